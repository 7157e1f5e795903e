import pytest
import torch

from llmtrain.config import ModelConfig
from llmtrain.model import KVCache, Transformer

CONFIGS = {
    "gqa": ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64),
    "mha-tied": ModelConfig(vocab_size=101, dim=48, n_layers=3, n_heads=6, max_seq_len=64, tie_embeddings=True, rope_theta=500.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers_llama(name):
    transformers = pytest.importorskip("transformers")
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.hf_config())).eval()
    result = hf.load_state_dict(ours.state_dict(), strict=True)  # same names, no renaming table
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


def test_causality():
    torch.manual_seed(0)
    m = Transformer(CONFIGS["gqa"]).eval()
    x = torch.randint(0, 101, (2, 30))
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % 101
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :17], b[:, :17])
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_kv_cache_equals_full_forward():
    torch.manual_seed(0)
    cfg = CONFIGS["gqa"]
    m = Transformer(cfg).eval()
    x = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(cfg, 2, 24, x.device, torch.float32)
        parts = [m(x[:, :10], cache=cache)]  # a prompt, then one token at a time
        for t in range(10, 24):
            parts.append(m(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_row():
    torch.manual_seed(0)
    m = Transformer(CONFIGS["gqa"]).eval()
    seq = torch.randint(0, 101, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = m(seq)
        inside = m(padded, attention_mask=mask, position_ids=pos)[:, 5:]
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=0)


def test_init_is_seeded_and_scaled():
    cfg = CONFIGS["gqa"]
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=1)
    b.init_weights(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.all(a.model.norm.weight == 1)
    std_q = a.model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = a.model.layers[0].self_attn.o_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.1) and std_o == pytest.approx(0.02 / 2, rel=0.15)  # 1/sqrt(2*2 layers)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("how", ["autocast", "bf16 model"])
def test_fused_projections_in_16_bit_give_the_unfused_forward(monkeypatch, bias, how):
    """In 16-bit compute, q/k/v and gate/up run as one GEMM each on the concatenated weights
    (transformer.fused) with one rotary op on q and k: the same logits bit for bit as the
    separate projections, gradients as close to fp64 as theirs, under the same HF names.
    fp32 and LoRA layers keep separate projections."""
    import copy

    from llmtrain import dist
    from llmtrain.model import transformer as tr

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                attention_bias=bias))
    if bias:
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    ids = torch.randint(0, 50, (4, 20))  # 80 rows: at least FUSED_MIN_ROWS
    keys = torch.ones(4, 20, dtype=torch.long)
    keys[1, :4] = 0
    pos = (keys.cumsum(1) - 1).clamp(min=0)
    exact = copy.deepcopy(m).double()
    exact(ids, keys, pos).square().mean().backward()
    if how == "bf16 model":
        m.to(torch.bfloat16)
    calls = []
    real = tr.fused
    monkeypatch.setattr(tr, "fused", lambda x, *ls: calls.append(real(x, *ls)) or calls[-1])
    runs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(tr, "fused", lambda x, *ls: False)
        m.zero_grad()
        with dist.autocast(torch.device("cpu"), "bf16" if how == "autocast" else "fp32"):
            y = m(ids, keys, pos)
        y.float().square().mean().backward()
        runs.append((y.detach(), [p.grad.double() for p in m.parameters()]))
    assert calls and all(calls)  # the first run did fuse, every layer
    assert torch.equal(runs[0][0], runs[1][0])

    def grad_errors(grads):
        return sorted(((g - p.grad).norm() / p.grad.norm()).item() for g, p in zip(grads, exact.parameters()))

    fused_err, unfused_err = grad_errors(runs[0][1]), grad_errors(runs[1][1])
    mid = len(fused_err) // 2
    assert fused_err[mid] <= 1.5 * unfused_err[mid]
    assert fused_err[-1] <= 2 * unfused_err[-1] + 2 ** -8  # the worst tensor: within a bf16 rounding
    # fp32 (the pinned losses' path) and LoRA layers: never fused
    x32 = torch.zeros(2, tr.FUSED_MIN_ROWS // 2, 32)
    a = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=8)).model.layers[0].self_attn
    assert not real(x32, a.q_proj, a.k_proj, a.v_proj)
    from llmtrain.model.adapters import LoRALinear
    with dist.autocast(torch.device("cpu"), "bf16"):
        assert real(x32, a.q_proj, a.k_proj, a.v_proj)
        assert not real(x32, LoRALinear(a.q_proj, 2, 4, 0.0), a.k_proj, a.v_proj)
        assert not real(x32[:, :1], a.q_proj, a.k_proj, a.v_proj)  # a decode step's few rows


def test_rms_norm_with_a_hand_written_backward():
    """RMSNormFn (mixed precision's RMSNorm): the exact gradient (gradcheck in fp64), the
    forward of rms_norm bit for bit in fp32, its gradients to fp32 rounding; and the model uses
    it exactly under 16-bit autocast with grad."""
    from llmtrain import dist
    from llmtrain.model.transformer import RMSNorm, RMSNormFn, rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-5), (x, w))
    x = torch.randn(4, 16, 64, generator=g, requires_grad=True)
    w = torch.randn(64, generator=g, requires_grad=True)
    dy = torch.randn(4, 16, 64, generator=g)
    ours, ref = RMSNormFn.apply(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    norm = RMSNorm(64, 1e-5)
    with dist.autocast(torch.device("cpu"), "bf16"):
        assert type(norm(x).grad_fn).__name__ == "RMSNormFnBackward"
        with torch.no_grad():
            assert norm(x).grad_fn is None
    assert type(norm(x).grad_fn).__name__ != "RMSNormFnBackward"  # plain fp32: autograd's backward
    # a frozen weight gets no gradient; a second derivative is refused, not silently wrong
    w.requires_grad_(False)
    dx, = torch.autograd.grad(RMSNormFn.apply(x, w, 1e-5), (x,), dy)
    torch.testing.assert_close(dx, torch.autograd.grad(rms_norm(x, w, 1e-5), (x,), dy)[0], rtol=1e-5, atol=1e-5)
    dx, = torch.autograd.grad(RMSNormFn.apply(x, w, 1e-5), (x,), dy, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_under_compile_gives_the_rolled_bits(monkeypatch, dtype):
    """The form `rotary_rolled` takes while torch.compile traces (a cat of the swapped halves,
    which inductor vectorises) gives the roll form's values and gradient bit for bit."""
    from llmtrain.model import transformer as tr

    rot = tr.Rotary(16, 32, 10000.0)
    cos, sin = tr.rolled_tables(*rot.span(0, 32), dtype)
    x = torch.randn(3, 32, 5, 16, dtype=dtype)
    g = torch.randn(3, 32, 5, 16, dtype=dtype)
    got = []
    for compiling in (False, True):
        monkeypatch.setattr(tr, "_compiling", lambda c=compiling: c)
        xi = x.clone().requires_grad_()
        y = tr.rotary_rolled(xi, cos, sin)
        y.backward(g)
        got.append((y.detach(), xi.grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert not torch.equal(got[0][0], x)  # the rotation did something
