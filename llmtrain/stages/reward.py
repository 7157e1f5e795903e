"""Stage 3a, the reward model: the fine-tuned LLM with a scalar head, trained on K-way rankings.

    llmtrain reward -c configs/reward.yaml init_from=runs/sft data.train=rankings.jsonl
    llmtrain reward score runs/reward --prompt "..." --response "..."   (or --input pairs.jsonl)

As in InstructGPT, a prompt's K ranked answers give all C(K,2) ordered pairs (ties give none),
all pairs of one prompt go into the same batch, and each answer goes through the model once:
    loss = mean over pairs of -log sigmoid(r_better - r_worse - margin)
After training, an offset is set so that the SFT model's own answers to held-out prompts
score mean 0 (their std is recorded): PPO then sees rewards on a known scale.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmtrain import checkpoint, dist, training
from llmtrain.config import RewardConfig, to_dict
from llmtrain.data.preference import Ranking, RankingBatches, load_pairs_data, pair_tensors
from llmtrain.data.prompts import fit_prompts, prompt_room
from llmtrain.errors import ConfigError
from llmtrain.generate import SamplingConfig, generate
from llmtrain.losses import pairwise_ranking_loss
from llmtrain.metrics import Metrics, Progress, fmt_duration
from llmtrain.model import Transformer
from llmtrain.model.adapters import freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.scoring import forward_rankings, score_texts
from llmtrain.tokenizer import Tokenizer, render_chat
from llmtrain.training import count_params, lr_at, optimizer_step, set_lr


def main(cfg: RewardConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    run_dir = Path(run.out_dir)
    if not cfg.init_from:
        raise ConfigError("init_from is not set: give the fine-tuned (SFT) checkpoint")

    # ---- data
    base = checkpoint.resolve(cfg.init_from)
    tok_path = checkpoint.tokenizer_of(base)
    tok = Tokenizer.load(tok_path)
    mcfg = checkpoint.model_config(base)
    max_len = cfg.data.max_len or mcfg.max_seq_len
    prompt_room(mcfg.max_seq_len, cfg.norm_max_new_tokens, "norm_max_new_tokens", f" of {base}")  # now, not after training
    train_r, val_r, counts = load_pairs_data(cfg.data)
    batches = RankingBatches(train_r, run.batch_size * run.grad_accum * env.world, run.seed, cfg.data.min_score_gap)

    # ---- model: the SFT backbone, a new scalar head
    torch.manual_seed(run.seed)
    model = ScoreModel(mcfg, 1)
    checkpoint.load_weights(base, model, new_head=("score.",))
    frozen = freeze(model, cfg.freeze.patterns, cfg.freeze.first_layers)
    model.to(env.device)
    train_model, optimizer, resumed, done = training.prepare(model, cfg.optim, run, env, run_dir)
    start_step = done.get("step", 0)

    log = Metrics(run_dir, enabled=env.is_main, tensorboard=run.tensorboard, resume_step=start_step if resumed else None)
    trainable, total = count_params(model)
    n_pairs = lambda rs: sum(len(r.pairs(cfg.data.min_score_gap)) for r in rs)
    log.print(f"reward: from {base}; {len(train_r)} train / {len(val_r)} held-out prompts with pairs "
              f"({n_pairs(train_r)} / {n_pairs(val_r)} pairs; {counts['without_pairs']} rankings without "
              f"a pair left out, {counts['skipped_lines']} bad lines skipped); {trainable / 1e6:.2f}M of {total / 1e6:.2f}M trainable")
    log.log(start_step, "setup", train_prompts=len(train_r), val_prompts=len(val_r), train_pairs=n_pairs(train_r),
            val_pairs=n_pairs(val_r), trainable_params=trainable, total_params=total, frozen_tensors=len(frozen))

    # What always preferring the longer answer would score on the same held-out pairs: a
    # baseline that says how much of the accuracy is more than length.
    longer = [1.0 if len(r.texts[i]) > len(r.texts[j]) else 0.5 if len(r.texts[i]) == len(r.texts[j]) else 0.0
              for r in val_r for i, j in r.pairs(cfg.data.min_score_gap)]
    length_baseline = sum(longer) / len(longer)

    def evaluate() -> dict:
        res = evaluate_pairs(model, tok, val_r, max_len, run.batch_size, cfg.data.min_score_gap, env.device, run.precision)
        return {**res, "longer_text_baseline": length_baseline}

    # ---- the loop
    model.train()
    progress = Progress(start_step, run.max_steps, 0, unit="pairs")
    result, pairs_seen = {}, 0
    for step in range(start_step, run.max_steps):
        lr = lr_at(step, cfg.optim, run.max_steps)
        set_lr(optimizer, lr)
        total_pairs = batches.n_pairs(step)

        def loss_of(micro, m):
            rows = batches.rows(step, run.batch_size, micro, env.rank, env.world)
            rewards, starts = forward_rankings(m, tok, rows, max_len, env.device)
            b, w, margin = pair_tensors(rows, starts, cfg.data.min_score_gap, cfg.margin_scale, env.device)
            # The sum over this micro-batch's pairs / all pairs of the global batch.
            return pairwise_ranking_loss(rewards[b], rewards[w], margin, reduction="sum") * env.world / total_pairs

        step_loss = training.accumulate(train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        pairs_seen += total_pairs
        d = step + 1
        if d % run.log_every == 0 or d == run.max_steps:
            loss_v = float(dist.all_reduce_mean(step_loss, env))
            line, _ = progress.line(d, pairs_seen, loss=loss_v, lr=lr, gnorm=grad_norm)
            log.log(d, "train", loss=loss_v, lr=lr, grad_norm=grad_norm)
            log.print(line)
        if (run.eval_every and d % run.eval_every == 0) or d == run.max_steps:
            result = evaluate()
            log.log(d, "val", **{k: v for k, v in result.items() if k != "calibration"})
            log.print(f"step {d:>6} | held-out pairwise accuracy {result['accuracy']:.3f} (always-longer baseline "
                      f"{length_baseline:.3f}) | mean margin {result['mean_margin']:.3f} | loss {result['loss']:.4f}")
        last = d == run.max_steps
        if (run.save_every and d % run.save_every == 0) or last:
            norm = normalise(cfg, model, tok, base, val_r or train_r, env) if last else {}
            if last:
                log.log(d, "normalisation", **norm)
                log.log(d, "calibration", bins=result["calibration"])
                log.print(f"normalisation: offset {norm['offset']:.4f} makes the SFT model's answers to "
                          f"{norm['n']} held-out prompts score mean 0 (std {norm['std']:.4f})"
                          + (f"; {norm['skipped_long']} prompts longer than the context less norm_max_new_tokens "
                             "skipped" if norm["skipped_long"] else ""))
            checkpoint.save(run_dir, d, model, config={"model": to_dict(mcfg), "stage": "reward", "reward": norm,
                                                       "config": to_dict(cfg)},
                            meta={"tokens": 0, **{k: v for k, v in result.items() if k != "calibration"}},
                            tokenizer_path=str(tok_path), optimizer=optimizer, rng=dist.rng_state(),
                            keep_last=run.keep_last, rank=env.rank, barrier=lambda: dist.barrier(env))
    log.print(f"reward done in {fmt_duration(progress.elapsed())}; {'checkpoint in ' + str(run_dir / 'checkpoints') if checkpoint.step_dirs(run_dir) else 'no checkpoint written (run.max_steps=0)'}")
    log.close()
    dist.teardown()
    return run_dir


def evaluate_pairs(model, tok, rankings: list[Ranking], max_len: int, batch_size: int, min_gap: float, device,
                   precision: str = "fp32") -> dict:
    """Pairwise accuracy, mean margin and loss over held-out pairs; calibration bins of the
    predicted P(a beats b) against how often a did (pairs oriented alternately)."""
    was = model.training
    model.eval()
    diffs = []
    with torch.no_grad(), dist.autocast(device, precision):
        for i in range(0, len(rankings), batch_size):
            rows = rankings[i:i + batch_size]
            rewards, starts = forward_rankings(model, tok, rows, max_len, device)
            b, w, _ = pair_tensors(rows, starts, min_gap, 0.0, device)
            diffs += (rewards[b] - rewards[w]).float().tolist()
    model.train(was)
    d = np.array(diffs)
    bins = np.linspace(0, 1, 11)
    sign = np.where(np.arange(len(d)) % 2 == 0, 1.0, -1.0)  # orient half the pairs worse-first
    p = 1 / (1 + np.exp(-d * sign))
    y = (sign > 0).astype(float)
    calib = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (p >= lo) & (p < hi if hi < 1 else p <= hi)
        if sel.any():
            calib.append({"lo": float(lo), "hi": float(hi), "n": int(sel.sum()), "predicted": float(p[sel].mean()),
                          "observed": float(y[sel].mean())})
    return {"accuracy": float((d > 0).mean()), "mean_margin": float(d.mean()), "pairs": int(len(d)),
            "loss": float(np.logaddexp(0, -d).mean()), "calibration": calib}


def normalise(cfg: RewardConfig, model: ScoreModel, tok: Tokenizer, base: Path, rankings: list[Ranking], env) -> dict:
    """Sample the SFT model's answers to held-out prompts; their mean reward becomes the offset.
    Prompts that leave fewer than norm_max_new_tokens of the context are skipped (counted)."""
    seen, convs = set(), []
    for r in rankings:
        key = str(r.messages)
        if key not in seen:
            seen.add(key)
            convs.append(r.messages)
    ctx = checkpoint.model_config(base).max_seq_len
    convs, long = fit_prompts(tok, convs, prompt_room(ctx, cfg.norm_max_new_tokens, "norm_max_new_tokens"))
    convs = convs[: cfg.norm_prompts]
    if not convs:  # nothing to sample: no offset rather than a crash after training
        return {"offset": 0.0, "std": 1.0, "n": 0, "samples": 0, "skipped_long": len(long)}
    sft = Transformer(checkpoint.model_config(base))
    checkpoint.load_weights(base, sft)
    sft.to(env.device).eval()
    s = SamplingConfig(max_new_tokens=cfg.norm_max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(tok.end_id, tok.eos_id))
    gen = torch.Generator(device=env.device).manual_seed(cfg.run.seed)
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs for _ in range(cfg.norm_samples)]
    items = []
    for i in range(0, len(prompts), 32):
        outs = generate(sft, prompts[i:i + 32], s, pad_id=tok.pad_id, generator=gen)
        for k, o in enumerate(outs, start=i):  # prompt k answers conversation k // norm_samples
            done = bool(o) and o[-1] in s.stop_ids
            items.append((convs[k // cfg.norm_samples], tok.decode(o[:-1] if done else o, skip_special=True).strip(), done))
    scores = np.array(score_texts(model, tok, items))
    return {"offset": float(scores.mean()), "std": float(scores.std()), "n": len(convs), "samples": len(items),
            "skipped_long": len(long)}
