"""The skeleton every stage shares (llmtrain/training.py): a resumed run says where it resumed
and goes on to the same records as an uninterrupted one; the closing line names the time,
peak memory and the checkpoints; greedy answers decode without their stop token."""
import pytest

from conftest import WORDS, write_jsonl
from llmtrain.config import (ClassifyConfig, ClassifyDataConfig, DPOConfig, OptimConfig, RewardConfig, RewardDataConfig,
                             RunConfig)
from llmtrain.generate import answer_text
from llmtrain.metrics import read_metrics
from llmtrain.tokenizer import Tokenizer

VOLATILE = {"time", "seconds", "tokens_per_s", "peak_memory_mb"}


def rankings(n: int, k: int) -> list[dict]:
    return [{"prompt": f"Describe the {w} number {i}",
             "ranked": [{"text": " ".join(["splendid"] * (k - j) + [w]), "rank": j + 1} for j in range(k)]}
            for i, w in zip(range(n), WORDS * 5)]


def texts(n: int) -> list[dict]:
    return [{"text": f"{WORDS[i % 10]} {WORDS[i % 10]}", "label": "first"} if i % 2 else
            {"text": f"{WORDS[10 + i % 10]} {WORDS[10 + (i * 7) % 10]}", "label": "second"} for i in range(n)]


def config(stage: str, pretrained, tmp_path, max_steps: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = RunConfig(out_dir=str(tmp_path / stage), max_steps=max_steps, batch_size=3, log_every=1, eval_every=2,
                    save_every=1, seed=5, threads=1, device="cpu", precision="fp32", resume=True)
    optim = OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0)
    if stage == "classify":
        data = ClassifyDataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", texts(24))), val_every=4)
        return ClassifyConfig(init_from=str(pretrained), data=data, optim=optim, run=run)
    data = RewardDataConfig(train=str(write_jsonl(tmp_path / "r.jsonl", rankings(16, 3))), val_every=4)
    if stage == "dpo":
        return DPOConfig(policy=str(pretrained), data=data, optim=optim, run=run)
    return RewardConfig(init_from=str(pretrained), data=data, optim=optim, run=run, norm_prompts=2, norm_samples=1,
                        norm_max_new_tokens=4)


def records(run_dir, last: int) -> list[dict]:
    """The records less wall-clock fields. Written by each run, not each step, and so left out:
    setup records and the reward's normalisation before `last` (the interrupted run's end)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)
            if r["kind"] != "setup" and (r["kind"] not in ("normalisation", "calibration") or r["step"] == last)]


@pytest.mark.parametrize("stage", ["classify", "dpo", "reward"])
def test_resumed_run_says_so_and_equals_an_uninterrupted_one(stage, pretrained, tmp_path, capsys):
    """These three stages never printed "resumed from" before the shared skeleton."""
    import importlib

    main = importlib.import_module(f"llmtrain.stages.{stage}").main
    main(config(stage, pretrained, tmp_path / "whole", 3))
    whole = capsys.readouterr().out
    main(config(stage, pretrained, tmp_path / "split", 2))
    first = capsys.readouterr().out
    main(config(stage, pretrained, tmp_path / "split", 3))
    second = capsys.readouterr().out

    assert "resumed from" not in whole and "resumed from" not in first
    resumed = [l for l in second.splitlines() if l.startswith("resumed from")]
    assert resumed == [f"resumed from {tmp_path / 'split' / stage / 'checkpoints' / 'step_0000002'} at step 2"], second
    for out in (whole, first, second):
        closing = out.strip().splitlines()[-1]
        assert closing.startswith(f"{stage} done in ") and "; peak memory " in closing, closing
        assert closing.endswith(f"checkpoint in {tmp_path / ('whole' if out is whole else 'split') / stage / 'checkpoints'}")
    assert records(tmp_path / "split" / stage, 3) == records(tmp_path / "whole" / stage, 3)


def test_nothing_to_do_is_said_by_every_stage(pretrained, tmp_path, capsys):
    from llmtrain.stages import classify

    classify.main(config("classify", pretrained, tmp_path, 1))
    capsys.readouterr()
    classify.main(config("classify", pretrained, tmp_path, 1))
    out = capsys.readouterr().out
    assert "nothing to do: the checkpoint is at step 1 >= run.max_steps=1" in out


def test_answer_text_strips_only_a_final_stop_token(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    ids = tok.encode(" splendid teapot")
    stops = (tok.end_id, tok.eos_id)
    assert answer_text(tok, [*ids, tok.end_id], stops) == ("splendid teapot", True)
    assert answer_text(tok, ids, stops) == ("splendid teapot", False)  # cut off at max_new_tokens
    assert answer_text(tok, [], stops) == ("", False)
    # A stop id not at the end is not the end of the answer (generate cuts at the first one).
    assert answer_text(tok, [tok.end_id, *ids], (tok.eos_id,))[1] is False
