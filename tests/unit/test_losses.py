import math

import pytest
import torch

from llmtrain.config import OptimConfig
from llmtrain.losses import IGNORE, lm_loss
from llmtrain.training import lr_at


def test_lm_loss_hand_worked():
    # Two positions, vocabulary of 3.
    # position 0: logits (0, 0, 0), target 1  -> -log(1/3) = ln 3
    # position 1: logits (ln 4, 0, 0), target 0 -> -log(4/6) = ln 1.5
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(4), 0.0, 0.0]]])
    targets = torch.tensor([[1, 0]])
    assert lm_loss(logits, targets).item() == pytest.approx((math.log(3) + math.log(1.5)) / 2, abs=1e-7)
    # An ignored position drops out of the mean.
    assert lm_loss(logits, torch.tensor([[1, IGNORE]])).item() == pytest.approx(math.log(3), abs=1e-7)


def test_lr_schedule_hand_worked():
    c = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, c, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c, 14) == pytest.approx(1.0)
    assert lr_at(9, c, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(14, c, 14) == pytest.approx(0.1)


def test_pairwise_ranking_loss_hand_worked_k3():
    from llmtrain.data.preference import Ranking
    from llmtrain.losses import pairwise_ranking_loss

    # K = 3 answers ranked 1, 2, 3 with rewards 2, 1, 0: C(3,2) = 3 pairs, reward gaps 1, 2, 1.
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(2) = log(1 + e^-2) = 0.1269280
    r = Ranking([{"role": "user", "content": "q"}], ["a", "b", "c"], [1, 2, 3])
    pairs = r.pairs()
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    rewards = torch.tensor([2.0, 1.0, 0.0])
    b, w = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    expect = (2 * 0.3132617 + 0.1269280) / 3
    assert pairwise_ranking_loss(rewards[b], rewards[w]).item() == pytest.approx(expect, abs=1e-6)
    # A tie between b and c removes the pair (1, 2); a margin of 1 on every pair shifts each gap.
    tied = Ranking(r.messages, r.texts, [1, 2, 2])
    assert tied.pairs() == [(0, 1), (0, 2)]
    assert pairwise_ranking_loss(rewards[b], rewards[w], margin=1.0).item() == pytest.approx(
        (2 * math.log(2) + 0.3132617) / 3, abs=1e-6)
