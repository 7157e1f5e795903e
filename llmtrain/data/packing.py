"""Padding-free batches of whole sequences: several short sequences share one row.

A reward model forwards every answer of a batch of rankings at once. Answers differ in length
(a prompt of 5 or 40 tokens, an answer that ended after 3 words or was cut at the limit), so
right padding to the longest wastes about 40% of the compute on the demo's rankings. Packing
puts sequences end to end in rows of `capacity` tokens (first-fit, longest first), restarts
the positions at 0 for each, and builds a block-diagonal causal mask so that no token sees
another sequence. Each sequence's outputs then equal those of an unpacked forward (to float
rounding: tests/unit/test_packing.py).

    batch = pack(seqs, capacity=128, pad_id=tok.pad_id)
    h = model(batch.ids, None, batch.mask, batch.positions)     # ScoreModel: (R, T, n_out)
    per_sequence = h[batch.end_rows, batch.end_cols]             # each sequence's last token

DPO packs the same way and sums each answer's token log-probs with `sequence_index()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    ids: torch.Tensor  # (R, T) token ids, padding after the last sequence of a row
    mask: torch.Tensor  # (R, 1, T, T) bool: query i sees key j (same sequence, j <= i)
    positions: torch.Tensor  # (R, T) position of each token within its own sequence
    end_rows: torch.Tensor  # (N,) row of sequence n's last token, in the order given
    end_cols: torch.Tensor  # (N,) column of that token
    lengths: torch.Tensor  # (N,) tokens of sequence n

    def to(self, device) -> Packed:
        return Packed(*(t.to(device) for t in (self.ids, self.mask, self.positions, self.end_rows, self.end_cols,
                                               self.lengths)))

    def layout(self, values: list[list[int]], fill: int) -> torch.Tensor:
        """Per-token values (one list per sequence, as long as it) placed like the ids: (R, T)."""
        out = torch.full(self.ids.shape, fill, dtype=torch.long)
        for v, r, c, n in zip(values, self.end_rows.tolist(), self.end_cols.tolist(), self.lengths.tolist()):
            if len(v) != n:
                raise ValueError(f"{len(v)} values for a sequence of {n} tokens")
            out[r, c - n + 1:c + 1] = torch.tensor(v, dtype=torch.long)
        return out.to(self.ids.device)

    def sequence_index(self) -> torch.Tensor:
        """(R, T): which sequence each token belongs to, -1 on padding."""
        return self.layout([[i] * n for i, n in enumerate(self.lengths.tolist())], -1)


def pack(seqs: list[list[int]], capacity: int, pad_id: int) -> Packed:
    """Rows of at most max(capacity, longest sequence) tokens; sequences are never split."""
    if not seqs or any(not s for s in seqs):
        raise ValueError("pack needs at least one sequence, and no empty one")
    cap = max(capacity, max(len(s) for s in seqs))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):  # first-fit decreasing
        n = len(seqs[i])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(cap)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    T = max(cap - free for free in room)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    end_rows, end_cols = [0] * len(seqs), [0] * len(seqs)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            n = len(seqs[i])
            ids[r, at:at + n] = torch.tensor(seqs[i])
            segment[r, at:at + n] = k
            positions[r, at:at + n] = torch.arange(n)
            end_rows[i], end_cols[i] = r, at + n - 1
            at += n
    col = torch.arange(T)
    causal = col[:, None] >= col[None, :]
    mask = (segment[:, :, None] == segment[:, None, :]) & causal[None]
    mask |= torch.eye(T, dtype=torch.bool)[None]  # a padding query sees itself only (no NaN); ignored
    return Packed(ids, mask[:, None], positions, torch.tensor(end_rows), torch.tensor(end_cols),
                  torch.tensor([len(s) for s in seqs]))
