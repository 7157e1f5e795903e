"""`llmtrain pipeline -c chain.yaml` and `llmtrain demo`: a chain of stages from one YAML
(llmtrain/pipeline.py runs it), rerun from any stage with --from.

Each command imports the pipeline inside its function (lazily), as the other commands do.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llmtrain.errors import LlmtrainError


def add_arguments(commands: dict[str, argparse.ArgumentParser]) -> None:
    """The flags of pipeline and demo, on their parsers in `commands`."""
    commands["demo"].add_argument("overrides", nargs="*", metavar="key=value",
                                  help="override fields of configs/demo.yaml, e.g. pretrain.run.max_steps=50")
    for name in ("demo", "pipeline"):
        commands[name].add_argument("--from", dest="from_stage", default="", metavar="STAGE",
                                    help="rerun from this stage on: tokenizer, prepare, pretrain, sft, candidates, "
                                         "rankings, reward, ppo, grpo, rloo, dpo, rounds (all rounds after the first), "
                                         "evaluate, report")
        commands[name].add_argument("--human", action="store_true",
                                    help="people rank the candidates in the web app instead of the simulated annotator")


def cmd_pipeline(args) -> int:
    from llmtrain import pipeline

    if not args.config:
        raise LlmtrainError("give the pipeline's YAML with -c (configs/demo.yaml is the demo's)")
    pipeline.run(pipeline.load(args.config, args.overrides), base=Path.cwd(), from_stage=args.from_stage, human=args.human)
    return 0


def cmd_demo(args) -> int:
    from llmtrain import pipeline

    pipeline.run(pipeline.load(pipeline.DEMO_CONFIG, args.overrides), from_stage=args.from_stage, human=args.human)
    return 0
