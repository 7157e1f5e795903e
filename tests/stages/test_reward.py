"""Reward model: pairs per prompt, one forward per answer, split by prompt, normalisation."""

import pytest
import torch

from conftest import WORDS, write_jsonl
from llmtrain import checkpoint
from llmtrain.cli import main as cli_main
from llmtrain.config import OptimConfig, RewardConfig, RewardDataConfig, RunConfig
from llmtrain.data.preference import Ranking, pair_tensors, split_by_prompt
from llmtrain.scoring import forward_rankings, load_reward_model, score_texts
from llmtrain.metrics import read_metrics
from llmtrain.model.heads import ScoreModel
from llmtrain.stages import reward
from llmtrain.tokenizer import Tokenizer


def toy_rankings(n=60, k=4):
    """Answers with more 'splendid' rank higher: a learnable preference."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        texts = [" ".join(["splendid"] * (k - j) + [w]) for j in range(k)]
        rows.append({"prompt": f"Describe the {w} number {i}", "ranked": [{"text": t, "rank": j + 1} for j, t in enumerate(texts)],
                     "annotator": "sim", "simulated": True})
    return rows


def reward_config(pretrained, data, out, **run):
    r = dict(out_dir=str(out), max_steps=30, batch_size=4, log_every=5, eval_every=15, seed=1, threads=1)
    r.update(run)
    return RewardConfig(init_from=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4),
                        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0), run=RunConfig(**r),
                        norm_prompts=6, norm_samples=2, norm_max_new_tokens=8)


def test_split_by_prompt_keeps_prompts_on_one_side():
    rs = [Ranking([{"role": "user", "content": f"p{i % 30}"}], ["a", "b"], [1, 2], annotator=f"a{i}") for i in range(90)]
    train, val = split_by_prompt(rs, 5)
    assert train and val
    assert not {r.prompt for r in train} & {r.prompt for r in val}
    assert len(train) + len(val) == 90


def test_all_pairs_of_a_prompt_in_one_batch_each_answer_forwarded_once(pretrained, tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    model = ScoreModel(checkpoint.model_config(pretrained), 1)
    rows = [Ranking([{"role": "user", "content": "q1"}], ["a", "b", "c"], [1, 2, 3]),
            Ranking([{"role": "user", "content": "q2"}], ["d", "e", "f", "g"], [1, 2, 2, 4])]
    calls = []
    # Answers are packed into rows: count the sequences in each forward by their first (position 0) tokens.
    model.model.register_forward_hook(lambda mod, inp, out: calls.append(int(((inp[2] == 0) & (inp[0] != tok.pad_id)).sum())))
    rewards, starts = forward_rankings(model, tok, rows, 64, torch.device("cpu"))
    assert calls == [7]  # one pass, 3 + 4 answers, each once
    assert rewards.shape == (7,) and starts == [0, 3]
    b, w, _ = pair_tensors(rows, starts, 0.0, 0.0, torch.device("cpu"))
    assert len(b) == 3 + (6 - 1)  # C(3,2) + C(4,2) minus the one tie
    assert set(zip(b.tolist(), w.tolist())) == {(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (3, 6), (4, 6), (5, 6)}


def test_reward_learns_rankings_and_normalises(pretrained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    reward.main(reward_config(pretrained, data, tmp_path / "rm"))
    val = read_metrics(tmp_path / "rm", "val")
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["mean_margin"] > 0
    norm = read_metrics(tmp_path / "rm", "normalisation")[0]
    held_out = read_metrics(tmp_path / "rm", "setup")[0]["val_prompts"]
    assert held_out >= 6 and norm["n"] == 6 and norm["samples"] == 12  # norm_prompts=6 prompts x norm_samples=2
    assert norm["std"] > 0.01 and abs(norm["offset"]) > 1e-3  # sampled answers differ; the offset is not a no-op
    # What is saved with the model is what was logged.
    model, tok, saved = load_reward_model(tmp_path / "rm")
    assert {k: saved[k] for k in ("offset", "std", "n", "samples")} == {k: norm[k] for k in ("offset", "std", "n", "samples")}
    # Scoring through the CLI subtracts the offset: each printed score is the model's raw score
    # (computed here, without the CLI) minus the offset; --raw prints the raw score.
    msgs = [{"role": "user", "content": "Describe the apple"}]
    answers = ["splendid splendid splendid apple", "apple"]
    raw = [float(x) for x in score_texts(model, tok, [(msgs, a) for a in answers])]
    capsys.readouterr()
    args = ["reward", "score", str(tmp_path / "rm"), "--prompt", "Describe the apple"]
    for a in answers:
        args += ["--response", a]
    assert cli_main(args) == 0
    printed = [float(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == pytest.approx([r - norm["offset"] for r in raw], abs=1e-4)  # printed to 4 decimals
    assert printed[0] > printed[1]
    assert cli_main(args + ["--raw"]) == 0
    printed_raw = [float(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed_raw == pytest.approx(raw, abs=1e-4) and printed_raw != pytest.approx(printed, abs=1e-3)


def test_normalisation_gives_mean_zero_on_reference_answers(pretrained, tmp_path, monkeypatch):
    """The offset is the mean and the recorded std the (population) std of the reward model's
    scores of the SFT model's sampled answers, recomputed here from the saved model on the very
    answers the stage sampled."""
    import numpy as np

    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    captured = {}
    real = reward.score_texts

    def spy(model, tok, items, batch_size=32, offset=0.0):
        out = real(model, tok, items, batch_size, offset)
        captured["items"] = items
        return out

    monkeypatch.setattr(reward, "score_texts", spy)
    reward.main(reward_config(pretrained, data, tmp_path / "rm", max_steps=4, eval_every=0))
    model, tok, norm = load_reward_model(tmp_path / "rm")
    raw = np.array(real(model, tok, captured["items"]))
    assert len(raw) == norm["samples"] == 2 * norm["n"] > 0
    assert len({it[1] for it in captured["items"]}) > 1  # the answers were sampled, not one answer repeated
    assert norm["offset"] == pytest.approx(float(raw.mean()), abs=1e-5)
    assert norm["std"] == pytest.approx(float(raw.std()), rel=1e-4) and norm["std"] > 0.01
    normalised = real(model, tok, captured["items"], offset=norm["offset"])
    assert sum(normalised) / len(normalised) == pytest.approx(0.0, abs=1e-5)


def test_rankings_without_pairs_and_bad_files(pretrained, tmp_path, capsys):
    rows = toy_rankings(8)
    rows[0]["ranked"] = [{"text": "x", "rank": 1}, {"text": "y", "rank": 1}]  # a tie: no pair
    data = write_jsonl(tmp_path / "r.jsonl", rows + [{"prompt": "q", "ranked": [{"text": "a"}]}])
    assert cli_main(["reward", f"init_from={pretrained}", f"data.train={data}", f"run.out_dir={tmp_path}/x"]) == 2
    assert "r.jsonl:9: 'ranked' must list at least 2 candidates" in capsys.readouterr().err
    assert cli_main(["reward", "score", str(pretrained), "--prompt", "q", "--response", "a"]) == 2
    assert "not a reward-model checkpoint" in capsys.readouterr().err


def test_continuing_from_a_reward_model_needs_norm_policy(pretrained, tmp_path, capsys):
    """A reward model that continues from another (the rounds of iterative RLHF) writes no answers of
    its own to set its zero: without norm_policy it is refused in one line before training; a missing
    norm_policy is named; with the SFT model as norm_policy it trains and its zero is set by that
    model's answers."""
    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings(24))
    reward.main(reward_config(pretrained, data, tmp_path / "rm1", max_steps=2, eval_every=0))
    base = ["reward", f"init_from={tmp_path}/rm1", f"data.train={data}", "data.val_every=4", "run.max_steps=2", "norm_prompts=2",
            "norm_samples=1", "norm_max_new_tokens=4"]
    capsys.readouterr()
    assert cli_main(base + [f"run.out_dir={tmp_path}/rm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a reward model, which writes no answers: set norm_policy" in err, err
    assert not (tmp_path / "rm2" / "checkpoints").exists()
    assert cli_main(base + [f"run.out_dir={tmp_path}/rm3", f"norm_policy={tmp_path}/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "norm_policy" in err and "nowhere" in err, err
    assert cli_main(base + [f"run.out_dir={tmp_path}/rm4", f"norm_policy={pretrained}"]) == 0
    norm = read_metrics(tmp_path / "rm4", "normalisation")[0]
    assert norm["n"] == 2 and norm["samples"] == 2
