"""Agreement between annotators who ranked the same prompt: pairwise agreement, Kendall's tau.

A ranking is tiers of candidate indices, best first. For each pair of candidates (i, j) it
says i > j, i < j, or a tie. Over the pairs both annotators ordered strictly:
    pairwise agreement = (concordant) / (concordant + discordant)
Kendall's tau-b over all pairs, with ties:
    tau_b = (C - D) / sqrt((n0 - t1) * (n0 - t2))
where n0 = K(K-1)/2, t1/t2 the pairs tied by each annotator.
"""
from __future__ import annotations

import itertools
import math


def rank_of(tiers: list[list[int]]) -> dict[int, int]:
    """candidate index -> tier number (0 best)."""
    return {c: t for t, tier in enumerate(tiers) for c in tier}


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Concordant, discordant and tied pair counts of two rankings of the same candidates."""
    ra, rb = rank_of(a), rank_of(b)
    c = d = ta = tb = 0
    for i, j in itertools.combinations(sorted(ra), 2):
        sa, sb = ra[i] - ra[j], rb[i] - rb[j]
        if sa == 0:
            ta += 1
        if sb == 0:
            tb += 1
        if sa and sb:
            if (sa > 0) == (sb > 0):
                c += 1
            else:
                d += 1
    n0 = len(ra) * (len(ra) - 1) // 2
    return {"concordant": c, "discordant": d, "ties_a": ta, "ties_b": tb, "pairs": n0}


def kendall_tau_b(a: list[list[int]], b: list[list[int]]) -> float:
    s = compare(a, b)
    denom = math.sqrt((s["pairs"] - s["ties_a"]) * (s["pairs"] - s["ties_b"]))
    return (s["concordant"] - s["discordant"]) / denom if denom else float("nan")


def summarize(judgements: list[dict]) -> dict:
    """Agreement per pair of annotators over the prompts both ranked (status 'ranked')."""
    by_prompt: dict[int, dict[str, list]] = {}
    for j in judgements:
        if j["status"] == "ranked":
            by_prompt.setdefault(j["prompt_id"], {})[j["annotator"]] = j["ranking"]
    pairs: dict[tuple[str, str], dict] = {}
    for rankings in by_prompt.values():
        for x, y in itertools.combinations(sorted(rankings), 2):
            s = compare(rankings[x], rankings[y])
            p = pairs.setdefault((x, y), {"prompts": 0, "concordant": 0, "discordant": 0, "taus": []})
            p["prompts"] += 1
            p["concordant"] += s["concordant"]
            p["discordant"] += s["discordant"]
            tau = kendall_tau_b(rankings[x], rankings[y])
            if not math.isnan(tau):
                p["taus"].append(tau)
    out = []
    for (x, y), p in sorted(pairs.items()):
        strict = p["concordant"] + p["discordant"]
        out.append({"a": x, "b": y, "shared_prompts": p["prompts"],
                    "pairwise_agreement": p["concordant"] / strict if strict else None,
                    "kendall_tau": sum(p["taus"]) / len(p["taus"]) if p["taus"] else None})
    return {"pairs": out}
