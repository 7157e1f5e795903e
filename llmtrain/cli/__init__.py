"""`llmtrain <command> [-c cfg.yaml] [key=value ...]`: COMMANDS below is the table of contents,
{command: (function, help line, reads a config?)}; the functions live in one module per group:

  cli/train.py     data and training: tokenizer, prepare, the STAGES pretrain sft classify reward
                   ppo|grpo|rloo dpo evaluate (one run_stage), reward chitchat
  cli/models.py    using a checkpoint: generate, chat, classify predict, reward score, import, export
  cli/feedback.py  feedback <action>: candidates, annotators, the ranking app, export, import
  cli/pipeline.py  pipeline and demo: a chain of stages from one YAML
  cli/args.py      the checks of flags and paths that the commands share

Errors the user can fix (config, data, checkpoints) print as one line and exit with status 2.

Each command imports what it runs inside its function (lazily, in its module): `llmtrain --help`,
a bad flag or a feedback command answers in a tenth of a second instead of first loading torch
(about 2 s). Nothing imports the CLI, so no import cycle can hide behind that
(tests/unit/test_layers.py).
"""
from __future__ import annotations

import argparse
import sys

from llmtrain.cli import feedback, models, pipeline
from llmtrain.cli.args import config_args, not_utf8
from llmtrain.cli.feedback import cmd_feedback
from llmtrain.cli.models import (cmd_chat, cmd_classify_predict, cmd_export, cmd_generate, cmd_import,
                                 cmd_reward_score)
from llmtrain.cli.pipeline import cmd_demo, cmd_pipeline
from llmtrain.cli.train import STAGES, cmd_prepare, cmd_reward_chitchat, cmd_tokenizer, run_stage
from llmtrain.errors import LlmtrainError

COMMANDS = {
    "tokenizer": (cmd_tokenizer, "train a byte-level BPE tokenizer on text/JSONL files", True),
    "prepare": (cmd_prepare, "tokenize a corpus into train/val token shards", True),
    **{name: (run_stage, help_, True) for name, (_, help_) in STAGES.items()},
    "generate": (cmd_generate, "sample text from a checkpoint", False),
    "chat": (cmd_chat, "chat with a fine-tuned checkpoint in the terminal", False),
    "feedback": (cmd_feedback, "human feedback: candidates, the ranking app, simulated annotator, export", False),
    "import": (cmd_import, "read a Hugging Face model (a folder, or a Hub id org/name[@rev]; Llama, Mistral, Qwen2) into a checkpoint", False),
    "export": (cmd_export, "write a checkpoint as a Hugging Face model folder (transformers; LoRA as a peft adapter)", False),
    "pipeline": (cmd_pipeline, "run a chain of stages from one YAML (-c)", True),
    "demo": (cmd_demo, "the whole chain on shipped data, on CPU, in minutes (configs/demo.yaml)", False),
}

# Sub-commands with their own parser and flags: (command, action) -> function(argv after them).
SUB_ACTIONS = {
    ("classify", "predict"): cmd_classify_predict,
    ("reward", "score"): cmd_reward_score,
    ("reward", "chitchat"): cmd_reward_chitchat,
}


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per command of COMMANDS; each group module adds its commands' flags."""
    parser = argparse.ArgumentParser(prog="llmtrain", description="Train a language model: pretraining, fine-tuning, RLHF.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if takes_config:
            config_args(p)
    feedback.add_arguments(sub.choices["feedback"])
    pipeline.add_arguments(sub.choices)
    models.add_arguments(sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bad = not_utf8(argv)
    if bad is not None:
        cmd = " ".join(argv[:2]) if tuple(argv[:2]) in SUB_ACTIONS else argv[0] if argv[0] in COMMANDS else ""
        print(f"llmtrain{' ' + cmd if cmd else ''}: error: command line: {bad} is not UTF-8 text "
              f"(give the value in UTF-8)", file=sys.stderr)
        return 2
    parser = build_parser()
    sub_action = SUB_ACTIONS.get(tuple(argv[:2]))
    if sub_action is not None:  # e.g. `classify predict`: a sub-command with its own flags
        try:
            return sub_action(argv[2:])
        except LlmtrainError as e:
            print(f"llmtrain {' '.join(argv[:2])}: error: {e}", file=sys.stderr)
            return 2
    # key=value overrides may come before or after options (`demo --from ppo ppo.kl.beta=0.1`):
    # argparse fills the positional list only once, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][0](args)
    except LlmtrainError as e:
        print(f"llmtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
