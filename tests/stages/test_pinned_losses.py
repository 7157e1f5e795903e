"""Pinned losses (as torchtune's recipe tests): a seeded tiny CPU run of every stage must log
the same numbers as the run recorded in `pinned_losses.json`, to 1e-6.

What is pinned, per stage: every record metrics.jsonl holds for the run (train, val, eval,
normalisation, setup ...) with the wall-clock fields left out (`VOLATILE`): losses, learning
rates, grad norms, accuracies; for PPO/GRPO/RLOO each iteration's reward, KL (k1, k3), beta,
policy and value losses, entropy, clip fraction, lengths, and the held-out evaluation.

Tolerance: a float passes when |got - pinned| <= 1e-6 * max(1, |pinned|) (pytest.approx with
rel=1e-6, abs=1e-6: absolute below 1, relative above); ints, bools, strings and the set of
record kinds and keys must be equal. The runs are fp32, run.threads=1, on CPU. The values
are those of one torch version and one set of CPU kernels, both recorded under "_meta"; one
file per kind of CPU the project's machines have: `pinned_losses.json` (AVX2, recorded on AMD
Zen cores) and `pinned_losses_avx512_amx.json` (AVX512 with AMX, Intel Sapphire Rapids class:
its MKL and oneDNN kernels sum in another order, which ATEN_CPU_CAPABILITY cannot undo). A
process uses the file recorded under its own kernels, else the fallback below.
Under another torch version (a GPU machine's own; CI pins the recorded one in
requirements/cpu.txt) the tests skip, naming both versions; to move to a new torch,
re-record deliberately and say so in the commit. On a CPU
whose default kernels differ (ATEN's capability, e.g. AVX512 where AVX2 was recorded) the
file runs itself again in a subprocess with ATEN_CPU_CAPABILITY set to the recorded one;
where that cannot be set (not x86) the tests skip, saying why.

The chain: `pretrain` (5 steps from random weights) is the base of sft, classify, reward
(K-way rankings with ties, and 2-way pairs with ratings and a margin) and dpo; the K-way
reward run is the reward model of ppo, grpo and rloo. Everything is built here from the
session's tiny tokenizer and shards (tests/conftest.py) and data written in this file, so no
other test's helpers can move these numbers.

Re-recording (rewrites pinned_losses.json from the current code):

    LLMTRAIN_RECORD_PINNED=1 python -m pytest tests/stages/test_pinned_losses.py

is legitimate only for a deliberate change of a method (a loss, a normalisation, the data
order, a default) or of torch, and the commit that does it says which and why. A refactor
must pass this file unchanged: that is its proof that it changed no computation. A recording
run skips every test (it checks nothing), so it can never stand in for a passing run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import WORDS, write_jsonl
from llmtrain.config import (ClassifyConfig, ClassifyDataConfig, DPOConfig, ModelConfig, OptimConfig, PPOConfig,
                             PretrainConfig, PretrainDataConfig, RewardConfig, RewardDataConfig, RunConfig, SFTConfig,
                             SFTDataConfig)
from llmtrain.metrics import read_metrics

PINNED_AVX2 = Path(__file__).with_name("pinned_losses.json")
RECORD = os.environ.get("LLMTRAIN_RECORD_PINNED") == "1"
VOLATILE = {"time", "seconds", "tokens_per_s", "peak_memory_mb"}  # wall clock and memory: not a function of the inputs
TOL = dict(rel=1e-6, abs=1e-6)


def kernels() -> dict:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": bool(amx)}


def pinned_file() -> Path:
    """The recording made under this process's kernels, or the AVX2 one (the fallback: this
    file run again under its kernels, or skipped where that cannot be)."""
    k = kernels()
    for f in sorted(Path(__file__).parent.glob("pinned_losses*.json")):
        if json.loads(f.read_text()).get("_meta") == k:
            return f
    if RECORD:
        return Path(__file__).with_name(f"pinned_losses_{k['cpu_capability'].lower()}{'_amx' if k['amx'] else ''}.json")
    return PINNED_AVX2


PINNED = pinned_file()


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("seconds_")}  # RL's phase times
            for r in read_metrics(run_dir)]


def same(got, want, where: str) -> list[str]:
    """The differences between a logged value and its pinned one, each naming where it is."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != pinned {sorted(want)}"]
        return [d for k in want for d in same(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got!r} != pinned {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in same(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        return [] if got == pytest.approx(want, nan_ok=True, **TOL) else [f"{where}: {got!r} != pinned {want!r}"]
    return [] if type(got) is type(want) and got == want else [f"{where}: {got!r} != pinned {want!r}"]


def check_pinned(name: str, run_dir: Path) -> None:
    got = records(run_dir)
    pinned = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
    if RECORD:
        pinned[name], pinned["_meta"] = got, kernels()
        PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {len(got)} records of {name} in {PINNED.name}")
    assert name in pinned, f"{name} has no pinned values: record them (see this file's docstring)"
    assert pinned["_meta"] == kernels(), f"recorded under {pinned['_meta']}, this process runs {kernels()}"
    assert any(r["kind"] == "train" for r in got), "the run logged no training record"
    diffs = same(got, pinned[name], name)
    assert not diffs, f"{len(diffs)} logged values differ from the pinned run:\n" + "\n".join(diffs[:20])


def run_cfg(out: Path, **kw) -> RunConfig:
    """eval_batches=2 as recorded; reward, classify and DPO ran on their whole held-out set
    (eval_batches was ignored there before #16 gave it one meaning), so they pass 0: all."""
    r = dict(out_dir=str(out), max_steps=4, batch_size=4, log_every=1, eval_every=0, eval_batches=2, seed=11, threads=1,
             device="cpu", precision="fp32")
    r.update(kw)
    return RunConfig(**r)


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, **kw})


@pytest.fixture(autouse=True)
def _global_rng_as_the_recording_had_it():
    """Whatever earlier tests left in torch's and numpy's global generators is set aside: each
    stage seeds itself, and this makes sure nothing here depends on test order either way."""
    import numpy as np
    import random

    state = (np.random.get_state(), random.getstate())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        yield
    np.random.set_state(state[0])
    random.setstate(state[1])


@pytest.fixture(scope="module")
def child_outcomes() -> dict | None:
    """None when this process runs the recorded torch and CPU kernels (the tests then run here);
    otherwise each test's outcome from this file run again under the recorded kernels."""
    import platform
    import re
    import subprocess
    import sys

    meta = json.loads(PINNED.read_text()).get("_meta", {}) if PINNED.is_file() else {}
    if RECORD or not meta or meta == kernels():
        return None
    if meta["torch"] != kernels()["torch"]:  # e.g. a GPU machine's own torch; CI pins the recorded one (requirements/cpu.txt)
        pytest.skip(f"pinned_losses.json was recorded under torch {meta['torch']}, this is torch {kernels()['torch']}: "
                    "the last bits are not comparable; run under the recorded torch, or re-record deliberately")
    if os.environ.get("LLMTRAIN_PINNED_CHILD") or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"recorded with the {meta['cpu_capability']} CPU kernels, which this process "
                    f"({platform.machine()}, {kernels()['cpu_capability']}) cannot select: the values are not comparable")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": meta["cpu_capability"].lower(), "LLMTRAIN_PINNED_CHILD": "1",
           "MKL_ENABLE_INSTRUCTIONS": meta["cpu_capability"].upper()}  # MKL's matrix products on the same ISA
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(Path(__file__))],
                         env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    outcomes = {m[2]: (m[1], out.stdout) for m in re.finditer(r"^(PASSED|FAILED|SKIPPED|ERROR) \S*::(\S+)", out.stdout, re.M)}
    return outcomes or {"": ("ERROR", out.stdout + out.stderr)}


def stage(request, fixture: str = "") -> Path | None:
    """The input a test needs (a fixture's value), or None when the child process ran the test:
    then its outcome there is this test's outcome here."""
    outcomes = request.getfixturevalue("child_outcomes")
    if outcomes is None:
        return request.getfixturevalue(fixture) if fixture else None
    outcome, log = outcomes.get(request.node.name, ("ERROR", next(iter(outcomes.values()))[1]))
    assert outcome == "PASSED", f"under ATEN_CPU_CAPABILITY as recorded, {request.node.name} {outcome}:\n{log[-4000:]}"
    return None


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory) -> Path:
    """The pinned pretraining run, also the base every later stage starts from."""
    from llmtrain.stages import pretrain

    out = tmp_path_factory.mktemp("pinned") / "pretrain"
    with torch.random.fork_rng(devices=[]):
        pretrain.main(PretrainConfig(
            model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
            optim=optim(lr=1e-2, weight_decay=0.1, schedule="cosine"),
            data=PretrainDataConfig(shards=str(shards)),
            run=run_cfg(out, max_steps=5, batch_size=4, eval_every=5)))
    return out


def rankings(n: int, k: int) -> list[dict]:
    """K answers per prompt, more 'splendid' ranked higher; the last two tied when K > 2; K=2
    rows carry ratings (for margin_scale)."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        texts = [" ".join(["splendid"] * (k - j) + [w]) for j in range(k)]
        ranks = [j + 1 for j in range(k)]
        if k > 2:
            ranks[-1] = ranks[-2]
        ranked = [{"text": t, "rank": r} for t, r in zip(texts, ranks)]
        if k == 2:
            ranked[0]["score"], ranked[1]["score"] = 7.0 + i % 3, 3.0
        rows.append({"prompt": f"Describe the {w} number {i}", "ranked": ranked, "annotator": "sim", "simulated": True})
    return rows


def reward_config(base: Path, data: Path, out: Path, **kw) -> RewardConfig:
    return RewardConfig(init_from=str(base), data=RewardDataConfig(train=str(data), val_every=4), optim=optim(),
                        run=run_cfg(out, batch_size=3, eval_batches=0), norm_prompts=3, norm_samples=2, norm_max_new_tokens=6, **kw)


@pytest.fixture(scope="module")
def reward_run(base, tmp_path_factory) -> Path:
    """The pinned K-way reward run (4 answers per prompt, one tie), PPO's reward model."""
    from llmtrain.stages import reward

    tmp = tmp_path_factory.mktemp("pinned_rm")
    with torch.random.fork_rng(devices=[]):
        reward.main(reward_config(base, write_jsonl(tmp / "r.jsonl", rankings(24, 4)), tmp / "reward"))
    return tmp / "reward"


def test_pretrain_losses_are_pinned(request):
    if (base := stage(request, "base")) is None:
        return
    check_pinned("pretrain", base)


def test_sft_losses_are_pinned(request, tmp_path):
    from llmtrain.stages import sft

    if (base := stage(request, "base")) is None:
        return

    rows = [{"prompt": f"Tell me about the {w} {i}", "response": f"Indeed, the {w} is splendid, old chap."}
            for i, w in zip(range(30), WORDS * 2)]
    rows[3] = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Good day."},
                            {"role": "user", "content": "And the teapot?"}, {"role": "assistant", "content": "Quite so."}]}
    sft.main(SFTConfig(init_from=str(base), data=SFTDataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), val_every=5),
                       optim=optim(), run=run_cfg(tmp_path / "sft", eval_every=2), sample_prompts=2, sample_tokens=6))
    check_pinned("sft", tmp_path / "sft")


def test_classify_losses_are_pinned(request, tmp_path):
    from llmtrain.stages import classify

    if (base := stage(request, "base")) is None:
        return

    rows = [{"text": f"{WORDS[i % 10]} {WORDS[i % 10]} {WORDS[(i * 3) % 10]}", "label": "first"} if i % 2 else
            {"text": f"{WORDS[10 + i % 10]} {WORDS[10 + (i * 7) % 10]}", "label": "second"} for i in range(32)]
    classify.main(ClassifyConfig(init_from=str(base), data=ClassifyDataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", rows)),
                                                                             val_every=5),
                                 optim=optim(), run=run_cfg(tmp_path / "cls", batch_size=6, eval_every=2, eval_batches=0)))
    check_pinned("classify", tmp_path / "cls")


def test_reward_kway_ranking_losses_are_pinned(request):
    if (reward_run := stage(request, "reward_run")) is None:
        return
    check_pinned("reward_kway", reward_run)


def test_reward_pairs_with_margin_losses_are_pinned(request, tmp_path):
    from llmtrain.stages import reward

    if (base := stage(request, "base")) is None:
        return

    data = write_jsonl(tmp_path / "p.jsonl", rankings(24, 2))
    reward.main(reward_config(base, data, tmp_path / "rm", margin_scale=0.1))
    check_pinned("reward_pairs_margin", tmp_path / "rm")


def test_dpo_losses_are_pinned(request, tmp_path):
    from llmtrain.stages import dpo

    if (base := stage(request, "base")) is None:
        return

    data = write_jsonl(tmp_path / "r.jsonl", rankings(24, 3))
    dpo.main(DPOConfig(policy=str(base), data=RewardDataConfig(train=str(data), val_every=4), beta=0.5, optim=optim(),
                       run=run_cfg(tmp_path / "dpo", batch_size=3, eval_every=2, eval_batches=0)))
    check_pinned("dpo", tmp_path / "dpo")


def rl_config(base: Path, rm: Path, tmp: Path, algorithm: str, **kw) -> PPOConfig:
    prompts = write_jsonl(tmp / "p.jsonl", [{"prompt": f"Say something about the {w}"} for w in WORDS])
    c = PPOConfig(algorithm=algorithm, policy=str(base), reward_model=str(rm), prompts=str(prompts), val_every=5,
                  eval_prompts=2, max_new_tokens=6, ppo_epochs=2, optim=optim(warmup_steps=0, schedule="constant"),
                  run=run_cfg(tmp / algorithm, max_steps=3))
    # fp32 throughout, as recorded, on any machine (their default "auto" is bf16 where bf16 is native)
    c.frozen_precision, c.rollout_precision = "fp32", "fp32"
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_rl_metrics_are_pinned(request, tmp_path, algorithm):
    """PPO with an adaptive KL coefficient and a pretraining (ptx) term, so beta's moves and
    ptx_loss are pinned too; GRPO with its default k3 KL loss term; RLOO with k1 in the reward."""
    from llmtrain.config import KLConfig
    from llmtrain.stages import ppo

    if (base := stage(request, "base")) is None:
        return
    reward_run, shards = request.getfixturevalue("reward_run"), request.getfixturevalue("shards")
    kw = (dict(rollout_batch=4, minibatch=2, kl=KLConfig(adaptive=True, target=0.1, horizon=50), ptx_coef=0.5,
               ptx_shards=str(shards), ptx_batch=2)
          if algorithm == "ppo" else dict(rollout_batch=2, group_size=3, minibatch=3))
    ppo.main(rl_config(base, reward_run, tmp_path, algorithm, **kw))
    check_pinned(algorithm, tmp_path / algorithm)
