"""The run: the folders every stage writes (Run), and run(), the steps in order, each skipped
when its output is complete."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmtrain import dist
from llmtrain.config import to_dict
from llmtrain.errors import ConfigError
from llmtrain.files import write_file
from llmtrain.metrics import fmt_duration
from llmtrain.pipeline import steps
from llmtrain.pipeline.checks import check_split
from llmtrain.pipeline.config import REPO, RL_METHODS, STAGES, PipelineConfig, method_of
from llmtrain.pipeline.human import bind
from llmtrain.pipeline.prompts import db_convs, feedback_convs
from llmtrain.pipeline.rounds import run_rounds


@dataclass
class Round:
    """Where one round of iterative RLHF reads and writes. Round 1 is the run's own folders
    (candidates from the SFT model); round n >= 2 lives in round<n>/: candidates from round n-1's
    policy of `method`, its rankings, the reward model continued on every ranking so far, and
    the policy continued from round n-1's."""
    n: int
    root: Path  # the run's folder (round 1) or round<n>/
    writer: Path  # the model that writes this round's candidates and starts its RL
    writer_name: str
    reward_from: Path  # what the reward model starts from
    rankings_so_far: list[Path]  # every round's rankings.jsonl up to this one
    cleanup: contextlib.ExitStack  # the run's: the ranking app of --human

    def __post_init__(self):
        self.feedback = self.root / "feedback"
        self.db, self.prompts = self.feedback / "feedback.db", self.feedback / "prompts.jsonl"
        self.rankings = self.feedback / "rankings.jsonl"
        self.all_rankings = self.rankings if self.n == 1 else self.feedback / "all_rankings.jsonl"
        self.reward = self.root / "reward"
        self.summary = self.root / "round.json"

    def policy(self, method: str) -> Path:
        return self.root / method


class Run:
    """Where every stage of one pipeline run writes."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = root / "tokenizer" / "tokenizer.json"
        self.data = root / "data"
        self.pretrain, self.sft = root / "pretrain", root / "sft"
        self.feedback = root / "feedback"
        self.db, self.prompts, self.rankings = self.feedback / "feedback.db", self.feedback / "prompts.jsonl", self.feedback / "rankings.jsonl"
        self.reward, self.ppo, self.dpo = root / "reward", root / "ppo", root / "dpo"
        self.grpo, self.rloo = root / "grpo", root / "rloo"
        self.evaluation = root / "evaluation.json"
        self.report = root / "report.md"
        self.cleanup = contextlib.ExitStack()  # what the run stops at its end (the ranking app of --human)

    def round(self, n: int, method: str = "") -> Round:
        """Round n's folders; `method` (n >= 2) is the RL method whose policy goes on."""
        if n == 1:
            return Round(1, self.root, self.sft, "the SFT model", self.sft, [self.rankings], self.cleanup)
        last = self.round(n - 1, method)
        return Round(n, self.root / f"round{n}", last.policy(method), f"round {n - 1}'s {method.upper()} policy",
                     last.reward, [*last.rankings_so_far, self.root / f"round{n}" / "feedback" / "rankings.jsonl"],
                     self.cleanup)

    def outputs(self, stage: str) -> list[Path]:
        return {"tokenizer": [self.tokenizer.parent], "prepare": [self.data], "pretrain": [self.pretrain],
                "sft": [self.sft, self.root / "style.json"], "candidates": [self.feedback],
                "rankings": [self.rankings], "reward": [self.reward],
                **{m: [self.root / m] for m in RL_METHODS},
                "rounds": sorted(self.root.glob("round[0-9]*")),
                "evaluate": [self.evaluation], "report": [self.report, self.root / "report.html", self.root / "plots"]}[stage]


def run(cfg: PipelineConfig, base: Path = REPO, from_stage: str = "", human: bool = False) -> Path:
    """Run the chain; data paths in the config are relative to `base` (the repo for the demo)."""
    if from_stage and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage}: not a stage ({', '.join(STAGES)})")
    unknown = [m for m in cfg.methods if m not in RL_METHODS]
    if unknown or not cfg.methods:
        raise ConfigError(f"methods: {unknown or 'empty'}; choose from {', '.join(RL_METHODS)}")
    if cfg.rounds > 1:
        method_of(cfg)
    elif cfg.round_method:
        raise ConfigError(f"round_method={cfg.round_method}: only with rounds above 1 (rounds={cfg.rounds})")
    for m in ("ppo", "grpo", "rloo"):
        if getattr(cfg, m).algorithm != m:
            raise ConfigError(f"{m}.algorithm={getattr(cfg, m).algorithm}: the {m} section runs {m}")
    root = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    r = Run(root)
    redo = STAGES[STAGES.index(from_stage):] if from_stage else []
    if "rankings" in redo or not r.rankings.is_file():
        # Checked before anything is trained or anyone ranks: a split that cannot work, or a
        # busy port, is a one-line error now, not after minutes of training or of ranking.
        if r.db.is_file() and "candidates" not in redo:
            convs, what = db_convs(r.db), f"prompts in {r.db}"
        else:
            first, rounds = feedback_convs(cfg, base), max(1, cfg.feedback.rounds)
            convs, what = first * rounds, "prompts to rank" + (f" ({len(first)} x {rounds} rounds)" if rounds > 1 else "")
        check_split(cfg, convs, what)
        if human:
            bind(cfg.feedback.port).close()
    root.mkdir(parents=True, exist_ok=True)
    if from_stage:
        for s in STAGES[STAGES.index(from_stage):]:
            for p in r.outputs(s):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    print(f"pipeline '{cfg.name}': all outputs in {root.resolve()}")
    timing_path = root / "timings.json"
    timings: dict[str, float] = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    write_file(root / "pipeline.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"[{name}] complete, skipped")
            return
        print(f"\n[{name}] ...", flush=True)
        t = time.time()
        fn()
        dist.release_freed_memory()  # the stage kept its freed memory for its own steps
        timings[name] = round(time.time() - t, 1)
        write_file(timing_path, json.dumps(timings, indent=2))
        print(f"[{name}] done in {fmt_duration(timings[name])}", flush=True)

    with r.cleanup:  # --human: the ranking app serves (saying the round is over) until the run ends
        stage("tokenizer", r.tokenizer.is_file(), lambda: steps.tokenizer(cfg, base, r))
        stage("prepare", (r.data / "meta.json").is_file(), lambda: steps.prepare(cfg, base, r))
        stage("pretrain", steps.finished(r.pretrain, cfg.pretrain.run.max_steps), lambda: steps.pretrain(cfg, r))
        stage("sft", steps.finished(r.sft, cfg.sft.run.max_steps) and (root / "style.json").is_file(), lambda: steps.sft(cfg, base, r))
        stage("candidates", r.db.is_file(), lambda: steps.candidates(cfg, base, r))
        stage("rankings", r.rankings.is_file(), lambda: steps.rankings(cfg, r, human))
        stage("reward", steps.finished(r.reward, cfg.reward.run.max_steps), lambda: steps.reward(cfg, r))
        for m in ("ppo", "grpo", "rloo"):
            if m in cfg.methods:
                stage(m, steps.finished(r.root / m, getattr(cfg, m).run.max_steps), lambda m=m: steps.rl(cfg, base, r, m))
        if "dpo" in cfg.methods:
            stage("dpo", steps.finished(r.dpo, cfg.dpo.run.max_steps), lambda: steps.dpo(cfg, r))
        if cfg.rounds > 1:
            run_rounds(cfg, base, r, human, stage)
        stage("evaluate", r.evaluation.is_file(), lambda: steps.evaluate(cfg, base, r))
        stage("report", r.report.is_file(), lambda: steps.report(cfg, base, r, timings))
    total = sum(timings.values())
    print("\ntime per stage: " + ", ".join(f"{k} {fmt_duration(v)}" for k, v in timings.items()) +
          f"; total {fmt_duration(total)}")
    print(f"report: {r.report.resolve()} (and report.html)")
    return root
