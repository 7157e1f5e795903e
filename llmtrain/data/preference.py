"""Rankings of K candidate answers per prompt (`rankings.jsonl`): the format the feedback app
exports and the reward-model and DPO stages read.

One line per (prompt, annotator):
    {"prompt": "...", "messages": [...chat before the answer...],
     "ranked": [{"text": "...", "rank": 1}, {"text": "...", "rank": 2, "finished": false}, ...],
     "status": "ranked" | "all_bad", "annotator": "alice", "simulated": false, "source": {...}}
`ranked` is best first; equal ranks are ties. "all_bad" marks a prompt whose every answer the
annotator found unacceptable (all ranks equal: it yields no preference pair). Optional per
answer: "score" (a rating: margins and gap filters) and "finished" (default true; false for an
answer cut off at the token limit, which the reward model and DPO then read without <|end|>).

Published pairs are read too, as rankings of K=2 (chosen rank 1, rejected rank 2) whose
`source` says {"format": "prompt-chosen-rejected" | "chosen-rejected" | "hh-rlhf"}: TRL's and
UltraFeedback binarized's prompt/chosen/rejected (strings or message lists; UltraFeedback's
score_chosen/score_rejected become the scores), and Anthropic HH-RLHF's chosen/rejected
transcripts (data/formats.py). Any source data/sources.py reads: JSONL, JSON, Parquet, CSV,
a folder, a saved or Hub dataset.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmtrain.data.formats import last_user, preference_pair
from llmtrain.data.sources import read_records
from llmtrain.errors import DataError
from llmtrain.tokenizer import ROLES


@dataclass
class Ranking:
    messages: list[dict]  # the conversation the candidates answer (ends with a user turn)
    texts: list[str]  # candidates, best first
    ranks: list[int]  # rank of each, 1 = best; equal = tie
    scores: list[float] | None = None  # optional ratings (e.g. 1-10): margins and gap filters
    finished: list[bool] | None = None  # optional: False for an answer cut off at the token limit
    status: str = "ranked"
    annotator: str = ""
    simulated: bool = False
    source: dict = field(default_factory=dict)
    where: str = ""

    @property
    def finished_flags(self) -> list[bool]:
        return self.finished if self.finished is not None else [True] * len(self.texts)

    @property
    def prompt(self) -> str:
        return last_user(self.messages)

    def pairs(self, min_score_gap: float = 0.0) -> list[tuple[int, int]]:
        """All (better, worse) index pairs with a strict preference: C(K,2) minus ties, minus
        pairs of the same text (a person may rank two identical candidates apart; "a beats a"
        is no preference, and the export must stay importable), and minus pairs whose scores
        differ by less than `min_score_gap` (when scores are given)."""
        out = []
        for i in range(len(self.texts)):
            for j in range(len(self.texts)):
                if self.ranks[i] < self.ranks[j] and self.texts[i] != self.texts[j]:
                    if min_score_gap and self.scores is not None and self.scores[i] - self.scores[j] < min_score_gap:
                        continue
                    out.append((i, j))
        return out

    def to_json(self) -> dict:
        ranked = [{"text": t, "rank": r} for t, r in zip(self.texts, self.ranks)]
        if self.scores is not None:
            for c, sc in zip(ranked, self.scores):
                c["score"] = sc
        if self.finished is not None:
            for c, f in zip(ranked, self.finished):
                c["finished"] = f
        return {"prompt": self.prompt, "messages": self.messages, "ranked": ranked,
                "status": self.status, "annotator": self.annotator, "simulated": self.simulated, "source": self.source}


def parse_line(obj) -> Ranking:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "chosen" in obj or "rejected" in obj:
        if "ranked" in obj:
            raise ValueError("has both 'ranked' and 'chosen'/'rejected': ambiguous, give one format")
        msgs, texts, scores, fmt = preference_pair(obj)
        return Ranking(msgs, texts, [1, 2], scores, source={"format": fmt})
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
    texts, ranks, scores, finished = [], [], [], []
    for i, c in enumerate(ranked):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise ValueError(f"ranked[{i}].text is missing or not a string")
        r = c.get("rank")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranked[{i}].rank must be an integer >= 1")
        sc = c.get("score")
        if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float))):
            raise ValueError(f"ranked[{i}].score must be a number")
        f = c.get("finished", True)
        if not isinstance(f, bool):
            raise ValueError(f"ranked[{i}].finished must be true or false")
        finished.append(f)
        texts.append(c["text"])
        ranks.append(r)
        scores.append(sc)
    if ranks != sorted(ranks):
        raise ValueError("'ranked' must be listed best first (ranks ascending)")
    status = obj.get("status", "ranked")
    if status not in ("ranked", "all_bad"):
        raise ValueError(f"status {status!r} is not 'ranked' or 'all_bad'")
    if any(x is None for x in scores):
        scores = None
    return Ranking(msgs, texts, ranks, scores, None if all(finished) else finished, status, str(obj.get("annotator", "")), bool(obj.get("simulated", False)),
                   obj.get("source") if isinstance(obj.get("source"), dict) else {})


def read_rankings(path: str | Path, skip_bad_lines: bool = False,
                  columns: dict | None = None) -> tuple[list[Ranking], int]:
    """Rankings from any source data/sources.py reads; `columns` maps our field names to its own."""
    items, skipped = read_records(path, parse_line, skip_bad_lines=skip_bad_lines, columns=columns)
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


def prompt_key(messages: list[dict]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def split_by_prompt(rankings: list[Ranking], val_every: int) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out whole prompts: a prompt is held out when the hash of its conversation is 0
    mod val_every. Every ranking of a prompt (all annotators) falls on the same side, and the
    split does not depend on the order of the file."""
    train, val = [], []
    for r in rankings:
        (val if int(prompt_key(r.messages), 16) % val_every == 0 else train).append(r)
    return train, val


class RankingBatches:
    """Global batches of whole rankings (prompts), one permutation per epoch seeded by (seed, epoch)."""

    def __init__(self, rankings: list[Ranking], global_batch: int, seed: int, min_gap: float):
        if len(rankings) < global_batch:
            raise DataError(f"{len(rankings)} training prompts are fewer than one global batch of {global_batch}")
        self.r, self.G, self.seed, self.min_gap = rankings, global_batch, seed, min_gap
        self.per_epoch = len(rankings) // global_batch

    def global_batch(self, step: int) -> list[Ranking]:
        epoch, k = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.r))
        return [self.r[i] for i in order[k * self.G:(k + 1) * self.G]]

    def rows(self, step: int, batch_size: int, micro: int, rank: int, world: int) -> list[Ranking]:
        first = (micro * world + rank) * batch_size
        return self.global_batch(step)[first:first + batch_size]

    def n_pairs(self, step: int) -> int:
        return sum(len(r.pairs(self.min_gap)) for r in self.global_batch(step))


def pair_tensors(rankings: list[Ranking], starts: list[int], min_gap: float, margin_scale: float, device):
    """Indices (into the reward vector) of better and worse answers of every pair, and margins."""
    better, worse, margins = [], [], []
    for r, s in zip(rankings, starts):
        for i, j in r.pairs(min_gap):
            better.append(s + i)
            worse.append(s + j)
            gap = (r.scores[i] - r.scores[j]) if (r.scores is not None and margin_scale) else 0.0
            margins.append(margin_scale * gap)
    t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)
    return t(better, torch.long), t(worse, torch.long), t(margins, torch.float32)


def load_pairs_data(data) -> tuple[list[Ranking], list[Ranking], dict]:
    """Read a RewardDataConfig's rankings, split them by prompt (or read `val`), and keep the
    rankings that give at least one pair. Returns (train, held-out, counts for the log)."""
    columns = data.columns
    rankings, skipped = read_rankings(data.train, data.skip_bad_lines, columns)
    if data.val:
        train_r = rankings
        val_r, more = read_rankings(data.val, data.skip_bad_lines, columns)
        skipped += more
    else:
        train_r, val_r = split_by_prompt(rankings, data.val_every)
    n_read = len(train_r) + len(val_r)

    def keep(rs: list[Ranking]) -> list[Ranking]:
        return [r for r in rs if r.status == "ranked" and (data.include_simulated or not r.simulated)
                and r.pairs(data.min_score_gap)]

    train_r, val_r = keep(train_r), keep(val_r)
    if not val_r:
        raise DataError(f"{data.train}: no held-out prompt has a preference pair (lower data.val_every)")
    return train_r, val_r, {"skipped_lines": skipped, "without_pairs": n_read - len(train_r) - len(val_r)}
