"""The small pieces of RLHF: log-probs of sequences, masked statistics, KL penalty, GAE, and
the KL coefficient controllers. Pure functions on tensors (the controller holds one float).

Layout used by PPO: a batch row is [left padding | prompt | response | right padding];
`mask` marks the response tokens (B, T-1), aligned with the *targets* of the logits, i.e.
logprobs[:, t] is log p(token t+1 | tokens <= t).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def rollout_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """[left pad | prompt | answer | right pad] rows -> ids, attention mask, position ids, and
    the answer mask over log-prob targets (B, T-1): 1 where the target token is an answer token."""
    Lp = max(len(p) for p in prompts)
    La = max(1, max(len(a) for a in answers))
    B = len(prompts)
    ids = torch.full((B, Lp + La), pad_id, dtype=torch.long)
    mask = torch.zeros((B, Lp + La), dtype=torch.long)
    amask = torch.zeros((B, Lp + La - 1), dtype=torch.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, Lp - len(p):Lp] = torch.tensor(p, dtype=torch.long)
        mask[i, Lp - len(p):Lp + len(a)] = 1
        if a:
            ids[i, Lp:Lp + len(a)] = torch.tensor(a, dtype=torch.long)
            amask[i, Lp - 1:Lp - 1 + len(a)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, amask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) at positions 0..T-1 and tokens (B, T) -> log p(tokens[:, t+1]) (B, T-1)."""
    return answer_logprobs(logits[:, :-1], tokens, 0)


def answer_logprobs(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """logits (B, A, V) at positions start..start+A-1 (the word head run on a span only) and the
    rows' tokens (B, T) -> log p(tokens[:, start+1+a]) (B, A), in fp32."""
    return _at_tokens(F.log_softmax(logits.float(), dim=-1), tokens, start)


def answer_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                                start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`answer_logprobs`, and the entropy of each position's next-token distribution (B, A)
    (no gradient), from one log-softmax over the vocabulary (PPO's old pass)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    lp = logp.detach()
    return _at_tokens(logp, tokens, start), -(lp.exp() * lp).sum(-1)


def _at_tokens(logp: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """log-probs (B, A, V) at positions start.. -> those of the tokens that follow (B, A)."""
    A = logp.shape[1]
    return logp.gather(-1, tokens[:, start + 1:start + 1 + A, None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries. With `all_reduce_sum` (summing a
    tensor over processes) they are those of the masked entries of *all* processes, from
    all-reduced sums (count and sum, then squared deviations from the global mean), so the
    result does not depend on how many processes share the batch."""
    m = mask.to(x.dtype)
    reduce = all_reduce_sum or (lambda t: t)
    n, total = reduce(torch.stack([m.sum(), (x * m).sum()])).unbind()
    mean = total / n.clamp(min=1)
    var = reduce(((x - mean) ** 2 * m).sum()) / (n - 1).clamp(min=1)
    return mean, var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of all processes with `all_reduce_sum`, see
    `masked_moments`); with shift_mean=False the mean is kept."""
    mean, var = masked_moments(x, mask, all_reduce_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask.to(x.dtype)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman,
    "Approximating KL divergence", 2020), with log r = log pi_ref - log pi:

        k1 = -log r = log pi - log pi_ref          unbiased, can be negative, high variance
        k3 = (r - 1) - log r                       unbiased, never negative, lower variance
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL of each answer (B,): the per-token estimate summed over its answer tokens. Masked with
    where, not a product: k3 of a padding position may overflow to inf, and inf x 0 is NaN."""
    return torch.where(mask > 0, kl_estimate(logp, ref_logp, estimator), 0.0).sum(1)


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, score: torch.Tensor,
               beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t (estimator k1 or k3) on every response token, plus the
    reward model's score on the last response token. Returns (rewards, kl), both (B, T-1)."""
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -beta * kl
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)  # index of each row's last response token
    rewards[torch.arange(len(score)), last] += score
    return rewards * mask, kl


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Critic-free advantages: each answer's reward against the other answers to its prompt.
    `rewards` (N,) holds N / G groups of G consecutive answers to one prompt.

        grpo:  A_i = (r_i - mean_g r) / (std_g r + 1e-4)     (Shao et al., 2024; unbiased std)
        rloo:  A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g r)   (Ahmadian et al., 2024)
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (at least 2)")
    r = rewards.view(-1, group_size).float()
    mean = r.mean(1, keepdim=True)
    if kind == "grpo":
        return ((r - mean) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    if kind == "rloo":
        return ((r - mean) * group_size / (group_size - 1)).flatten()
    raise ValueError(f"unknown group advantage {kind!r} (grpo or rloo)")


def minibatches(n_global: int, n_minibatches: int, seed: Sequence[int], rank: int = 0, world: int = 1
                ) -> list[list[int]]:
    """One epoch's minibatches as this process's local row indices, the same global partition
    whatever the number of processes: the global rows (rank r holds rows r*n/world ..) are
    cut into blocks of `n_minibatches` consecutive rows, and each block sends one row, drawn
    at random, to each minibatch. Every process so holds the same share of every minibatch,
    and 1 process computes exactly the minibatches that 2 compute together."""
    if n_global % (world * n_minibatches):
        raise ValueError(f"{n_global} rows do not split into {n_minibatches} minibatches on each of {world} processes")
    rng = np.random.default_rng(list(seed))
    assign = np.concatenate([rng.permutation(n_minibatches) for _ in range(n_global // n_minibatches)])
    local = n_global // world
    mine = assign[rank * local:(rank + 1) * local]
    return [np.flatnonzero(mine == j).tolist() for j in range(n_minibatches)]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (masked positions are skipped).

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   returns = A + V
    with V and A zero after the last response token.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    m = mask.to(rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        # Carry across masked positions unchanged (padding inside a row does not cut the chain).
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(m[:, t] > 0, a, next_adv)
    return adv, (adv + values) * m


class FixedKL:
    def __init__(self, beta: float):
        self.value = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so the measured KL tracks `target`.

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        e = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + e * n_steps / self.horizon
