"""Every loss in one place, each a small pure function whose docstring states the formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the counted positions (mean, or sum with reduction="sum").

    L = -(1/N) * sum_{t: y_t != ignore} log softmax(z_t)[y_t],   N = #{t: y_t != ignore}

    logits (B, T, V) are scores z_t for the token after position t; targets (B, T) hold y_t.
    Computed in fp32 whatever the logits' dtype.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def pairwise_ranking_loss(r_better: torch.Tensor, r_worse: torch.Tensor, margin: torch.Tensor | float = 0.0,
                          reduction: str = "mean") -> torch.Tensor:
    """Reward-model loss on preference pairs (InstructGPT; Bradley-Terry):

    L = mean_pairs  -log sigmoid(r_better - r_worse - margin)

    computed as softplus(-(r_better - r_worse - margin)), which is the same and never overflows.
    """
    loss = F.softplus(-(r_better.float() - r_worse.float() - margin))
    return loss.sum() if reduction == "sum" else loss.mean()
