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
