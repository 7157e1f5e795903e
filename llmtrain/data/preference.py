"""Rankings of K candidate answers per prompt (`rankings.jsonl`): the format the feedback app
exports and the reward-model and DPO stages read.

One line per (prompt, annotator):
    {"prompt": "...", "messages": [...chat before the answer...],
     "ranked": [{"text": "...", "rank": 1}, {"text": "...", "rank": 2}, {"text": "...", "rank": 2}],
     "status": "ranked" | "all_bad", "annotator": "alice", "simulated": false, "source": {...}}
`ranked` is best first; equal ranks are ties. "all_bad" marks a prompt whose every answer the
annotator found unacceptable (all ranks equal: it yields no preference pair).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.data.sft import read_jsonl
from llmtrain.tokenizer import ROLES


@dataclass
class Ranking:
    messages: list[dict]  # the conversation the candidates answer (ends with a user turn)
    texts: list[str]  # candidates, best first
    ranks: list[int]  # rank of each, 1 = best; equal = tie
    status: str = "ranked"
    annotator: str = ""
    simulated: bool = False
    source: dict = field(default_factory=dict)
    where: str = ""

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs with a strict preference: C(K,2) minus ties."""
        return [(i, j) for i in range(len(self.texts)) for j in range(len(self.texts)) if self.ranks[i] < self.ranks[j]]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "messages": self.messages,
                "ranked": [{"text": t, "rank": r} for t, r in zip(self.texts, self.ranks)],
                "status": self.status, "annotator": self.annotator, "simulated": self.simulated, "source": self.source}


def parse_line(obj) -> Ranking:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    msgs = obj.get("messages")
    if msgs is None:
        if not isinstance(obj.get("prompt"), str):
            raise ValueError("'prompt' (or 'messages') is missing or not a string")
        msgs = [{"role": "user", "content": obj["prompt"]}]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
        raise ValueError("'messages' must be a list of {role, content} objects")
    ranked = obj.get("ranked")
    if not isinstance(ranked, list) or len(ranked) < 2:
        raise ValueError("'ranked' must list at least 2 candidates")
    texts, ranks = [], []
    for i, c in enumerate(ranked):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise ValueError(f"ranked[{i}].text is missing or not a string")
        r = c.get("rank")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranked[{i}].rank must be an integer >= 1")
        texts.append(c["text"])
        ranks.append(r)
    if ranks != sorted(ranks):
        raise ValueError("'ranked' must be listed best first (ranks ascending)")
    status = obj.get("status", "ranked")
    if status not in ("ranked", "all_bad"):
        raise ValueError(f"status {status!r} is not 'ranked' or 'all_bad'")
    return Ranking(msgs, texts, ranks, status, str(obj.get("annotator", "")), bool(obj.get("simulated", False)),
                   obj.get("source") if isinstance(obj.get("source"), dict) else {})


def read_rankings(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[Ranking], int]:
    items, skipped = read_jsonl(path, parse_line, skip_bad_lines)
    out = []
    for where, r in items:
        r.where = where
        out.append(r)
    return out, skipped


def ranks_from_tiers(tiers: list[list[int]]) -> tuple[list[int], list[int]]:
    """Tiers of candidate indices (best first) -> (candidate order, competition ranks 1,2,2,4)."""
    order, ranks, r = [], [], 1
    for tier in tiers:
        order += tier
        ranks += [r] * len(tier)
        r += len(tier)
    return order, ranks
