"""Labelled texts for the classification head: records {"text": ..., "label": ...} (JSONL lines,
or rows of any source data/sources.py reads).

Labels are named in the data; they are mapped to ids in sorted order and the list is saved
with the checkpoint, so predictions come back as names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain.data.sources import read_records
from llmtrain.tokenizer import Tokenizer


@dataclass
class LabelledText:
    ids: list[int]
    label: int
    where: str


def parse_line(obj) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if not isinstance(obj.get("text"), str):
        raise ValueError("'text' is missing or not a string")
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError("'label' is missing or not a string/integer")
    return obj["text"], str(label)


def read(path: str | Path, skip_bad_lines: bool = False, columns: dict | None = None):
    """(where, (text, label)) from any source data/sources.py reads; `columns` maps text/label."""
    return read_records(path, parse_line, skip_bad_lines=skip_bad_lines, columns=columns)


def encode_text(tok: Tokenizer, text: str, max_len: int) -> list[int]:
    """<|bos|> text <|eos|>, cut to max_len keeping the final <|eos|> the head reads."""
    ids = tok.encode(text)[: max_len - 2]
    return [tok.bos_id, *ids, tok.eos_id]


def encode(tok: Tokenizer, items, labels: list[str], max_len: int) -> list[LabelledText]:
    index = {name: i for i, name in enumerate(labels)}
    return [LabelledText(encode_text(tok, text, max_len), index[label], where) for where, (text, label) in items]


def collate(rows: list[LabelledText] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> ids (B, T) and lengths (B,)."""
    seqs = [r.ids if isinstance(r, LabelledText) else r for r in rows]
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) for s in seqs])
