"""Typed configuration: one dataclass per stage, nesting Model/Optim/Data/Run configs.

A YAML file fills a stage config and ``key=value`` overrides (dotted for nested fields,
e.g. ``optim.lr=3e-4``) are applied on top. Every key is checked against the dataclass
fields and every value against the field's type, so a typo is a one-line error naming the
key instead of a silently ignored setting.

    rules.py     what one field may hold (`check(default, RULE)`), writable paths, devices
    sections.py  the sections stages share: model, optim, run, freeze, LoRA, KL
    stages.py    one config per command, each with its data section and the fields it refuses
    yamlfile.py  reading YAML safely (duplicate keys, alias bombs, not a mapping)
    loading.py   a YAML file plus key=value overrides -> a checked config; errors name the key
"""
from llmtrain.config.rules import (BETA, DEVICE, FRACTION, HELD_OUT_EVERY, MAX_THREADS, NON_NEGATIVE, OUTPUT_DIR,
                                   OUTPUT_FILE, POSITIVE, SEED, TEMPERATURE, THREADS, TOP_P, WRITABLE_DIR, WRITABLE_FILE,
                                   Rule, at_least, check, path_problem)
from llmtrain.config.sections import FreezeConfig, KLConfig, LoRAConfig, ModelConfig, OptimConfig, RunConfig
from llmtrain.config.stages import (ClassifyConfig, ClassifyDataConfig, DPOConfig, EvaluateConfig, JSONLDataConfig,
                                    PPOConfig, PrepareConfig, PretrainConfig, PretrainDataConfig, RewardConfig,
                                    RewardDataConfig, SFTConfig, SFTDataConfig, TokenizerConfig)
from llmtrain.config.yamlfile import MAX_YAML_VALUES, read_yaml, safe_load
from llmtrain.config.loading import COMMAND_LINE, dump_yaml, from_dict, load_config, set_dotted, to_dict

__all__ = [
    "BETA", "DEVICE", "FRACTION", "HELD_OUT_EVERY", "MAX_THREADS", "NON_NEGATIVE", "OUTPUT_DIR", "OUTPUT_FILE",
    "POSITIVE", "SEED", "TEMPERATURE", "THREADS", "TOP_P", "WRITABLE_DIR", "WRITABLE_FILE", "Rule", "at_least", "check",
    "path_problem",
    "FreezeConfig", "KLConfig", "LoRAConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "ClassifyConfig", "ClassifyDataConfig", "DPOConfig", "EvaluateConfig", "JSONLDataConfig", "PPOConfig",
    "PrepareConfig", "PretrainConfig", "PretrainDataConfig", "RewardConfig", "RewardDataConfig", "SFTConfig",
    "SFTDataConfig", "TokenizerConfig",
    "MAX_YAML_VALUES", "read_yaml", "safe_load",
    "COMMAND_LINE", "dump_yaml", "from_dict", "load_config", "set_dotted", "to_dict",
]
