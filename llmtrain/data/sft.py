"""Supervised fine-tuning data: JSONL conversations -> (ids, loss mask) -> length-bucketed batches.

Each record (a JSONL line, or a row of any source data/sources.py reads) is one of
    {"prompt": "...", "response": "..."}                 (optionally "system": "...")
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": ..., "completion": ...}                   TRL's prompt-completion: each a string
                                                         or a message list (optionally "system")
Every assistant turn is learned (the loss mask of render_chat), so assistant turns inside a
prompt list are learned too, as they are in `messages`.
A malformed line is an error naming file, line and what is wrong; with skip_bad_lines it is
skipped and counted instead. Nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmtrain.data.formats import check_messages, turns
from llmtrain.data.sources import read_records
from llmtrain.errors import DataError
from llmtrain.losses import IGNORE
from llmtrain.tokenizer import Tokenizer, render_chat


@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    where: str  # file:line, for messages about this example


def parse_line(obj) -> list[dict]:
    """One record -> a list of messages, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "messages" in obj and ("prompt" in obj or "response" in obj):
        raise ValueError("has both 'messages' and 'prompt'/'response': ambiguous, give one or the other")
    if "completion" in obj and ("messages" in obj or "response" in obj):
        raise ValueError("has 'completion' beside 'messages' or 'response': ambiguous, give one format")
    if "messages" in obj:
        out = check_messages(obj["messages"], "messages")
    elif "completion" in obj:  # TRL's prompt-completion, standard (strings) or conversational (lists)
        out = turns(obj.get("prompt"), "prompt", "user") + turns(obj["completion"], "completion", "assistant")
    elif "prompt" in obj or "response" in obj:
        for k in ("prompt", "response"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"'{k}' is missing or not a string")
        out = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise ValueError("expected 'prompt' and 'response', 'prompt' and 'completion', or 'messages'")
    if isinstance(obj.get("system"), str) and isinstance(obj.get("prompt"), str):
        out.insert(0, {"role": "system", "content": obj["system"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out


def read_conversations(path: str | Path, skip_bad_lines: bool = False,
                       columns: dict | None = None) -> tuple[list[tuple[str, list[dict]]], int]:
    """Conversations from any source data/sources.py reads (JSONL, JSON, Parquet, CSV, a folder,
    a saved or Hub dataset), `columns` mapping our field names to the source's."""
    return read_records(path, parse_line, skip_bad_lines=skip_bad_lines, columns=columns)


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
