"""The blind arena end to end through the CLI, on two tiny checkpoints: arena-generate (greedy,
as evaluate), arena-simulate by a rule, arena-export read by a tiny reward run, and the check
the demo makes: the simulated voters' win rate of one checkpoint over the other, with its 95%
Wilson interval, against evaluate's true-rule win rate for the same checkpoints on the same
prompts. Greedy answers are evaluate's answers, so the two figures agree exactly."""
from __future__ import annotations

import json

import pytest
from conftest import WORDS, tiny_pretrain_config, write_jsonl
from test_reward import reward_config

from llmtrain.cli import main as cli_main
from llmtrain.feedback.arena_stats import pair_table
from llmtrain.feedback.store import FeedbackStore
from llmtrain.metrics import read_metrics
from llmtrain.stages import pretrain, reward

RULE = "length"


@pytest.fixture(scope="module")
def arena_run(pretrained, shards, tmp_path_factory):
    """Two checkpoints (the shared tiny one and one trained for fewer steps), 40 prompts of which
    every 2nd is held out, the arena over the held-out 20, simulated votes, and the export."""
    tmp = tmp_path_factory.mktemp("arena")
    cfg = tiny_pretrain_config(shards, tmp / "early", max_steps=8, batch_size=8, seed=3)
    cfg.model.max_seq_len = 64
    pretrain.main(cfg)
    prompts = write_jsonl(tmp / "p.jsonl", [{"prompt": f"Tell me about the {WORDS[i % 20]} number {i}"}
                                             for i in range(40)])
    db = tmp / "arena.db"
    assert cli_main(["feedback", "arena-generate", "--db", str(db), "--model", f"base={pretrained}",
                     "--model", f"early={tmp / 'early'}", "--prompts", str(prompts), "--val-every", "2",
                     "--max-new-tokens", "10"]) == 0
    assert cli_main(["feedback", "arena-simulate", "--db", str(db), "--rule", RULE]) == 0
    assert cli_main(["feedback", "arena-export", "--db", str(db), "-o", str(tmp / "arena.jsonl")]) == 0
    return {"tmp": tmp, "db": db, "prompts": prompts, "base": pretrained, "early": tmp / "early"}


def test_generate_simulate_and_export(arena_run, capsys):
    store = FeedbackStore(arena_run["db"])
    assert store.arena_counts() == {"models": 2, "prompts": 20, "matches": 20, "votes": 20}
    assert [m["name"] for m in store.arena_models()] == ["base", "early"]
    settings = store.arena_generation(store.arena_match(1)["prompt_id"])
    assert settings["decoding"] == "greedy" and settings["val_every"] == 2 and settings["max_new_tokens"] == 10
    assert settings["models"]["early"]["step"] == 8 and settings["models"]["base"]["step"] == 30
    held = [json.loads(x)["prompt"] for x in arena_run["prompts"].read_text().splitlines()][1::2]
    assert sorted(store.arena_match(i)["prompt"] for i in range(1, 21)) == sorted(held)
    assert all(v["simulated"] and v["annotator"] == f"sim-{RULE}" for v in store.arena_votes())
    lines = [json.loads(x) for x in (arena_run["tmp"] / "arena.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(x["source"]["kind"] == "arena" and x["simulated"] for x in lines)
    assert all(len(x["ranked"]) == 2 for x in lines)
    store.close()


@pytest.fixture(scope="module")
def arena_rm(arena_run):
    """A tiny reward model trained on the arena's export (evaluate needs one too)."""
    out = arena_run["tmp"] / "rm"
    reward.main(reward_config(arena_run["base"], arena_run["tmp"] / "arena.jsonl", out, max_steps=3, eval_every=0,
                              batch_size=2))
    return out


def test_the_reward_stage_trains_on_an_arena_export(arena_run, arena_rm):
    setup = read_metrics(arena_rm, "setup")[0]
    with FeedbackStore(arena_run["db"]) as store:
        votes = store.arena_votes()
    pairs = sum(v["vote"] in ("a", "b") for v in votes)  # a tie (equal length) gives no pair and is left out
    assert setup["train_prompts"] + setup["val_prompts"] == pairs >= 10
    assert read_metrics(arena_rm, "train")[-1]["step"] == 3


def test_the_arena_win_rate_agrees_with_evaluates_true_rule_win_rate(arena_run, arena_rm, capsys):
    rm = arena_rm
    out = arena_run["tmp"] / "evaluation.json"
    assert cli_main(["evaluate", f"a={arena_run['base']}", f"b={arena_run['early']}", f"reward_model={rm}",
                     f"prompts={arena_run['prompts']}", "val_every=2", f"true_rule={RULE}", "max_new_tokens=10",
                     f"out={out}"]) == 0
    ev = json.loads(out.read_text())
    store = FeedbackStore(arena_run["db"])
    votes = store.arena_votes()
    row = pair_table(votes, [m["name"] for m in store.arena_models()])[0]
    assert (row["model"], row["against"], row["votes"]) == ("early", "base", ev["prompts"]) == ("early", "base", 20)
    assert row["lo"] <= ev["win_rate_b_by_true_rule"] <= row["hi"]
    assert row["win_rate"] == ev["win_rate_b_by_true_rule"]  # greedy answers: the same answers, the same verdicts
    assert 0 < row["wins"] + row["losses"]  # the rule tells the two checkpoints apart somewhere
    # and the answers are evaluate's (its first 8 samples), prompt by prompt
    by_prompt = {}
    for mid in range(1, 21):
        m = store.arena_match(mid)
        by_prompt[m["prompt"]] = {m["x"]["name"]: m["x"]["text"], m["y"]["name"]: m["y"]["text"]}
    for s in ev["samples"]:
        assert by_prompt[s["prompt"]] == {"base": s["a"], "early": s["b"]}
    store.close()  # now, not at garbage collection: its last close writes the database (the next test's mtime check)


@pytest.mark.parametrize("args, message", [
    (["--model", "only=X"], "the arena needs at least two models"),
    (["--model", "a=X", "--model", "nameless"], "--model nameless: give NAME=CHECKPOINT"),
    (["--model", "a=X", "--model", "a=Y"], "the name a is given twice"),
    (["--model", "a b=X", "--model", "c=Y"], "model names are 1-64 ASCII letters"),
    (["--model", "a=X", "--model", "b=/no/such/run"], "--model a=X: checkpoint not found: X"),
    (["--model", "a=BASE", "--model", "b=BASE", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--model", "a=BASE", "--model", "b=BASE", "--val-every", "1"], "--val-every must be 0 (all) or >= 2"),
    (["--model", "a=BASE", "--model", "b=BASE", "--prompts", "/no/such.jsonl"], "/no/such.jsonl"),
    (["--model", "base=BASE", "--model", "b=BASE", "--db", "ARENA"], "has a model named base already"),
])
def test_arena_generate_refuses_bad_flags_in_one_line(arena_run, tmp_path, capsys, args, message):
    prompts = arena_run["prompts"]
    sub = {"BASE": str(arena_run["early"]), "ARENA": str(arena_run["db"])}
    argv = ["feedback", "arena-generate", "--prompts", str(prompts), "--db", str(tmp_path / "new.db")]
    for a in args:
        for k, v in sub.items():
            a = a.replace(k, v)
        argv.append(a)
    before = arena_run["db"].stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "new.db").exists() and arena_run["db"].stat().st_mtime_ns == before


@pytest.mark.parametrize("action, args, message", [
    ("arena-simulate", ["--rule", "nope"], "unknown rule 'nope'"),
    ("arena-simulate", ["--rule", RULE, "--limit", "-1"], "--limit must be >= 0"),
    ("arena-simulate", ["--rule", RULE, "--db", "MISSING"], "no such database"),
    ("arena-export", ["--db", "MISSING"], "no such database"),
    ("arena-export", ["-o", "/proc/nope/arena.jsonl"], "--output /proc/nope/arena.jsonl"),
])
def test_arena_simulate_and_export_refuse_in_one_line(arena_run, tmp_path, capsys, action, args, message):
    args = [str(tmp_path / "missing.db") if a == "MISSING" else a for a in args]
    argv = ["feedback", action, *([] if "--db" in args else ["--db", str(arena_run["db"])]), *args]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "missing.db").exists()


def test_evaluate_samples_compares_sampled_answers_too(arena_run, arena_rm, tmp_path):
    """evaluate samples=n: each model also samples n answers per prompt at temperature 1 with one seed.
    A model against itself ties on every prompt (0.5 exactly, equal scores); against another, each
    model's mean true score is the mean over prompts of the mean over its n answers, recomputed here
    from generate() with the same seed, and the win rate compares the per-prompt means."""
    import numpy as np
    import torch

    from llmtrain import checkpoint
    from llmtrain.data.jsonl import split
    from llmtrain.data.prompts import last_user, read_prompts
    from llmtrain.generate import SamplingConfig, answer_text, generate
    from llmtrain.model import Transformer
    from llmtrain.scoring import win_rate
    from llmtrain.styles import RULES
    from llmtrain.tokenizer import Tokenizer, render_chat

    common = [f"reward_model={arena_rm}", f"prompts={arena_run['prompts']}", "val_every=2", f"true_rule={RULE}",
              "max_new_tokens=10", "samples=3"]
    assert cli_main(["evaluate", f"a={arena_run['base']}", f"b={arena_run['base']}", *common, f"out={tmp_path}/same.json"]) == 0
    same = json.loads((tmp_path / "same.json").read_text())["sampled"]
    assert same["per_prompt"] == 3 and same["win_rate_b_by_true_rule"] == same["win_rate_b_by_reward_model"] == 0.5
    assert same["true_score_a"] == same["true_score_b"] and same["reward_a"] == same["reward_b"]
    assert cli_main(["evaluate", f"a={arena_run['base']}", f"b={arena_run['early']}", *common, f"out={tmp_path}/ab.json"]) == 0
    ab = json.loads((tmp_path / "ab.json").read_text())["sampled"]

    convs = split(read_prompts(str(arena_run["prompts"])), 2)[1]
    per_prompt = {}
    for name in ("base", "early"):
        ckpt = checkpoint.resolve(arena_run[name])
        model = Transformer(checkpoint.model_config(ckpt))
        checkpoint.load_weights(ckpt, model)
        tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
        s = SamplingConfig(10, 1.0, stop_ids=tok.stop_ids)
        g = torch.Generator().manual_seed(0)
        prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
        scores = np.zeros((len(convs), 3))
        for j in range(3):
            for i, ids in enumerate(generate(model.eval(), prompts, s, pad_id=tok.pad_id, generator=g)):
                text, finished = answer_text(tok, ids, s.stop_ids)
                scores[i, j] = RULES[RULE](last_user(convs[i]), {"text": text, "finished": finished})
        per_prompt[name] = scores.mean(1)
    assert ab["true_score_a"] == pytest.approx(per_prompt["base"].mean())
    assert ab["true_score_b"] == pytest.approx(per_prompt["early"].mean())
    assert ab["win_rate_b_by_true_rule"] == win_rate(per_prompt["early"].tolist(), per_prompt["base"].tolist())
    assert ab["true_score_a"] != ab["true_score_b"]  # the two checkpoints do differ when sampled
