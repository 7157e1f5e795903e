"""Supervised fine-tuning data: JSONL conversations -> (ids, loss mask) -> length-bucketed batches.

Each JSONL line is one of
    {"prompt": "...", "response": "..."}                 (optionally "system": "...")
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
A malformed line is an error naming file, line and what is wrong; with skip_bad_lines it is
skipped and counted instead. Nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmtrain.data.jsonl import read_jsonl
from llmtrain.errors import DataError
from llmtrain.losses import IGNORE
from llmtrain.tokenizer import ROLES, Tokenizer, render_chat


@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    where: str  # file:line, for messages about this example


def parse_line(obj) -> list[dict]:
    """One JSON value -> a list of messages, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "messages" in obj and ("prompt" in obj or "response" in obj):
        raise ValueError("has both 'messages' and 'prompt'/'response': ambiguous, give one or the other")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"messages[{i}].content is not a string")
        out = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif "prompt" in obj or "response" in obj:
        for k in ("prompt", "response"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"'{k}' is missing or not a string")
        out = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
        if isinstance(obj.get("system"), str):
            out.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise ValueError("expected 'prompt' and 'response', or 'messages'")
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out


def read_conversations(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[tuple[str, list[dict]]], int]:
    return read_jsonl(path, parse_line, skip_bad_lines)


def encode(tok: Tokenizer, convs: list[tuple[str, list[dict]]], max_len: int) -> tuple[list[Example], int]:
    """Render each conversation; truncate to max_len + 1 tokens (inputs + the last target).
    Returns the examples and how many were dropped for having no response token left."""
    out, dropped = [], 0
    for where, msgs in convs:
        try:
            ids, mask = render_chat(tok, msgs)
        except DataError as e:  # a model's own template refused the conversation: say which line
            raise DataError(f"{where}: {e}") from None
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        out.append(Example(ids, mask, where))
    return out, dropped


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest; targets are the next token where the mask is 1, else IGNORE."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        m = torch.tensor(e.mask[1:], dtype=torch.bool)
        n = len(e.ids) - 1
        x[i, :n] = ids[:-1]
        y[i, :n] = torch.where(m, ids[1:], torch.full_like(ids[1:], IGNORE))
    return x, y


class LengthBatches:
    """Global batches of examples of similar length, drawn deterministically per step.

    Each epoch shuffles the examples (seeded by (seed, epoch)), sorts chunks of 50 global
    batches by length, cuts them into global batches and shuffles the batch order. A step's
    global batch (batch x grad_accum x world) is a function of (seed, step), and each
    (micro-step, rank) takes its own rows: resume, accumulation and DDP all see the same data.
    """

    def __init__(self, examples: list[Example], global_batch: int, seed: int):
        if len(examples) < global_batch:
            raise DataError(f"{len(examples)} training examples are fewer than one global batch of {global_batch}")
        self.examples, self.G, self.seed = examples, global_batch, seed
        self.per_epoch = len(examples) // global_batch
        self._epoch, self._order = -1, None

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        idx = rng.permutation(len(self.examples))
        chunk = 50 * self.G
        batches = []
        for s in range(0, self.per_epoch * self.G, chunk):
            part = sorted(idx[s:min(s + chunk, self.per_epoch * self.G)], key=lambda i: len(self.examples[i].ids))
            batches += [part[j:j + self.G] for j in range(0, len(part), self.G)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def global_batch(self, step: int) -> list[Example]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._plan(epoch)
        return [self.examples[i] for i in self._order[k]]

    def rows(self, step: int, batch_size: int, micro: int = 0, rank: int = 0, world: int = 1) -> list[Example]:
        first = (micro * world + rank) * batch_size
        return self.global_batch(step)[first:first + batch_size]

    def target_tokens(self, step: int) -> int:
        """Loss tokens in the whole global batch of `step` (the denominator of the step's loss)."""
        return sum(sum(e.mask[1:]) for e in self.global_batch(step))
