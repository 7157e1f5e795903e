"""Scaled dot-product attention: SDPA's kernels, or two batched matmuls where those are slow.

`attention(q, k, v, mask)` is the one entry point; it picks the kernel from the shapes and the
device, never from grad mode, so a forward without grad (RL's old log-probs) gives the same bits
as the same forward with grad (the update).

On a CPU in bf16/fp16 at short sequences, SDPA's flash kernel is slow, and most of all its
backward: forward and backward of 8 rows x 6 heads x 256 tokens (nanoGPT's shape) took 26 ms
with flash, 22 ms with SDPA's math backend and 8 ms with `BmmAttention` on an AMX Xeon; at 64
tokens 16, 6 and 2.5 ms. `BmmAttention` is attention written as two batched matmuls around a
softmax, with its own backward: the scores go through the CPU's bf16 GEMMs (AMX) and the
probabilities, the only (B, H, T, S) tensor kept for the backward, stay in the activations'
dtype. Flash wins again from about 512 keys (1024 keys: 76 against 141 ms), and it keeps no
(B, H, T, S) tensor, so longer sequences and larger score tensors keep SDPA (`BMM_MAX_KEYS`,
`BMM_MAX_SCORES`). fp32 keeps SDPA, whose flash kernel is as fast there; GPUs keep SDPA.

Shapes: B batch, H query heads, K key/value heads, T queries, S keys, Dh head size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5

BMM_MAX_KEYS = 256  # measured crossover with CPU flash attention: ~512 keys (module docstring)
BMM_MAX_SCORES = 1 << 25  # B*H*T*S: 64 MB of bf16 probabilities kept per layer at most


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, T, Dh), k and v (B, K, S, Dh), mask None (causal when T > 1, else all keys),
    boolean (True where a query sees a key) or additive, broadcastable to (B, 1, T, S); every
    query must see at least one key. -> (B, H, T, Dh)."""
    if not use_bmm(q, k, v, mask):
        return sdpa(q, k, v, mask)
    H, K = q.shape[1], k.shape[1]
    if K != H:
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    return BmmAttention.apply(q, k, v, _bias(mask, q))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attention` through SDPA's own kernels (the decoder's choice at every step)."""
    H, K = q.shape[1], k.shape[1]
    gqa = {}
    if K != H:
        if _SDPA_GQA:  # SDPA shares each key/value head among its query heads itself
            gqa = {"enable_gqa": True}
        else:  # torch < 2.5: copy the key/value heads out
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


def use_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> bool:
    """`BmmAttention` on a CPU in a 16-bit dtype while keys and the score tensor are small; q, k
    and v of one dtype (SDPA under autocast takes mixed ones) and no mask that wants a
    gradient (SDPA gives it one)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and (v is None or v.dtype == q.dtype)
            and not (mask is not None and mask.requires_grad)
            and S <= BMM_MAX_KEYS and B * H * T * S <= BMM_MAX_SCORES)


def _bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The additive mask in q's dtype: 0 where a query sees a key, the dtype's lowest finite
    number where it does not (exp of it less the row's max is 0, as with -inf, and a query
    that sees no key at all averages the values instead of giving NaN); None where nothing is
    hidden. A floating mask is already additive (SDPA's convention)."""
    if mask is not None and mask.is_floating_point():
        return mask.to(q.dtype)
    if mask is None:
        T = q.shape[2]
        if T == 1:
            return None
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)


class BmmAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh) + bias) v with H == K, as batched matmuls; keeps q, k, v and the
    probabilities for a backward of four batched matmuls and one softmax backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        B, H, T, Dh = q.shape
        S = k.shape[2]
        scale = Dh ** -0.5
        q3, k3, v3 = q.reshape(B * H, T, Dh), k.reshape(B * H, S, Dh), v.reshape(B * H, S, Dh)
        with torch.autocast(q.device.type, enabled=False):  # every op here in q's dtype
            if bias is None:
                s = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
            else:  # (B or 1, 1 or H, T, S) -> (B*H, T, S): a view when it only broadcasts over B, H
                b3 = bias.expand(B, H, T, S).reshape(B * H, T, S)
                s = torch.baddbmm(b3, q3, k3.transpose(1, 2), alpha=scale)
            p = torch.softmax(s, dim=-1)  # computed in fp32 inside, stored in q's dtype
            out = torch.bmm(p, v3)
        ctx.save_for_backward(q3, k3, v3, p)
        ctx.scale, ctx.shape = scale, (B, H, T, S, Dh)
        return out.view(B, H, T, Dh)

    @staticmethod
    @once_differentiable  # a second derivative is not written: asking for one is an error
    def backward(ctx, grad):
        q3, k3, v3, p = ctx.saved_tensors
        B, H, T, S, Dh = ctx.shape
        with torch.autocast(q3.device.type, enabled=False):
            g3 = grad.reshape(B * H, T, Dh)
            dv = torch.bmm(p.transpose(1, 2), g3)
            dp = torch.bmm(g3, v3.transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq = torch.bmm(ds, k3).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), q3).mul_(ctx.scale)
        return dq.view(B, H, T, Dh), dk.view(B, H, S, Dh), dv.view(B, H, S, Dh), None
