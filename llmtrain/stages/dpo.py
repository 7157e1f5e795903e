"""Stage 3c, DPO: Direct Preference Optimization from the same rankings, no reward model.

    llmtrain dpo -c configs/dpo.yaml policy=runs/sft data.train=rankings.jsonl

A prompt's K ranked answers give the same pairs as the reward stage; each answer's summed
log-probability goes through the policy (with gradients) and the frozen reference once:
    L = mean over pairs of -log sigmoid(beta [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))])
The implicit rewards beta (log pi - log pi_ref) give accuracy and margins on held-out prompts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmtrain import checkpoint, dist, training
from llmtrain.config import DPOConfig
from llmtrain.data.packing import pack
from llmtrain.data.preference import Ranking, RankingBatches, load_pairs_data, pair_tensors
from llmtrain.errors import ConfigError
from llmtrain.losses import IGNORE, dpo_loss
from llmtrain.model import Transformer
from llmtrain.model.adapters import adapters_off, apply_lora, freeze
from llmtrain.tokenizer import Tokenizer, render_answer
from llmtrain.training import count_params, optimizer_step


def answer_logprobs(model: Transformer, tok: Tokenizer, rankings: list[Ranking], max_len: int, device):
    """Summed log-probs of every answer (its text and closing <|end|>, none for a cut-off
    answer) in one forward pass -> (N,) and, per ranking, the offset of its first answer.
    The answers are packed end to end (llmtrain/data/packing.py), not padded."""
    inputs, targets, starts = [], [], []
    for r in rankings:
        starts.append(len(inputs))
        for t, f in zip(r.texts, r.finished_flags):
            ids, mask = render_answer(tok, r.messages, t, f)
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            inputs.append(ids[:-1])  # position p predicts token p + 1 of the same answer
            targets.append([y if m else IGNORE for y, m in zip(ids[1:], mask[1:])])
    b = pack(inputs, max_len, tok.pad_id).to(device)
    y, seq = b.layout(targets, IGNORE), b.sequence_index()
    logp = torch.log_softmax(model(b.ids, b.mask, b.positions).float(), -1)
    per_token = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != IGNORE)
    return per_token.new_zeros(len(inputs)).index_add(0, seq.clamp(min=0).flatten(), per_token.flatten()), starts


def main(cfg: DPOConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    sft_ckpt, tok_path, tok, mcfg = training.load_base(cfg.policy, "policy", "the SFT checkpoint", cfg.run.out_dir)
    max_len = cfg.data.max_len or mcfg.max_seq_len

    train_r, val_r, counts = load_pairs_data(cfg.data)
    batches = RankingBatches(train_r, run.batch_size * run.grad_accum * env.world, run.seed, cfg.data.min_score_gap)

    policy, reference = build_models(cfg, sft_ckpt, mcfg, env)
    if run.resume and cfg.lora.enabled:
        raise ConfigError("run.resume with lora.enabled is not supported by dpo yet (checkpoints hold merged weights)")
    if cfg.lora.enabled and run.strategy == "fsdp" and env.distributed:
        raise ConfigError("dpo with lora.enabled runs under run.strategy=ddp (adapters are small)")
    s = training.start("dpo", cfg, policy, mcfg, tok_path, env)
    log, optimizer, start_step = s.log, s.optimizer, s.start_step

    trainable, total = count_params(policy)
    training.announce(s, f"dpo: from {sft_ckpt}; beta {cfg.beta}; {len(train_r)} train / {len(val_r)} held-out prompts "
                         f"with pairs; {trainable / 1e6:.3f}M of {total / 1e6:.2f}M trainable; "
                         f"{counts['skipped_lines']} bad lines skipped")

    def pair_rewards(model, rows):
        lp, starts = answer_logprobs(model, tok, rows, max_len, env.device)
        with torch.no_grad():
            if reference is None:
                with adapters_off(policy):
                    ref, _ = answer_logprobs(policy, tok, rows, max_len, env.device)
            else:
                ref, _ = answer_logprobs(reference, tok, rows, max_len, env.device)
        b, w, _ = pair_tensors(rows, starts, cfg.data.min_score_gap, 0.0, env.device)
        return lp[b], lp[w], ref[b], ref[w]

    val_eval = val_r[: run.eval_batches * run.batch_size or None]  # the first run.eval_batches batches (0: all)

    def evaluate(done: int) -> dict:
        result = held_out(policy, pair_rewards, val_eval, cfg, env.device)
        log.log(done, "val", **result)
        log.print(f"step {done:>6} | held-out reward accuracy {result['accuracy']:.3f} | margin {result['margin']:.3f}")
        return result

    def save(step: int, pairs: int, result: dict) -> None:
        training.save(s, step, {"tokens": 0, **result})

    # ---- the loop
    result, pairs_seen = {}, 0  # the last evaluation (saved with each checkpoint), pairs trained on
    if start_step == 0:
        r = held_out(policy, pair_rewards, val_eval, cfg, env.device)
        log.log(0, "val", **r)
        log.print(f"before DPO: held-out reward accuracy {r['accuracy']:.3f}, margin {r['margin']:.3f}")
    progress = training.begin(s, 0, unit="pairs")
    for step, lr in training.steps(s):
        # The step's loss is the mean over every pair of the global batch, however the pairs
        # fall into micro-batches and processes.
        total_pairs = batches.n_pairs(step)

        def loss_of(micro, m):
            rows = batches.rows(step, run.batch_size, micro, env.rank, env.world)
            loss, _, _ = dpo_loss(*pair_rewards(m, rows), cfg.beta)
            n = sum(len(r.pairs(cfg.data.min_score_gap)) for r in rows)
            return loss * n * env.world / total_pairs  # mean over this micro-batch -> share of the global mean

        step_loss = training.accumulate(s.train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(policy, optimizer, cfg.optim.grad_clip)
        pairs_seen += total_pairs
        result = training.end_step(s, progress, step + 1, step_loss, lr, grad_norm, pairs_seen, evaluate, save, result)

    return training.finish(s, progress)


def build_models(cfg: DPOConfig, sft_ckpt: Path, mcfg, env) -> tuple[Transformer, Transformer | None]:
    """-> (policy, frozen reference). With LoRA there is no reference model: it is the policy
    with its adapters off, since the base weights stay frozen."""
    torch.manual_seed(cfg.run.seed)
    policy = Transformer(mcfg)
    checkpoint.load_weights(sft_ckpt, policy)
    if cfg.lora.enabled:
        apply_lora(policy, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        reference = None
    else:
        reference = Transformer(mcfg)
        checkpoint.load_weights(sft_ckpt, reference)
        reference.requires_grad_(False)
        reference.to(env.device).eval()  # replicated on every process, never sharded
        freeze(policy, cfg.freeze.patterns, cfg.freeze.first_layers)
    policy.to(env.device)
    return policy, reference


def held_out(policy: Transformer, pair_rewards, rankings: list[Ranking], cfg: DPOConfig, device) -> dict:
    """Implicit-reward accuracy, margin, chosen/rejected rewards and loss over held-out pairs;
    `pair_rewards(model, rows)` gives the four log-prob tensors of `dpo_loss`."""
    run = cfg.run
    policy.eval()
    rc, rr, losses = [], [], []
    with torch.no_grad(), dist.autocast(device, run.precision):
        for i in range(0, len(rankings), run.batch_size):
            loss, c, r = dpo_loss(*pair_rewards(policy, rankings[i:i + run.batch_size]), cfg.beta)
            rc.append(c)
            rr.append(r)
            losses.append(float(loss) * len(c))
    policy.train()
    rc, rr = torch.cat(rc), torch.cat(rr)
    # A tie (as before training, when policy == reference) counts half, like a coin flip.
    acc = float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())
    return {"accuracy": acc, "margin": float((rc - rr).mean()),
            "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
            "loss": sum(losses) / len(rc), "pairs": len(rc)}
