"""model/attention.py: BmmAttention against SDPA (forward and gradients), and when it is used."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmtrain.model import attention as attn
from llmtrain.model.attention import BMM_MAX_KEYS, BmmAttention, attention, use_bmm


def qkv(B, H, K, T, S, Dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, L: torch.randn(B, n, L, Dh, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(H, T), make(K, S), make(K, S)


def padded_mask(B, T):
    """build_mask's kind: causal, left padding of 0, 2, 3 keys, a padding query sees itself."""
    from llmtrain.model.transformer import build_mask
    keys = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate([0, 2, 3][:B]):
        keys[b, :pad] = 0
    return build_mask(keys, B, T, 0, "cpu")


def sdpa_math(q, k, v, mask):
    H, K = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_backward_is_the_exact_gradient_in_fp64():
    q, k, v = qkv(2, 3, 3, 5, 5, 4, torch.float64)
    bias = attn._bias(padded_mask(2, 5), q)
    assert torch.autograd.gradcheck(lambda q, k, v: BmmAttention.apply(q, k, v, bias), (q, k, v))
    q, k, v = qkv(2, 2, 2, 1, 6, 4, torch.float64)  # one query over a cache: no bias
    assert torch.autograd.gradcheck(lambda q, k, v: BmmAttention.apply(q, k, v, None), (q, k, v))


@pytest.mark.parametrize("case", ["causal", "padded", "additive", "gqa", "one query"])
def test_equals_sdpa_in_fp64(case):
    B, H, K, T, S = {"causal": (2, 4, 4, 7, 7), "padded": (3, 4, 4, 7, 7), "additive": (3, 4, 4, 7, 7),
                     "gqa": (2, 4, 2, 7, 7), "one query": (2, 4, 4, 1, 9)}[case]
    q, k, v = qkv(B, H, K, T, S, 8, torch.float64)
    mask = padded_mask(B, T) if case in ("padded", "additive") else None
    if case == "additive":  # SDPA's other convention: 0 seen, -inf hidden
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    if K != H:
        k2, v2 = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    else:
        k2, v2 = k, v
    ours = BmmAttention.apply(q, k2, v2, attn._bias(mask, q))
    ref = sdpa_math(q, k, v, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_kind", ["causal", "padded"])
def test_bf16_is_as_close_to_fp64_as_sdpa_is(mask_kind):
    """The bmm path replaces SDPA on a CPU in bf16: its forward and gradients must be no
    further from the exact (fp64) result than SDPA's own bf16 kernels are."""
    B, H, K, T, Dh = 3, 4, 2, 64, 32
    q, k, v = qkv(B, H, K, T, T, Dh, torch.bfloat16)
    mask = padded_mask(B, T) if mask_kind == "padded" else None
    assert use_bmm(q, k)
    g = torch.randn(B, H, T, Dh, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = sdpa_math(*exact_in, mask)
    exact_grads = torch.autograd.grad(exact, exact_in, g)

    def error(fn):
        y = fn(q, k, v, mask)
        grads = torch.autograd.grad(y, (q, k, v), g.to(y.dtype))
        return max((a.double() - b).abs().max().item() for a, b in zip((y, *grads), (exact, *exact_grads)))

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    ours, theirs = error(attention), error(sdpa)
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)


def test_kernel_choice():
    small = qkv(2, 4, 4, 16, 16, 8, torch.bfloat16)
    assert use_bmm(small[0], small[1])
    assert use_bmm(*qkv(2, 4, 4, 16, 16, 8, torch.float16)[:2])
    assert not use_bmm(*qkv(2, 4, 4, 16, 16, 8, torch.float32)[:2])  # fp32: SDPA's flash is as fast
    long = qkv(1, 2, 2, 1, BMM_MAX_KEYS + 1, 8, torch.bfloat16)
    assert not use_bmm(long[0], long[1])  # past the crossover with flash attention


def test_model_forward_in_bf16_matches_sdpa_closely(monkeypatch):
    """A bf16-autocast model forward with the bmm path against the same forward on SDPA."""
    from llmtrain import dist
    from llmtrain.config import ModelConfig
    from llmtrain.model import Transformer

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    ids = torch.randint(0, 50, (3, 20))
    keys = torch.ones(3, 20, dtype=torch.long)
    keys[1, :4] = 0
    with dist.autocast(torch.device("cpu"), "bf16"):
        ours = m(ids, keys).float()
        monkeypatch.setattr(attn, "use_bmm", lambda *args: False)
        sdpa = m(ids, keys).float()
    exact = m.double()(ids, keys)
    assert (ours - exact).abs().max() <= 1.5 * (sdpa - exact).abs().max() + 1e-3


def test_edge_cases_never_give_nan_or_a_wrong_gradient():
    """A query that sees no key gives finite outputs and gradients (SDPA: zeros; here the mean
    of the values, an ignored row either way); q, k, v of mixed dtypes and a mask that wants a
    gradient go to SDPA; a second derivative is refused."""
    q, k, v = qkv(2, 2, 2, 4, 4, 8, torch.bfloat16)
    mask = padded_mask(2, 4).clone()
    mask[0, 0, 1] = False  # query 1 of row 0 sees nothing
    y = attention(q, k, v, mask)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert not use_bmm(q, k.float(), v)
    assert not use_bmm(q, k, v, torch.zeros(4, 4, requires_grad=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's mixed inputs: SDPA takes them
        assert attention(q, k.detach().float(), v.detach().float(), None).shape == q.shape
    g, = torch.autograd.grad(attention(q, k, v, None).float().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError):
        g.float().sum().backward()
