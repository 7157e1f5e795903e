"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded into one batch, so every row's next token sits
in the last column; the attention mask hides the padding and position ids count from each
row's first real token, so a padded row computes exactly what it would alone.
This is the rollout engine of the RLHF stages too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from llmtrain import dist
from llmtrain.model.decoder import Cache, Decoder
from llmtrain.model.transformer import KVCache, Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    stop_ids: tuple[int, ...] = ()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of tokens whose
    probability reaches top_p (the most likely token is always kept). logits (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy takes `max`'s indices: argmax's tokens (the first
    of equal maxima, NaN as the largest), 1.6x (fp32) to 4x (bf16) faster at 16 x 8192 here."""
    if s.temperature <= 0:
        return logits.max(-1).indices
    logits = filter_logits(logits.float() / s.temperature, s.top_k, s.top_p)
    return sample_from(torch.softmax(logits, dim=-1), generator, rows)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) by inverting the cumulative distribution: one uniform
    number per row. (`torch.multinomial` draws V exponential numbers per row on the CPU, which
    took a quarter of the time of sampling candidates with the demo's 2,048-token vocabulary.)
    A token of probability 0 is never drawn: its cumulative value equals its predecessor's.
    rows=(first, total): these B rows are rows first.. of a global batch of `total` spread over
    processes; the uniforms of all `total` rows are drawn and this slice taken, so a row gets
    the same number whatever the number of processes."""
    cdf = probs.cumsum(-1)
    first, total = rows or (0, probs.shape[0])
    u = torch.rand((total, 1), generator=generator, device=probs.device, dtype=cdf.dtype)[first:first + probs.shape[0]]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, L) and attention mask (B, L), padding on the left."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def prompt_budget(ctx: int, max_new: int) -> int:
    """How many prompt tokens `llmtrain generate`, `chat` and SFT's sample answers keep: the
    context window less max_new, but at least half of it (a max_new near the context's size
    then gives a shorter answer, as much as the context allows, rather than no prompt).
    Training and ranking data are stricter: `data.prompts.prompt_room`."""
    return max(1, min(ctx - 1, max(ctx - max_new, ctx // 2)))


def truncate_left(ids: Sequence[int], room: int) -> list[int]:
    """A prompt longer than `room` tokens cut from the left: its first token (<|bos|>) and its
    last room - 1 tokens, so the most recent text is what the model continues."""
    ids = list(ids)
    if len(ids) <= room:
        return ids
    return [ids[0], *ids[len(ids) - room + 1:]] if room > 1 else ids[:1]


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             pad_id: int = 0, use_cache: bool = True, generator: torch.Generator | None = None,
             on_token: Callable[[list[int]], None] | None = None, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None) -> list[list[int]]:
    """Sample continuations of each prompt; returns the new tokens of each, ending with the
    stop token when one was produced. `on_token` receives each step's new ids (streaming).
    `rows` (first, total): see `sample_from` (RL rollouts spread over processes).
    The weights decode through `Decoder` (fused, packed, last position only) in `dtype`:
    by default the autocast dtype when autocast is on, else the model's own.
    A model sharded by FSDP2 (every forward a collective) steps in lockstep with the other
    processes: it stops early only when all of them are done.
    Callers check prompt lengths up front (`prompt_budget`, `truncate_left`,
    `data.prompts.prompt_room`, `fit_prompts`); a prompt that fills the context here is a
    programming error (ValueError)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B, L = ids.shape
    ctx = model.config.max_seq_len
    sharded = dist.is_sharded(model)
    # Sharded: the processes agree on the longest prompt, so all take the same number of steps
    # (and all raise together when one prompt is too long).
    L_all = dist.all_max(L) if sharded else L
    if L_all >= ctx:
        raise ValueError(f"prompt of {L_all} tokens does not fit the context window of {ctx}")
    max_new = min(sampling.max_new_tokens, ctx - L_all)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    if use_cache and not sharded:
        steps = DecoderSteps(Decoder.of(model, decode_dtype(model, dtype)), ids, mask, positions, max_new)
        with torch.autocast(device.type, enabled=False), torch.inference_mode():
            out = _token_loop(steps, B, max_new, sampling, pad_id, generator, on_token, rows, bool)
    else:
        was_training = model.training
        model.eval()
        # The cache takes the dtype of the first keys written (bf16 when FSDP2 gathers in bf16).
        cache = KVCache(model.config, B, L + max_new, device, None) if use_cache else None
        out = _token_loop(ModelSteps(model, ids, mask, positions, cache), B, max_new, sampling, pad_id, generator,
                          on_token, rows, dist.all_finished if sharded else bool)
        model.train(was_training)
    results = []
    for row in out.tolist():
        for j, t in enumerate(row):
            if t in sampling.stop_ids:
                row = row[: j + 1]
                break
        results.append(row)
    return results


def decode_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """What the weights decode in: `dtype` if given, else the autocast dtype where autocast is
    on (a bf16 run samples in bf16, as before), else the model's own."""
    if dtype is not None:
        return dtype
    param = next(model.parameters())
    dev = param.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else param.dtype


def _token_loop(logits_of: Callable[[torch.Tensor], torch.Tensor], B: int, max_new: int, s: SamplingConfig,
                pad_id: int, generator, on_token, rows, all_done: Callable[[bool], bool]) -> torch.Tensor:
    """Up to max_new steps of one token per row; logits_of(new) gives the logits (B, V) of the
    position after the new tokens so far (B, n). A finished row gets pad_id from then on; the
    loop ends when `all_done` says every row (of every process, when sharded) has finished.
    -> (B, n) new ids."""
    device = logits_of.device
    # Without stop tokens no row finishes early: every step skips the bookkeeping (and its
    # device sync). Every process of a sharded run has the same sampling, so all skip alike.
    stop = torch.tensor(sorted(set(s.stop_ids)), device=device) if s.stop_ids else None
    out = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, max_new + 1):
        tok = next_token(logits_of(out[:, :n - 1]), s, generator, rows)
        if stop is not None:
            tok.masked_fill_(finished, pad_id)
        out[:, n - 1] = tok
        if on_token is not None:
            on_token(tok.tolist())
        if stop is not None:
            finished |= torch.isin(tok, stop)
            if all_done(bool(finished.all())):
                break
    return out[:, :n]


class DecoderSteps:
    """Next-token logits through a `Decoder` and its KV cache: the prompts first (prefill), then
    each step's new token. Holds this generation's cache, so one decoder serves many calls."""

    def __init__(self, dec: Decoder, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_new: int):
        B, L = ids.shape
        self.dec, self.ids, self.positions, self.device = dec, ids, positions, ids.device
        self.cache = dec.new_cache(B, L + max_new)
        self.keys = None  # the real keys (B, L + max_new), where a prompt is padded
        if not bool(mask.all()):
            self.keys = torch.ones((B, L + max_new), dtype=torch.bool, device=ids.device)
            self.keys[:, :L] = mask.bool()

    def __call__(self, new: torch.Tensor) -> torch.Tensor:
        n = new.shape[1]
        step_ids, step_pos = (self.ids, self.positions) if n == 0 else (new[:, -1:], self.positions[:, -1:] + n)
        keys = None if self.keys is None else self.keys[:, :self.cache.length + step_ids.shape[1]]
        return self.dec.step(step_ids, step_pos, self.cache, keys)


class ModelSteps:
    """Next-token logits through the model's own forward: with its KV cache, or without one
    (the whole sequence again each step: a check of the cached paths). A model sharded by
    FSDP2 decodes this way, as every forward is a collective."""

    def __init__(self, model: Transformer, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None):
        self.model, self.ids, self.mask, self.positions, self.cache = model, ids, mask, positions, cache
        self.device = ids.device

    def __call__(self, new: torch.Tensor) -> torch.Tensor:
        n = new.shape[1]
        mask = torch.cat([self.mask, torch.ones((new.shape[0], n), dtype=self.mask.dtype, device=self.device)], 1)
        if self.cache is None:
            ids, pos = torch.cat([self.ids, new], 1), torch.cat([self.positions, _tail_pos(self.positions, new)], 1)
        elif n == 0:
            ids, pos = self.ids, self.positions
        else:
            ids, pos = new[:, -1:], self.positions[:, -1:] + n
        return self.model(ids, attention_mask=mask, position_ids=pos, cache=self.cache)[:, -1]


def greedy_static(dec: Decoder, prompts: Sequence[Sequence[int]], max_new: int, pad_id: int = 0,
                  step: Callable | None = None, cache=None) -> list[list[int]]:
    """Greedy decoding on a static cache (no stop tokens): every decode step has the same
    shapes and reads no changing Python number, so `step` (default `dec.step`) may be a
    compiled one, e.g. torch.compile(dec.step, mode="reduce-overhead") on CUDA, whose CUDA
    graphs replay the whole step in one launch (bench/gpu.py). The prompt runs eagerly.
    `cache`: a static cache of this batch and length to reuse (a compiled step's graphs are
    recorded for its tensors' addresses); its old contents are masked out, never read.
    -> max_new new tokens per prompt, the tokens of `generate(..., temperature=0)`."""
    ids, mask = left_pad(prompts, pad_id, dec.device)
    B, L = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = cache or dec.new_cache(B, L + max_new, static=True)
    keys = torch.ones((B, L + max_new), dtype=torch.bool, device=dec.device)
    keys[:, :L] = mask.bool()
    step = step or dec.step
    out = []
    with torch.inference_mode():
        tok = dec.step(ids, positions, cache, keys, cache.slots[:L]).argmax(-1)
        for n in range(1, max_new):
            out.append(tok)
            at = cache.slots[L + n - 1:L + n]
            tok = step(tok[:, None], positions[:, -1:] + n, cache, keys, at).argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist()


def compiled_static_step(dec: Decoder, batch: int, max_len: int, **compile_kwargs) -> tuple[Callable, Cache]:
    """`dec.step` compiled as one graph (fullgraph) and a static cache of `batch` rows and
    `max_len` positions for it, for `greedy_static(dec, prompts, max_new, step=, cache=)` with
    prompts padded to max_len - max_new. The cache's tensors are marked as fixed addresses, so
    CUDA graphs (mode="reduce-overhead", bench/gpu.py) write the cache in place instead of
    copying it in and out at every replay. compile_kwargs go to torch.compile (the tests
    trace with backend="eager")."""
    cache = dec.new_cache(batch, max_len, static=True)
    for t in cache.tensors():
        torch._dynamo.mark_static_address(t)
    return torch.compile(dec.step, fullgraph=True, **compile_kwargs), cache


def answer_text(tok, ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[str, bool]:
    """A generated answer -> (its text, without the stop token, stripped; whether it ended with
    a stop token: finished rather than cut off at max_new_tokens). `tok` is a `Tokenizer`."""
    finished = bool(ids) and ids[-1] in stop_ids
    return tok.decode(ids[:-1] if finished else ids, skip_special=True).strip(), finished


def greedy_answers(model: Transformer, tok, prompts: Sequence[Sequence[int]], max_new: int,
                   batch_size: int = 32) -> list[tuple[str, bool]]:
    """Greedy answers (stopping at `tok.stop_ids`) to prompts of token ids, `batch_size` at
    a time -> (text, finished) each (`answer_text`). Greedy, so that the change between two
    models or two evaluations is readable, not sampling noise. A prompt longer than
    `prompt_budget` is cut from the left (`truncate_left`)."""
    s = SamplingConfig(max_new_tokens=max_new, temperature=0.0, stop_ids=tok.stop_ids)
    room = prompt_budget(model.config.max_seq_len, max_new)
    out = []
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, [truncate_left(p, room) for p in prompts[i:i + batch_size]], s, pad_id=tok.pad_id)
        out += [answer_text(tok, o, s.stop_ids) for o in outs]
    return out


def _tail_pos(positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = out.shape[1]
    return positions[:, -1:] + torch.arange(1, n + 1, device=positions.device)[None, :]
