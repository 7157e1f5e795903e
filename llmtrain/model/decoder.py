"""The decoding engine: a `Transformer`'s weights laid out for generating tokens fast.

Training keeps Hugging Face's modules and names (q_proj, k_proj, v_proj, gate_proj, up_proj, ...)
so state dicts, LoRA targets, freeze patterns and FSDP units stay as the Hub has them. Decoding
wants the opposite: a few large ops per layer, each weight read once per token in the
precision of the rollout. A `Decoder` is a frozen copy of a model's weights in that layout:

  * q/k/v fused into one matrix and gate/up into one (two GEMMs per layer fewer), with rotary
    embeddings applied to queries and keys in one go;
  * in the decoding dtype (bf16 rollouts read half the bytes of fp32 weights per token), with
    LoRA updates merged in;
  * on a CPU, each matrix packed once for oneDNN/MKL (`torch.ops.mkldnn._reorder_linear_weight`,
    `torch.ops.mkl._mkl_reorder_linear_weight`), the layout inductor's weight freezing uses,
    without compiling anything; on other devices plain `F.linear`;
  * the word head only at the last position (the next token is all a decode step needs), and
    in a prefill the last layer's attention, o and MLP there too (its keys and values are
    written for every position);
  * in fp32, each RMSNorm's weight folded into the matrix that reads the norm (`fold_norm`),
    the norm a handful of ops instead of F.rms_norm's twenty, and at one query per head the
    query heads of a key/value head attending as that head's queries: the same logits to
    fp32 rounding, not bit for bit. In bf16 a norm keeps the model's bits, as one fp32
    rounding of its scale can move a bf16 output by a whole step and change a greedy token.

`Decoder.of(model, dtype)` builds one, or returns the one built before while no weight of the
model has changed since, so an evaluation packs the model once however many batches it
generates. "Changed" is read from the tensors' version counters, which every in-place op
bumps, except fused optimizers (`torch.optim.AdamW(fused=True)` leaves them as they were):
`training.optimizer_step` therefore calls `weights_changed()`, which retires every decoder.
Code that steps a fused optimizer itself must call it too.

`static=True` keeps every shape fixed from step to step (attention over the whole preallocated
cache under a mask, cache writes by `index_copy_` at a position tensor): what CUDA graphs and
`torch.compile(mode="reduce-overhead")` need (bench/gpu.py); on a CPU it gives the same tokens,
more slowly.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmtrain.model.adapters import LoRALinear
from llmtrain.model.attention import sdpa
from llmtrain.model.transformer import Transformer, rolled_tables, swapped_halves
from llmtrain.model.transformer import rms_norm as transformer_rms_norm


_generation = 0  # bumped by weights_changed(): part of every decoder's key
# model -> (key, its decoder), beside the model rather than in it: a decoder's packed weights
# are opaque tensors that neither copy.deepcopy nor torch.save can read, and a model must stay
# copyable and saveable after it has generated.
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_changed() -> None:
    """Some weights changed in a way their version counters do not show (a fused optimizer
    step): no decoder built before this call is used again."""
    global _generation
    _generation += 1


def _weight(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.merged_weight() if isinstance(linear, LoRALinear) and linear.enabled else linear.weight


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _packed_kind(device: torch.device, dtype: torch.dtype) -> str:
    """'mkl' (fp32) or 'mkldnn' (bf16) where this torch has the packed CPU linear ops, else 'plain'."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return "plain"
    if dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        return "mkl"
    if dtype == torch.bfloat16 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        try:
            return "mkldnn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain"
        except Exception:  # a private helper: without it, the plain path
            return "plain"
    return "plain"


class Linear:
    """One frozen matrix (and bias), packed for the CPU's GEMM library where that is possible."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, batch_hint: int):
        self.weight, self.bias, self.kind = weight.contiguous(), bias, kind
        if kind == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch_hint)
            self.hint = batch_hint
        elif kind == "mkldnn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)

    def for_rows(self, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """What this matrix runs on an input of n rows, as one function with no branch to take
        per call (`Decoder._next` binds these once per batch size; __call__ picks it per call):
        MKL's packed GEMM is for `hint` rows only, other row counts take F.linear (what
        `_mkl_linear` falls back to)."""
        w, b = self.weight, self.bias
        if self.kind == "mkl" and n == self.hint:
            mkl, packed, hint = torch.ops.mkl._mkl_linear.default, self.packed, self.hint
            return lambda x: mkl(x, packed, w, b, hint)
        if self.kind == "mkldnn":
            dnn, packed = torch.ops.mkldnn._linear_pointwise.default, self.packed
            return lambda x: dnn(x, packed, b, "none", [], "")
        return functools.partial(F.linear, weight=w, bias=b)

    def writer_for_rows(self, n: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`for_rows(n)` as f(x, out) that writes into `out` (B, N): the plain GEMM writes there
        itself (`torch.mm(..., out=)`, F.linear's own op), a packed one's result is copied."""
        w, b = self.weight, self.bias
        if (self.kind == "mkl" and n == self.hint) or self.kind == "mkldnn":
            of = self.for_rows(n)
            return lambda x, out: out.copy_(of(x))
        wt = w.t()
        if b is None:
            return lambda x, out: torch.mm(x, wt, out=out)
        return lambda x, out: torch.addmm(b, x, wt, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.for_rows(x.numel() // x.shape[-1])(x)


class Layer:
    def __init__(self, layer, dtype: torch.dtype, kind: str, hint: int):
        a, m = layer.self_attn, layer.mlp
        cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
        qkv = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])
        gate_up = torch.cat([_weight(m.gate_proj), _weight(m.up_proj)])
        self.norm1, qkv = fold_norm(layer.input_layernorm, qkv, dtype)
        self.norm2, gate_up = fold_norm(layer.post_attention_layernorm, gate_up, dtype)
        self.qkv = Linear(cast(qkv), cast(_cat_bias(a.q_proj, a.k_proj, a.v_proj)), kind, hint)
        self.o = Linear(cast(_weight(a.o_proj)), cast(a.o_proj.bias), kind, hint)
        self.gate_up = Linear(cast(gate_up), None, kind, hint)
        self.down = Linear(cast(_weight(m.down_proj)), None, kind, hint)


class Norm:
    """An RMSNorm as the decoder applies it, from `fold_norm`. Each op right after a GEMM
    (which has just streamed megabytes of weights through the caches) costs several times
    what it costs warm, and F.rms_norm on a CPU is about twenty of them.

    weight None (fp32, the weight folded into the next matrix): x times the scale, in four
    ops, the sum of squares one `vector_norm` reduction and eps a 0-d tensor made here once;
    the scale differs from the model's by fp32 rounding (its sum runs in another order). With
    the one-query attention of the decode step, decode steps 1.10-1.16x faster at batch 1 and
    1.06-1.12x at 16 (two A/B runs, bench/README.md).
    With a weight (any dtype but fp32): the model's `rms_norm` bit for bit. There a scale one fp32
    rounding off moves a bf16 output by a whole bf16 step now and then, which changed greedy
    tokens (3 rows of 16 against transformers in bench/generate.py). On a CPU it is the same
    arithmetic in 7 ops instead of 9 (the 13 norms were a sixth of a bf16 decode step at
    batch 16); on other devices the model's function itself, as CUDA's `mean` multiplies by
    a rounded 1/D where the CPU's divides."""

    def __init__(self, weight: torch.Tensor | None, eps: float, device: torch.device, dim: int):
        self.weight, self.eps = weight, eps
        self.eps_tensor = torch.tensor(eps, dtype=torch.float32, device=device)
        self.dim_tensor = torch.tensor(float(dim), dtype=torch.float32, device=device)
        self.cpu = device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x * torch.addcmul(self.eps_tensor, n, n, value=1 / x.shape[-1]).rsqrt_()
        if not self.cpu:
            return transformer_rms_norm(x, self.weight, self.eps)
        # The model's arithmetic in 7 ops (its own takes 9, counting mean's sum and division,
        # and makes 6 fp32 tensors): on a CPU its mean is a sum and a division by D (addcdiv's
        # s / D, then + eps, the same roundings); h * r goes straight into a tensor of x's
        # dtype, rounded as `.to` rounds.
        h = x.float()
        r = torch.addcdiv(self.eps_tensor, (h * h).sum(-1, keepdim=True), self.dim_tensor).rsqrt_()
        return torch.mul(h, r, out=torch.empty_like(x)).mul_(self.weight)


def fold_norm(norm: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> tuple[Norm, torch.Tensor]:
    """An RMSNorm and the matrix that reads its output -> (the `Norm` the decoder applies, the
    matrix). In fp32 the norm's weight goes into the matrix's columns, W @ (w * h) ==
    (W * w) @ h, one multiplication per norm fewer (the matrix is then the decoder's own copy:
    for the word head, V x D fp32 values more than an alias of the model's); in 16 bits both
    stay as they are, so the rounding to bf16 happens where the model's does."""
    w = norm.weight.detach()
    if dtype != torch.float32:
        return Norm(w.to(dtype), norm.eps, w.device, w.shape[0]), weight
    return Norm(None, norm.eps, w.device, w.shape[0]), weight.detach().float() * w.float()


class Decoder:
    """A frozen, fused, packed copy of a `Transformer` for decoding; see the module docstring."""

    def __init__(self, model: Transformer, dtype: torch.dtype, batch_hint: int = 16):
        c = model.config
        self.config, self.dtype = c, dtype
        self.device = model.lm_head.weight.device
        self.H, self.K, self.Dh = c.n_heads, c.n_kv_heads, c.dim // c.n_heads
        kind = _packed_kind(self.device, dtype)
        with torch.no_grad():
            bb = model.model
            self.embed = bb.embed_tokens.weight.detach().to(dtype)
            self.layers = [Layer(layer, dtype, kind, batch_hint) for layer in bb.layers]
            self.norm, head = fold_norm(bb.norm, _weight(model.lm_head), dtype)
            self.lm_head = Linear(head.detach().to(dtype), None, kind, batch_hint)
        self.kind = kind
        self.fold_gqa = self.device.type == "cpu" and dtype == torch.float32
        self.rotary = bb.rotary  # the model's fp32 tables; each cache takes the span it needs
        self._plans: dict[int, tuple] = {}  # batch size -> each layer's norms and bound GEMMs (_next)

    @staticmethod
    def of(model: Transformer, dtype: torch.dtype | None = None) -> "Decoder":
        """The model's decoder in `dtype` (default: the model's own), rebuilt only when a weight
        has changed since the last call (or the dtype, or which LoRA adapters are on)."""
        params = list(model.parameters())
        dtype = dtype or params[0].dtype
        adapters = tuple(m.enabled for m in model.modules() if isinstance(m, LoRALinear))
        key = (_generation, dtype, adapters, tuple((id(p), p._version) for p in params))
        cached = _decoders.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        dec = Decoder(model, dtype)
        _decoders[model] = (key, dec)
        return dec

    # ---------------------------------------------------------------- the cache
    def new_cache(self, batch: int, max_len: int, static: bool = False) -> "Cache":
        return Cache(self, batch, max_len, static)

    # ---------------------------------------------------------------- a step
    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: "Cache", keys: torch.Tensor | None,
             at: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) new tokens at positions pos (B, T), written into the cache after its
        `cache.length` positions; keys (B, S) with S = length + T marks the real keys
        (None: all real). -> logits of the last position (B, V) in the decoder's dtype.
        A static cache takes instead `at` (T,), the cache slots written, and keys (B, max_len);
        it reads no Python number that changes from step to step (`cache.length` is the
        caller's), so a compiled step is traced once."""
        B, T = ids.shape
        if T == 1 and not cache.static:
            return self._next(ids, pos, cache, keys)
        return self._step(ids, pos, cache, keys, at)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, cache: "Cache", keys: torch.Tensor | None,
              at: torch.Tensor | None = None) -> torch.Tensor:
        """`step` for any number of new tokens and either cache: prefills, static caches (what
        torch.compile traces), and the reference `_next` is tested against."""
        B, T = ids.shape
        H, K, Dh = self.H, self.K, self.Dh
        cos, sin = cache.cos[pos], cache.sin[pos]  # (B, T, 1, Dh): a gather, no host read, no sync
        mask = cache.static_mask(keys, at) if cache.static else cache.mask(keys, T)
        x = F.embedding(ids, self.embed)
        last = len(self.layers) - 1
        for i, L in enumerate(self.layers):
            qkv = L.qkv(L.norm1(x)).view(B, T, H + 2 * K, Dh)
            rotary_into(qkv.narrow(2, 0, H + K), cos, sin)
            # keys and values lie side by side in qkv: one copy writes both into the cache
            k, v = cache.write(i, qkv.narrow(2, H, 2 * K).transpose(1, 2), at)
            if i == last and T > 1:
                # All the last layer's keys and values are written; its output is read at the
                # last position only (by the head), so attention, o and MLP run there alone:
                # a prefill of T tokens does (1 - 1/T) of one layer's o and MLP less.
                qkv, x = qkv[:, -1:], x[:, -1:]
                mask = None if mask is None else mask[:, :, -1:]
            Tq = qkv.shape[1]
            if Tq == 1 and self.fold_gqa:
                # One query per head: the H/K query heads that share a key/value head are that
                # head's H/K queries, so SDPA reads each key and value once, not H/K times.
                y = F.scaled_dot_product_attention(qkv.narrow(2, 0, H).view(B, K, H // K, Dh), k, v, attn_mask=mask)
            else:
                y = sdpa(qkv.narrow(2, 0, H).transpose(1, 2), k, v, mask).transpose(1, 2)
            x += L.o(y.reshape(B, Tq, H * Dh))  # x is this step's own: add in place
            g, u = L.gate_up(L.norm2(x)).chunk(2, dim=-1)
            x += L.down(F.silu(g).mul_(u))
        if not cache.static:
            cache.advance(T)
        return self.lm_head(self.norm(x[:, -1]))

    def _next(self, ids: torch.Tensor, pos: torch.Tensor, cache: "Cache", keys: torch.Tensor | None) -> torch.Tensor:
        """`_step` for one new token per row on a dynamic cache, bit for bit (tested): the same
        ops on the same values, without `_step`'s branches and Python calls per layer. Each
        GEMM is bound once per batch size (`Linear.for_rows`); q/k/v and gate/up land in two
        buffers of this generation's (`Cache.scratch`), so every view of them that a layer reads is
        made once, not per layer and step; activations are (B, D); the rotary is inline; each
        layer's key and value halves are views made with the cache. Outside the GEMMs (which,
        back to back, are 0.94 of a 1.45 ms fp32 step at batch 1 at TRL's sizes) Python and
        the dispatcher were most of a step's remaining time (bench/README.md)."""
        B = ids.shape[0]
        H, Dh = self.H, self.Dh
        layers, head = self._plans.get(B) or self._plan(B)
        qkv, qk, new_kv, q, gate_up, g, u = cache.scratch
        mask = cache.mask(keys, 1)  # (B, 1, 1, S) or None; raises when the cache is full
        at = pos.reshape(B)
        cos, sin = cache.cos[at], cache.sin[at]  # (B, 1, Dh)
        x = F.embedding(ids.reshape(B), self.embed)
        start, end, half = cache.length, cache.length + 1, Dh // 2
        for (norm1, qkv_into, o_of, norm2, gate_up_into, down_of), (kv, keys_all, values_all) in zip(layers, cache.halves):
            qkv_into(norm1(x), qkv)
            rolled = qk.roll(half, -1).mul_(sin)  # `rotary_into`, not traced by torch.compile here
            qk.mul_(cos).add_(rolled)
            kv.narrow(2, start, 1).copy_(new_kv)
            k, v = keys_all.narrow(2, 0, end), values_all.narrow(2, 0, end)
            if self.fold_gqa:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                y = sdpa(q, k, v, mask)
            x += o_of(y.reshape(B, H * Dh))
            gate_up_into(norm2(x), gate_up)
            x += down_of(F.silu(g).mul_(u))
        cache.advance(1)
        return head(self.norm(x))

    def _plan(self, B: int) -> tuple[list, Callable]:
        """Each layer's (norm1, qkv, o, norm2, gate_up, down) with its GEMMs bound for B rows,
        and the head's."""
        layers = [(L.norm1, L.qkv.writer_for_rows(B), L.o.for_rows(B), L.norm2, L.gate_up.writer_for_rows(B),
                   L.down.for_rows(B)) for L in self.layers]
        self._plans[B] = plan = (layers, self.lm_head.for_rows(B))
        return plan


def rotary_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`rotary_rolled(x, cos, sin)` written over x (a view into the step's q/k/v), the same
    bits: the keys come out where the values already are, next to them."""
    rolled = swapped_halves(x).mul_(sin)
    x.mul_(cos).add_(rolled)


class Cache:
    """Keys and values of every layer, one (B, 2K, max_len, Dh) tensor each (keys in the first
    K heads, values in the last K), filled left to right; and the rotary tables for its
    positions, (max_len, 1, Dh) each in the form `rotary_rolled` takes (one gather per step).
    The tables are the cache's own, not the decoder's for the whole context: for a 128k-token
    model they would be 67 MB, cast again whenever the weights change (every RL iteration).

    Dynamic (default): a step attends to the positions written so far, [0, length + T), and
    advances `length`; the slots from `length` on hold whatever memory held (torch.empty).
    Static: a step attends to all max_len slots, those after the written ones masked out, and
    writes with `index_copy_` at the slots `at` (a tensor), so no shape depends on the step."""

    def __init__(self, dec: Decoder, batch: int, max_len: int, static: bool):
        shape = (batch, 2 * dec.K, max_len, dec.Dh)
        # A dynamic step reads only the slots written so far: no need to clear 2 x layers x B x K x
        # max_len x Dh values first. A static step attends to every slot under a mask, and a
        # masked slot must hold a number (its weight 0 times NaN would still be NaN).
        new = torch.zeros if static else torch.empty
        self.kv = [new(shape, dtype=dec.dtype, device=dec.device) for _ in dec.layers]
        # each layer's (cache, its keys, its values), the halves as views made once
        self.halves = [(kv, kv.narrow(1, 0, dec.K), kv.narrow(1, dec.K, dec.K)) for kv in self.kv]
        # A dynamic cache's generation steps through `Decoder._next`: its q/k/v and gate/up
        # outputs land in these two buffers (each layer in turn), read through views made here
        # once; made with the cache, so in the same (inference) mode as its keys and values.
        self.scratch = None if static else self._scratch(dec, batch)
        self.cos, self.sin = rolled_tables(*dec.rotary.span(0, max_len), dec.dtype)
        self.length, self.max_len, self.static, self.device = 0, max_len, static, dec.device
        self.slots = torch.arange(max_len, device=dec.device)

    @staticmethod
    def _scratch(dec: Decoder, B: int) -> tuple:
        """(q/k/v buffer, its rotated heads, its new keys and values, its queries as attention
        reads them, gate/up buffer, gate, up)."""
        H, K, Dh = dec.H, dec.K, dec.Dh
        qkv = torch.empty(B, (H + 2 * K) * Dh, dtype=dec.dtype, device=dec.device)
        heads = qkv.view(B, H + 2 * K, Dh)
        q = heads.narrow(1, 0, H)
        q = q.view(B, K, H // K, Dh) if dec.fold_gqa else q.unsqueeze(2)
        gate_up = torch.empty(B, dec.layers[0].gate_up.weight.shape[0], dtype=dec.dtype, device=dec.device)
        return qkv, heads.narrow(1, 0, H + K), heads.narrow(1, H, 2 * K).unsqueeze(2), q, gate_up, *gate_up.chunk(2, -1)

    def mask(self, keys: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """The boolean (B, 1, T, S) attention mask of a dynamic step, or None where plain
        causal attention is the same (no padding)."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        if keys is None and (T == 1 or start == 0):
            return None
        return self._mask(keys, self.slots[start:end], end)

    def static_mask(self, keys: torch.Tensor | None, at: torch.Tensor) -> torch.Tensor:
        """A static step's (B, 1, T, max_len) mask: slot j seen from slot at[i] if j <= at[i]
        and j holds a real key (keys (B, max_len); None: all real)."""
        return self._mask(keys, at, self.max_len)

    def _mask(self, keys: torch.Tensor | None, q_pos: torch.Tensor, S: int) -> torch.Tensor:
        B, T = self.kv[0].shape[0], q_pos.shape[0]
        k_pos = self.slots[None, :S]
        q_pos = q_pos[:, None]
        m = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if keys is not None:
            real = keys[:, :S].bool()
            # A padding query that would see no key at all sees itself (SDPA never returns NaN).
            m = (m & real[:, None, None, :]) | (k_pos == q_pos)[None, None]
        return m.expand(B, 1, T, S)

    def write(self, layer: int, kv: torch.Tensor,
              at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv (B, 2K, T, Dh), this step's keys and values -> the layer's keys and values so
        far, (B, K, S, Dh) each."""
        cache = self.kv[layer]
        if self.static:
            cache.index_copy_(2, at, kv)
        else:
            T = kv.shape[2]
            cache.narrow(2, self.length, T).copy_(kv)
            cache = cache.narrow(2, 0, self.length + T)
        return cache.chunk(2, dim=1)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a static step reads or writes in place: what CUDA graphs should keep at fixed
        addresses (`generate.compiled_static_step`)."""
        return [*self.kv, self.cos, self.sin, self.slots]

    def advance(self, t: int) -> None:
        self.length += t
