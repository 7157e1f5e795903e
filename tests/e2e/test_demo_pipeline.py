"""The demo pipeline end to end on a still smaller config: every artefact exists, every
headline figure is a real number, and a second run skips every completed stage."""
import json
import math

import pytest

from llmtrain import pipeline

SMALL = [
    "pretrain.model.dim=64", "pretrain.model.n_layers=2", "pretrain.run.max_steps=20", "pretrain.run.eval_every=10",
    "pretrain.run.eval_batches=2", "pretrain.run.save_every=10", "pretrain.run.batch_size=8",
    "sft.run.max_steps=15", "sft.run.eval_every=15", "sft.run.batch_size=8", "sft.sample_tokens=12",
    "feedback.max_prompts=24", "feedback.max_new_tokens=12", "feedback.rule=length",  # a tiny SFT model has no style yet
    "reward.run.max_steps=8", "reward.run.eval_every=8", "reward.norm_prompts=4", "reward.data.val_every=4",
    "ppo.run.max_steps=3", "ppo.run.eval_every=3", "ppo.rollout_batch=8", "ppo.max_new_tokens=12", "ppo.eval_prompts=6",
    "grpo.run.max_steps=2", "grpo.run.eval_every=2", "grpo.rollout_batch=2", "grpo.group_size=4", "grpo.minibatch=4",
    "grpo.max_new_tokens=12", "grpo.eval_prompts=6",
    "dpo.run.max_steps=4", "dpo.run.eval_every=4",
    "evaluate.max_prompts=8", "evaluate.max_new_tokens=12", "style_eval_prompts=8", "sample_prompts=2",
]


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path, capsys):
    cfg = pipeline.load(pipeline.DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", *SMALL])
    root = pipeline.run(cfg)
    for rel in ["tokenizer/tokenizer.json", "data/meta.json", "feedback/feedback.db", "feedback/rankings.jsonl",
                "style.json", "evaluation.json", "report.md", "report.html", "headline.json", "timings.json",
                "plots/pretrain.png", "plots/sft.png", "plots/reward.png", "plots/ppo.png", "plots/grpo.png", "plots/dpo.png"]:
        assert (root / rel).is_file(), rel
    assert cfg.methods == ["ppo", "grpo", "dpo"]  # the demo's choice; rloo runs when listed
    for stage in ["pretrain", "sft", "reward", "ppo", "grpo", "dpo"]:
        assert list((root / stage / "checkpoints").glob("step_*/model.safetensors")), stage
    headline = json.loads((root / "headline.json").read_text())
    expected = {"pretrain_val_first", "pretrain_val_last", "sft_val_first", "sft_val_last", "style_sft", "rm_accuracy",
                "ppo_win_rm", "ppo_win_true", "dpo_win_rm", "dpo_win_true", "ppo_kl", "dpo_accuracy",
                "grpo_win_rm", "grpo_win_true", "grpo_distinct", "grpo_kl"}
    assert expected <= set(headline)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in headline.values())
    report = (root / "report.md").read_text()
    assert "Headline figures" in report and "answered by each model" in report
    timings = json.loads((root / "timings.json").read_text())
    assert set(timings) == set(pipeline.stages_of(cfg)) == set(pipeline.STAGES) - {"rloo", "rounds"}

    # A second run finds everything complete and redoes nothing.
    capsys.readouterr()
    pipeline.run(cfg)
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == len(pipeline.stages_of(cfg))

    # --from reruns a late stage alone, with what the skipped stages made before it.
    # A fresh config, as a new process would load it (the first run filled in paths).
    before = (root / "reward" / "metrics.jsonl").read_text()
    fresh = pipeline.load(pipeline.DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", *SMALL])
    pipeline.run(fresh, from_stage="dpo")
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == pipeline.stages_of(cfg).index("dpo")
    assert (root / "report.md").is_file() and (root / "reward" / "metrics.jsonl").read_text() == before
