"""What the recipes of configs/recipes/ cost: peak memory and seconds per step of every stage
(SFT, reward model, DPO, GRPO, PPO) for a SmolLM2-135M-shaped and a Qwen2.5-0.5B-shaped model.

    python bench/recipes.py                                   # both shapes, every stage, this CPU
    python bench/recipes.py --shapes smollm2-135m --stages sft dpo --steps 3
    python bench/recipes.py --device cuda --json recipes.json   # the same on a GPU (bench/gpu.py)
    python bench/recipes.py --smoke                           # a tiny shape and short texts: the script runs

Each stage runs from its recipe YAML, unchanged but for what a benchmark must replace:
  - the weights: random, of exactly the published model's shape (cost does not depend on them);
    the Hub ids and run folders of init_from / policy / reward_model point at them instead;
  - the data: generated here at the recipe's lengths, every example as long as the recipe lets
    it be (SFT, reward and DPO texts of data.max_len tokens; RL prompts of --prompt-tokens and
    answers of max_new_tokens, which random weights never end early), so the figures are the
    worst case of the recipe's batch, not the average of a dataset;
  - the length of the run: --steps micro-steps of SFT, reward and DPO, each one micro-batch
    (run.grad_accum=1): the recipe's step is that time x its run.grad_accum, as accumulation
    repeats the same micro-step; --rl-iters GRPO/PPO iterations, whole (rollout, scoring,
    reference, update); no evaluation before the end, no checkpoint before the end, no samples.
Batch, micro-batch, gradient accumulation, LoRA, freezing and activation checkpointing are the
recipe's own; the precision too, except on a CPU, where the default is fp32 (--precision): the
recipes' bf16 is for GPUs, and CPUs without native bf16 (AVX512-BF16/AMX) multiply it dozens of
times slower (measured here: 1 GFLOP/s against 84 for fp32 on one core). The tokenizer is a small one trained here (vocab 2048): the
model's vocabulary (49152 / 151936 rows of embedding and LM head) is the published one, so the
LM head costs what it costs; only which ids appear differs.

Each (shape, stage) runs in its own process. Seconds per step: the median over the micro-steps
after the first (which warms up) x grad_accum; an RL iteration as timed by the stage. Peak memory: on CPU the process's peak resident set minus its
resident set after importing torch (weights, gradients, optimizer state, activations, the
frozen reference and reward model); on a GPU torch.cuda.max_memory_allocated. Figures are
printed, nothing is asserted.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
# The published models' shapes (their config.json): what the recipes train.
SHAPES = {
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                         tie_embeddings=True, rope_theta=100000.0, max_seq_len=2048),
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, vocab_size=151936,
                         tie_embeddings=True, rope_theta=1000000.0, attention_bias=True, max_seq_len=2048,
                         norm_eps=1e-6),
}
SMOKE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=4096, tie_embeddings=True,
             max_seq_len=256)
STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
WORDS = ("the a of to and in that it is was for on with as his he by at be this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two may then do").split()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_of(tok, n_tokens: int, seed: int) -> str:
    """Plain words whose encoding is about n_tokens long."""
    import random

    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_tokens)]
    text = " ".join(words)
    while len(tok.encode(text)) > n_tokens and words:
        words = words[: max(1, int(len(words) * 0.95))]
        text = " ".join(words)
    return text


def make_data(root: Path, tok, max_len: int, prompt_tokens: int, n: int) -> dict[str, Path]:
    """SFT lines, K=2 rankings and prompts, each at the lengths a recipe allows (see the module doc)."""
    answer = max(8, max_len - prompt_tokens - 8)  # room for the template's control tokens
    files = {k: root / f"{k}.jsonl" for k in ("sft", "rankings", "prompts")}
    with open(files["sft"], "w") as sft, open(files["rankings"], "w") as rk, open(files["prompts"], "w") as pr:
        for i in range(n):
            prompt = text_of(tok, prompt_tokens, 3 * i)
            sft.write(json.dumps({"prompt": prompt, "response": text_of(tok, answer, 3 * i + 1)}) + "\n")
            rk.write(json.dumps({"prompt": prompt, "ranked": [{"text": text_of(tok, answer, 3 * i + 1), "rank": 1},
                                                              {"text": text_of(tok, answer, 3 * i + 2), "rank": 2}]}) + "\n")
            pr.write(json.dumps({"prompt": prompt}) + "\n")
    return files


def make_checkpoints(root: Path, shape: str, smoke: bool) -> tuple[Path, Path, Path]:
    """A tokenizer, and random policy and reward-model checkpoints of the shape; -> (tokenizer, sft, rm)."""
    import torch

    from llmtrain import checkpoint
    from llmtrain.config import ModelConfig, to_dict
    from llmtrain.data.corpus import iter_documents
    from llmtrain.model import Transformer
    from llmtrain.model.heads import ScoreModel
    from llmtrain.tokenizer import train_tokenizer

    tok_path = root / "tokenizer.json"
    train_tokenizer(iter_documents([str(REPO / "data/corpus/chitchat.txt")]), 2048, tok_path, max_chars=300_000)
    cfg = ModelConfig(**(SMOKE if smoke else SHAPES[shape]))
    torch.manual_seed(0)
    sft, rm = root / "sft", root / "rm"
    model = Transformer(cfg)
    checkpoint.save(sft, 1, model, config={"model": to_dict(cfg), "stage": "sft"}, meta={"tokens": 0},
                    tokenizer_path=str(tok_path))
    del model
    score = ScoreModel(cfg, 1)
    checkpoint.save(rm, 1, score, config={"model": to_dict(cfg), "stage": "reward", "reward": {"offset": 0.0, "std": 1.0}},
                    meta={"tokens": 0}, tokenizer_path=str(tok_path))
    return tok_path, sft, rm


def overrides(stage: str, ckpt: dict, data: dict, out: Path, steps: int, rl_iters: int, device: str,
              smoke: bool) -> list[str]:
    if smoke:  # short texts: only checks that every stage of the recipe runs
        lengths = (["max_new_tokens=8"] if stage in ("grpo", "ppo") else ["data.max_len=64"]
                   + (["norm_max_new_tokens=8"] if stage == "reward" else []))
        return overrides(stage, ckpt, data, out, steps, rl_iters, device, False) + lengths
    run = [f"run.out_dir={out}", "run.log_every=1", "run.eval_every=0", "run.save_every=0", f"run.device={device}"]
    if stage in ("grpo", "ppo"):
        return run + [f"run.max_steps={rl_iters}", f"policy={ckpt['sft']}", f"reward_model={ckpt['rm']}", f"prompts={data['prompts']}",
                      "eval_prompts=1"]
    # One micro-batch per optimizer step: its time x the recipe's run.grad_accum is the recipe's
    # step (accumulation runs the same micro-step grad_accum times; memory does not grow with it).
    common = run + [f"run.max_steps={steps}", "run.grad_accum=1", "run.eval_batches=1", "data.val=", "data.val_every=8"]
    if stage == "sft":
        return common + [f"init_from={ckpt['sft']}", f"data.train={data['sft']}", "sample_prompts=0"]
    if stage == "reward":
        return common + [f"init_from={ckpt['sft']}", f"data.train={data['rankings']}", "norm_prompts=0"]
    return common + [f"policy={ckpt['sft']}", f"data.train={data['rankings']}"]  # dpo


def child(a) -> None:
    """One stage of one recipe in this process; prints RESULT {json}."""
    import torch

    base = rss_mb()
    from llmtrain.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, load_config, read_yaml
    from llmtrain.metrics import read_metrics
    from llmtrain.stages import dpo, ppo, reward, sft

    if a.threads:
        torch.set_num_threads(a.threads)
    cls, stage_main = {"sft": (SFTConfig, sft.main), "reward": (RewardConfig, reward.main), "dpo": (DPOConfig, dpo.main),
                       "grpo": (PPOConfig, ppo.main), "ppo": (PPOConfig, ppo.main)}[a.stage]
    recipe = RECIPES / a.shape / f"{a.stage}.yaml"
    accum = read_yaml(recipe).get("run", {}).get("grad_accum", 1)  # the recipe's, before the override to 1
    cfg = load_config(cls, recipe, a.overrides)
    t0 = time.time()
    stage_main(cfg)
    wall = time.time() - t0
    recs = read_metrics(cfg.run.out_dir, "train")
    if a.stage in ("grpo", "ppo"):
        secs, accum = [r["seconds"] for r in recs], 1
    else:  # micro-steps: the time between consecutive steps' records
        secs = [b["time"] - r["time"] for r, b in zip(recs, recs[1:])]
    setup = read_metrics(cfg.run.out_dir, "setup")
    cuda = torch.cuda.is_available() and cfg.run.device.startswith(("cuda", "auto"))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb() - base
    n = cfg.run.batch_size * accum if a.stage not in ("grpo", "ppo") else \
        cfg.rollout_batch * (1 if cfg.algorithm == "ppo" else cfg.group_size)
    micro = statistics.median(secs[1:] or secs)
    print("RESULT " + json.dumps({
        "sec_per_step": micro * accum, "sec_per_micro_step": micro, "grad_accum": accum,
        "steps_timed": len(secs[1:] or secs), "peak_mb": peak,
        "wall_s": wall, "per_step": n, "device": cfg.run.device,
        "trainable": setup[0].get("trainable_params") if setup else None,
        "total": setup[0].get("total_params") if setup else None}))


def measure(shape: str, stage: str, ckpt: dict, data: dict, root: Path, a) -> dict:
    ov = overrides(stage, ckpt, data, root / f"run-{stage}", a.steps, a.rl_iters, a.device, a.smoke)
    if a.precision == "fp32":
        ov += ["run.precision=fp32"] + (["frozen_precision=fp32"] if stage in ("grpo", "ppo") else [])
    cmd = [sys.executable, __file__, "--child", "--shape", shape, "--stage", stage, "--threads", str(a.threads), *ov]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode < 0:  # the kernel's OOM killer sends SIGKILL: nothing is printed
        return {"error": f"killed by signal {-out.returncode}" + (" (out of memory)" if out.returncode == -9 else "")}
    if out.returncode or not line:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line[0][7:])


def recipe_lengths(shape: str, stage: str) -> str:
    from llmtrain.config import read_yaml

    y = read_yaml(RECIPES / shape / f"{stage}.yaml")
    run = y.get("run", {})
    if stage in ("grpo", "ppo"):
        g = y.get("group_size", 4) if stage == "grpo" else 1
        return (f"{y.get('rollout_batch')} prompts x {g} answers x {y.get('max_new_tokens')} new tokens, "
                f"minibatch {y.get('minibatch')}, {y.get('ppo_epochs', 2)} epoch(s)")
    return f"{run.get('batch_size')} x {y.get('data', {}).get('max_len')} tokens, accum {run.get('grad_accum', 1)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--steps", type=int, default=2,
                    help="SFT/reward/DPO micro-steps per stage; the first is not timed (default 2)")
    ap.add_argument("--rl-iters", type=int, default=1,
                    help="GRPO/PPO iterations; with more than 1 the first is not timed (default 1)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the generated data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["recipe", "fp32"], default=None,
                    help="the recipe's precision (bf16), or fp32; default: fp32 on a CPU, the recipe's elsewhere")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and short texts: checks the script runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.precision is None:
        a.precision = "fp32" if a.device == "cpu" else "recipe"
    if a.precision == "fp32":
        print("precision: fp32 (the recipes say bf16, for a GPU; a CPU without AVX512-BF16/AMX multiplies bf16 "
              "dozens of times slower than fp32, and an fp32 run's memory bounds the bf16-autocast one's from above)")
    from llmtrain.config import read_yaml
    from llmtrain.tokenizer import Tokenizer

    results = {}
    for shape in a.shapes:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            tok_path, sft, rm = make_checkpoints(root, shape, a.smoke)
            max_len = 64 if a.smoke else read_yaml(RECIPES / shape / "sft.yaml")["data"]["max_len"]
            prompt_tokens = 16 if a.smoke else a.prompt_tokens
            data = make_data(root, Tokenizer.load(tok_path), max_len, prompt_tokens, n=64)
            for stage in a.stages:
                t = time.time()
                r = measure(shape, stage, {"sft": sft, "rm": rm}, data, root, a)
                r["recipe"] = recipe_lengths(shape, stage)
                results[f"{shape}/{stage}"] = r
                print(f"{shape:<14}{stage:<8}" + (f"error: {r['error']}" if "error" in r else
                      f"{r['sec_per_step']:>9.1f} s/step {r['peak_mb'] / 1024:>7.2f} GiB peak  ({r['recipe']}; "
                      f"{time.time() - t:.0f} s)"), flush=True)
    print(f"\n| shape | stage | batch and lengths | s/step ({a.device}, {a.precision}) | peak memory |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        shape, stage = key.split("/")
        if "error" in r:
            print(f"| {shape} | {stage} | {r['recipe']} | error | {r['error']} |")
        else:
            print(f"| {shape} | {stage} | {r['recipe']} | {r['sec_per_step']:.1f} | {r['peak_mb'] / 1024:.2f} GiB |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
