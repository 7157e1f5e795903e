"""Run the whole chain from one YAML; `llmtrain demo` runs the shipped default.

    tokenizer -> prepare -> pretrain -> sft -> feedback (candidates, then rankings by the
    simulated annotator or by people in the app) -> reward -> ppo / grpo / rloo / dpo (the
    `methods` chosen, each from the same SFT model) -> evaluate -> report

Each stage's own config is nested in the pipeline config; the pipeline only decides where
each stage writes (folders inside one run directory) and hands outputs on through them.
A stage whose output is complete is skipped, so a killed pipeline continues where it
stopped (training stages resume from their last step checkpoint); `--from STAGE` deletes
that stage's output and everything after it, and reruns from there.

The package, read in the order of a run:
    config.py   PipelineConfig (each stage's config nested), STAGES, load
    run.py      Run (the folders every stage writes) and run(): the steps in order
    steps.py    one function per step: where its stage reads and writes, then the stage
    prompts.py  which conversations a step uses: held-out split, prompts to rank
    checks.py   can the rankings train a reward model (held-out split, one batch)
    human.py    --human: the ranking app's port and thread, waiting for people
    answers.py  greedy answers to held-out prompts: the style check, the report's samples

Every stage is imported lazily, inside the step that runs it, so a bad pipeline YAML or --from
is refused before torch loads; only the CLI imports this package (tests/unit/test_layers.py).
"""
from llmtrain.pipeline.answers import answers_side_by_side, style_check
from llmtrain.pipeline.config import (DEMO_CONFIG, REPO, RL_METHODS, STAGES, FeedbackStageConfig, PipelineConfig,
                                      abs_path, load, stages_of)
from llmtrain.pipeline.prompts import held_out
from llmtrain.pipeline.run import Run, run
from llmtrain.pipeline.steps import finished

__all__ = ["DEMO_CONFIG", "REPO", "RL_METHODS", "STAGES", "FeedbackStageConfig", "PipelineConfig", "Run",
           "abs_path", "answers_side_by_side", "finished", "held_out", "load", "run", "stages_of", "style_check"]
