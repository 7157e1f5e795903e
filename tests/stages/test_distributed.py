"""Every training stage under torchrun (2 processes, gloo on CPU) against one process at the
same global batch: the losses of the first steps are equal (rel 1e-5: the reduction order of
the gradient all-reduce is the only difference), for DDP and for FSDP2; a checkpoint written
by 2 sharded processes loads into 1 process and continues with the same losses.

Each launch is a real `torchrun -m llmtrain STAGE -c config.yaml`; the configs are the same
dataclasses the one-process runs use, written to YAML. (pretrain and sft under DDP are in
test_pretrain.py and test_sft.py.)"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, WORDS, tiny_pretrain_config, write_jsonl
from llmtrain import checkpoint
from llmtrain.config import (ClassifyConfig, ClassifyDataConfig, DPOConfig, OptimConfig, PPOConfig, RewardConfig,
                             RewardDataConfig, RunConfig, SFTConfig, SFTDataConfig, to_dict)
from llmtrain.metrics import read_metrics
from llmtrain.stages import classify, dpo, pretrain, reward, sft

pytestmark = pytest.mark.slow
REL = 1e-5


def torchrun(stage: str, cfg, tmp_path, name: str, top: dict | None = None, **run) -> None:
    """Run `stage` with 2 processes on the config `cfg`, its run section updated by `run` and
    its top-level keys by `top`."""
    d = to_dict(cfg)
    d["run"].update(run)
    d.update(top or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmtrain",
            stage, "-c", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run, kind="train", key="loss"):
    return [r[key] for r in read_metrics(run, kind)]


def weights(run):
    return load_file(str(checkpoint.resolve(run) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-5):
    a, b = weights(a), weights(b)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)


# Reward and DPO pack the answers of a batch into rows (llmtrain/data/packing.py): one process
# packs 4 rankings, each of 2 processes packs 2, so the rows and with them the order of float
# sums differ. Adam turns those last-bit gradient differences into weight differences of up to
# a few 1e-5 after 3 steps at lr 3e-3 (0.003 x the size of one step); the losses still agree.
PACKED_ATOL = 1e-4


def test_pretrain_fsdp_equals_one_process_and_reshards_to_one(shards, tmp_path):
    cfg = tiny_pretrain_config(shards, tmp_path / "one", max_steps=4, batch_size=8, save_every=2, eval_every=2)
    pretrain.main(cfg)
    torchrun("pretrain", cfg, tmp_path, "fsdp", out_dir=str(tmp_path / "fsdp"), batch_size=4, strategy="fsdp")
    one = losses(tmp_path / "one")
    assert len(one) == 4 and one[-1] < one[0]  # it learns: the comparison is not between constants
    assert losses(tmp_path / "fsdp") == pytest.approx(one, rel=REL)
    assert losses(tmp_path / "fsdp", "val") == pytest.approx(losses(tmp_path / "one", "val"), rel=REL)
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp")
    step2 = tmp_path / "fsdp" / "checkpoints" / "step_0000002"
    assert (step2 / "dcp" / ".metadata").is_file()  # sharded: written by both processes

    # The sharded step-2 checkpoint, resumed by ONE process (DCP reshards 2 -> 1).
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / "step_0000002")
    cfg.run.out_dir, cfg.run.resume = str(tmp_path / "resumed"), True
    pretrain.main(cfg)
    assert losses(tmp_path / "resumed") == pytest.approx(one[2:], rel=REL)
    assert_same_weights(tmp_path / "one", tmp_path / "resumed")


def style_pairs(n=40):
    return [{"prompt": f"Tell me about the {WORDS[i % 20]}", "response": f"Splendid {WORDS[i % 20]}, old bean."}
            for i in range(n)]


def test_sft_fsdp_equals_one_process(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    cfg = SFTConfig(init_from=str(pretrained), data=SFTDataConfig(train=str(data), val_every=5),
                    optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
                    run=RunConfig(out_dir=str(tmp_path / "one"), max_steps=3, batch_size=4, eval_every=0, seed=3,
                                  threads=1, log_every=1),
                    sample_prompts=1, sample_tokens=4)
    sft.main(cfg)
    torchrun("sft", cfg, tmp_path, "fsdp", out_dir=str(tmp_path / "fsdp"), batch_size=2, strategy="fsdp")
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=REL)
    assert losses(tmp_path / "fsdp", "val") == pytest.approx(losses(tmp_path / "one", "val"), rel=REL)
    # the greedy samples every process wrote in lockstep are those of one process
    assert losses(tmp_path / "fsdp", "samples", "samples") == losses(tmp_path / "one", "samples", "samples")


def test_classify_ddp_equals_one_process(pretrained, tmp_path):
    rows = [{"text": f"{WORDS[i % 10]} {WORDS[i % 10]}", "label": "a"} if i % 2 else
            {"text": f"{WORDS[10 + i % 10]} {WORDS[10 + i % 10]}", "label": "b"} for i in range(48)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = ClassifyConfig(init_from=str(pretrained), data=ClassifyDataConfig(train=str(data), val_every=4),
                         optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
                         run=RunConfig(out_dir=str(tmp_path / "one"), max_steps=3, batch_size=8, eval_every=0,
                                       log_every=1, threads=1))
    classify.main(cfg)
    torchrun("classify", cfg, tmp_path, "ddp", out_dir=str(tmp_path / "ddp"), batch_size=4)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=REL)
    assert_same_weights(tmp_path / "one", tmp_path / "ddp")


def toy_rankings(n=24, k=3):
    return [{"prompt": f"Describe the {WORDS[i % 20]} number {i}",
             "ranked": [{"text": " ".join(["splendid"] * (k - j) + [WORDS[i % 20]]), "rank": j + 1} for j in range(k)]}
            for i in range(n)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reward_equals_one_process(pretrained, tmp_path, strategy):
    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    cfg = RewardConfig(init_from=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4),
                       optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
                       run=RunConfig(out_dir=str(tmp_path / "one"), max_steps=3, batch_size=4, eval_every=0,
                                     log_every=1, threads=1, seed=1),
                       norm_prompts=2, norm_samples=1, norm_max_new_tokens=4)
    reward.main(cfg)
    torchrun("reward", cfg, tmp_path, strategy, out_dir=str(tmp_path / strategy), batch_size=2, strategy=strategy)
    assert losses(tmp_path / strategy) == pytest.approx(losses(tmp_path / "one"), rel=REL)
    assert losses(tmp_path / strategy, "val", "accuracy") == losses(tmp_path / "one", "val", "accuracy")
    assert_same_weights(tmp_path / "one", tmp_path / strategy, atol=PACKED_ATOL)


def test_dpo_ddp_equals_one_process(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    cfg = DPOConfig(policy=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4), beta=0.5,
                    optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
                    run=RunConfig(out_dir=str(tmp_path / "one"), max_steps=3, batch_size=4, eval_every=0,
                                  log_every=1, threads=1))
    dpo.main(cfg)
    torchrun("dpo", cfg, tmp_path, "ddp", out_dir=str(tmp_path / "ddp"), batch_size=2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=REL)
    assert_same_weights(tmp_path / "one", tmp_path / "ddp", atol=PACKED_ATOL)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_two_processes_equal_one_on_every_iteration(pretrained, tmp_path, algorithm):
    """The RL stage on 2 processes (DDP, and FSDP2 for PPO) equals 1 process at the same global
    batch on every iteration, with 2 epochs of 2 minibatches: advantages are whitened over all
    processes, every process holds the same share of each minibatch (llmtrain.rl.minibatches)
    and its loss is its share of the global token mean. GRPO samples (its groups need differing
    answers); the random numbers of sampling are drawn for the global batch, so each answer is
    the same on any number of processes (tests/unit/test_generate.py checks that exactly). PPO
    answers greedily: with sampling, the last-bit differences of the gradient all-reduce can,
    rarely, move a cumulative probability across a drawn number and change one token."""
    from llmtrain.model.heads import ScoreModel
    from llmtrain.stages import ppo

    rm = tmp_path / "rm"
    model = ScoreModel(checkpoint.model_config(pretrained), 1)
    torch.manual_seed(0)
    checkpoint.load_weights(pretrained, model, new_head=("score.",))
    torch.nn.init.normal_(model.score.weight, std=0.5)  # rewards that differ between answers
    checkpoint.save(rm, 1, model, config={"model": vars(model.config), "stage": "reward", "reward": {"offset": 0.0}},
                    meta={"tokens": 0}, tokenizer_path=str(checkpoint.tokenizer_of(pretrained)))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about the {w}"} for w in WORDS * 2])
    rollout = 16 if algorithm == "ppo" else 4  # GRPO: 4 prompts x 4 answers
    cfg = PPOConfig(algorithm=algorithm, policy=str(pretrained), reward_model=str(rm), prompts=str(prompts),
                    val_every=10, eval_prompts=2, rollout_batch=rollout, group_size=4, max_new_tokens=8, minibatch=8,
                    ppo_epochs=2, temperature=0.0 if algorithm == "ppo" else 1.0,
                    # fp32 as the default "auto" is on a CPU without native bf16: bf16 kernels pick
                    # their blocking by the number of rows, so half a batch rounds differently
                    frozen_precision="fp32", rollout_precision="fp32",
                    optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, schedule="constant"),
                    run=RunConfig(out_dir=str(tmp_path / "one"), max_steps=3, eval_every=0, log_every=1, threads=1))
    ppo.main(cfg)
    strategies = ("ddp", "fsdp") if algorithm == "ppo" else ("ddp",)
    for strategy in strategies:
        torchrun(algorithm, cfg, tmp_path, strategy, top={"rollout_batch": rollout // 2, "minibatch": 4},
                 out_dir=str(tmp_path / strategy), strategy=strategy)  # half the prompts and answers on each
    one = read_metrics(tmp_path / "one", "train")
    keys = ["reward", "kl_k1", "kl_k3", "pg_loss", "entropy", "response_length", "clipfrac", "approx_kl"]
    keys += ["vf_loss", "explained_variance"] if algorithm == "ppo" else ["reward_std_in_group"]
    assert len(one) == 3 and one[-1]["kl_k3"] > 1e-4  # the policy moved: the comparison is not of constants
    for strategy in strategies:
        two = read_metrics(tmp_path / strategy, "train")
        assert len(two) == 3
        for a, b in zip(one, two):  # every iteration, not only the first
            assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-3, abs=1e-5), (strategy, a["step"])
        assert_same_weights(tmp_path / "one", tmp_path / strategy, atol=PACKED_ATOL)


def test_fsdp_accumulation_bf16_and_activation_checkpointing(shards, pretrained, tmp_path):
    """FSDP2's no-sync path (grad_accum 2) equals one process; bf16 mixed precision with
    activation checkpointing trains, and generates (greedy samples) with its bf16 KV cache."""
    cfg = tiny_pretrain_config(shards, tmp_path / "one", max_steps=3, batch_size=8)
    pretrain.main(cfg)
    torchrun("pretrain", cfg, tmp_path, "acc", out_dir=str(tmp_path / "acc"), batch_size=2, grad_accum=2,
             strategy="fsdp")
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), rel=REL)

    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    s = SFTConfig(init_from=str(pretrained), data=SFTDataConfig(train=str(data), val_every=5),
                  optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
                  run=RunConfig(out_dir=str(tmp_path / "sft1"), max_steps=3, batch_size=4, eval_every=0, seed=3,
                                threads=1, log_every=1),
                  sample_prompts=2, sample_tokens=4)
    sft.main(s)
    torchrun("sft", s, tmp_path, "bf16", out_dir=str(tmp_path / "bf16"), batch_size=2, strategy="fsdp",
             precision="bf16", activation_checkpointing=True)
    # bf16 rounds differently from fp32: close, not equal
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "sft1"), rel=0.05)
    samples = losses(tmp_path / "bf16", "samples", "samples")
    assert len(samples) == 2 and all(len(s) == 2 for s in samples)
