"""RLHF pieces against hand-worked values: GAE, clipped losses, KL, controllers, DPO, LoRA."""
import math

import pytest
import torch

from llmtrain.config import ModelConfig
from llmtrain.losses import dpo_loss, ppo_policy_loss, ppo_value_loss
from llmtrain.model import Transformer
from llmtrain.model.adapters import LoRALinear, apply_lora, merged_state_dict
from llmtrain.rl import (AdaptiveKL, gae, group_advantages, kl_estimate, kl_rewards, masked_mean, minibatches,
                         rollout_rows, token_logprobs, whiten)


def test_gae_three_steps_by_hand():
    # rewards 0, 0, 1; values 0.5, 0.6, 0.7; gamma 0.9, lambda 0.8
    # delta_2 = 1 - 0.7 = 0.3                         A_2 = 0.3
    # delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03               A_1 = 0.03 + 0.72*0.3 = 0.246
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04               A_0 = 0.04 + 0.72*0.246 = 0.21712
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 9.9]])  # the 4th position is padding: ignored
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]]))


def ppo_layout_mask():
    """PPO's real layout, from rollout_rows: two rows [left pad | prompt | answer | right pad],
    row 0 a 3-token prompt and a 2-token answer (then one pad), row 1 a 1-token prompt (two
    left pads) and a 3-token answer. The mask is over log-prob targets (T-1 = 5 columns):
    answer tokens are targets 2..3 in row 0 and 2..4 in row 1."""
    _, _, _, amask = rollout_rows([[11, 12, 13], [14]], [[15, 16], [17, 18, 19]], pad_id=0)
    assert amask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    return amask


def test_gae_on_ppo_layout_by_hand():
    """Left prompt positions, trailing padding and rows of different lengths; the masked
    positions hold junk that must not leak in (a chain that ran through them would pick up
    row 0's trailing value 3.0 or reward 7.0)."""
    m = ppo_layout_mask()
    J = 5.0  # junk at masked positions
    r = torch.tensor([[J, J, 0.0, 1.0, 7.0],
                      [J, J, -0.1, 0.0, 2.0]])
    v = torch.tensor([[9.0, 9.0, 0.5, 0.2, 3.0],
                      [-7.0, -7.0, 1.0, 0.5, 1.5]])
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45); V and A are 0 after each row's last answer token.
    # row 0, answer at t = 2, 3:
    #   t=3: delta = 1.0 + 0.9*0 - 0.2 = 0.8                   A = 0.8                      R = 0.8 + 0.2 = 1.0
    #   t=2: delta = 0.0 + 0.9*0.2 - 0.5 = -0.32               A = -0.32 + 0.45*0.8 = 0.04  R = 0.04 + 0.5 = 0.54
    # row 1, answer at t = 2, 3, 4:
    #   t=4: delta = 2.0 + 0.9*0 - 1.5 = 0.5                   A = 0.5                      R = 2.0
    #   t=3: delta = 0.0 + 0.9*1.5 - 0.5 = 0.85                A = 0.85 + 0.45*0.5 = 1.075  R = 1.575
    #   t=2: delta = -0.1 + 0.9*0.5 - 1.0 = -0.65              A = -0.65 + 0.45*1.075 = -0.16625   R = 0.83375
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.04, 0.8, 0.0],
                                                  [0.0, 0.0, -0.16625, 1.075, 0.5]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.0, 0.54, 1.0, 0.0],
                                                  [0.0, 0.0, 0.83375, 1.575, 2.0]]), atol=1e-6, rtol=0)
    # Each row is its own chain: row 0 alone gives row 0's numbers.
    adv0, _ = gae(r[:1], v[:1], m[:1], gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv0, adv[:1], atol=1e-7, rtol=0)


def test_whiten_on_ppo_layout_mean_zero_unit_variance_masked_zero():
    """Over the answer tokens of both rows (5 of them, rows of different lengths): mean 0 and
    unbiased variance 1; prompt and padding positions come out 0 whatever they held."""
    m = ppo_layout_mask()
    x = torch.tensor([[100.0, -50.0, 1.0, 3.0, 42.0],
                      [7.0, 7.0, 2.0, 4.0, 5.0]])
    # answer entries 1, 3, 2, 4, 5: mean 3, squared deviations 4 + 0 + 1 + 1 + 4 = 10,
    # unbiased variance 10 / 4 = 2.5 (not 1, so forgetting to divide by the std shows)
    s = math.sqrt(2.5)
    want = torch.tensor([[0.0, 0.0, -2 / s, 0.0, 0.0],
                         [0.0, 0.0, -1 / s, 1 / s, 2 / s]])
    w = whiten(x, m)
    torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    sel = w[m.bool()]
    assert abs(sel.mean().item()) < 1e-6 and abs(sel.var(unbiased=True).item() - 1.0) < 1e-6
    assert torch.all(w[~m.bool()] == 0)
    other = x.clone()
    other[~m.bool()] = torch.tensor([-1e4, 3.0, 0.5, 1e3, -2.0])  # other junk at the masked positions
    assert torch.equal(whiten(other, m), w)
    # shift_mean=False keeps the mean: (x - 3) / s + 3 on the answer tokens, 0 elsewhere.
    torch.testing.assert_close(whiten(x, m, shift_mean=False), (want + 3.0) * m, atol=1e-6, rtol=0)


def test_clipped_policy_loss_by_hand():
    # advantages +1 and -1; ratios e^0.5 = 1.6487 and e^-0.5 = 0.6065; clip 0.2
    # token 0: max(-1.6487, -1.2) = -1.2 (clipped);  token 1: max(0.6065, 0.8) = 0.8 (clipped)
    logp, old = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2)
    adv, m = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, clipfrac = ppo_policy_loss(logp, old, adv, m, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    # Inside the clip range the loss is the plain surrogate -A * ratio.
    loss, clipfrac = ppo_policy_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-2 * math.exp(0.1)) and clipfrac.item() == 0.0


def test_clipped_value_loss_by_hand():
    # old 0, new 1, return 2, clip 0.5: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 0.5*2.25
    # old 0, new 0.2, return 0: 0.04 vs 0.04 -> 0.5*0.04
    v, old, ret = torch.tensor([[1.0, 0.2]]), torch.zeros(1, 2), torch.tensor([[2.0, 0.0]])
    assert ppo_value_loss(v, old, ret, torch.ones(1, 2), clip=0.5).item() == pytest.approx((1.125 + 0.02) / 2)


def test_kl_is_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, max_seq_len=16))
    x = torch.randint(0, 30, (2, 10))
    lp = token_logprobs(m(x), x)
    mask = torch.zeros(2, 9)
    mask[:, 4:] = 1
    rewards, kl = kl_rewards(lp, lp.clone(), mask, torch.tensor([1.5, -0.5]), beta=0.1)
    assert torch.all(kl == 0)
    assert rewards[:, 8].tolist() == [1.5, -0.5] and rewards[:, :8].abs().sum() == 0  # the score sits on the last token
    # With a different reference, the per-token penalty is -beta * (log pi - log pi_ref).
    rewards, kl = kl_rewards(lp, lp - 0.5, mask, torch.zeros(2), beta=0.1)
    assert masked_mean(kl, mask).item() == pytest.approx(0.5)
    assert rewards[0, 5].item() == pytest.approx(-0.05)


def test_adaptive_kl_moves_beta_the_right_way():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    c.update(kl=12.0, n_steps=10)  # too far from the reference: push harder
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c2 = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    c2.update(kl=3.0, n_steps=10)  # e = -0.5 clipped to -0.2: relax
    assert c2.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))


def test_whiten_by_hand():
    # masked entries 1, 2, 3: mean 2, unbiased variance ((1)^2 + 0 + 1^2) / 2 = 1, so x - 2
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)


def test_whiten_over_processes_equals_whiten_over_the_whole_batch():
    """Two halves of a batch, each whitened with the other's sums added (what the all-reduce
    does), equal the whole batch whitened at once; each half alone does not."""
    torch.manual_seed(0)
    x, m = torch.randn(6, 5) * 3 + 1, (torch.rand(6, 5) > 0.3).float()
    halves = [(x[:3], m[:3]), (x[3:], m[3:])]
    # Sum-based moments, done by hand over both halves: count, sum, then squared deviations.
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    expected = (x - mean) / var.sqrt() * m
    for i, (xh, mh) in enumerate(halves):
        xo, mo = halves[1 - i]

        def reduce(t, xo=xo, mo=mo):
            if t.numel() == 2:  # (count, sum)
                return t + torch.stack([mo.sum(), (xo * mo).sum()])
            return t + (((xo - mean) ** 2) * mo).sum()  # squared deviations from the global mean
        got = whiten(xh, mh, all_reduce_sum=reduce)
        torch.testing.assert_close(got, expected[3 * i:3 * i + 3], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(whiten(xh, mh), expected[3 * i:3 * i + 3], atol=1e-3)


def test_kl_estimators_by_hand():
    # log pi = log 0.5, log pi_ref = log 0.25: log r = log(0.25 / 0.5) = -log 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))  # -log r
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # (r - 1) - log r
    # k3 is never negative, k1 is when the sampled token is likelier under the reference
    assert kl_estimate(ref, logp, "k1").item() == pytest.approx(-math.log(2))
    assert kl_estimate(ref, logp, "k3").item() == pytest.approx(2 - 1 - math.log(2))
    assert kl_estimate(logp, logp, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_kl_rewards_with_k3_penalise_every_answer_token():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_rewards(logp, ref, mask, torch.tensor([2.0]), beta=0.1, estimator="k3")
    k3 = 0.5 - 1 + math.log(2)
    torch.testing.assert_close(kl, torch.tensor([[k3, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * k3, 2.0, 0.0]]))  # score on the last answer token


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])  # two groups of 4
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3); group 2: mean 1, std sqrt(12/3) = 2
    s1 = math.sqrt(14 / 3)
    grpo = [(-2) / (s1 + 1e-4), -1 / (s1 + 1e-4), 0.0, 3 / (s1 + 1e-4), -1 / 2.0001, -1 / 2.0001, -1 / 2.0001, 3 / 2.0001]
    torch.testing.assert_close(group_advantages(r, 4, "grpo"), torch.tensor(grpo), atol=1e-6, rtol=1e-6)
    # RLOO: r_i minus the mean of the other three: 1 - (2+3+6)/3 = -8/3, 2 - 10/3, 3 - 3, 6 - 2; 0 - 4/3 (x3), 4 - 0
    rloo = [-8 / 3, -4 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    torch.testing.assert_close(group_advantages(r, 4, "rloo"), torch.tensor(rloo), atol=1e-6, rtol=1e-6)
    # a group whose answers all score the same teaches nothing
    assert group_advantages(torch.tensor([5.0, 5.0]), 2, "grpo").abs().max().item() == 0.0
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3, "grpo")


def test_minibatches_are_the_same_partition_on_any_number_of_processes():
    one = minibatches(16, 2, [7, 3, 1])
    two = [minibatches(16, 2, [7, 3, 1], rank, 2) for rank in range(2)]
    for j in range(2):  # minibatch j: process 1's local rows are global rows 8..15
        assert sorted(one[j]) == sorted(two[0][j] + [8 + i for i in two[1][j]])
        assert len(two[0][j]) == len(two[1][j]) == 4  # every process holds the same share
    assert sorted(one[0] + one[1]) == list(range(16))  # a partition
    assert minibatches(16, 2, [7, 3, 2]) != one  # another epoch, another draw
    with pytest.raises(ValueError, match="do not split"):
        minibatches(12, 4, [0], 0, 2)


def test_dpo_loss_by_hand():
    # beta 0.5; chosen: policy -1 vs ref -2 -> r_c = 0.5; rejected: policy -3 vs ref -2 -> r_r = -0.5
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert rc.item() == 0.5 and rr.item() == -0.5


def test_lora_changes_only_adapters_and_merges():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, max_seq_len=16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 30, (2, 8))
    ref = m(x).detach()
    assert apply_lora(m, ["q_proj", "v_proj"], r=4, alpha=8) == 4
    torch.testing.assert_close(m(x), ref)  # B = 0: starts as the original model
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        m(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    sd = m.state_dict()
    assert all(torch.equal(sd[k], before[k]) for k in before)  # base weights untouched
    merged = merged_state_dict(m)
    assert set(merged) == set(before)
    plain = Transformer(ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, max_seq_len=16))
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(x), m(x), atol=1e-5, rtol=1e-5)
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoRALinear)


def test_adapters_off_is_the_original_model_without_a_copy():
    """PPO's LoRA mode keeps two models, not four: the reference is the policy with its
    adapters off, the reward model the value model's backbone with adapters off and its own head."""
    from llmtrain.model.adapters import adapters_off
    from llmtrain.model.heads import ScoreModel
    from llmtrain.model.actor_critic import AdaptersOffScore

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, max_seq_len=16)
    m = Transformer(cfg)
    x = torch.randint(0, 30, (2, 8))
    ref = m(x).detach()
    ptr = m.model.layers[0].self_attn.q_proj.weight.data_ptr()
    apply_lora(m, ["q_proj", "v_proj"], r=4, alpha=8)
    assert m.model.layers[0].self_attn.q_proj.weight.data_ptr() == ptr  # wrapped, not copied
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.5)  # adapters now change the output
    assert not torch.allclose(m(x), ref)
    with adapters_off(m):
        assert torch.equal(m(x), ref)
    assert not torch.allclose(m(x), ref)  # back on after the block

    rm = ScoreModel(cfg, 1)
    lengths = torch.tensor([8, 5])
    rm_out = rm(x, lengths).detach()
    head = torch.nn.Linear(16, 1, bias=False)
    head.load_state_dict(rm.score.state_dict())
    apply_lora(rm, ["q_proj", "v_proj"], r=4, alpha=8)  # rm is now the value model
    with torch.no_grad():
        rm.score.weight.mul_(-3.0)
        for n, p in rm.named_parameters():
            if ".lora_" in n:
                p.add_(0.5)
    view = AdaptersOffScore(rm, head)
    assert torch.equal(view(x, lengths), rm_out)
    assert not torch.allclose(rm(x, lengths), rm_out)


def test_heads_on_the_answer_span_equal_the_full_heads_sliced():
    """RL's forwards run the word head and the value head at the answers' positions only
    (Transformer/ScoreModel/ActorCritic `span`): the same numbers as the full heads sliced, and
    answer_logprobs on them equal token_logprobs' answer columns."""
    from llmtrain.model.actor_critic import ActorCritic
    from llmtrain.model.heads import ScoreModel
    from llmtrain.rl import answer_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=32)
    ac = ActorCritic(Transformer(cfg), ScoreModel(cfg, 1)).eval()
    prompts, answers = [[1, 5, 6], [1, 7], [1, 2, 3, 4]], [[9, 9, 2], [8], [11, 12]]
    ids, mask, pos, amask = rollout_rows(prompts, answers, 0)
    start = max(map(len, prompts)) - 1
    span = slice(start, ids.shape[1] - 1)
    with torch.no_grad():
        full_logits, full_values = ac(ids, mask, pos)
        logits, values = ac(ids, mask, pos, span)
    assert logits.shape == (3, 3, 40) and values.shape == (3, 3)
    torch.testing.assert_close(logits, full_logits[:, span], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, full_values[:, span], rtol=1e-6, atol=1e-6)
    full_lp = token_logprobs(full_logits, ids)
    assert amask[:, :start].sum() == 0  # nothing of an answer is left out of the span
    torch.testing.assert_close(answer_logprobs(logits, ids, start), full_lp[:, start:], rtol=1e-6, atol=1e-6)


def test_frozen_lower_layers_cost_no_weight_gradients_and_no_backward():
    """Freezing the embeddings and the lowest block: those weights get no gradient, and
    backward stops above them (their output needs no gradient, so autograd never goes there)."""
    from llmtrain.model.adapters import freeze

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=30, dim=16, n_layers=3, n_heads=2, max_seq_len=16))
    freeze(m, ["model.embed_tokens.*"], first_layers=1)
    seen = {}
    m.model.layers[0].register_forward_hook(lambda mod, inp, out: seen.update(low=out))
    m.model.layers[1].register_forward_hook(lambda mod, inp, out: seen.update(high=out))
    m(torch.randint(0, 30, (2, 8))).logsumexp(-1).mean().backward()
    assert not seen["low"].requires_grad and seen["high"].requires_grad
    for n, p in m.named_parameters():
        frozen = n.startswith(("model.embed_tokens.", "model.layers.0.")) or (n == "lm_head.weight" and m.config.tie_embeddings)
        assert (p.grad is None) == frozen, n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_old_pass_without_grad_equals_the_update_forward(precision):
    """PPO's old log-probs and values come from forwards without grad (all minibatches but the
    first, whose graph the update reuses); the update's forwards run with grad. Both must give
    the same numbers bit for bit, in fp32 and under bf16 autocast, or the new/old ratio of the
    first epoch is off before any update (no kernel may be chosen by grad mode)."""
    from llmtrain import dist
    from llmtrain.model.actor_critic import ActorCritic
    from llmtrain.model.heads import ScoreModel
    from llmtrain.rl import answer_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    ac = ActorCritic(Transformer(cfg), ScoreModel(cfg, 1)).eval()
    ids, mask, pos, _ = rollout_rows([[1, 5, 6, 7, 8], [1, 7], [1, 2, 3]], [[9, 9, 2, 4], [8], [11, 12, 5, 5]], 0)
    span = slice(4, ids.shape[1] - 1)
    out = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), dist.autocast(torch.device("cpu"), precision):
            logits, values = ac(ids, mask, pos, span)
            out.append((answer_logprobs(logits, ids, 4).detach(), values.detach()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_auto_precision_is_bf16_only_where_native_and_the_policy_is_big_enough(monkeypatch):
    from llmtrain import dist
    from llmtrain.rl_models import AUTO_BF16_MIN_PARAMS, resolved_precision

    cpu, big, small = torch.device("cpu"), AUTO_BF16_MIN_PARAMS, AUTO_BF16_MIN_PARAMS - 1
    for native in (True, False):
        monkeypatch.setattr(dist, "native_bf16", lambda device, n=native: n)
        assert resolved_precision("auto", "fp32", cpu, big) == ("bf16" if native else "fp32")
        assert resolved_precision("auto", "fp32", cpu, small) == "fp32"
        assert resolved_precision("auto", "bf16", cpu, small) == "bf16"  # else: the run's own precision
        assert resolved_precision("fp32", "bf16", cpu, big) == "fp32"  # a setting is kept as given
        assert resolved_precision("bf16", "fp32", cpu, small) == "bf16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_from_one_log_softmax_give_the_two_calls_bits(dtype):
    """The old pass takes the answers' log-probs and the entropy from one log-softmax: the same
    values, and the same gradient, as answer_logprobs and the entropy's formula computed apart."""
    from llmtrain.rl import answer_logprobs, answer_logprobs_and_entropy

    def entropy_from_logits(logits):  # what PPO's old pass computed before, in a second log-softmax
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 11, (3, 9), generator=g)
    lp, ent = answer_logprobs_and_entropy(logits, tokens, 2)
    lp_ref, ent_ref = answer_logprobs(logits, tokens, 2), entropy_from_logits(logits.detach())
    assert torch.equal(lp, lp_ref) and torch.equal(ent, ent_ref)
    assert not ent.requires_grad
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    (grad_ref,) = torch.autograd.grad(lp_ref.sum(), logits)
    assert torch.equal(grad, grad_ref)
