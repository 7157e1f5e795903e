"""Packed (padding-free) batches give each sequence exactly what an unpadded forward gives."""

import pytest
import torch

from llmtrain.config import ModelConfig
from llmtrain.data.packing import pack
from llmtrain.model.heads import ScoreModel


def test_pack_places_every_sequence_once_with_its_own_positions():
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11], [12, 13, 14, 15]]
    b = pack(seqs, capacity=6, pad_id=0)
    assert b.ids.shape == (3, 6)  # 15 tokens: first-fit decreasing needs 3 rows of 6
    for s, r, c in zip(seqs, b.end_rows.tolist(), b.end_cols.tolist()):
        n = len(s)
        assert b.ids[r, c - n + 1:c + 1].tolist() == s
        assert b.positions[r, c - n + 1:c + 1].tolist() == list(range(n))
        # Its tokens see only themselves and earlier tokens of the same sequence.
        seen = b.mask[r, 0, c].nonzero().flatten().tolist()
        assert seen == list(range(c - n + 1, c + 1))
    assert b.ids.numel() - sum(map(len, seqs)) == 3  # padding left over, against 5 x 5 - 15 = 10 when padded


def test_a_sequence_longer_than_the_capacity_gets_a_row_of_its_own():
    b = pack([[1] * 9, [2, 2]], capacity=4, pad_id=0)
    assert b.ids.shape[1] == 9 and b.end_cols.tolist()[0] == 8
    with pytest.raises(ValueError, match="empty"):
        pack([[1], []], 4, 0)


def test_packed_scores_equal_one_sequence_at_a_time():
    torch.manual_seed(0)
    model = ScoreModel(ModelConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                   init_std=0.2), 1).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 60, (n,), generator=g).tolist() for n in (7, 3, 12, 1, 9, 5, 16)]
    b = pack(seqs, capacity=20, pad_id=0)
    assert b.ids.shape[0] < len(seqs)  # sequences really share rows
    with torch.no_grad():
        packed = model(b.ids, None, b.mask, b.positions)[b.end_rows, b.end_cols, 0]
        alone = torch.stack([model(torch.tensor([s]), torch.tensor([len(s)]))[0, 0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_layout_places_per_token_values_like_the_ids():
    seqs = [[5, 6, 7], [8], [9, 10]]
    b = pack(seqs, capacity=4, pad_id=0)
    labels = b.layout([[1, 2, 3], [4], [5, 6]], fill=-100)
    for s, lab in zip(seqs, ([1, 2, 3], [4], [5, 6])):
        assert labels[b.ids == s[0]].tolist() == [lab[0]]
    idx = b.sequence_index()
    assert sorted(idx[idx >= 0].tolist()) == [0, 0, 0, 1, 2, 2]
    assert (b.ids[idx < 0] == 0).all()
    with pytest.raises(ValueError, match="2 values for a sequence of 3"):
        b.layout([[1, 2], [4], [5, 6]], 0)
