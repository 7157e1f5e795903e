"""RL iteration time, side by side with TRL: PPO and GRPO seconds per iteration, with the phase split.

    python bench/rlhf.py                       # TRL's default sizes and the demo's; ours fp32/auto/bf16, TRL fp32
    python bench/rlhf.py --shapes trl --iters 4 --json out.json
    python bench/rlhf.py --no-trl              # ours only (TRL is not a requirement: pip install 'trl==1.12.*')

Sizes ("shapes"):
  trl   TRL's PPO defaults at a small model: 6 layers, width 384, 6 heads (3 key/value heads), vocab
        8192, untied word head; 16 answers per iteration, 32 new tokens, 4 epochs, one minibatch.
        PPO: 16 prompts; GRPO: 4 prompts x 4 answers.
  demo  configs/demo.yaml's model (4 layers, width 128, vocab 2048, tied) and RL settings
        (16 answers of up to 40 tokens, minibatches of 8, 2 epochs).

Ours runs `llmtrain.stages.ppo.main` (the stage as a user runs it) in its own process per
variant, on random weights (speed does not depend on them) and one tokenizer trained here; TRL's
`PPOTrainer` (trl.experimental.ppo, the last TRL with PPO) runs on the same weights (our parameter
names are HF Llama's), the same prompt token ids and the same sizes. Precisions:
  fp32  ours: everything fp32 (run.precision, rollout_precision and frozen_precision fp32)
  auto  ours: the defaults: fp32 training; rollouts, reference and reward model bf16 where the
        hardware has native bf16 (AVX512-BF16/AMX or a GPU) and the policy has 8M parameters or
        more, else fp32 (so at the demo's sizes auto is fp32)
  bf16  ours: also run.precision=bf16 (autocast over fp32 master weights)
  TRL runs fp32 (its PPOTrainer on a CPU), and with --trl-bf16 also TrainingArguments(bf16=True).
Time per iteration is the median over iterations 2.. (the first warms up); ours also splits it into
rollout (sampling), score (reward model), old (old log-probs and values), reference, update.
Every variant runs once per round (--rounds, alternating, so a slow spell of a shared machine hits
all of them); the table gives the median over rounds, and "x TRL fp32" the median over rounds of
the ratio to TRL's run of the same round.
Each answer runs to max_new_tokens in both (random weights rarely sample an end token).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "trl": {"model": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=3, max_seq_len=256,
                          tie_embeddings=False),
            "ppo": dict(rollout_batch=16, minibatch=16, ppo_epochs=4, max_new_tokens=32),
            "grpo": dict(rollout_batch=4, group_size=4, minibatch=16, ppo_epochs=4, max_new_tokens=32)},
    "demo": {"model": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                           tie_embeddings=True),
             "ppo": dict(rollout_batch=16, minibatch=8, ppo_epochs=2, max_new_tokens=40),
             "grpo": dict(rollout_batch=4, group_size=4, minibatch=8, ppo_epochs=2, max_new_tokens=40)},
}
PRECISIONS = {
    "fp32": ["run.precision=fp32", "rollout_precision=fp32", "frozen_precision=fp32"],
    "auto": ["run.precision=fp32"],
    "bf16": ["run.precision=bf16"],
}
PHASES = ("rollout", "score", "old", "reference", "update")


def make_setup(root: Path, model: dict) -> tuple[Path, Path, Path]:
    """Tokenizer, SFT-shaped policy and reward checkpoints (random weights), a prompts file."""
    from ppo import save_untrained  # bench/ppo.py (this script's folder is on sys.path)

    from llmtrain.config import ModelConfig
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_documents([str(REPO / "data/corpus/chitchat.txt")]), model["vocab_size"],
                          root / "tokenizer.json", max_chars=3_000_000)
    sft, rm = save_untrained(root, ModelConfig(**{**model, "vocab_size": tok.vocab_size}))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}, and what you would do with it."})
                               + "\n" for i in range(200)))
    return sft, rm, prompts


# ----------------------------------------------------------------------------- ours

def ours_child(overrides: list[str]) -> None:
    from llmtrain.config import PPOConfig, load_config
    from llmtrain.metrics import read_metrics
    from llmtrain.stages import ppo

    cfg = load_config(PPOConfig, None, overrides)
    ppo.main(cfg)
    recs = read_metrics(cfg.run.out_dir, "train")[1:]  # the first iteration warms up
    out = {"seconds": statistics.median(r["seconds"] for r in recs),
           "length": statistics.median(r["response_length"] for r in recs)}
    for ph in PHASES:
        out[ph] = statistics.median(r.get(f"seconds_{ph}", 0.0) for r in recs)
    print("RESULT " + json.dumps(out))


def run_ours(algorithm: str, shape: dict, precision: str, sft: Path, rm: Path, prompts: Path, out: Path,
             iters: int) -> dict:
    ov = [f"algorithm={algorithm}", f"policy={sft}", f"reward_model={rm}", f"prompts={prompts}",
          f"run.out_dir={out}", f"run.max_steps={iters}", "run.eval_every=0", "run.save_every=0", "eval_prompts=1",
          "optim.lr=3e-6", "missing_eos_penalty=0", *PRECISIONS[precision]]
    ov += [f"{k}={v}" for k, v in shape[algorithm].items()]
    return child([__file__, "--child-ours", *ov])


# ----------------------------------------------------------------------------- TRL

def trl_child(sft: Path, rm: Path, prompts: Path, out: Path, shape: dict, iters: int, bf16: bool) -> None:
    import torch
    import transformers
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer

    from llmtrain import checkpoint
    from llmtrain.config import ModelConfig
    from llmtrain.data.prompts import read_prompts
    from llmtrain.tokenizer import Tokenizer, render_chat

    ckpt = checkpoint.resolve(sft)
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    mcfg = ModelConfig(**checkpoint.read_config(ckpt)["model"])
    hf_cfg = transformers.LlamaConfig(**mcfg.hf_config())
    from safetensors.torch import load_file

    policy_sd = load_file(str(ckpt / "model.safetensors"))
    rm_sd = load_file(str(checkpoint.resolve(rm) / "model.safetensors"))

    def causal():
        m = transformers.LlamaForCausalLM(hf_cfg)
        m.load_state_dict(policy_sd, strict=False)
        return m

    def scorer():
        m = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**mcfg.hf_config(), num_labels=1))
        m.load_state_dict(rm_sd, strict=False)
        return m

    htok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), padding_side="left")
    htok.pad_token = htok.convert_ids_to_tokens(tok.pad_id)
    htok.eos_token = htok.convert_ids_to_tokens(tok.eos_id)
    a = shape["ppo"]
    ids = [render_chat(tok, c, add_generation_prompt=True)[0] for c in read_prompts(str(prompts))]
    data = Dataset.from_dict({"input_ids": ids})
    args = TRLConfig(output_dir=str(out), per_device_train_batch_size=a["rollout_batch"], gradient_accumulation_steps=1,
                     num_mini_batches=a["rollout_batch"] // a["minibatch"], num_ppo_epochs=a["ppo_epochs"],
                     response_length=a["max_new_tokens"], total_episodes=a["rollout_batch"] * iters,
                     local_rollout_forward_batch_size=a["rollout_batch"], num_sample_generations=0,
                     learning_rate=3e-6, report_to=[], save_strategy="no", logging_steps=1000, bf16=bf16,
                     use_cpu=True, temperature=1.0, missing_eos_penalty=None, stop_token=None, seed=0)
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=htok, model=causal(), ref_model=causal(), reward_model=scorer(),
                         value_model=scorer(), train_dataset=data, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    steps = [b - a_ for a_, b in zip([t0] + times[:-1], times)]
    print("RESULT " + json.dumps({"seconds": statistics.median(steps[1:] or steps), "iterations": len(steps),
                                  "torch_threads": torch.get_num_threads()}))


def run_trl(sft, rm, prompts, out, shape_name: str, iters: int, bf16: bool) -> dict:
    return child([__file__, "--child-trl", str(sft), str(rm), str(prompts), str(out), shape_name, str(iters),
                  "bf16" if bf16 else "fp32"])


def child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"{argv[1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        return ours_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-trl":
        sft, rm, prompts, out, shape, iters, prec = sys.argv[2:]
        return trl_child(Path(sft), Path(rm), Path(prompts), Path(out), SHAPES[shape], int(iters), prec == "bf16")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["trl", "demo"], choices=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="times every variant runs, alternating")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--trl-bf16", action="store_true", help="also TRL with TrainingArguments(bf16=True)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.rounds < 1 or a.iters < 2:
        ap.error(f"--rounds must be at least 1 and --iters at least 2 (the first warms up), got {a.rounds} and {a.iters}")
    import torch

    from llmtrain import dist

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: "
          f"{dist.native_bf16(torch.device('cpu'))}; median s/iteration over iterations 2..{a.iters}")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for shape_name in a.shapes:
            shape = SHAPES[shape_name]
            root = Path(d) / shape_name
            root.mkdir()
            sft, rm, prompts = make_setup(root, shape["model"])
            with_trl = not a.no_trl and shape_name == "trl"
            variants = ([("TRL PPOTrainer", None, p) for p in (["fp32", "bf16"] if a.trl_bf16 else ["fp32"])]
                        if with_trl else [])
            variants += [(f"llmtrain {algo}", algo, prec) for algo in a.algorithms for prec in a.precisions]
            runs: dict = {}
            for rnd in range(a.rounds):  # every variant once per round: a slow spell of the machine hits all
                for who, algo, prec in variants:
                    out = root / f"{who.replace(' ', '-')}-{prec}-{rnd}"
                    try:
                        r = (run_trl(sft, rm, prompts, out, shape_name, a.iters, prec == "bf16") if algo is None
                             else run_ours(algo, shape, prec, sft, rm, prompts, out, a.iters))
                    except SystemExit as e:
                        if algo is not None or prec == "fp32":
                            raise
                        print(f"TRL bf16 did not run: {str(e)[-300:]}")  # optional: the others still count
                        continue
                    runs.setdefault((who, prec), []).append(r)
                    results.append({"shape": shape_name, "who": who, "precision": prec, "round": rnd, **r})
            print(f"\n[{shape_name}] {shape['model']}; {a.rounds} round(s)\n{'who':<18}{'precision':<10}{'s/iter':>8}"
                  f"{'x TRL fp32':>11}" + "".join(f"{p:>10}" for p in PHASES))
            for (who, prec), rs in runs.items():
                secs = statistics.median(r["seconds"] for r in rs)
                rel, per_round = "", ""
                if with_trl:  # the ratio within each round, then its median and the worst round
                    ratios = [r["seconds"] / t["seconds"] for r, t in zip(rs, runs[("TRL PPOTrainer", "fp32")])]
                    rel = f"{statistics.median(ratios):>11.2f}"
                    per_round = f"   per round {' '.join(f'{x:.2f}' for x in ratios)} (worst {max(ratios):.2f})"
                phases = "".join(f"{statistics.median(r[p] for r in rs):>10.2f}" for p in PHASES) if "llmtrain" in who else ""
                print(f"{who:<18}{prec:<10}{secs:>8.2f}{rel:>11}{phases}{per_round}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
