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


# ----------------------------------------------------------------------------- values checked at load


@pytest.mark.parametrize("override,key,needle", [
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("optim.lr=nan", "optim.lr", "must be a finite number"),
    ("optim.lr=inf", "optim.lr", "must be a finite number"),
    ("optim.beta1=1", "optim.beta1", ">= 0 and < 1"),
    ("optim.beta2=-0.5", "optim.beta2", ">= 0 and < 1"),
    ("optim.eps=0", "optim.eps", "must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay", "must be >= 0"),
    ("run.grad_accum=0", "run.grad_accum", "must be >= 1"),
    ("run.batch_size=0", "run.batch_size", "must be > 0"),
    ("run.max_steps=-1", "run.max_steps", "0: check everything, train nothing"),
    ("run.log_every=0", "run.log_every", "must be > 0"),
    ("run.eval_every=-1", "run.eval_every", "0: only at the end"),
    ("model.n_heads=0", "model.n_heads", "must be > 0"),
    ("model.n_heads=3", "model.n_heads", "must divide model.dim=256"),
    ("model.n_kv_heads=3", "model.n_kv_heads", "must divide model.n_heads=4"),
    ("model.dim=36", "model.n_heads", "even head size"),
    ("run.eval_batches=0", "run.eval_batches", "pretraining evaluates"),
])
def test_each_bad_value_names_its_key_and_the_command_line(override, key, needle):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, [override])
    msg = str(e.value)
    assert msg.startswith(f"command line: '{key}' ") and needle in msg and "\n" not in msg


def test_values_are_blamed_on_where_they_came_from(tmp_path):
    p = write(tmp_path, "optim:\n  lr: -1\nrun:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"^{p}: 'optim.lr' must be > 0"):
        load_config(PretrainConfig, p, [])
    # The same key fixed on the command line, another one broken there: the command line is named.
    with pytest.raises(ConfigError, match=r"^command line: 'run.batch_size' must be > 0, got 0"):
        load_config(PretrainConfig, p, ["optim.lr=1e-3", "run.batch_size=0"])
    # A whole section given on the command line: its keys are the command line's.
    with pytest.raises(ConfigError, match=r"^command line: 'run.log_every' must be > 0"):
        load_config(PretrainConfig, p, ["optim.lr=1e-3", "run={log_every: 0}"])
    # The file's own bad value is still the file's when another key comes from the command line.
    with pytest.raises(ConfigError, match=rf"^{p}: 'optim.lr'"):
        load_config(PretrainConfig, p, ["run.batch_size=2"])


def test_the_demo_names_keys_with_their_stage_section():
    from llmtrain import pipeline

    for override, key in [("ppo.optim.lr=-1", "ppo.optim.lr"), ("grpo.group_size=1", "grpo.group_size"),
                          ("feedback.top_p=0", "feedback.top_p"), ("pretrain.model.n_heads=3", "pretrain.model.n_heads"),
                          ("dpo.beta=0", "dpo.beta")]:
        with pytest.raises(ConfigError, match=rf"^command line: '{key}' "):
            pipeline.load(pipeline.DEMO_CONFIG, [override])


def test_rules_are_declared_on_the_fields():
    """The checks live in field metadata (one place per field), and every default passes them."""
    import dataclasses

    from llmtrain import config

    ruled = {(c.__name__, f.name) for c in (config.OptimConfig, config.RunConfig, config.ModelConfig, config.PPOConfig,
                                            config.DPOConfig) for f in dataclasses.fields(c) if "check" in f.metadata}
    for name in [("OptimConfig", "lr"), ("OptimConfig", "beta1"), ("OptimConfig", "eps"), ("RunConfig", "grad_accum"),
                 ("RunConfig", "device"), ("RunConfig", "out_dir"), ("ModelConfig", "n_heads"), ("PPOConfig", "top_p"),
                 ("PPOConfig", "temperature"), ("DPOConfig", "beta")]:
        assert name in ruled
    for cls in (config.PretrainConfig, config.SFTConfig, config.ClassifyConfig, config.RewardConfig, config.PPOConfig,
                config.DPOConfig, config.EvaluateConfig, config.TokenizerConfig, config.PrepareConfig):
        load_config(cls, None, [])


def test_temperature_zero_is_greedy_and_allowed():
    from llmtrain.config import PPOConfig

    assert load_config(PPOConfig, None, ["temperature=0", "top_p=1", "top_k=0"]).temperature == 0.0


def test_devices_must_exist():
    import torch

    from llmtrain.dist import device_problem, pick_device

    assert device_problem("cpu") is None and device_problem("auto") is None
    assert "auto, cpu, cuda" in device_problem("gpu0")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in device_problem("cuda")
        with pytest.raises(ConfigError, match="device 'cuda:1'"):
            pick_device("cuda:1")
    else:
        n = torch.cuda.device_count()
        assert device_problem(f"cuda:{n}") and device_problem("cuda:0") is None


def test_output_paths_are_checked_and_nothing_is_left(tmp_path):
    from llmtrain.config import path_problem

    f = tmp_path / "file.txt"
    f.write_text("x")
    before = sorted(tmp_path.rglob("*"))
    assert path_problem(tmp_path / "new" / "deeper") is None
    assert "not a directory" in path_problem(f)
    assert "is a file, not a directory" in path_problem(f / "sub")
    assert "directory, not a file" in path_problem(tmp_path, "file")
    assert "not writable" in path_problem("/proc/llmtrain-test")
    assert sorted(tmp_path.rglob("*")) == before  # the probe file is gone, nothing was created


def test_max_steps_zero_writes_no_checkpoint_and_says_so(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["pretrain", f"data.shards={shards}", f"run.out_dir={out}", "run.max_steps=0", "model.dim=32",
                     "model.n_layers=1", "model.max_seq_len=32", "run.threads=1"]) == 0
    text = capsys.readouterr().out
    assert "no checkpoint written" in text and "checkpoint in" not in text
    assert not (out / "checkpoints").exists()


def test_deeply_nested_json_is_refused_before_the_parser_recurses():
    from llmtrain.data.jsonl import loads_line

    assert loads_line('{"text": "' + "[" * 1000 + '"}') == {"text": "[" * 1000}  # brackets inside a string
    assert loads_line("[" * 60 + "]" * 60)
    with pytest.raises(ValueError, match="nested more than"):
        loads_line("[" * 100_000 + "]" * 100_000)


def test_more_processes_than_gpus_is_one_line_naming_run_device(monkeypatch):
    """torchrun with 2 processes on a 1-GPU machine: CUDA's 'invalid device ordinal' traceback
    from rank 1 (seen on an H200) becomes one line that says what to change."""
    import torch

    from llmtrain import dist
    from llmtrain.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dist._check_rank_has_gpu(torch.device("cuda", 0), 0, 1)  # one process, one GPU: fine
    dist._check_rank_has_gpu(torch.device("cpu"), 1, 2)  # gloo on CPU: fine
    with pytest.raises(ConfigError, match=r"^run\.device: 2 processes on this node need 2 CUDA devices .* has 1: "
                                          r"start at most 1 \(torchrun --nproc_per_node 1\) or set run\.device=cpu$"):
        dist._check_rank_has_gpu(torch.device("cuda", 1), 1, 2)


# ----------------------------------------------------------------------------- #15 review: YAML and limits


def test_a_key_given_twice_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.01\n  warmup_steps: 0\n  lr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, p)
    assert str(e.value) == f"{p} line 4: key 'lr' is given twice (first on line 2); YAML would keep only the last"


def test_merge_keys_may_still_be_overridden():
    from llmtrain.config import safe_load

    assert safe_load("a: &b {lr: 0.5}\noptim:\n  <<: *b\n  lr: 0.25\n")["optim"] == {"lr": 0.25}


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")) + "run: *h\n"
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 values") as e:
        load_config(PretrainConfig, p, ["run.out_dir=x"])
    assert str(e.value).startswith(str(p))
    # A small alias is an ordinary YAML feature.
    q = write(tmp_path, "x: &n 3\n")
    from llmtrain.config import safe_load

    assert safe_load(q.read_text() + "y: *n\n") == {"x": 3, "y": 3}


def test_a_section_from_the_file_is_blamed_on_the_file(tmp_path):
    p = write(tmp_path, "run: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, p, ["run.out_dir=x"])
    assert str(e.value).startswith(f"{p}: 'run' must be a mapping") and "command line" in str(e.value)
    with pytest.raises(ConfigError, match="^command line: 'run.out_dir': run is not a section"):
        load_config(PretrainConfig, None, ["run=3", "run.out_dir=x"])


@pytest.mark.parametrize("override,needle", [
    ("run.seed=9223372036854775808", "'run.seed' must be >= 0 and < 2**63"),
    ("run.threads=100000", "'run.threads' must be >= 0 and <="),
    ("run.out_dir=", "'run.out_dir' must name a directory"),
    ("optim.warmup_steps=11", "'optim.warmup_steps' must be <= run.max_steps=10"),
])
def test_limits(override, needle):
    with pytest.raises(ConfigError, match="^command line: " + needle.replace("*", r"\*").replace(".", r"\.")):
        load_config(PretrainConfig, None, ["run.max_steps=10", override])


def test_limits_accept_the_edges():
    cfg = load_config(PretrainConfig, None, ["run.seed=9223372036854775807", "run.threads=4", "run.max_steps=10",
                                             "optim.warmup_steps=10"])
    assert cfg.run.seed == 2**63 - 1 and cfg.optim.warmup_steps == 10
    # A stage's own default warm-up is not an error on a short run; nor is max_steps 0.
    from llmtrain.config import DPOConfig

    assert load_config(DPOConfig, None, ["run.max_steps=1"]).optim.warmup_steps == 10
    assert load_config(PretrainConfig, None, ["run.max_steps=0", "optim.warmup_steps=50"]).run.max_steps == 0


def test_a_configured_warmup_on_a_run_shortened_on_the_command_line_is_left_alone(tmp_path):
    p = write(tmp_path, "optim:\n  warmup_steps: 20\nrun:\n  max_steps: 100\n")
    assert load_config(PretrainConfig, p, ["run.max_steps=1"]).optim.warmup_steps == 20
    q = write(tmp_path, "optim:\n  warmup_steps: 20\nrun:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match=f"^{q}: 'optim.warmup_steps' must be <= run.max_steps=10"):
        load_config(PretrainConfig, q)
