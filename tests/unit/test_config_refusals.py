"""Each stage refuses the config fields it does not read (issue #16, Build 5): a value other than
the stage's default is a one-line error at load naming the dotted key, instead of a setting
silently ignored. The tables are the `UNUSED` attributes of the config classes
(llmtrain/config/unused.py); the same values are accepted where the stage reads them, and
every shipped config under configs/ still loads."""
from pathlib import Path

import pytest

from llmtrain import config, pipeline
from llmtrain.config import (ClassifyConfig, DPOConfig, LoRAConfig, OptimConfig, PPOConfig, PrepareConfig, PretrainConfig,
                             RewardConfig, SFTConfig, TokenizerConfig, load_config)
from llmtrain.config.unused import dotted
from llmtrain.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (config class, overrides that make the field unused, the refused key=value, what the message says)
REFUSED = [
    (PPOConfig, [], "run.batch_size=4", "is not used by ppo (rollout_batch and minibatch size its batches)"),
    (PPOConfig, ["algorithm=rloo"], "run.grad_accum=2", "is not used by rloo (each minibatch is one optimizer step)"),
    (PPOConfig, [], "run.eval_batches=0", "is not used by ppo (eval_prompts sizes its evaluation)"),
    (PPOConfig, ["algorithm=grpo"], "optim.warmup_steps=5", "is not used by grpo (its learning rate is constant)"),
    (PPOConfig, [], "optim.schedule=cosine", "is not used by ppo (its learning rate is constant)"),
    (PPOConfig, [], "run.compile=true", "is not used by ppo (generation changes shapes every step)"),
    (PPOConfig, [], "group_size=8", "is not used by ppo (one answer per prompt"),
    *((PPOConfig, [f"algorithm={a}"], kv, f"is not used by {a} (no value model")
      for a, kv in [("grpo", "value_clip=0.3"), ("rloo", "vf_coef=1.0"), ("grpo", "gamma=0.9"), ("rloo", "lam=0.9"),
                    ("grpo", "whiten_advantages=false")]),
    (PPOConfig, [], "ptx_shards=runs/data", "is not used by ppo with ptx_coef=0 (no pretraining loss)"),
    (PPOConfig, [], "ptx_batch=8", "is not used by ppo with ptx_coef=0"),
    (PPOConfig, [], "optim.min_lr_ratio=0.5", "is not used with optim.schedule=constant"),
    *((cls, [], kv, "is not used without lora.enabled (it shapes the LoRA adapters, which are off)")
      for cls in (PPOConfig, DPOConfig) for kv in ("lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "lora.targets=[o_proj]")),
    *((cls, ["lora.enabled=true"], kv, f"is not used by {stage} with lora.enabled (LoRA trains its adapters only")
      for cls, stage in ((PPOConfig, "ppo"), (DPOConfig, "dpo")) for kv in ("freeze.first_layers=1", "freeze.patterns=[x]")),
    *((cls, ["optim.schedule=constant"], "optim.min_lr_ratio=0.5", "is not used with optim.schedule=constant")
      for cls in (PretrainConfig, SFTConfig, ClassifyConfig, RewardConfig, DPOConfig)),
]


def case_id(case) -> str:
    cls, setup, kv, _ = case
    return "-".join([cls.__name__, *setup, kv])


@pytest.mark.parametrize("cls, setup, override, message", REFUSED, ids=map(case_id, REFUSED))
def test_a_field_the_stage_does_not_read_is_refused_naming_its_key(cls, setup, override, message):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [*setup, override])
    msg = str(e.value)
    assert msg.startswith(f"command line: '{key}' {message}"), msg
    assert "leave it at" in msg and "\n" not in msg


@pytest.mark.parametrize("path, message", [
    ("ppo.run.batch_size=4", "'ppo.run.batch_size' is not used by ppo (ppo.rollout_batch and ppo.minibatch size"),
    ("grpo.gamma=0.9", "'grpo.gamma' is not used by grpo (no value model"),
    ("dpo.lora.r=4", "'dpo.lora.r' is not used without dpo.lora.enabled"),
    ("sft.optim.min_lr_ratio=0.5", None),  # the demo's SFT has a cosine schedule: read, accepted
])
def test_a_pipeline_section_refuses_the_same_fields_named_as_typed(path, message):
    if message is None:
        pipeline.load(pipeline.DEMO_CONFIG, [path])
        return
    with pytest.raises(ConfigError) as e:
        pipeline.load(pipeline.DEMO_CONFIG, [path])
    assert str(e.value).startswith(f"command line: {message}"), str(e.value)


@pytest.mark.parametrize("cls, overrides", [
    (PPOConfig, ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.targets=[o_proj]"]),
    (PPOConfig, ["algorithm=grpo", "group_size=8", "minibatch=8"]),
    (PPOConfig, ["gamma=0.9", "lam=0.9", "vf_coef=1.0", "value_clip=0.3", "whiten_advantages=false"]),
    (PPOConfig, ["ptx_coef=0.1", "ptx_shards=runs/data", "ptx_batch=8"]),
    (PPOConfig, ["freeze.first_layers=1", "freeze.patterns=[x]"]),
    (PPOConfig, ["run.batch_size=8", "run.grad_accum=1", "run.compile=false"]),  # the defaults may be spelled out
    (DPOConfig, ["lora.enabled=true", "lora.dropout=0.1"]),
    (DPOConfig, ["freeze.first_layers=1", "optim.min_lr_ratio=0.5", "run.grad_accum=2", "run.eval_batches=3"]),
    (RewardConfig, ["run.eval_batches=3"]),
    (ClassifyConfig, ["run.eval_batches=3"]),
    (SFTConfig, ["run.eval_batches=3"]),
])
def test_the_same_values_load_where_the_stage_reads_them(cls, overrides):
    load_config(cls, None, overrides)


def test_every_table_entry_names_a_field_and_has_a_refusal_case():
    """A typo in a table would refuse nothing; an entry without a case above is untested."""
    tested = {(cls, kv.split("=")[0]) for cls, _, kv, _ in REFUSED}
    for owner, stages in [(PPOConfig, [PPOConfig]), (DPOConfig, [DPOConfig]), (OptimConfig, [PPOConfig, DPOConfig]),
                          (LoRAConfig, [PPOConfig, DPOConfig])]:
        for u in owner.UNUSED:
            dotted(owner(), u.key)  # an AttributeError names a table entry that is no field
            prefix = {OptimConfig: "optim.", LoRAConfig: "lora."}.get(owner, "")
            for stage in stages:
                assert (stage, prefix + u.key) in tested, f"{owner.__name__}.UNUSED {u.key}: no case in REFUSED for {stage.__name__}"


def test_pretraining_refuses_eval_batches_zero_saying_why():
    with pytest.raises(ConfigError, match=r"^command line: 'run.eval_batches' must be > 0 \(pretraining evaluates that "
                                          r"many batches sampled from its validation split"):
        load_config(PretrainConfig, None, ["run.eval_batches=0"])


CLASS_OF = {"classify.yaml": ClassifyConfig, "prepare.yaml": PrepareConfig, "pretrain-124m.yaml": PretrainConfig,
            "pretrain-tiny.yaml": PretrainConfig, "sft.yaml": SFTConfig, "tokenizer.yaml": TokenizerConfig,
            "demo.yaml": pipeline.PipelineConfig}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads_with_its_stage(name, tmp_path, monkeypatch):
    assert name in CLASS_OF, f"configs/{name}: say which config class reads it (CLASS_OF)"
    monkeypatch.chdir(tmp_path)  # its output folders are checked for writability here, not in the repo
    load_config(CLASS_OF[name], CONFIGS / name, [])


def test_every_stage_loads_with_its_defaults():
    for cls in (PretrainConfig, SFTConfig, ClassifyConfig, RewardConfig, PPOConfig, DPOConfig, config.EvaluateConfig,
                TokenizerConfig, PrepareConfig, pipeline.PipelineConfig):
        load_config(cls, None, [])
    for algorithm in ("grpo", "rloo"):
        load_config(PPOConfig, None, [f"algorithm={algorithm}"])


RECIPE_CLASS = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "grpo": PPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("recipes/*/*.yaml")))
def test_every_recipe_loads_with_its_stage(path, tmp_path, monkeypatch):
    """configs/recipes/<model>/<stage>.yaml: each loads with its stage's class (Hub ids and hf:
    datasets are only resolved when the stage runs), and GRPO/PPO recipes name their algorithm."""
    stage = Path(path).stem
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RECIPE_CLASS[stage], CONFIGS / path, [])
    if stage in ("grpo", "ppo"):
        assert cfg.algorithm == stage
