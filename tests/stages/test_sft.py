"""Fine-tuning: held-out response loss falls; freezing; accumulation; resume; chat; classify."""
import io

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, write_jsonl
from llmtrain import checkpoint
from llmtrain.cli import main as cli_main
from llmtrain.config import ClassifyConfig, ClassifyDataConfig, FreezeConfig, OptimConfig, RunConfig, SFTConfig, SFTDataConfig
from llmtrain.metrics import read_metrics
from llmtrain.stages import classify, sft


def style_pairs(n=80):
    return [{"prompt": f"Tell me about the {w} {i}", "response": f"Indeed, the {w} is splendid, old chap."}
            for i, w in zip(range(n), WORDS * 10)]


def sft_config(pretrained, data, out, **run):
    r = dict(out_dir=str(out), max_steps=20, batch_size=4, log_every=1, eval_every=10, seed=3, threads=1)
    r.update(run)
    return SFTConfig(init_from=str(pretrained), data=SFTDataConfig(train=str(data), val_every=5),
                     optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0), run=RunConfig(**r), sample_prompts=2,
                     sample_tokens=8)


def val_losses(run):
    return [r["loss"] for r in read_metrics(run, "val")]


def test_sft_lowers_held_out_response_loss(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    cfg = sft_config(pretrained, data, tmp_path / "sft", max_steps=30)
    cfg.optim.lr = 1e-2
    sft.main(cfg)
    v = val_losses(tmp_path / "sft")
    assert v[-1] < 0.5 * v[0]
    samples = read_metrics(tmp_path / "sft", "samples")
    assert samples[0]["step"] == 0 and samples[-1]["step"] == 30 and len(samples[-1]["samples"]) == 2


def test_frozen_parameters_are_untouched_and_have_no_optimizer_state(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    cfg = sft_config(pretrained, data, tmp_path / "frozen", max_steps=4)
    cfg.freeze = FreezeConfig(patterns=["model.embed_tokens.*"], first_layers=1)
    sft.main(cfg)
    before = load_file(str(checkpoint.resolve(pretrained) / "model.safetensors"))
    after = load_file(str(checkpoint.resolve(tmp_path / "frozen") / "model.safetensors"))
    frozen = [k for k in after if k.startswith(("model.embed_tokens.", "model.layers.0."))]
    trained = [k for k in after if k.startswith("model.layers.1.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight"))
    state = checkpoint.load_train_state(tmp_path / "frozen")["optimizer"]
    n_trainable = len(trained) + 2  # layer 1's tensors, the final norm and the (untied) lm_head
    assert len(state["state"]) == n_trainable
    setup = read_metrics(tmp_path / "frozen", "setup")[0]
    assert setup["trainable_params"] < setup["total_params"]


def test_bad_freeze_pattern_is_an_error(pretrained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    assert cli_main(["sft", f"init_from={pretrained}", f"data.train={data}", f"run.out_dir={tmp_path}/x",
                     "freeze.patterns=[model.embeddings.*]"]) == 2
    assert "matches no parameter" in capsys.readouterr().err


def test_accumulation_and_resume(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    sft.main(sft_config(pretrained, data, tmp_path / "big", max_steps=6, batch_size=4, save_every=3, keep_last=0))
    sft.main(sft_config(pretrained, data, tmp_path / "acc", max_steps=6, batch_size=1, grad_accum=4))
    big = [r["loss"] for r in read_metrics(tmp_path / "big", "train")]
    acc = [r["loss"] for r in read_metrics(tmp_path / "acc", "train")]
    assert acc == pytest.approx(big, rel=1e-5, abs=1e-6)
    import shutil

    (tmp_path / "res" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "big" / "checkpoints" / "step_0000003", tmp_path / "res" / "checkpoints" / "step_0000003")
    sft.main(sft_config(pretrained, data, tmp_path / "res", max_steps=6, batch_size=4, save_every=3, resume=True))
    assert [r["loss"] for r in read_metrics(tmp_path / "res", "train")] == big[3:]


def test_chat_prompt_and_repl(pretrained, tmp_path, capsys):
    from llmtrain.chat import ChatSession, repl
    from llmtrain.generate import SamplingConfig

    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    sft.main(sft_config(pretrained, data, tmp_path / "sft", max_steps=10))
    capsys.readouterr()
    assert cli_main(["chat", str(tmp_path / "sft"), "--prompt", "Tell me about the apple", "--greedy",
                     "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()
    session = ChatSession(str(tmp_path / "sft"), SamplingConfig(max_new_tokens=12, temperature=0))
    out = io.StringIO()
    repl(session, io.StringIO("Tell me about the river\nAnd the castle?\n/reset\nHello\n/exit\nnever read\n"), out)
    text = out.getvalue()
    assert text.count("bot> ") == 3 and "(history cleared)" in text
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # reset dropped the first exchange
    # Streaming printed exactly the final answers.
    assert session.history[-1]["content"] in text


def test_classification_head_learns_separable_task(pretrained, tmp_path, capsys):
    rows = []
    for i in range(120):
        a, b = WORDS[i % 10], WORDS[10 + (i * 7) % 10]
        rows.append({"text": f"{a} {a} {WORDS[(i * 3) % 10]}", "label": "first"} if i % 2 else
                    {"text": f"{b} {b} {WORDS[10 + (i * 3) % 10]}", "label": "second"})
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    cfg = ClassifyConfig(init_from=str(pretrained), data=ClassifyDataConfig(train=str(data), val_every=4),
                         optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
                         run=RunConfig(out_dir=str(tmp_path / "cls"), max_steps=40, batch_size=8, eval_every=20,
                                       log_every=10, threads=1))
    classify.main(cfg)
    val = read_metrics(tmp_path / "cls", "val")[-1]
    assert val["accuracy"] == 1.0 and sum(map(sum, val["confusion"])) == 30
    capsys.readouterr()
    assert cli_main(["classify", "predict", str(tmp_path / "cls"), "--text", "apple apple river",
                     "--text", "meadow meadow teapot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split("\t")[0] for l in lines] == ["first", "second"]


def test_classify_rejects_a_language_model_checkpoint_for_predict(pretrained, capsys):
    assert cli_main(["classify", "predict", str(pretrained), "--text", "x"]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_torchrun_two_processes_equals_one(pretrained, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    data = write_jsonl(tmp_path / "d.jsonl", style_pairs())
    sft.main(sft_config(pretrained, data, tmp_path / "one", max_steps=4, batch_size=4, eval_every=0))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmtrain",
            "sft", f"init_from={pretrained}", f"data.train={data}", "data.val_every=5", f"run.out_dir={tmp_path / 'two'}",
            "run.max_steps=4", "run.batch_size=2", "run.eval_every=0", "run.seed=3", "run.threads=1", "run.log_every=1",
            "optim.lr=3e-3", "optim.warmup_steps=2", "optim.weight_decay=0.0", "sample_prompts=2", "sample_tokens=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    two = [r["loss"] for r in read_metrics(tmp_path / "two", "train")]
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert val_losses(tmp_path / "two") == pytest.approx(val_losses(tmp_path / "one"), rel=1e-5)
