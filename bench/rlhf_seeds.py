"""How much does an RLHF result depend on the seed? From one finished demo run (its SFT model,
reward model and rankings), run PPO, GRPO, RLOO and DPO once per seed and compare each with
the SFT model on the held-out prompts, by the stated (true) rule and by the reward model.

    python bench/rlhf_seeds.py RUN_DIR --seeds 1-5 [--methods ppo,grpo,rloo,dpo] [--json OUT]
                               [-c CONFIG] [key=value ...]

The stage settings are the run's own (RUN_DIR/pipeline.yaml), or those of CONFIG, with
key=value overrides (e.g. grpo.kl.beta=0.2); only run.seed changes between runs. Each run
writes into RUN_DIR/seeds/seed_N/METHOD (or --out), so an interrupted sweep continues where
it stopped. Per run: win rate over SFT by the true rule and by the reward model, KL to SFT
(nats per answer, on answers sampled from the policy), share of distinct greedy answers, the
win rate by the rule on sampled answers (the config's evaluate.samples per prompt), and
the seconds its training took. The summary gives, per method, the median and the worst seed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmtrain import pipeline  # noqa: E402
from llmtrain.config import to_dict  # noqa: E402
from llmtrain.stages import dpo, evaluate, ppo  # noqa: E402

METHODS = ["ppo", "grpo", "rloo", "dpo"]


def parse_seeds(text: str) -> list[int]:
    """"1-5" -> [1, 2, 3, 4, 5]; "1,3,7" -> [1, 3, 7]."""
    out: list[int] = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        try:
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        except ValueError:
            raise SystemExit(f"--seeds {text!r}: give a range like 1-5 or a list like 1,3,7") from None
    return out


def train(cfg: pipeline.PipelineConfig, run: Path, method: str, seed: int, out: Path) -> float:
    """Train one method with one seed from the run's SFT model; seconds it took (0 if it was done)."""
    if method == "dpo":
        c = dataclasses.replace(cfg.dpo, run=dataclasses.replace(cfg.dpo.run))
        c.policy = str(run / "sft")
        c.data = dataclasses.replace(cfg.reward.data, train=str(run / "feedback" / "rankings.jsonl"))
    else:
        base = getattr(cfg, method)
        c = dataclasses.replace(base, run=dataclasses.replace(base.run), kl=dataclasses.replace(base.kl))
        c.policy, c.reward_model = str(run / "sft"), str(run / "reward")
        c.prompts = pipeline.abs_path(cfg.sft.data.train, pipeline.REPO)
        c.val_every = cfg.sft.data.val_every
        c.true_rule = c.true_rule or cfg.feedback.rule
    c.run.seed, c.run.out_dir, c.run.resume = seed, str(out), True
    settings = json.dumps(to_dict(c), sort_keys=True, default=str)
    saved = out / "bench_config.json"
    if saved.is_file() and saved.read_text() != settings:
        raise SystemExit(f"{out} was trained with other settings ({saved}); give another --out, or delete it")
    if pipeline.finished(out, c.run.max_steps):
        return float(json.loads((out / "seconds.json").read_text())["seconds"]) if (out / "seconds.json").is_file() else 0.0
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(settings)
    t = time.time()
    with open(out / "stage.log", "a") as fh, contextlib.redirect_stdout(fh):
        (dpo.main if method == "dpo" else ppo.main)(c)
    seconds = time.time() - t
    (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished demo run (with sft/, reward/ and feedback/rankings.jsonl)")
    ap.add_argument("--seeds", default="1-5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--out", default="", help="where the runs go (default RUN_DIR/seeds)")
    ap.add_argument("-c", "--config", default="", help="stage settings (default RUN_DIR/pipeline.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. grpo.kl.beta=0.2")
    a = ap.parse_intermixed_args(argv)  # key=value overrides may follow options
    run = Path(a.run_dir)
    for need in ("sft", "reward", "feedback/rankings.jsonl"):
        if not (run / need).exists():
            raise SystemExit(f"{run / need} is missing: give a finished demo run")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    cfg = pipeline.load(a.config or run / "pipeline.yaml", a.overrides)
    seeds = parse_seeds(a.seeds)
    out_root = Path(a.out) if a.out else run / "seeds"
    convs = pipeline.held_out(cfg, pipeline.REPO)[1][: cfg.evaluate.max_prompts or None]
    rule = cfg.evaluate.true_rule or cfg.feedback.rule

    res: dict = {"sft": {}, "methods": {m: [] for m in methods}, "rule": rule, "prompts": len(convs),
                 "kl_target": cfg.ppo.kl.target}
    print(f"{len(methods)} methods x {len(seeds)} seeds from {run}; {len(convs)} held-out prompts; true rule {rule!r}")
    print(f"{'method':<6} {'seed':>4} {'win true':>9} {'win RM':>7} {'gap':>6} {'KL':>6} {'distinct':>9} {'seconds':>8}"
          f" {'win true, sampled':>18}")
    for seed in seeds:
        seconds, dirs = {}, {}
        for m in methods:
            dirs[m] = out_root / f"seed_{seed}" / m
            seconds[m] = train(cfg, run, m, seed, dirs[m])
        with contextlib.redirect_stdout(sys.stderr):
            ev = evaluate.compare(str(run / "sft"), {m: str(d) for m, d in dirs.items()}, str(run / "reward"), convs,
                                  rule, cfg.evaluate.max_new_tokens, cfg.evaluate.samples)
        for m in methods:
            e = ev[m]
            res["sft"] = {"distinct": e["distinct_a"], "distinct2": e["distinct2_a"], "mean_words": e["mean_words_a"]}
            row = {"seed": seed, "win_true": e["win_rate_b_by_true_rule"], "win_rm": e["win_rate_b_by_reward_model"],
                   "kl": e["kl_b"], "kl_k3": e["kl_b_k3"], "distinct": e["distinct_b"], "distinct2": e["distinct2_b"],
                   "mean_words": e["mean_words_b"], "seconds": round(seconds[m], 1),
                   "win_true_sampled": e.get("sampled", {}).get("win_rate_b_by_true_rule", float("nan"))}
            res["methods"][m].append(row)
            print(f"{m:<6} {seed:>4} {row['win_true']:>9.1%} {row['win_rm']:>7.1%} {row['win_rm'] - row['win_true']:>+6.2f} "
                  f"{row['kl']:>6.2f} {row['distinct']:>9.1%} {row['seconds']:>8.1f} {row['win_true_sampled']:>18.1%}",
                  flush=True)

    sft_distinct = res["sft"].get("distinct", 0.0)
    print(f"\nSFT: {sft_distinct:.1%} distinct greedy answers. Over seeds {a.seeds}:")
    print(f"{'method':<6} {'median win':>10} {'worst win':>10} {'mean KL':>8} {'worst distinct/SFT':>19} "
          f"{'sampled: median':>16} {'worst':>6}")
    summary = {}
    for m, rows in res["methods"].items():
        wins = [r["win_true"] for r in rows]
        s = {"median_win_true": statistics.median(wins), "min_win_true": min(wins),
             "mean_kl": statistics.fmean(r["kl"] for r in rows),
             "min_distinct_vs_sft": min(r["distinct"] for r in rows) / sft_distinct if sft_distinct else float("nan"),
             "median_win_true_sampled": statistics.median(r["win_true_sampled"] for r in rows),
             "min_win_true_sampled": min(r["win_true_sampled"] for r in rows)}
        summary[m] = s
        print(f"{m:<6} {s['median_win_true']:>10.1%} {s['min_win_true']:>10.1%} {s['mean_kl']:>8.2f} "
              f"{s['min_distinct_vs_sft']:>19.2f} {s['median_win_true_sampled']:>16.1%} {s['min_win_true_sampled']:>6.1%}")
    res["summary"] = summary
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
        print(f"figures -> {a.json}")
    return res


if __name__ == "__main__":
    from llmtrain.errors import LlmtrainError

    try:
        main()
    except LlmtrainError as e:  # a wrong key, a damaged checkpoint: one line, no traceback
        raise SystemExit(f"rlhf_seeds: {e}") from None
