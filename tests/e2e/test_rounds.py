"""Iterative RLHF (`rounds: 2`) on the small demo config: round 2's candidates come from round 1's
policy, the reward model continues from round 1's on every ranking so far, the policy continues
from round 1's, round.json holds the round's figures and the report shows them; a second run
skips everything; config mistakes about rounds are one-line errors before anything runs."""
import json
import math

import pytest
from test_demo_pipeline import SMALL

from llmtrain import checkpoint, pipeline
from llmtrain.errors import ConfigError


def _lines(p):
    return sum(1 for line in p.read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_two_rounds(tmp_path, capsys):
    cfg = pipeline.load(pipeline.DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", *SMALL, "methods=[ppo]", "rounds=2"])
    root = pipeline.run(cfg)
    r2 = root / "round2"
    # Round 2's candidates were written by round 1's PPO policy, not by the SFT model.
    out = capsys.readouterr().out
    assert "from round 1's PPO policy" in out and "from the SFT model" in out
    # The reward model continued from round 1's, on round 1's and round 2's rankings together.
    assert _lines(r2 / "feedback" / "all_rankings.jsonl") == \
        _lines(root / "feedback" / "rankings.jsonl") + _lines(r2 / "feedback" / "rankings.jsonl")
    rm_cfg = checkpoint.read_config(checkpoint.resolve(r2 / "reward"))["config"]
    assert rm_cfg["init_from"] == str(root / "reward") and rm_cfg["norm_policy"] == str(root / "sft")
    assert rm_cfg["data"]["train"] == str(r2 / "feedback" / "all_rankings.jsonl")
    ppo_cfg = checkpoint.read_config(checkpoint.resolve(r2 / "ppo"))["config"]
    assert ppo_cfg["policy"] == str(root / "ppo") and ppo_cfg["reward_model"] == str(r2 / "reward")
    # round.json: every figure a real number; the report has the round table.
    s = json.loads((r2 / "round.json").read_text())
    figures = [s["reward_accuracy"]["last_round_rm"]["accuracy"], s["reward_accuracy"]["this_round_rm"]["accuracy"],
               s["vs_last_round"]["win_rate_b_by_true_rule"], s["vs_last_round"]["win_rate_b_by_reward_model"],
               s["vs_sft"]["win_rate_b_by_true_rule"], s["vs_last_round"]["kl_b"], s["vs_sft"]["kl_b"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in figures)
    assert s["reward_accuracy"]["this_round_rm"]["pairs"] > 0
    assert "## Iterative RLHF, round by round" in (root / "report.md").read_text()
    ev = json.loads((root / "evaluation.json").read_text())
    assert set(ev) == {"ppo", "ppo@2"}
    timings = json.loads((root / "timings.json").read_text())
    assert {"candidates@2", "rankings@2", "reward@2", "ppo@2", "check@2"} <= set(timings)
    # check@2 answered with round 2's policy once, not once per baseline: compare_to_baselines
    # gives compare's figures for each baseline with one measurement of the challenger.
    from llmtrain.pipeline.prompts import held_out
    from llmtrain.stages import evaluate

    convs = held_out(cfg, pipeline.REPO)[1][:4]
    args = (str(r2 / "reward"), convs, "aristocrat", 8, 2)
    measured = []
    real = evaluate.evaluate_policy
    evaluate.evaluate_policy = lambda model, *a, **k: measured.append(model) or real(model, *a, **k)
    try:
        both = evaluate.compare_to_baselines(str(r2 / "ppo"), {"last": str(root / "ppo"), "sft": str(root / "sft")}, *args)
    finally:
        evaluate.evaluate_policy = real
    assert len(measured) == 3  # the policy, the last round's, SFT
    for name, baseline in (("last", root / "ppo"), ("sft", root / "sft")):
        assert both[name] == evaluate.compare(str(baseline), {"b": str(r2 / "ppo")}, *args)["b"]
    # check@2 again (its round.json deleted): the same round.json, with round 2's policy
    # measured once, not once per baseline (3 measurements: the policy, round 1's, SFT).
    before = (r2 / "round.json").read_text()
    (r2 / "round.json").unlink()
    measured.clear()
    evaluate.evaluate_policy = lambda model, *a, **k: measured.append(model) or real(model, *a, **k)
    try:
        pipeline.run(cfg)
    finally:
        evaluate.evaluate_policy = real
    assert len(measured) == 3 and (r2 / "round.json").read_text() == before
    # A second run redoes nothing.
    capsys.readouterr()
    pipeline.run(cfg)
    assert "] ..." not in capsys.readouterr().out


@pytest.mark.parametrize("overrides,needle", [
    (["rounds=2", "round_method=grpo", "methods=[ppo]"], "round_method=grpo: not one of the methods"),
    (["round_method=ppo"], "round_method=ppo: only with rounds above 1"),
])
def test_round_config_mistakes(tmp_path, overrides, needle):
    cfg = pipeline.load(pipeline.DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=needle):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()


def test_rounds_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match="rounds"):
        pipeline.load(pipeline.DEMO_CONFIG, ["rounds=0"])
