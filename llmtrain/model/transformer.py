"""A Llama-style decoder-only transformer in one file.

RMSNorm, rotary position embeddings, SwiGLU feed-forward, grouped-query attention (SDPA, or
batched matmuls where those are faster: `model/attention.py`), optional tied embeddings, and a KV cache
for generation. Parameter names are exactly those of Hugging Face's `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict moves between the two as is.

Shapes: B batch, T new tokens, S all keys (cache + new), D model width, H heads, K kv heads,
Dh head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from llmtrain.config import ModelConfig
from llmtrain.model.attention import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and torch.is_grad_enabled() and sixteen_bit_compute(x):
            return RMSNormFn.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 whatever the activation dtype, as Llama does; then the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormFn(torch.autograd.Function):
    """`rms_norm` of an fp32 x with a hand-written backward: the same forward bits, and the exact
    gradient in 5 passes over x's size and 2 reductions, where autograd's takes about twice as
    many (1.7 against 3.1 ms forward + backward at (8, 256, 384), 13 norms per step of
    nanoGPT's shape). Used in mixed precision (fp32 residual stream under 16-bit autocast);
    plain fp32 training keeps autograd's backward, whose bits the pinned losses recorded."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = x * r
        ctx.save_for_backward(h, r, weight)
        return weight * h

    @staticmethod
    @once_differentiable  # a second derivative is not written: asking for one is an error
    def backward(ctx, grad):
        h, r, weight = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[1]:  # a frozen norm's weight wants none
            dweight = (grad * h).sum(tuple(range(grad.dim() - 1)))
        if ctx.needs_input_grad[0]:
            gh = grad * weight
            # d/dx of x * r(x): r * (gh - h * mean(gh * h))
            dx = torch.addcmul(gh, h, (gh * h).mean(-1, keepdim=True), value=-1).mul_(r)
        return dx, dweight, None


def sixteen_bit_compute(x: torch.Tensor) -> bool:
    """Whether x's layer computes in bf16/fp16: a 16-bit x, or 16-bit autocast on x's device."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != torch.float32


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings, the 'rotate half' convention of HF Llama."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: ModelConfig | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling is not None and scaling.rope_scaling == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._inv_freq_fp32 = inv_freq  # what `_apply` restores after a cast
        self.max_len = max_len
        self._build(max_len)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the tables; `.to(bf16)` / `.half()` leave them fp32. Rounded to
        bf16 the angles of far positions are off by whole radians (HF's rotary also computes
        in fp32: a bf16 model then matches transformers' bit for bit, bench/generate.py)."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq_fp32.to(self.inv_freq.device)
            self._build(self.cos.shape[0])
        return self

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, Dh)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def span(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start..end-1: a slice, no gather and no device sync."""
        if end > self.cos.shape[0]:
            self._build(max(end, 2 * self.cos.shape[0]))
        return self.cos[start:end], self.sin[start:end]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) or (T,) -> cos, sin broadcastable to (B, H, T, Dh)."""
        need = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))
        cos, sin = self.cos[position_ids], self.sin[position_ids]
        if position_ids.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin


def llama3_inv_freq(inv_freq: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """Llama 3.1's rope scaling: frequencies whose wavelength is longer than the original context
    / low_freq_factor are divided by `factor`, those shorter than original / high_freq_factor are
    kept, and those between are interpolated smoothly (the formula of HF's
    `_compute_llama3_parameters`, in the same order of operations)."""
    factor, low, high, old = c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_len
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values of every layer, filled left to right.

    `length` is the number of positions already written; a forward pass with T new tokens
    writes positions [length, length + T) in every layer, then `advance(T)` moves on.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=None):
        c = cfg.resolved()
        hd = c.dim // c.n_heads
        self.shape = (batch, c.n_kv_heads, max_len, hd)
        self.n_layers, self.device = c.n_layers, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if dtype is not None:
            self._allocate(dtype)
        self.length = 0
        self.max_len = max_len

    def _allocate(self, dtype) -> None:
        self.k = [torch.zeros(self.shape, device=self.device, dtype=dtype) for _ in range(self.n_layers)]
        self.v = [torch.zeros(self.shape, device=self.device, dtype=dtype) for _ in range(self.n_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dtype None at construction: allocated on the first write, in the dtype of its keys."""
        if not self.k:
            self._allocate(k.dtype)
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. drop finished sequences)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv = c.n_heads, c.n_kv_heads
        self.hd = c.dim // c.n_heads
        bias = c.attention_bias  # Qwen2: q/k/v biases, none on o_proj
        self.q_proj = nn.Linear(c.dim, c.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * self.hd, bias=bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * self.hd, bias=bias)
        self.o_proj = nn.Linear(c.n_heads * self.hd, c.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv, self.hd
        if fused(x, self.q_proj, self.k_proj, self.v_proj):
            # one GEMM for q, k and v and one rotary op for q and k (the decoder's layout)
            b = self.q_proj.bias
            if b is not None:
                b = torch.cat((b, self.k_proj.bias, self.v_proj.bias))
            w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            qkv = F.linear(x, w, b).view(B, T, H + 2 * K, Dh)
            qk = rotary_rolled(qkv[:, :, :H + K], *rolled_tables(cos, sin, qkv.dtype))
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + K:].transpose(1, 2)
        else:
            q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            k = self.k_proj(x).view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
            v = self.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, Dh)
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


FUSED_MIN_ROWS = 64


def fused(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether a layer computes its parallel projections as one GEMM on concatenated weights:
    in 16-bit compute (autocast, or a bf16/fp16 model), where it also casts the input once
    instead of once per projection, and only on plain `nn.Linear`s (LoRA layers add their own
    path) and at FUSED_MIN_ROWS tokens or more (decoding a few rows at a time through the
    model, concatenating the weights costs more than it saves: 15% slower per token at 4 rows).
    fp32 keeps one GEMM per projection: its results, bit for bit, are what the pinned losses
    of every CPU kind recorded (tests/stages/test_pinned_losses.py). Shapes decide, never
    grad mode."""
    return (x.shape[:-1].numel() >= FUSED_MIN_ROWS and all(type(m) is nn.Linear for m in linears)
            and sixteen_bit_compute(x))


def rolled_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of (T, Dh), (B, T, Dh) or (B, 1, T, Dh) -> the tables `rotary_rolled` takes:
    (B?, T, 1, Dh) in dtype, sin with its first half negated. The decoder builds them once per
    step; the training path once per layer."""
    half = cos.shape[-1] // 2
    cos, sin = [t[:, 0] if t.dim() == 4 else t for t in (cos, sin)]
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[..., None, :].to(dtype), sin[..., None, :].to(dtype)


def rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary on x (B, T, heads, Dh) with one roll instead of chunk, neg and cat, the
    tables from `rolled_tables`: rotate_half(x) * sin == x.roll(Dh/2) * (sin with its first
    half negated), the same bits (a sign flip is exact).

    Under torch.compile the halves are swapped with a cat instead, the same bits again:
    inductor fuses a cat of two slices into one vectorised loop, but lowers roll (and its
    backward) to a gather by modular index, 5.6 against 2.0 ms forward + backward at nanoGPT's
    shape (8 x 256 x 12 heads x 64, bf16), 22 ms of a 330 ms training step."""
    return x * cos + swapped_halves(x) * sin


def swapped_halves(x: torch.Tensor) -> torch.Tensor:
    """x with the two halves of its last dim swapped (a new tensor): one roll eagerly, a cat
    of the two halves under torch.compile (see `rotary_rolled`); the same values either way."""
    if _compiling():
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x2, x1), dim=-1)
    return x.roll(x.shape[-1] // 2, dims=-1)


def _compiling() -> bool:
    """Whether torch.compile is tracing this code."""
    return torch.compiler.is_compiling()


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x):
        if fused(x, self.gate_proj, self.up_proj):  # one GEMM for gate and up
            g, u = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    shard_unit = True  # dist.shard: one FSDP all-gather unit (dist, below the model, looks for the mark)

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and final norm: HF's `LlamaModel`. Heads sit on top of it."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.rotary = Rotary(c.dim // c.n_heads, c.max_seq_len, c.rope_theta, scaling=c)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, D).

        attention_mask (B, S) marks the real (1) and padding (0) keys of the whole sequence so
        far, cache included; position_ids (B, T) default to 0..T-1 after the cached positions.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:  # the common case in training: slice the tables
            cos, sin = self.rotary.span(past, past + T)
        else:
            cos, sin = self.rotary(position_ids)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask  # ready-made (B, 1, T, S), e.g. packed sequences' block-diagonal mask
        elif attention_mask is not None or (cache is not None and T > 1 and past > 0):
            mask = build_mask(attention_mask, B, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # RL trains in eval mode (no dropout)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


def build_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query i sees key j if j <= past + i and key j is not padding.

    A padding query that would see no key at all is let see itself, so SDPA never returns NaN;
    its output is ignored anyway.
    """
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    causal = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is None:
        return causal.expand(B, 1, T, S)
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    mask = causal & keys
    return mask | (k_pos == q_pos)[None, None]


class Transformer(nn.Module):
    """The causal language model: HF's `LlamaForCausalLM`."""

    def __init__(self, cfg: ModelConfig, init: bool = True):
        """init=False skips `init_weights` for a model whose every weight is loaded next
        (`checkpoint.load_transformer`): at Qwen2-0.5B's shape that is 4 of the 8 s it takes
        to build the model on a CPU. The weights then hold torch's default initialisation."""
        super().__init__()
        self.config = cfg.resolved()
        c = self.config
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix; the two projections that write into the
        residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * n_layers) as in GPT-2, so
        the residual's variance does not grow with depth. Norm weights are one."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                span: slice | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); the arguments are Backbone.forward's. With `span`
        the word head runs at those positions only, (B, len(span), V): RL reads the answers'
        log-probs and skips the head's FLOPs (and its fp32 log-softmax) over the prompts."""
        h = self.model(input_ids, attention_mask, position_ids, cache)
        # contiguous: a strided (B, A, D) slice sends F.linear to a batched matmul over B
        # copies of the weight (90 ms of a 170 ms reference forward at vocab 8192)
        return self.lm_head(h if span is None else h[:, span].contiguous())

    def num_params(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N for the matmuls plus attention's 12 L D T (PaLM)."""
        c = self.config
        n = self.num_params() - self.model.embed_tokens.weight.numel() * (0 if c.tie_embeddings else 1)
        return 6 * n + 12 * c.n_layers * c.dim * seq_len
