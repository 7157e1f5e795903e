"""rankings.jsonl out of and into the feedback database (format: llmtrain/data/preference.py),
and the arena's votes out as rankings of two answers (`export_arena`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmtrain.data.preference import Ranking, ranks_from_tiers, read_rankings
from llmtrain.errors import DataError
from llmtrain.feedback.store import FeedbackStore, StoreError
from llmtrain.files import write_file


def export(store: FeedbackStore, out: str | Path, include_simulated: bool = True, only_simulated: str = "") -> dict:
    """Write one line per (prompt, annotator) judgement that ranks (skips are left out); with
    `only_simulated`, of the simulated annotators only that one (people's rankings are always
    kept). Written to a temporary file and renamed: a reader never sees half a file."""
    counts = {"ranked": 0, "all_bad": 0, "skipped": 0, "simulated": 0}
    lines = []
    cache: dict[int, dict] = {}
    for j in store.judgements():
        counts[j["status"]] += 1
        if j["status"] == "skipped" or (j["simulated"] and not include_simulated) or \
                (only_simulated and j["simulated"] and j["annotator"] != only_simulated):
            continue
        p = cache.get(j["prompt_id"]) or cache.setdefault(j["prompt_id"], store.prompt(j["prompt_id"]))
        texts = [c["text"] for c in p["candidates"]]
        done = [c["finished"] for c in p["candidates"]]
        if j["status"] == "ranked":
            order, ranks = ranks_from_tiers(j["ranking"])
        else:
            order, ranks = list(range(len(texts))), [1] * len(texts)
        counts["simulated"] += int(j["simulated"])
        r = Ranking(p["messages"], [texts[i] for i in order], ranks, None,
                    None if all(done) else [done[i] for i in order], j["status"], j["annotator"], j["simulated"],
                    {"db": str(Path(store.path).name), "prompt_id": p["id"], "candidate_ids": order,
                     "generation": store.generation(p["generation_id"]) if p["generation_id"] else {},
                     "imported": j["imported"]})
        lines.append(_one_line(json.dumps(r.to_json(), ensure_ascii=False)))
    _write_lines(out, lines)
    counts["exported"] = len(lines)
    return counts


def export_arena(store: FeedbackStore, out: str | Path, include_simulated: bool = True) -> dict:
    """Write each arena vote as a ranking of K=2 (the two answers of its match), marked
    `"source": {"kind": "arena", ...}` and simulated when its voter is:
        A or B better   the winner rank 1, the loser rank 2: one preference pair
        tie             both rank 1, status "ranked": one tier of two, no pair
        both bad        both rank 1, status "all_bad": not a preference (the reward model and
                        DPO keep only status "ranked" with a pair, so both are read and left out)
    Written to a temporary file and renamed: a reader never sees half a file."""
    counts = {"votes": 0, "preferences": 0, "ties": 0, "both_bad": 0, "simulated": 0}
    lines = []
    matches: dict[int, dict] = {}
    gens: dict[int, dict] = {}
    for v in store.arena_votes():
        if v["simulated"] and not include_simulated:
            continue
        m = matches.get(v["match_id"]) or matches.setdefault(v["match_id"], store.arena_match(v["match_id"]))
        side = {m["x"]["id"]: m["x"], m["y"]["id"]: m["y"]}
        order = [v["b_id"], v["a_id"]] if v["vote"] == "b" else [v["a_id"], v["b_id"]]
        ranks = [1, 2] if v["vote"] in ("a", "b") else [1, 1]
        done = [side[i]["finished"] for i in order]
        gen = gens[m["prompt_id"]] if m["prompt_id"] in gens else gens.setdefault(m["prompt_id"], store.arena_generation(m["prompt_id"]))
        r = Ranking(m["messages"], [side[i]["text"] for i in order], ranks, None, None if all(done) else done,
                    "all_bad" if v["vote"] == "both_bad" else "ranked", v["annotator"], v["simulated"],
                    {"kind": "arena", "db": Path(store.path).name, "match_id": m["id"], "prompt_id": m["prompt_id"],
                     "models": [side[i]["name"] for i in order], "vote": v["vote"],
                     "sides": {"A": v["a"], "B": v["b"]}, "generation": gen})
        lines.append(_one_line(json.dumps(r.to_json(), ensure_ascii=False)))
        counts["votes"] += 1
        counts["simulated"] += int(v["simulated"])
        counts[{"a": "preferences", "b": "preferences", "tie": "ties", "both_bad": "both_bad"}[v["vote"]]] += 1
    _write_lines(out, lines)
    return counts


def _write_lines(out: str | Path, lines: list[str]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, "".join(l + "\n" for l in lines))


def read_import(path: str | Path) -> list[Ranking]:
    """read_rankings: a malformed line, or text that is not valid Unicode (a lone surrogate,
    which JSON allows and SQLite cannot store), is a DataError naming FILE:LINE and the field
    (the JSONL reader checks every string of a line)."""
    rankings, _ = read_rankings(path)
    return rankings


def import_rankings(store: FeedbackStore, path: str | Path) -> dict:
    """Load rankings made elsewhere (same format) into the store; importing twice adds nothing.
    All or nothing: the whole file is one transaction, and a line the store refuses is an
    error naming the file and line, with nothing of the file written."""
    rankings = read_import(path)  # a malformed line is a DataError naming FILE:LINE, before any write
    added = dup = 0
    with store.transaction():
        known = {}  # (messages, sorted candidate texts) -> prompt id, read once
        for pid in store.prompt_ids():
            p = store.prompt(pid)
            known[_prompt_key(p["messages"], [c["text"] for c in p["candidates"]])] = pid
        for r in rankings:
            try:
                ok = _import_one(store, r, known)
            except StoreError as e:
                raise DataError(f"{r.where}: {e}") from None  # leaving the transaction rolls the file back
            added += ok
            dup += not ok
    return {"read": len(rankings), "added": added, "already_there": dup}


def _import_one(store: FeedbackStore, r: Ranking, known: dict) -> bool:
    key = hashlib.sha256(json.dumps([r.messages, sorted(r.texts), r.annotator]).encode()).hexdigest()[:32]
    pk = _prompt_key(r.messages, r.texts)
    if pk not in known:
        known[pk] = store.add_prompt(r.prompt, [{"text": t, "finished": f} for t, f in zip(r.texts, r.finished_flags)],
                                     messages=r.messages)
    pid = known[pk]
    p = store.prompt(pid)
    index: dict[str, list[int]] = {}  # text -> candidate indices (two answers may read the same)
    for c in p["candidates"]:
        index.setdefault(c["text"], []).append(c["idx"])
    tiers: dict[int, list[int]] = {}
    for t, rank in zip(r.texts, r.ranks):
        tiers.setdefault(rank, []).append(index[t].pop(0))
    annotator = store.ensure_annotator(r.annotator or "imported", simulated=r.simulated)
    ranking = [tiers[k] for k in sorted(tiers)] if r.status == "ranked" else None
    return store.submit(annotator, pid, r.status, ranking, f"import-{key}", imported=True)


def _one_line(line: str) -> str:
    """Escape the characters JSON leaves raw that some readers take for line breaks (str.splitlines,
    editors): a line of model text stays one line everywhere. They occur only inside strings."""
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _prompt_key(messages: list[dict], texts: list[str]) -> str:
    return json.dumps([messages, sorted(texts)])
