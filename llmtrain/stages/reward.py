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
from llmtrain.config import RewardConfig
from llmtrain.data.preference import Ranking, RankingBatches, load_pairs_data, pair_tensors
from llmtrain.data.prompts import fit_prompts, prompt_room
from llmtrain.errors import ConfigError
from llmtrain.generate import SamplingConfig, answer_text, generate
from llmtrain.interop.hub import resolve_model
from llmtrain.losses import pairwise_ranking_loss
from llmtrain.model import Transformer
from llmtrain.model.adapters import freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.scoring import forward_rankings, score_texts
from llmtrain.tokenizer import Tokenizer, render_chat
from llmtrain.training import count_params, optimizer_step


def main(cfg: RewardConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    base, tok_path, tok, mcfg = training.load_base(cfg.init_from, "init_from", "the fine-tuned (SFT) checkpoint", cfg.run.out_dir)

    # ---- data
    max_len = cfg.data.max_len or mcfg.max_seq_len
    prompt_room(mcfg.max_seq_len, cfg.norm_max_new_tokens, "norm_max_new_tokens", f" of {base}")  # now, not after training
    train_r, val_r, counts = load_pairs_data(cfg.data)
    batches = RankingBatches(train_r, run.batch_size * run.grad_accum * env.world, run.seed, cfg.data.min_score_gap)

    # ---- model: the SFT backbone and a new scalar head, or a reward model's backbone and head
    # (iterative RLHF continues the last round's reward model on all rankings so far)
    torch.manual_seed(run.seed)
    model = ScoreModel(mcfg, 1)
    checkpoint.load_weights(base, model, new_head=("score.",))
    norm_base = norm_policy(cfg, base)
    frozen = freeze(model, cfg.freeze.patterns, cfg.freeze.first_layers)
    model.to(env.device)
    s = training.start("reward", cfg, model, mcfg, tok_path, env)
    log, optimizer, start_step = s.log, s.optimizer, s.start_step

    trainable, total = count_params(model)
    n_pairs = lambda rs: sum(len(r.pairs(cfg.data.min_score_gap)) for r in rs)
    training.announce(s, f"reward: from {base}; {len(train_r)} train / {len(val_r)} held-out prompts with pairs "
                         f"({n_pairs(train_r)} / {n_pairs(val_r)} pairs; {counts['without_pairs']} rankings without "
                         f"a pair left out, {counts['skipped_lines']} bad lines skipped); {trainable / 1e6:.2f}M of "
                         f"{total / 1e6:.2f}M trainable")
    log.log(start_step, "setup", train_prompts=len(train_r), val_prompts=len(val_r), train_pairs=n_pairs(train_r),
            val_pairs=n_pairs(val_r), trainable_params=trainable, total_params=total, frozen_tensors=len(frozen))

    # What always preferring the longer answer would score on the same held-out pairs: a
    # baseline that says how much of the accuracy is more than length.
    val_eval = val_r[: run.eval_batches * run.batch_size or None]  # the first run.eval_batches batches (0: all)
    longer = [1.0 if len(r.texts[i]) > len(r.texts[j]) else 0.5 if len(r.texts[i]) == len(r.texts[j]) else 0.0
              for r in val_eval for i, j in r.pairs(cfg.data.min_score_gap)]
    length_baseline = sum(longer) / len(longer)

    def evaluate(done: int) -> dict:
        res = evaluate_pairs(model, tok, val_eval, max_len, run.batch_size, cfg.data.min_score_gap, env.device, run.precision)
        res = {**res, "longer_text_baseline": length_baseline}
        log.log(done, "val", **{k: v for k, v in res.items() if k != "calibration"})
        log.print(f"step {done:>6} | held-out pairwise accuracy {res['accuracy']:.3f} (always-longer baseline "
                  f"{length_baseline:.3f}) | mean margin {res['mean_margin']:.3f} | loss {res['loss']:.4f}")
        return res

    def save(step: int, pairs: int, result: dict) -> None:
        """The last checkpoint carries the reward's normalisation (offset, std); the others none."""
        norm = {}
        if step == run.max_steps:
            norm = normalise(cfg, model, tok, norm_base, val_r or train_r, env)
            log.log(step, "normalisation", **norm)
            log.log(step, "calibration", bins=result["calibration"])
            log.print(f"normalisation: offset {norm['offset']:.4f} makes the SFT model's answers to "
                      f"{norm['n']} held-out prompts score mean 0 (std {norm['std']:.4f})"
                      + (f"; {norm['skipped_long']} prompts longer than the context less norm_max_new_tokens "
                         "skipped" if norm["skipped_long"] else ""))
        training.save(s, step, {"tokens": 0, **{k: v for k, v in result.items() if k != "calibration"}}, reward=norm)

    # ---- the loop
    progress = training.begin(s, 0, unit="pairs")
    result, pairs_seen = {}, 0
    for step, lr in training.steps(s):
        total_pairs = batches.n_pairs(step)

        def loss_of(micro, m):
            rows = batches.rows(step, run.batch_size, micro, env.rank, env.world)
            rewards, starts = forward_rankings(m, tok, rows, max_len, env.device)
            b, w, margin = pair_tensors(rows, starts, cfg.data.min_score_gap, cfg.margin_scale, env.device)
            # The sum over this micro-batch's pairs / all pairs of the global batch.
            return pairwise_ranking_loss(rewards[b], rewards[w], margin, reduction="sum") * env.world / total_pairs

        step_loss = training.accumulate(s.train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        pairs_seen += total_pairs
        result = training.end_step(s, progress, step + 1, step_loss, lr, grad_norm, pairs_seen, evaluate, save, result)

    return training.finish(s, progress)


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


def norm_policy(cfg: RewardConfig, base: Path) -> Path:
    """The model whose sampled answers set the reward's zero: norm_policy, else init_from, which
    must then be a language model (a reward model writes no answers)."""
    if cfg.norm_policy:
        return checkpoint.resolve(resolve_model(cfg.norm_policy, cfg.run.out_dir, "norm_policy"))
    if checkpoint.read_config(base).get("stage") == "reward":
        raise ConfigError(f"init_from: {base} is a reward model, which writes no answers: set norm_policy to the "
                          "model whose answers set the reward's zero (the SFT checkpoint)")
    return base


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
    s = SamplingConfig(max_new_tokens=cfg.norm_max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=tok.stop_ids)
    gen = torch.Generator(device=env.device).manual_seed(cfg.run.seed)
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs for _ in range(cfg.norm_samples)]
    items = []
    for i in range(0, len(prompts), 32):
        outs = generate(sft, prompts[i:i + 32], s, pad_id=tok.pad_id, generator=gen)
        for k, o in enumerate(outs, start=i):  # prompt k answers conversation k // norm_samples
            items.append((convs[k // cfg.norm_samples], *answer_text(tok, o, s.stop_ids)))
    scores = np.array(score_texts(model, tok, items))
    return {"offset": float(scores.mean()), "std": float(scores.std()), "n": len(convs), "samples": len(items),
            "skipped_long": len(long)}
