"""A simulated annotator, for the demo and tests only: ranks pending prompts by a stated,
scripted preference, through the same `FeedbackStore.submit` as a person's form, and votes in
the blind arena (`arena_simulate`) through the same `FeedbackStore.arena_vote` as the arena
page. Its annotator is marked simulated, and so is every ranking and vote, in the export too.

Rules (in llmtrain/styles.py, each stated in one sentence in styles.RULE_TEXT; score each
candidate, higher is better, equal scores tie):
    aristocrat   the demo's: takes up the question's subject, in the aristocratic voice, ends
                 by itself within 30 words: 3 x (share of the question's content words taken up)
                 + 1 if it shows the style + 1 if it ended by itself - 0.1 x (words beyond 30)
    markers      the earlier demo rule: 2 x (marker phrases, at most 3) + 1 if ended + ...
    length       - (number of words): shorter is better
    relevance    share of the prompt's content words the answer repeats
"""
from __future__ import annotations

from llmtrain.feedback.arena_store import arena_sides
from llmtrain.feedback.store import FeedbackStore
from llmtrain.styles import RULES


def rank(rule: str, prompt: str, candidates: list[dict]) -> list[list[int]]:
    """Tiers of candidate indices, best first; equal scores share a tier."""
    scores = [round(RULES[rule](prompt, c), 6) for c in candidates]
    tiers: dict[float, list[int]] = {}
    for i, s in enumerate(scores):
        tiers.setdefault(s, []).append(i)
    return [tiers[s] for s in sorted(tiers, reverse=True)]


def simulate(store: FeedbackStore, rule: str, name: str = "", limit: int = 0, redo: bool = False) -> dict:
    """Rank every prompt this simulated annotator has not judged yet (at most `limit`); with
    `redo`, first rank again the prompts it has judged (the rule's code may have changed since:
    a rerun of the pipeline's rankings stage must not keep rankings by an earlier rule)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    annotator = store.ensure_annotator(name or f"sim-{rule}", simulated=True)
    if not annotator.simulated:
        raise ValueError(f"annotator {annotator.name!r} is a person, not a simulated annotator")
    done = ties = redone = 0
    if redo:
        for j in store.judgements(annotator):
            p = store.prompt(j["prompt_id"])
            tiers = rank(rule, p["prompt"], p["candidates"])
            if j["status"] != "ranked" or j["ranking"] != tiers:
                store.change(annotator, j["prompt_id"], "ranked", tiers)
                redone += 1
    while limit == 0 or done < limit:
        pid = store.next_prompt(annotator)
        if pid is None:
            break
        p = store.prompt(pid)
        tiers = rank(rule, p["prompt"], p["candidates"])
        store.submit(annotator, pid, "ranked", tiers, f"sim-{annotator.name}-{pid}")
        done += 1
        ties += len(tiers) == 1  # all equal: a valid ranking that gives no preference pair
    return {"annotator": annotator.name, "ranked": done, "all_equal": ties, **({"changed": redone} if redo else {})}


def arena_choice(rule: str, prompt: str, a: dict, b: dict) -> str:
    """A simulated voter's vote on answers A and B ({"text", "finished"}; it never sees the models'
    names): the one the rule scores higher, "tie" when the scores are equal. The raw scores are
    compared, as evaluate's win rate compares them; a rule never says "both bad"."""
    sa, sb = RULES[rule](prompt, a), RULES[rule](prompt, b)
    return "a" if sa > sb else "b" if sb > sa else "tie"


def arena_simulate(store: FeedbackStore, rule: str, name: str = "", limit: int = 0) -> dict:
    """Vote on every arena match this simulated voter has not voted on (at most `limit`), by the
    rule, through the same `FeedbackStore.arena_vote` as the arena page, with the sides drawn for
    this voter. Its annotator is marked simulated, and so is every vote it casts."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    annotator = store.ensure_annotator(name or f"sim-{rule}", simulated=True)
    if not annotator.simulated:
        raise ValueError(f"annotator {annotator.name!r} is a person, not a simulated annotator")
    counts = dict.fromkeys(("a", "b", "tie"), 0)
    while limit == 0 or sum(counts.values()) < limit:
        mid = store.arena_next(annotator)
        if mid is None:
            break
        m = store.arena_match(mid)
        a, b = arena_sides(annotator.id, m["prompt_id"], m["x"]["id"], m["y"]["id"])
        side = {m["x"]["id"]: m["x"], m["y"]["id"]: m["y"]}
        vote = arena_choice(rule, m["prompt"], *({"text": side[i]["text"], "finished": side[i]["finished"]} for i in (a, b)))
        store.arena_vote(annotator, mid, m["prompt_id"], vote, f"sim-{annotator.name}-arena-{mid}")
        counts[vote] += 1
    return {"annotator": annotator.name, "voted": sum(counts.values()), **counts}
