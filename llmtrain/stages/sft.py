"""Stage 2, supervised fine-tuning: instruction -> response pairs, loss on the response only.

    llmtrain sft -c configs/sft.yaml init_from=runs/pretrain [key=value ...]

Set up (pretrained weights, freezing), log sample answers to held-out prompts, loop
(length-bucketed batches, loss over assistant tokens), evaluate the held-out response loss
and log samples again, save. Optimizer, precision, checkpoints, resume and torchrun are the
same pieces pretraining uses.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from llmtrain import checkpoint, dist, training
from llmtrain.config import SFTConfig
from llmtrain.data import sft as sft_data
from llmtrain.data.jsonl import split
from llmtrain.data.prompts import last_user
from llmtrain.generate import greedy_answers, prompt_budget
from llmtrain.losses import lm_loss
from llmtrain.model import Transformer
from llmtrain.model.adapters import freeze
from llmtrain.tokenizer import Tokenizer, render_chat
from llmtrain.training import count_params, optimizer_step


def main(cfg: SFTConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    base, tok_path, tok, mcfg = training.load_base(cfg.init_from, "init_from",
                                                   "the pretrained checkpoint (e.g. init_from=runs/pretrain)", cfg.run.out_dir)

    # ---- model, data
    torch.manual_seed(run.seed)
    model = Transformer(mcfg)
    checkpoint.load_weights(base, model)
    frozen = freeze(model, cfg.freeze.patterns, cfg.freeze.first_layers)
    model.to(env.device)

    max_len = cfg.data.max_len or mcfg.max_seq_len
    train_ex, val_ex, val_convs, skipped, dropped = read_data(cfg, tok, max_len)
    batches = sft_data.LengthBatches(train_ex, run.batch_size * run.grad_accum * env.world, run.seed)
    # Sample answers to the first held-out prompts: lengths checked now (too long: cut from the left).
    sample_convs = [msgs for _, msgs in val_convs[: cfg.sample_prompts]]
    room = prompt_budget(mcfg.max_seq_len, cfg.sample_tokens)
    long_samples = sum(len(prompt_ids(tok, c)) > room for c in sample_convs)

    s = training.start("sft", cfg, model, mcfg, tok_path, env, counts_tokens=True)
    log, optimizer, start_step = s.log, s.optimizer, s.start_step
    tokens_seen = s.resumed_meta.get("tokens", 0)
    trainable, total = count_params(model)
    log.log(start_step, "setup", trainable_params=trainable, total_params=total, frozen_tensors=len(frozen),
            train_examples=len(train_ex), val_examples=len(val_ex), skipped_lines=skipped, long_sample_prompts=long_samples)
    training.announce(s, f"sft: from {base}; {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
                         f"({len(frozen)} tensors frozen); {env.world} process(es) on {env.device}, {run.precision}",
                      f"sft data: {len(train_ex)} train / {len(val_ex)} held-out examples; {skipped} bad lines "
                      f"skipped, {dropped} dropped (no response token within {max_len})")
    if long_samples:
        log.print(f"sft: {long_samples} of {len(sample_convs)} sample prompts longer than {room} tokens (of the context "
                  f"window of {mcfg.max_seq_len} with sample_tokens {cfg.sample_tokens}) are cut from the left for their "
                  "sample answers")

    def log_samples(step: int) -> None:
        # A sharded model's forward is a collective: every process generates, the main one logs.
        if not sample_convs or not (env.is_main or dist.is_sharded(model)):
            return
        answers = sample_answers(model, tok, sample_convs, cfg.sample_tokens)
        log.log(step, "samples", samples=[{"prompt": last_user(c), "answer": a} for c, a in zip(sample_convs, answers)])
        for c, a in zip(sample_convs, answers):
            log.print(f"  Q: {last_user(c)}\n  A: {a}")

    def evaluate(done: int) -> float:
        val_loss = response_loss(model, tok, val_ex, run, env)
        log.log(done, "val", loss=val_loss, ppl=math.exp(min(val_loss, 50)))
        log.print(f"step {done:>6} | held-out response loss {val_loss:.4f}")
        log_samples(done)
        return val_loss

    def save(step: int, tokens: int, val_loss: float) -> None:
        training.save(s, step, {"tokens": tokens, "data": {"seed": run.seed, "next_step": step}, "val_loss": val_loss})

    if start_step == 0:
        val_loss = response_loss(model, tok, val_ex, run, env)
        log.log(0, "val", loss=val_loss)
        log.print(f"before fine-tuning: held-out response loss {val_loss:.4f}; samples:")
        log_samples(0)

    # ---- the loop
    progress = training.begin(s, tokens_seen)
    val_loss = float("nan")
    for step, lr in training.steps(s):
        # The step's loss is the sum over all its response tokens / their number, whatever
        # the split into micro-steps and processes (DDP averages over ranks: hence * world).
        n_targets = batches.target_tokens(step)

        def loss_of(micro, m):
            x, y = sft_data.collate(batches.rows(step, run.batch_size, micro, env.rank, env.world), tok.pad_id)
            return lm_loss(m(x.to(env.device)), y.to(env.device), reduction="sum") * env.world / n_targets

        step_loss = training.accumulate(s.train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        tokens_seen += n_targets
        val_loss = training.end_step(s, progress, step + 1, step_loss, lr, grad_norm, tokens_seen, evaluate, save, val_loss)

    return training.finish(s, progress)


def read_data(cfg: SFTConfig, tok: Tokenizer, max_len: int):
    """-> (train examples, held-out examples, held-out conversations, bad lines skipped,
    conversations dropped for want of a response token within max_len)."""
    convs, skipped = sft_data.read_conversations(cfg.data.train, cfg.data.skip_bad_lines, cfg.data.columns)
    if cfg.data.val:
        val_convs, skipped_val = sft_data.read_conversations(cfg.data.val, cfg.data.skip_bad_lines, cfg.data.columns)
        skipped += skipped_val
        train_convs = convs
    else:
        train_convs, val_convs = split(convs, cfg.data.val_every)
    train_ex, dropped = sft_data.encode(tok, train_convs, max_len)
    val_ex, dropped_val = sft_data.encode(tok, val_convs, max_len)
    return train_ex, val_ex, val_convs, skipped, dropped + dropped_val


def response_loss(model: Transformer, tok: Tokenizer, val_ex: list, run, env) -> float:
    """Held-out response loss: summed over every response token, divided by their count."""
    model.eval()
    # Each process its share; a sharded model's every forward is a collective, so there
    # every process runs the whole set (the same number of forwards; the mean is unchanged).
    sharded = dist.is_sharded(model)
    mine = val_ex if sharded else val_ex[env.rank::env.world]
    limit = len(mine) if run.eval_batches == 0 else run.eval_batches * run.batch_size * (env.world if sharded else 1)
    total_loss = torch.zeros((), device=env.device)
    n_tok = torch.zeros((), device=env.device)
    with torch.no_grad(), dist.autocast(env.device, run.precision):
        for i in range(0, min(limit, len(mine)), run.batch_size):
            x, y = sft_data.collate(mine[i:i + run.batch_size], tok.pad_id)
            y = y.to(env.device)
            total_loss += lm_loss(model(x.to(env.device)), y, reduction="sum")
            n_tok += (y != -100).sum()
    model.train()
    total_loss = dist.all_reduce_mean(total_loss, env)
    n_tok = dist.all_reduce_mean(n_tok.float(), env)
    return float(total_loss / n_tok.clamp(min=1))


def prompt_ids(tok: Tokenizer, msgs: list[dict]) -> list[int]:
    """The conversation up to (not including) its last assistant message, ready for the model."""
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return render_chat(tok, msgs[:last], add_generation_prompt=True)[0]


def sample_answers(model: Transformer, tok: Tokenizer, convs: list[list[dict]], max_new: int) -> list[str]:
    """Greedy answers to held-out conversations (`generate.greedy_answers`)."""
    return [text for text, _ in greedy_answers(model, tok, [prompt_ids(tok, c) for c in convs], max_new)]
