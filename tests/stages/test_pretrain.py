"""Pretraining, a few real CPU steps: loss falls, resume == uninterrupted (bitwise),
gradient accumulation 1x4 == batch 4, torchrun with 2 processes == 1 process."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_pretrain_config
from llmtrain import checkpoint
from llmtrain.cli import main as cli_main
from llmtrain.metrics import read_metrics
from llmtrain.stages import pretrain


def losses(run_dir, kind="train"):
    return [r["loss"] for r in read_metrics(run_dir, kind)]


def weights(run_dir):
    return load_file(str(checkpoint.resolve(run_dir) / "model.safetensors"))


def test_loss_falls(shards, tmp_path):
    cfg = tiny_pretrain_config(shards, tmp_path / "run", max_steps=40, batch_size=8, eval_every=20, eval_batches=4)
    cfg.optim.lr = 1e-2
    pretrain.main(cfg)
    train, val = losses(tmp_path / "run"), losses(tmp_path / "run", "val")
    vocab = checkpoint.model_config(tmp_path / "run").vocab_size
    assert train[0] == pytest.approx(math.log(vocab), rel=0.05)  # a fresh model is near uniform
    assert sum(train[-5:]) / 5 < train[0] - 0.7
    assert val[-1] < val[0] < math.log(vocab)


def test_resume_equals_uninterrupted_bitwise(shards, tmp_path):
    full = tmp_path / "full"
    pretrain.main(tiny_pretrain_config(shards, full, max_steps=6, save_every=3, keep_last=0))
    # A run killed after step 3 has exactly step_0000003 on disk: continue from it.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    pretrain.main(tiny_pretrain_config(shards, resumed, max_steps=6, save_every=3, resume=True))
    assert losses(resumed) == losses(full)[3:]  # exact float equality: bit for bit
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_equals_big_batch(shards, tmp_path):
    pretrain.main(tiny_pretrain_config(shards, tmp_path / "big", batch_size=4, grad_accum=1))
    pretrain.main(tiny_pretrain_config(shards, tmp_path / "acc", batch_size=1, grad_accum=4))
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_equals_one(shards, tmp_path):
    pretrain.main(tiny_pretrain_config(shards, tmp_path / "one", batch_size=4))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmtrain",
            "pretrain", f"data.shards={shards}", f"run.out_dir={tmp_path / 'two'}", "run.batch_size=2"]
    cfg = tiny_pretrain_config(shards, tmp_path / "x")
    args += [f"model.{k}={v}" for k, v in vars(cfg.model).items()]
    args += [f"optim.{k}={v}" for k, v in vars(cfg.optim).items()]
    args += [f"run.{k}={v}" for k, v in vars(cfg.run).items() if k not in ("out_dir", "batch_size")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_cli_pretrain_then_generate(shards, tmp_path, capsys):
    run = tmp_path / "cli"
    assert cli_main(["pretrain", f"data.shards={shards}", f"run.out_dir={run}", "run.max_steps=3",
                     "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32",
                     "run.batch_size=2", "run.eval_batches=1", "run.threads=1"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", str(run), "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")


def test_bad_shards_dir_is_clear(tmp_path, capsys):
    assert cli_main(["pretrain", f"data.shards={tmp_path}/nothing", f"run.out_dir={tmp_path}/r"]) == 2
    assert "missing meta.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 1e-4)])
def test_compiled_equals_eager(shards, tmp_path, precision, rel):
    """run.compile=true (torch.compile: inductor's C++ kernels on a CPU) trains the same model:
    the same train and validation losses within float reordering (fp32: the weights too) or
    bf16 rounding (the compiled graph keeps some intermediates in fp32 that eager rounds; Adam
    turns such tiny gradient differences into whole lr-sized steps, so bf16 weights are not
    compared), a checkpoint without torch.compile's "_orig_mod." names, and a checkpoint saved
    under compile resumes under compile bit for bit."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        pretrain.main(tiny_pretrain_config(shards, out, max_steps=6, eval_every=3, save_every=3, precision=precision,
                                           compile=compiled))
        runs[compiled] = out
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=rel)
    assert losses(runs[True], "val") == pytest.approx(losses(runs[False], "val"), rel=rel)
    a, b = weights(runs[False]), weights(runs[True])
    assert sorted(a) == sorted(b)
    if precision == "fp32":
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs[True] / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    pretrain.main(tiny_pretrain_config(shards, resumed, max_steps=6, save_every=3, resume=True, precision=precision,
                                       compile=True))
    assert losses(resumed) == losses(runs[True])[3:]


def test_compile_without_a_compiler_is_one_line(shards, tmp_path):
    """run.compile=true on a CPU with no C++ compiler for inductor stops before the first step in
    one line naming the setting, with no traceback and no run folder."""
    r = subprocess.run([sys.executable, "-m", "llmtrain", "pretrain", "-c", "configs/pretrain-tiny.yaml",
                        f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}", "run.compile=true",
                        "run.device=cpu"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "CXX": str(tmp_path / "no-such-g++"), "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run.compile=true" in lines[0] and "C++ compiler" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
