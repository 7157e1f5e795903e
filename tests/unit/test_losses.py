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
