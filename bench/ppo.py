"""PPO cost: peak memory and time per iteration for full fine-tuning, the lower half frozen,
and LoRA, on a ~27M-parameter model with random weights (cost does not depend on the weights).

    python bench/ppo.py [--iters 3 --dim 512 --layers 8 --json out.json]

Each variant runs in its own process (peak memory is per process). Memory is the process's
peak resident set minus its resident set after importing torch, i.e. what PPO itself took;
on a GPU it is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": [],
    "frozen-lower-half": ["freeze.first_layers={half}", "freeze.patterns=[model.embed_tokens.*]"],
    "lora": ["lora.enabled=true", "lora.r=8", "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoints(root: Path, dim: int, layers: int) -> tuple[Path, Path]:
    from llmtrain.config import ModelConfig
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_documents([str(REPO / "data/corpus/chitchat.txt")]), 2048, root / "tokenizer.json",
                          max_chars=300_000)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=layers, n_heads=dim // 64, max_seq_len=256,
                      tie_embeddings=True)
    return save_untrained(root, cfg)


def save_untrained(root: Path, cfg) -> tuple[Path, Path]:
    """An SFT checkpoint and a reward-model checkpoint of random weights (seed 0) with the
    tokenizer at root/tokenizer.json: what an RL stage starts from (bench/rlhf.py too)."""
    import torch

    from llmtrain import checkpoint
    from llmtrain.model import Transformer
    from llmtrain.model.heads import ScoreModel

    torch.manual_seed(0)
    sft, rm = root / "sft", root / "rm"
    checkpoint.save(sft, 1, Transformer(cfg), config={"model": vars(cfg), "stage": "sft"}, meta={"tokens": 0},
                    tokenizer_path=str(root / "tokenizer.json"))
    checkpoint.save(rm, 1, ScoreModel(cfg, 1), config={"model": vars(cfg), "stage": "reward",
                                                       "reward": {"offset": 0.0, "std": 1.0}},
                    meta={"tokens": 0}, tokenizer_path=str(root / "tokenizer.json"))
    return sft, rm


def child(args) -> None:
    base = rss_mb()
    from llmtrain.config import PPOConfig, load_config
    from llmtrain.metrics import read_metrics
    from llmtrain.stages import ppo

    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    base = rss_mb()
    cfg = load_config(PPOConfig, None, args.overrides)
    ppo.main(cfg)
    recs = read_metrics(cfg.run.out_dir, "train")
    secs = [r["seconds"] for r in recs[1:]] or [recs[0]["seconds"]]  # the first iteration warms up
    setup = read_metrics(cfg.run.out_dir, "setup")[0]
    print("RESULT " + json.dumps({"peak_mb": rss_mb() - base, "sec_per_iter": statistics.median(secs),
                                  "trainable": setup["trainable_params"], "total": setup["total_params"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rollout", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sft, rm = make_checkpoints(root, a.dim, a.layers)
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}, please."}) + "\n" for i in range(64)))
        results = {}
        for name, extra in VARIANTS.items():
            ov = [f"policy={sft}", f"reward_model={rm}", f"prompts={prompts}", f"run.out_dir={root / name}",
                  f"run.max_steps={a.iters}", "run.eval_every=0", "eval_prompts=2", f"rollout_batch={a.rollout}",
                  f"minibatch={a.rollout // 2}", f"max_new_tokens={a.new}", "optim.lr=1e-5"]
            ov += [e.format(half=a.layers // 2) for e in extra]
            out = subprocess.run([sys.executable, __file__, "--child", "--threads", str(a.threads), *ov],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(line[0][7:])
    full = results["full"]
    print(f"PPO on a {full['total'] / 2e6:.1f}M-parameter policy (+ value model of the same size), rollout {a.rollout} "
          f"x {a.new} new tokens, {a.iters} iterations, median time of iterations 2..")
    print(f"{'variant':<20}{'trainable':>12}{'peak MB':>10}{'x full':>8}{'s/iter':>8}{'x full':>8}")
    for name, r in results.items():
        print(f"{name:<20}{r['trainable'] / 1e6:>11.2f}M{r['peak_mb']:>10.0f}{r['peak_mb'] / full['peak_mb']:>8.2f}"
              f"{r['sec_per_iter']:>8.2f}{r['sec_per_iter'] / full['sec_per_iter']:>8.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
