import math

import pytest
import torch

from llmtrain.config import ModelConfig
from llmtrain.generate import SamplingConfig, filter_logits, generate, next_token, sample_from
from llmtrain.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A large init so greedy decoding is far from ties and sequences differ.
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3)).eval()


PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7]]


def test_greedy_with_cache_equals_without(model):
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    assert generate(model, PROMPTS, s, use_cache=True) == generate(model, PROMPTS, s, use_cache=False)


def test_batched_equals_one_at_a_time(model):
    s = SamplingConfig(max_new_tokens=15, temperature=0)
    batched = generate(model, PROMPTS, s)
    assert batched == [generate(model, [p], s)[0] for p in PROMPTS]
    assert len(set(map(tuple, batched))) > 1


def test_stop_token_ends_a_row(model):
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    free = generate(model, PROMPTS[:1], s)[0]
    stop = free[4]
    cut = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=20, temperature=0, stop_ids=(stop,)))[0]
    assert cut == free[: free.index(stop) + 1]


def test_rows_of_a_global_batch_sample_as_the_whole_batch_does(model):
    """RL rollouts spread over processes: each process samples its rows of the global batch
    with the uniforms of those rows, so the answers do not depend on the split."""
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7], [1, 4]]
    s = SamplingConfig(max_new_tokens=12, temperature=1.0)
    whole = generate(model, prompts, s, generator=torch.Generator().manual_seed(3))
    halves = [generate(model, prompts[i:i + 2], s, generator=torch.Generator().manual_seed(3), rows=(i, 4))
              for i in (0, 2)]
    assert halves[0] + halves[1] == whole
    alone = generate(model, prompts[2:], s, generator=torch.Generator().manual_seed(3))
    assert alone != whole[2:]  # without `rows`, the second half would draw the first half's numbers


def test_sampling_is_seeded(model):
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=10, top_p=0.9)
    a = generate(model, PROMPTS, s, generator=torch.Generator().manual_seed(1))
    b = generate(model, PROMPTS, s, generator=torch.Generator().manual_seed(1))
    assert a == b


def test_top_k_top_p_hand_worked():
    # probabilities 0.5, 0.25, 0.125, 0.125
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p=0.7: 0.5 < 0.7 so the second token is needed; 0.75 >= 0.7 so the rest go.
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    kept = filter_logits(logits, top_p=0.8)
    assert math.isclose(torch.softmax(kept, -1)[0, 2].item(), 0.125 / 0.875, rel_tol=1e-6)


def test_sample_from_draws_each_token_at_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 1.0, 0.0]]).repeat(20000, 1)
    draws = sample_from(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    freq = torch.bincount(draws[:, 0], minlength=4).float() / 20000
    # 4 standard errors of a frequency near 0.5 over 20,000 draws: 0.014
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.2, 0.3]), atol=0.014, rtol=0)
    assert freq[1] == 0  # probability 0: never drawn
    assert (draws[:, 1] == 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_of_equal_maxima_as_argmax_does(dtype):
    """Greedy picks through `max(-1).indices` (faster than argmax on a CPU): on ties it must
    take the first maximum, and a NaN as the largest, exactly as argmax (and transformers) do."""
    g = torch.Generator().manual_seed(0)
    greedy = SamplingConfig(temperature=0)
    logits = torch.randint(0, 4, (16, 8192), generator=g).to(dtype)  # many ties in every row
    logits[0, 5000] = logits[0, 7000] = 9  # a tie far apart, past any vector lane boundary
    logits[1, 3000] = logits[1, 6000] = float("nan")
    got = next_token(logits, greedy, None)
    assert got[0] == 5000 and got[1] == 3000
    assert torch.equal(got, logits.argmax(-1))
