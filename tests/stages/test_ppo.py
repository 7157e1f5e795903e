"""PPO end to end on a tiny model: a reward that prefers one token raises its frequency;
LoRA and freezing change only what they should; resume continues."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, write_jsonl
from llmtrain import checkpoint
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.config import LoRAConfig, OptimConfig, PPOConfig, RunConfig, FreezeConfig
from llmtrain.generate import SamplingConfig, generate
from llmtrain.metrics import read_metrics
from llmtrain.model import Transformer
from llmtrain.model.heads import ScoreModel
from llmtrain.stages import ppo
from llmtrain.tokenizer import Tokenizer, render_chat


@pytest.fixture(scope="module")
def rm_ckpt(pretrained, tmp_path_factory):
    """A reward-model checkpoint (random head on the pretrained backbone); the tests replace
    its scores with a scripted reward, but PPO loads it and starts its value head from it.
    The head is drawn from its own seed, not from whatever the tests before left in torch's
    global generator: that head steers PPO's first advantages, and a draw that depended on
    test order made the frequency test pass alone and fail after other tests."""
    out = tmp_path_factory.mktemp("rm") / "run"
    with torch.random.fork_rng(devices=[]):  # seeded here, and the global generator left as it was
        torch.manual_seed(0)
        model = ScoreModel(checkpoint.model_config(pretrained), 1)
    checkpoint.load_weights(pretrained, model, new_head=("score.",))
    checkpoint.save(out, 1, model, config={"model": vars(model.config), "stage": "reward", "reward": {"offset": 0.0, "std": 1.0}},
                    meta={"tokens": 0}, tokenizer_path=str(checkpoint.tokenizer_of(pretrained)))
    return out


def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about the {w}"} for w in WORDS * 2])


def target_token(pretrained):
    tok = Tokenizer.load(checkpoint.tokenizer_of(pretrained))
    return tok, tok.encode("!")[0]


def frequency(policy_dir_or_model, tok, target, convs, n=4):
    model = policy_dir_or_model
    if not isinstance(model, Transformer):
        model = Transformer(checkpoint.model_config(policy_dir_or_model))
        checkpoint.load_weights(policy_dir_or_model, model)
    s = SamplingConfig(16, 1.0, stop_ids=(tok.end_id, tok.eos_id))
    hits = total = 0
    for seed in range(n):
        outs = generate(model, [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs], s,
                        pad_id=tok.pad_id, generator=torch.Generator().manual_seed(seed))
        for o in outs:
            hits += sum(t == target for t in o)
            total += len(o)
    return hits / max(total, 1)


def scripted_reward(tok, target):
    def score(model, tok_, items, batch_size=32, offset=0.0):
        return [sum(t == target for t in tok.encode(it[1])) / max(1, len(tok.encode(it[1]))) * 4.0 for it in items]
    return score


def ppo_config(pretrained, rm, prompts, out, **kw):
    c = PPOConfig(policy=str(pretrained), reward_model=str(rm), prompts=str(prompts), val_every=10, eval_prompts=4,
                  # bf16 rollouts (the policy's decoding copy) and a bf16 reference and reward model,
                  # whatever the machine: the auto default where bf16 is native (issue #19)
                  rollout_precision="bf16", frozen_precision="bf16",
                  rollout_batch=16, max_new_tokens=16, minibatch=8, ppo_epochs=2, missing_eos_penalty=0.0,
                  optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0, schedule="constant"),
                  run=RunConfig(out_dir=str(out), max_steps=20, eval_every=0, log_every=4, seed=0, threads=1))
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_ppo_raises_the_rewarded_tokens_frequency(pretrained, rm_ckpt, tmp_path, monkeypatch):
    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    prompts = prompts_file(tmp_path)
    convs = [[{"role": "user", "content": f"Say something about the {w}"}] for w in WORDS[:8]]
    before = frequency(pretrained, tok, target, convs)
    cfg = ppo_config(pretrained, rm_ckpt, prompts, tmp_path / "ppo")
    # 30 iterations, not 20: after 20 the frequency ranged 0.037-0.112 over random value heads
    # (0.008 before), too near the bar of 0.048; after 30 it ranged 0.089-0.225 over ten heads
    # and five run seeds.
    cfg.run.max_steps = 30
    ppo.main(cfg)
    after = frequency(tmp_path / "ppo", tok, target, convs)
    train = read_metrics(tmp_path / "ppo", "train")
    print(f"frequency of the rewarded token: {before:.3f} -> {after:.3f}")
    assert after > 3 * before and after > before + 0.04, (before, after)
    assert train[-1]["reward"] > train[0]["reward"]
    # Finite numbers every iteration: no NaN, no inf (x == x let inf through).
    bad = [(r["step"], k, v) for r in train for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    assert not bad, bad
    assert all(k in r for r in train for k in ("kl", "kl_k1", "kl_k3", "reward", "pg_loss", "vf_loss", "entropy"))
    assert {"entropy", "clipfrac", "vf_loss", "explained_variance", "response_length"} <= set(train[0])


def test_lora_and_freezing_change_only_chosen_parameters(pretrained, rm_ckpt, tmp_path, monkeypatch):
    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    prompts = prompts_file(tmp_path)
    before = load_file(str(checkpoint.resolve(pretrained) / "model.safetensors"))

    ppo.main(ppo_config(pretrained, rm_ckpt, prompts, tmp_path / "frozen", freeze=FreezeConfig(first_layers=1),
                        run=RunConfig(out_dir=str(tmp_path / "frozen"), max_steps=2, eval_every=0, threads=1)))
    after = load_file(str(checkpoint.resolve(tmp_path / "frozen") / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers.0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers.1."))

    ppo.main(ppo_config(pretrained, rm_ckpt, prompts, tmp_path / "lora", lora=LoRAConfig(enabled=True, r=4, targets=["q_proj", "v_proj"]),
                        run=RunConfig(out_dir=str(tmp_path / "lora"), max_steps=2, eval_every=0, threads=1)))
    after = load_file(str(checkpoint.resolve(tmp_path / "lora") / "model.safetensors"))
    assert set(after) == set(before)  # merged: plain Llama names, no adapter tensors
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    setup = read_metrics(tmp_path / "lora", "setup")[0]
    assert setup["trainable_params"] < 0.2 * setup["total_params"]


def test_lora_resume_equals_uninterrupted(pretrained, rm_ckpt, tmp_path, monkeypatch, capsys):
    """A resumed LoRA run equals an uninterrupted one, and says where it resumed and how it ended, as
    every stage does (training.announce, training.finish)."""
    import shutil

    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    prompts = prompts_file(tmp_path)
    lora = LoRAConfig(enabled=True, r=4, targets=["q_proj", "v_proj", "up_proj"])

    def cfg(out, resume=False):
        return ppo_config(pretrained, rm_ckpt, prompts, out, lora=lora, rollout_batch=8, minibatch=4,
                          run=RunConfig(out_dir=str(out), max_steps=4, save_every=2, eval_every=0, log_every=1,
                                        threads=1, resume=resume))

    ppo.main(cfg(tmp_path / "full"))
    (tmp_path / "res" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000002", tmp_path / "res" / "checkpoints" / "step_0000002")
    capsys.readouterr()
    ppo.main(cfg(tmp_path / "res", resume=True))
    out = capsys.readouterr().out.strip().splitlines()
    assert f"resumed from {tmp_path / 'res' / 'checkpoints' / 'step_0000002'} at step 2" in out
    assert out[-1].startswith("ppo done in ") and out[-1].endswith(f"checkpoint in {tmp_path / 'res' / 'checkpoints'}")
    keys = ("reward", "kl", "pg_loss", "vf_loss")
    full = [[r[k] for k in keys] for r in read_metrics(tmp_path / "full", "train")]
    res = [[r[k] for k in keys] for r in read_metrics(tmp_path / "res", "train")]
    assert res == full[2:]  # exact: the frozen base weights are reloaded, never un-merged
    a = load_file(str(checkpoint.resolve(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "res") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The adapters only make sense on the base they were trained on: another policy is refused.
    other = tmp_path / "other"
    shutil.copytree(pretrained, other)
    bad = cfg(tmp_path / "res", resume=True)
    bad.policy = str(other)
    with pytest.raises(CheckpointError, match="LoRA adapters sit on"):
        ppo.main(bad)


@pytest.mark.parametrize("setting", ["bf16", "lora_dropout", "grpo_bf16"])
def test_ratio_is_exactly_one_before_every_update(pretrained, rm_ckpt, tmp_path, monkeypatch, setting):
    """Old log-probs are computed in eval mode (no dropout), under the update's autocast and in
    the first epoch's minibatches, so the first update step of every iteration sees a ratio of
    exactly 1: nothing is clipped that the policy did not change."""
    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    run = RunConfig(out_dir=str(tmp_path / "run"), max_steps=4, eval_every=0, log_every=1, threads=1,
                    precision="fp32" if setting == "lora_dropout" else "bf16")
    kw = {"lora": LoRAConfig(enabled=True, r=4, dropout=0.1, targets=["q_proj", "v_proj"])} if setting == "lora_dropout" else {}
    if setting == "grpo_bf16":
        kw.update(algorithm="grpo", rollout_batch=4, group_size=4)
    ppo.main(ppo_config(pretrained, rm_ckpt, prompts_file(tmp_path), tmp_path / "run", run=run, **kw))
    train = read_metrics(tmp_path / "run", "train")
    assert len(train) == 4
    assert [r["ratio_dev"] for r in train] == [0.0] * 4
    assert [r["first_clipfrac"] for r in train] == [0.0] * 4
    assert [r["approx_kl"] for r in train] == [0.0] * 4
    assert train[-1]["kl_k3"] > 1e-4  # the policy did move: the ratio is 1 because it is computed right


def test_grpo_and_rloo_raise_the_rewarded_tokens_frequency(pretrained, rm_ckpt, tmp_path, monkeypatch):
    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    prompts = prompts_file(tmp_path)
    convs = [[{"role": "user", "content": f"Say something about the {w}"}] for w in WORDS[:8]]
    before = frequency(pretrained, tok, target, convs)
    for algorithm in ("grpo", "rloo"):
        out = tmp_path / algorithm
        ppo.main(ppo_config(pretrained, rm_ckpt, prompts, out, algorithm=algorithm, rollout_batch=4, group_size=4,
                            run=RunConfig(out_dir=str(out), max_steps=20, eval_every=0, log_every=4, seed=0, threads=1)))
        after = frequency(out, tok, target, convs)
        train = read_metrics(out, "train")
        print(f"{algorithm}: frequency of the rewarded token {before:.3f} -> {after:.3f}")
        assert after > 3 * before and after > before + 0.04, (algorithm, before, after)
        assert "vf_loss" not in train[0] and train[0]["reward_std_in_group"] > 0  # no value model; groups differ
        setup = read_metrics(out, "setup")[0]
        assert setup["algorithm"] == algorithm
        if algorithm == "grpo":
            assert "kl_loss" in train[0]  # GRPO's default: k3 as a loss term


def test_kl_settings_resolve_from_each_other_and_a_checkpoint_of_another_algorithm_is_refused(pretrained, rm_ckpt,
                                                                                              tmp_path, monkeypatch):
    from llmtrain.config import KLConfig

    def resolved(algorithm, **kl):
        c = PPOConfig(algorithm=algorithm, policy="p", reward_model="r", kl=KLConfig(**kl))
        ppo.check(c)
        return c.kl.estimator, c.kl.placement

    assert resolved("ppo") == ("k1", "reward") and resolved("rloo") == ("k1", "reward")
    assert resolved("grpo") == ("k3", "loss")
    assert resolved("ppo", placement="loss") == ("k3", "loss")  # a given setting decides the other
    assert resolved("grpo", estimator="k1") == ("k1", "reward")
    assert resolved("grpo", estimator="k3", placement="reward") == ("k3", "reward")
    with pytest.raises(ConfigError, match="placement=loss takes kl.estimator=k3"):
        resolved("ppo", estimator="k1", placement="loss")
    with pytest.raises(ConfigError, match="must divide"):
        ppo.check(PPOConfig(algorithm="grpo", policy="p", reward_model="r", rollout_batch=3, group_size=3, minibatch=2))

    tok, target = target_token(pretrained)
    monkeypatch.setattr(ppo, "score_texts", scripted_reward(tok, target))
    out = tmp_path / "run"
    run = RunConfig(out_dir=str(out), max_steps=1, eval_every=0, threads=1)
    ppo.main(ppo_config(pretrained, rm_ckpt, prompts_file(tmp_path), out, rollout_batch=8, minibatch=8, run=run))
    run2 = RunConfig(out_dir=str(out), max_steps=2, eval_every=0, threads=1, resume=True)
    with pytest.raises(CheckpointError, match="a ppo checkpoint, but this run is grpo"):
        ppo.main(ppo_config(pretrained, rm_ckpt, prompts_file(tmp_path), out, algorithm="grpo", rollout_batch=2,
                            group_size=4, minibatch=8, run=run2))
