"""The decoding engine (llmtrain/model/decoder.py): fused q/k/v and gate/up, packed weights,
the head at the last position only. It must compute what the unfused model computes."""
import pytest
import torch
import torch.nn.functional as F

from llmtrain.config import ModelConfig
from llmtrain.generate import SamplingConfig, generate, greedy_static
from llmtrain.model import Transformer
from llmtrain.model.adapters import adapters_off, apply_lora
from llmtrain.model.decoder import Decoder

CFG = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3)
PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7]]


def model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def decoder_logits(dec: Decoder, ids: torch.Tensor, static=False) -> torch.Tensor:
    """The decoder's logits at every position of ids (B, T): the prompt prefilled one token at
    a time, so each step's last-position head is read."""
    B, T = ids.shape
    cache = dec.new_cache(B, T + 2, static=static)
    out = []
    for t in range(T):
        out.append(dec.step(ids[:, t:t + 1], torch.full((B, 1), t), cache, None))
    return torch.stack(out, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_give_the_unfused_logits(bias):
    """fp32: the fused q/k/v and gate/up projections (packed for MKL) give the logits of the
    model's own separate layers, whose names stay Hugging Face's."""
    m = model(ModelConfig(**{**vars(CFG), "attention_bias": bias}))
    if bias:
        with torch.no_grad():
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                    p.normal_(0, 0.5)
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        want = m(ids)
    dec = Decoder(m, torch.float32)
    assert len(dec.layers[0].qkv.weight) == (4 + 2 + 2) * 12 and len(dec.layers[0].gate_up.weight) == 2 * m.config.ffn_dim
    torch.testing.assert_close(decoder_logits(dec, ids), want, rtol=1e-5, atol=1e-5)
    # a whole prompt in one step: the head at its last position only
    torch.testing.assert_close(dec.step(ids, torch.arange(12).expand(3, 12), dec.new_cache(3, 16), None), want[:, -1],
                               rtol=1e-5, atol=1e-5)
    # ... and with rows padded on the left (the last layer then attends from the last position
    # only, under the last row of the mask), and the next step on that cache
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = dec.new_cache(3, 16)
    with torch.no_grad():
        want = m(ids, attention_mask=mask, position_ids=pos)[:, -1]
        nxt = want.argmax(-1, keepdim=True)
        want_next = m(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                      position_ids=torch.cat([pos, pos[:, -1:] + 1], 1))[:, -1]
    torch.testing.assert_close(dec.step(ids, pos, cache, mask), want, rtol=1e-5, atol=1e-5)
    keys = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(dec.step(nxt, pos[:, -1:] + 1, cache, keys), want_next, rtol=1e-5, atol=1e-5)
    # the same prompts in two chunks, the second (T > 1) after cached positions
    cache = dec.new_cache(3, 16)
    dec.step(ids[:, :7], pos[:, :7], cache, mask[:, :7])
    torch.testing.assert_close(dec.step(ids[:, 7:], pos[:, 7:], cache, mask), want, rtol=1e-5, atol=1e-5)


def test_bf16_decoder_is_as_accurate_as_the_bf16_model():
    """bf16: the decoder (packed oneDNN GEMMs, fused layers, SDPA's own kernel) is as close to
    the fp32 logits as the bf16 model's forward is (which takes model/attention.py's batched
    matmuls on a CPU in bf16, so the two bf16 paths differ in their last bits, not in
    accuracy). The rotary tables stay fp32 in a bf16 model."""
    m = model()
    mb = Transformer(CFG).eval()
    mb.load_state_dict(m.state_dict())
    mb.to(torch.bfloat16)
    assert mb.model.rotary.cos.dtype == torch.float32 and mb.model.rotary.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact, model_bf16 = m(ids), mb(ids).float()
    dec_bf16 = decoder_logits(Decoder(m, torch.bfloat16), ids).float()
    err_model, err_dec = (model_bf16 - exact).abs(), (dec_bf16 - exact).abs()
    assert 0 < err_model.mean() and err_dec.mean() <= 1.5 * err_model.mean()
    assert err_dec.max() <= 2 * err_model.max()
    assert (dec_bf16.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_state_dict_names_stay_hugging_faces():
    """Fusing happens in the decoder's copy only: the model's parameters, state dict and a
    save/load round trip keep HF Llama's names."""
    m = model()
    Decoder.of(m)
    names = set(m.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert not any("qkv" in n or "gate_up" in n for n in names)
    m2 = Transformer(CFG)
    m2.load_state_dict(m.state_dict())  # strict: same names, same shapes


def test_greedy_through_the_decoder_equals_the_models_own_forward():
    """Padded prompts of different lengths, greedy: the decoder's tokens are those of the
    model's forward with its KV cache, and of its forward without one."""
    m = model()
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    got = generate(m, PROMPTS, s)
    assert got == generate(m, PROMPTS, s, use_cache=False)
    assert len(set(map(tuple, got))) > 1


def test_static_cache_gives_the_same_tokens():
    """The fixed-shape step CUDA graphs need (attention over the whole cache under a mask,
    index_copy_ writes at a slot tensor) gives the dynamic cache's logits, and greedy_static
    (what bench/gpu.py compiles) the tokens of generate, padded prompts included."""
    m = model()
    dec = Decoder(m, torch.float32)
    ids = torch.randint(0, 97, (2, 9))
    B, T = ids.shape
    cache = dec.new_cache(B, T + 2, static=True)
    static = torch.stack([dec.step(ids[:, t:t + 1], torch.full((B, 1), t), cache, None, cache.slots[t:t + 1])
                          for t in range(T)], 1)
    torch.testing.assert_close(static, decoder_logits(dec, ids), rtol=1e-5, atol=1e-5)
    want = generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0))
    assert greedy_static(dec, PROMPTS, 10) == want
    assert want == generate(m, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), use_cache=False)
    # a step that is not dec.step itself is what runs the decode steps
    calls = []
    assert greedy_static(dec, PROMPTS, 10, step=lambda *a: calls.append(1) or dec.step(*a)) == want
    assert len(calls) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,padded", [(1, False), (3, False), (3, True), (16, False), (16, True)])
@pytest.mark.parametrize("kv_heads", [2, 4, 1])  # grouped, one per query head, one for all
def test_the_one_token_step_gives_the_general_steps_bits(dtype, batch, padded, kv_heads):
    """`Decoder._next`, which runs every decode step of `generate` (one new token per row, a
    dynamic cache), gives the logits and the cache of the general `_step` bit for bit: with
    biases on q/k/v and o, grouped-query attention or not, rows padded on the left or none
    (fp32: 16 rows take MKL's packed GEMM, 1 and 3 F.linear's; bf16 is oneDNN's at any
    batch); and a step's logits are its own (the next step leaves them as they were)."""
    m = model(ModelConfig(**{**vars(CFG), "attention_bias": True, "n_kv_heads": kv_heads}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    dec = Decoder(m.to(dtype), dtype)
    ids = torch.randint(1, 97, (batch, 6))
    keys = torch.ones(batch, 10, dtype=torch.long)
    if padded:
        keys[1, :3] = 0
    pos = (keys[:, :6].cumsum(-1) - 1).clamp(min=0)
    general, one = dec.new_cache(batch, 10), dec.new_cache(batch, 10)
    want = dec._step(ids, pos, general, keys[:, :6] if padded else None)
    got = dec._step(ids, pos, one, keys[:, :6] if padded else None)
    wants, gots = [], []
    for n in range(4):
        tok, p = want.argmax(-1, keepdim=True), pos[:, -1:] + 1 + n
        k = keys[:, :7 + n] if padded else None
        want, got = dec._step(tok, p, general, k), dec._next(tok, p, one, k)
        assert torch.equal(got, want), n
        wants.append(want.clone())
        gots.append(got)
    assert all(torch.equal(a, b) for a, b in zip(gots, wants))
    assert one.length == general.length == 10
    assert all(torch.equal(a, b) for a, b in zip(one.kv, general.kv))
    seen = []  # step(), which generate calls, takes _next for one token on a dynamic cache
    dec._next = lambda *a: seen.append(1) or Decoder._next(dec, *a)
    dec.step(tok, torch.zeros_like(p), dec.new_cache(batch, 10), None)
    dec.step(tok, torch.zeros_like(p), dec.new_cache(batch, 10, static=True), None, torch.zeros(1, dtype=torch.long))
    assert seen == [1]


def test_a_cache_steps_in_and_out_of_inference_mode():
    """A cache made outside inference mode (as `generate` makes it) can be stepped inside it and
    then outside: the one-token step's buffers are made with the cache, not by its first step."""
    dec = Decoder(model(), torch.float32)
    ids, pos = torch.randint(1, 97, (2, 3)), torch.arange(3).expand(2, 3)
    cache = dec.new_cache(2, 8)
    with torch.inference_mode():
        dec.step(ids, pos, cache, None)
        dec.step(ids[:, :1], pos[:, -1:] + 1, cache, None)
    assert dec.step(ids[:, :1], pos[:, -1:] + 2, cache, None).shape == (2, 97)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dynamic_cache_reads_only_the_slots_it_has_written(dtype):
    """A dynamic cache is not cleared when made (torch.empty): with NaN in every slot at the
    start, a padded batch, prefilled in one step and then stepped a token at a time, gives the
    logits it gives from a zeroed cache, bit for bit, and no NaN."""
    dec = Decoder(model().to(dtype), dtype)
    ids = torch.randint(1, 97, (2, 5))
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[1, :2] = False  # row 1's prompt is 3 tokens, padded on the left
    pos = (keys[:, :5].long().cumsum(-1) - 1).clamp(min=0)

    def run(fill: float) -> torch.Tensor:
        cache = dec.new_cache(2, 9)
        for t in cache.kv:
            t.fill_(fill)
        out = [dec.step(ids, pos, cache, keys[:, :5])]
        for n in range(4):
            out.append(dec.step(out[-1].argmax(-1, keepdim=True), pos[:, -1:] + 1 + n, cache, keys[:, :6 + n]))
        return torch.stack(out)

    with_nan = run(float("nan"))
    assert not with_nan.isnan().any()
    assert torch.equal(with_nan, run(0.0))


def test_decoder_is_rebuilt_when_a_weight_changes_and_only_then():
    m = model()
    d1 = Decoder.of(m)
    assert Decoder.of(m) is d1
    assert Decoder.of(m, torch.bfloat16) is not d1
    d2 = Decoder.of(m)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # in place, as an optimizer step
    d3 = Decoder.of(m)
    assert d3 is not d2
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        want = m(ids)[:, -1]
    torch.testing.assert_close(d3.step(ids, torch.arange(6).expand(2, 6), d3.new_cache(2, 8), None), want,
                               rtol=1e-5, atol=1e-5)


def test_lora_updates_are_merged_and_off_when_adapters_are_off():
    m = model()
    base_ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        before = m(base_ids)[:, -1]
    apply_lora(m, ["q_proj", "v_proj", "up_proj"], r=4)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        after = m(base_ids)[:, -1]
    assert not torch.allclose(before, after)
    pos = torch.arange(7).expand(2, 7)
    dec = Decoder.of(m)
    torch.testing.assert_close(dec.step(base_ids, pos, dec.new_cache(2, 8), None), after, rtol=1e-5, atol=1e-5)
    with adapters_off(m):  # PPO's reference under LoRA
        off = Decoder.of(m)
        torch.testing.assert_close(off.step(base_ids, pos, off.new_cache(2, 8), None), before, rtol=1e-5, atol=1e-5)
    assert Decoder.of(m) is not off


def test_a_fused_optimizer_step_retires_the_decoder():
    """Fused AdamW updates weights without bumping their version counters; optimizer_step says
    so (decoder.weights_changed), and the next decoder reads the new weights."""
    from llmtrain.config import OptimConfig
    from llmtrain.training import build_optimizer, optimizer_step

    m = model()
    opt = build_optimizer(m, OptimConfig(lr=0.1, impl="fused"), torch.device("cpu"))
    d1 = Decoder.of(m)
    ids = torch.randint(0, 97, (2, 6))
    m(ids).sum().backward()
    versions = [p._version for p in m.parameters()]
    optimizer_step(m, opt, 0.0)
    assert [p._version for p in m.parameters()] == versions  # what makes the explicit call needed
    d2 = Decoder.of(m)
    assert d2 is not d1
    with torch.no_grad():
        want = m(ids)[:, -1]
    torch.testing.assert_close(d2.step(ids, torch.arange(6).expand(2, 6), d2.new_cache(2, 8), None), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_decoders_bf16_norm_gives_the_models_bits(dtype):
    """In bf16 (and fp16), the decoder's `Norm` is the model's formula bit for bit, over
    magnitudes from 1e-3 to 1e3 (1e2 in fp16) and several widths, on rows read with a stride as
    the final norm reads a prefill's last position. A scale one fp32 rounding off moves a bf16
    output by a whole bf16 step only now and then (and that changed 3 of 16 greedy rows against
    transformers in bench/generate.py), so this takes thousands of rows: a scale from
    `vector_norm`, or the mean as a sum times a rounded 1/D (CUDA's `mean`), differs in a few
    of them."""
    from llmtrain.model.decoder import Norm
    from llmtrain.model.transformer import rms_norm as model_norm

    g = torch.Generator().manual_seed(0)
    for D in (48, 384, 896):
        for scale in (1e-3, 1.0, 1e3 if dtype == torch.bfloat16 else 1e2):
            x = (torch.randn(4096, 2, D, generator=g) * scale).to(dtype)
            w = torch.randn(D, generator=g).to(dtype)
            for rows in (x, x[:, -1]):  # contiguous, and every other row of x
                assert torch.equal(Norm(w, 1e-6, x.device, D)(rows), model_norm(rows, w, 1e-6)), (D, scale)


def test_the_decoders_fp32_norm_folds_its_weight_into_the_next_matrix():
    """In fp32 the norm's weight lives in the columns of the matrix that reads the norm
    (`fold_norm`), and the norm itself is a vector_norm reduction: the matrix's output is the
    model's to fp32 rounding, over magnitudes from 1e-3 to 1e3 (eps mattering at the small
    end) and several widths; an eps left out or a weight folded into rows would be far off."""
    from llmtrain.model.decoder import fold_norm
    from llmtrain.model.transformer import RMSNorm
    from llmtrain.model.transformer import rms_norm as model_norm

    g = torch.Generator().manual_seed(0)
    for i in range(60):
        D = (48, 384, 896)[i % 3]
        x = torch.randn(4, 2, D, generator=g) * 10 ** (6 * i / 59 - 3)
        norm = RMSNorm(D, eps=1e-2)
        with torch.no_grad():
            norm.weight.normal_(generator=g)
        W = torch.randn(32, D, generator=g)
        kept, folded = fold_norm(norm, W, torch.float32)
        assert kept.weight is None
        want = F.linear(model_norm(x, norm.weight.detach(), 1e-2), W)
        torch.testing.assert_close(kept(x) @ folded.T, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert fold_norm(norm, W, torch.bfloat16)[1] is W  # bf16 keeps the model's order of roundings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_written_in_place_gives_the_models_bits(dtype):
    """The decoder rotates queries and keys inside the step's q/k/v tensor (so keys and values
    reach the cache in one copy): the same bits as the model's `rotary_rolled`, and the values
    beside them untouched."""
    from llmtrain.model.decoder import rotary_into
    from llmtrain.model.transformer import rolled_tables, rotary_rolled

    g = torch.Generator().manual_seed(0)
    B, T, H, K, Dh = 3, 2, 4, 2, 16
    qkv = (torch.randn(B, T, H + 2 * K, Dh, generator=g) * 5).to(dtype)
    ang = torch.rand(B, T, Dh // 2, generator=g) * 100
    cos, sin = rolled_tables(torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1), dtype)
    want = rotary_rolled(qkv[:, :, :H + K], cos, sin)
    before, values = qkv[:, :, :H + K].clone(), qkv[:, :, H + K:].clone()
    assert not torch.equal(want, before)  # (so a rotary that did nothing fails below)
    rotary_into(qkv[:, :, :H + K], cos, sin)
    assert torch.equal(qkv[:, :, :H + K], want)
    assert torch.equal(qkv[:, :, H + K:], values)



def test_each_cache_carries_the_rotary_tables_of_its_own_positions():
    """The rotary tables are the cache's, as long as it (not the decoder's for the whole
    context), and equal to the model's at those positions."""
    from llmtrain.model.transformer import rolled_tables

    m = model()
    dec = Decoder(m, torch.float32)
    for n in (5, 3, 40):
        c = dec.new_cache(2, n)
        want = rolled_tables(*m.model.rotary.span(0, n), torch.float32)
        assert c.cos.shape == (n, 1, CFG.dim // CFG.n_heads)
        assert torch.equal(c.cos, want[0]) and torch.equal(c.sin, want[1])


def test_the_compiled_static_step_traces_as_one_graph_with_the_eager_tokens():
    """What bench/gpu.py runs under CUDA graphs, traced here by dynamo as one graph
    (fullgraph; backend="eager", so no C++ compile): the tokens of the eager static loop, the
    cache reused across calls, and the cache's tensors marked as fixed addresses."""
    from llmtrain.generate import compiled_static_step

    torch._dynamo.reset()
    m = model()
    dec = Decoder(m, torch.float32)
    want = greedy_static(dec, PROMPTS, 10)
    L = max(len(p) for p in PROMPTS)
    step, cache = compiled_static_step(dec, len(PROMPTS), L + 10, backend="eager")
    assert greedy_static(dec, PROMPTS, 10, step=step, cache=cache) == want
    assert greedy_static(dec, PROMPTS, 10, step=step, cache=cache) == want  # old contents masked out
    assert all(getattr(t, "_dynamo_static_input_type", None) is not None for t in cache.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_under_compile_gives_the_same_bits(monkeypatch, dtype):
    """The form `rotary_into` takes while torch.compile traces (a cat of the swapped halves
    instead of roll) writes the same bits."""
    from llmtrain.model.decoder import rotary_into
    from llmtrain.model.transformer import rolled_tables

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 8, 16, generator=g) * 5).to(dtype)
    ang = torch.rand(3, 2, 8, generator=g) * 100
    cos, sin = rolled_tables(torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1), dtype)
    got = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        y = x.clone()
        rotary_into(y, cos, sin)
        got.append(y)
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], x)


def test_a_model_that_has_generated_still_deepcopies_and_saves(tmp_path):
    """The decoder a model caches (packed weights: opaque tensors on a CPU) lives beside the
    model, not in it: copy.deepcopy and torch.save of the whole model work after generating,
    and the copy generates the same tokens."""
    import copy

    m = model()
    s = SamplingConfig(max_new_tokens=6, temperature=0)
    want = generate(m, PROMPTS, s)
    twin = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert generate(twin, PROMPTS, s) == want == generate(loaded, PROMPTS, s)
    assert Decoder.of(m) is Decoder.of(m) and Decoder.of(twin) is not Decoder.of(m)
