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


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over response tokens; returns (loss, clip fraction).

    ratio = exp(log pi - log pi_old)
    L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    m = mask.to(logp.dtype)
    loss = (torch.maximum(unclipped, clipped) * m).sum() / m.sum().clamp(min=1)
    clipfrac = ((clipped > unclipped).to(logp.dtype) * m).sum() / m.sum().clamp(min=1)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss, averaged over response tokens:

    V_clip = V_old + clip(V - V_old, -eps, eps)
    L = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    """
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    m = mask.to(values.dtype)
    worst = torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
    return 0.5 * (worst * m).sum() / m.sum().clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023), on summed response log-probs:

    r_chosen = beta (log pi(y_w|x) - log pi_ref(y_w|x)),  r_rejected likewise for y_l
    L = mean -log sigmoid(r_chosen - r_rejected)
    Returns (loss, r_chosen, r_rejected); the implicit rewards give accuracy and margins.
    """
    r_c = beta * (policy_chosen - ref_chosen)
    r_r = beta * (policy_rejected - ref_rejected)
    return F.softplus(-(r_c - r_r)).mean(), r_c.detach(), r_r.detach()
