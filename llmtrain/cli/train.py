"""The commands that make data and train: `tokenizer`, `prepare`, `reward chitchat` (data in,
files out), and the stages `pretrain`, `sft`, `classify`, `reward`, `ppo|grpo|rloo`, `dpo` and
`evaluate` (a config in, a run directory out; each is one main(config) in llmtrain/stages/).

Each command imports what it runs inside its function (lazily): a stage loads torch (about 2 s),
and `llmtrain --help` or a bad flag does not wait for it.
"""
from __future__ import annotations

import argparse

from llmtrain.cli.args import check_flags, check_out
from llmtrain.errors import ConfigError


def cmd_tokenizer(args) -> int:
    from llmtrain.config import TokenizerConfig, load_config
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    cfg = load_config(TokenizerConfig, args.config, args.overrides)
    tok = train_tokenizer(iter_documents(cfg.inputs, cfg.jsonl_field), cfg.vocab_size, cfg.out,
                          cfg.min_frequency, cfg.max_chars)
    print(f"tokenizer: {tok.vocab_size} tokens -> {cfg.out}")
    return 0


def cmd_prepare(args) -> int:
    from llmtrain.config import PrepareConfig, load_config
    from llmtrain.data.pretrain import prepare

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    meta = prepare(cfg.inputs, cfg.tokenizer, cfg.out_dir, cfg.jsonl_field, cfg.val_every, cfg.shard_tokens)
    s = meta["splits"]
    print(f"prepare: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} docs), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} docs), {meta['dtype']} -> {cfg.out_dir}")
    return 0


# The stage commands, in the order of a model's life: {command: (its config class in
# llmtrain.config, help line)}. Each runs llmtrain/stages/<command>.py (ppo, grpo and rloo: the
# one RL stage, stages/ppo.py, with its algorithm set).
STAGES = {
    "pretrain": ("PretrainConfig", "stage 1: pretrain the model by next-token prediction"),
    "sft": ("SFTConfig", "stage 2: fine-tune on instruction/response pairs (loss on responses)"),
    "classify": ("ClassifyConfig", "fine-tune with a classification head; `classify predict CKPT` labels text"),
    "reward": ("RewardConfig", "stage 3a: reward model on rankings; `reward score CKPT`, `reward chitchat`"),
    "ppo": ("PPOConfig", "stage 3b: RLHF with PPO against the reward model (KL-held, freezing or LoRA)"),
    "grpo": ("PPOConfig", "stage 3b: critic-free RLHF, GRPO (G answers per prompt, no value model)"),
    "rloo": ("PPOConfig", "stage 3b: critic-free RLHF, RLOO (leave-one-out baseline, no value model)"),
    "dpo": ("DPOConfig", "stage 3c: Direct Preference Optimization from the rankings (no reward model)"),
    "evaluate": ("EvaluateConfig", "compare two checkpoints: reward-model score, win rates (a=... b=...)"),
}
RL = ("ppo", "grpo", "rloo")


def stage_module(command: str):
    """The stage module `command` runs, imported now: only that stage loads. One import statement
    per stage, not a computed name, so tests/unit/test_layers.py can check each."""
    match command:
        case "pretrain": from llmtrain.stages import pretrain as stage
        case "sft": from llmtrain.stages import sft as stage
        case "classify": from llmtrain.stages import classify as stage
        case "reward": from llmtrain.stages import reward as stage
        case "ppo" | "grpo" | "rloo": from llmtrain.stages import ppo as stage
        case "dpo": from llmtrain.stages import dpo as stage
        case "evaluate": from llmtrain.stages import evaluate as stage
    return stage


def run_stage(args) -> int:
    """`llmtrain <stage> [-c cfg.yaml] [key=value ...]`: the stage's main(config), with the config
    read from the YAML and the overrides, and checked. `llmtrain grpo` is the RL stage with
    algorithm=grpo; a YAML or override naming another algorithm is refused."""
    from llmtrain import config

    stage = stage_module(args.command)
    rl = [f"algorithm={args.command}"] if args.command in RL else []
    cfg = config.load_config(getattr(config, STAGES[args.command][0]), args.config, [*rl, *args.overrides])
    if rl and cfg.algorithm != args.command:
        raise ConfigError(f"algorithm={cfg.algorithm} given to `llmtrain {args.command}`; use `llmtrain {cfg.algorithm}`")
    stage.main(cfg)
    return 0


def cmd_reward_chitchat(argv: list[str]) -> int:
    from llmtrain.data.chitchat import convert

    p = argparse.ArgumentParser(prog="llmtrain reward chitchat",
                                description="convert chitchat-dataset's human ratings to rankings.jsonl")
    p.add_argument("-o", "--output", default="chitchat_rankings.jsonl")
    p.add_argument("--k-max", type=int, default=4, help="chats per ranking at most (default 4)")
    p.add_argument("--max-chars", type=int, default=400, help="characters of each chat kept (default 400)")
    a = p.parse_args(argv)
    from llmtrain.config import POSITIVE, Rule

    check_flags(**{"--k-max": (a.k_max, Rule(lambda v: 2 <= v <= 9, "between 2 and 9")),
                   "--max-chars": (a.max_chars, POSITIVE)})
    check_out("--output", a.output, "file")
    r = convert(a.output, a.k_max, a.max_chars)
    print(f"chitchat: {r['rankings']} rankings of {r['chats']} rated chats over {r['prompts']} starter prompts -> "
          f"{a.output} (train with data.min_score_gap=3)")
    return 0
