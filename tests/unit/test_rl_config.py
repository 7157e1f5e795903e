"""PPO/GRPO/RLOO refuse the run/optim fields they do not use, at load, naming the key: a value
there would otherwise be silently ignored (PPO sizes its batches with rollout_batch, group_size
and minibatch, and trains at a constant learning rate)."""
import pytest

from llmtrain.cli import main as cli_main

UNUSED = [
    ("ppo", "run.batch_size=4", "'run.batch_size' is not used by ppo (rollout_batch and minibatch size its batches)"),
    ("grpo", "run.batch_size=16", "'run.batch_size' is not used by grpo"),
    ("ppo", "run.grad_accum=2", "'run.grad_accum' is not used by ppo (each minibatch is one optimizer step)"),
    ("rloo", "run.grad_accum=4", "'run.grad_accum' is not used by rloo"),
    ("ppo", "run.eval_batches=3", "'run.eval_batches' is not used by ppo (eval_prompts sizes its evaluation)"),
    ("grpo", "run.eval_batches=0", "'run.eval_batches' is not used by grpo"),
    ("ppo", "optim.warmup_steps=10", "'optim.warmup_steps' is not used by ppo (its learning rate is constant)"),
    ("rloo", "optim.warmup_steps=1", "'optim.warmup_steps' is not used by rloo"),
    ("ppo", "optim.schedule=cosine", "'optim.schedule' is not used by ppo (its learning rate is constant)"),
    ("grpo", "optim.schedule=cosine", "'optim.schedule' is not used by grpo"),
]


@pytest.mark.parametrize("algorithm,override,message", UNUSED, ids=[f"{a}-{o}" for a, o, _ in UNUSED])
def test_an_unused_field_is_refused_before_anything_runs(tmp_path, capsys, algorithm, override, message):
    out = tmp_path / "run"
    assert cli_main([algorithm, "policy=nowhere", "reward_model=nowhere", f"run.out_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"llmtrain {algorithm}: error: command line: {message}")
    assert "Traceback" not in err[0]
    assert not out.exists()


def test_the_defaults_and_the_demo_settings_are_accepted():
    from llmtrain.config import PPOConfig, load_config

    for algorithm in ("ppo", "grpo", "rloo"):
        c = load_config(PPOConfig, None, [f"algorithm={algorithm}", "run.batch_size=8", "run.grad_accum=1",
                                          "run.eval_batches=20", "optim.warmup_steps=0", "optim.schedule=constant"])
        assert (c.run.batch_size, c.optim.schedule) == (8, "constant")
