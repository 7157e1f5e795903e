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
