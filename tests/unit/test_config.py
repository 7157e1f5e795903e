import pytest

from llmtrain.cli import main as cli_main
from llmtrain.config import PretrainConfig, load_config
from llmtrain.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "model:\n  dim: 64\noptim:\n  lr: 3.0e-4\nrun:\n  max_steps: 5\n")
    cfg = load_config(PretrainConfig, p, ["optim.lr=1e-3", "run.precision=bf16", "model.n_layers=3"])
    assert cfg.model.dim == 64 and cfg.model.n_layers == 3
    assert cfg.optim.lr == 1e-3  # YAML reads "1e-3" as a string; the float field takes it
    assert cfg.run.max_steps == 5 and cfg.run.precision == "bf16"
    assert cfg.run.batch_size == 8  # untouched default


@pytest.mark.parametrize("text,overrides,needle", [
    ("model:\n  dimm: 64\n", [], "unknown key 'model.dimm'"),
    ("", ["run.max_step=3"], "unknown key 'run.max_step'"),
    ("run:\n  max_steps: many\n", [], "'run.max_steps' must be an integer"),
    ("run:\n  resume: 1\n", [], "'run.resume' must be true or false"),
    ("run:\n  precision: fp16\n", [], "'run.precision' must be one of fp32, bf16"),
    ("model: [1, 2]\n", [], "'model' must be a mapping"),
    ("run:\n  max_steps: [1\n", [], "not valid YAML"),
    ("", ["novalue"], "not of the form key=value"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(PretrainConfig, write(tmp_path, text), overrides)
    assert needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(PretrainConfig, "nope.yaml")


def test_cli_prints_one_line_not_a_traceback(tmp_path, capsys):
    p = write(tmp_path, "optim:\n  lrr: 1\n")
    assert cli_main(["pretrain", "-c", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'optim.lrr'" in err[0] and "did you mean lr" in err[0]
    assert cli_main(["pretrain", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_model_config_checks():
    from llmtrain.config import ModelConfig

    with pytest.raises(ConfigError, match="not divisible by model.n_kv_heads"):
        ModelConfig(vocab_size=10, dim=64, n_heads=4, n_kv_heads=3).resolved()
    c = ModelConfig(vocab_size=10, dim=96, n_heads=4).resolved()
    assert c.n_kv_heads == 4 and c.ffn_dim == 256  # 8/3 * 96 = 256, a multiple of 64


def test_cli_overrides_may_follow_options(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The overrides after --from are read (a wrong key is reported), and a wrong stage is
    # refused before anything is written.
    assert cli_main(["demo", "--from", "sft", "pretrain.run.max_stepz=1"]) == 2
    assert "unknown key 'pretrain.run.max_stepz'" in capsys.readouterr().err
    assert cli_main(["demo", "--from", "nothing", "pretrain.run.max_steps=1"]) == 2
    assert "--from nothing: not a stage" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        cli_main(["demo", "--from", "sft", "--bogus"])


def test_a_section_given_in_part_keeps_the_stage_defaults(tmp_path):
    """reward's run section defaults to 200 steps and no weight decay; setting one run key
    (or one optim key) must not reset the others to RunConfig's / OptimConfig's defaults."""
    from llmtrain.config import RewardConfig

    cfg = load_config(RewardConfig, None, ["run.log_every=50", "optim.lr=1e-3"])
    default = RewardConfig()
    assert cfg.run.max_steps == default.run.max_steps == 200 and cfg.run.log_every == 50
    assert cfg.optim.weight_decay == default.optim.weight_decay == 0.0 and cfg.optim.lr == 1e-3
    path = tmp_path / "r.yaml"
    path.write_text("run:\n  batch_size: 2\n")
    assert load_config(RewardConfig, str(path), []).run.max_steps == 200
