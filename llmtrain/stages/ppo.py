"""Stage 3b, RLHF: the policy writes answers, the reward model scores them, the policy is
updated to score better, held near the fine-tuned model by a KL penalty. Three algorithms:

    llmtrain ppo  policy=runs/sft reward_model=runs/reward      PPO: policy + value model, GAE
    llmtrain grpo policy=runs/sft reward_model=runs/reward      GRPO: G answers per prompt, no value model
    llmtrain rloo policy=runs/sft reward_model=runs/reward      RLOO: G answers per prompt, no value model

GRPO and RLOO (critic-free) sample G answers to each prompt and judge each answer against the
others to the same prompt (llmtrain.rl.group_advantages); they hold no value model, so no
second trainable model, its gradients or its optimizer state.

Every model runs in eval mode throughout (no dropout; as TRL's PPO), and everything an
iteration computes before its update (samples, old log-probs, values, reference, reward) runs
under the same autocast as the update, in the same batches as the first epoch's minibatches:
before the first update the new/old ratio is exactly 1 (logged as `ratio_dev`, on the first
minibatch, whose forward the update reuses; that the other minibatches' old pass, without
grad, equals the update's forward bit for bit is tests/unit/test_rl.py's to show).

Each iteration `main` calls one function per phase, in order, each filling in the iteration's `Batch`:
 (1) rollout     sample answers to a batch of prompts (batched, KV cache; G per prompt for GRPO/RLOO)
 (2) score       reward model on (prompt, answer), minus a penalty if cut off without an end
 (3) logprobs    old log-probs (and values) of the policy, the reference's; per-answer KL (k1 and k3);
                 the first minibatch's forward keeps its graph and is its first update's forward
 (4) advantages  PPO (gae_advantages): reward_t = -beta KL_t (+ score on the last token), GAE, whitened
                 over all processes. GRPO/RLOO (group_relative_advantages): score (- beta sum KL),
                 against its group. With kl.placement=loss the KL is a loss term instead (beta x mean k3).
 (5) update      several epochs of minibatches: clipped policy loss (+ clipped value loss)
                 (+ KL term) (+ PPO-ptx: a pretraining loss)
 (6) log_iteration  reward, KL, ratio before the update, entropy, clip fraction, value loss, lengths
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from llmtrain import checkpoint, dist, training
from llmtrain.config import PPOConfig
from llmtrain.data.pretrain import TokenWindows
from llmtrain.data.prompts import fit_prompts, last_user, prompt_room, read_prompts
from llmtrain.data.jsonl import split
from llmtrain.errors import ConfigError, DataError
from llmtrain.generate import SamplingConfig, generate
from llmtrain.interop.hub import resolve_model
from llmtrain.losses import lm_loss, ppo_policy_loss, ppo_value_loss
from llmtrain.metrics import Metrics, Progress
from llmtrain.rl import (answer_logprobs, answer_logprobs_and_entropy, gae, group_advantages, kl_estimate, kl_rewards, masked_mean,
                         masked_moments, minibatches, rollout_rows, sequence_kl, whiten)
from llmtrain.rl_models import Models, build_models, extra_state, resume
from llmtrain.scoring import evaluate_policy, score_texts
from llmtrain.styles import RULES
from llmtrain.tokenizer import Tokenizer, render_chat
from llmtrain.training import count_params, optimizer_step


@dataclass
class Prompts:
    """The prompts that fit the policy's context: training and held-out, and the note on those skipped."""
    train: list
    val: list
    n_long: int
    note: str


@dataclass
class Batch:
    """One iteration's answers on this process (N = rollout_batch x G rows, T tokens) and what the
    phases compute from them before the update; each phase fills in its own fields."""
    convs: list  # the conversation each row answers
    answers: list  # sampled token ids
    texts: list  # decoded answers, stop token stripped
    finished: torch.Tensor  # (N,) 1.0 where the answer ended with a stop token
    ids: torch.Tensor  # (N, T) prompt + answer rows, as rl.rollout_rows lays them out
    mask: torch.Tensor
    pos: torch.Tensor
    start: int  # the answers' span: the head runs at positions start..T-2, whose targets are the answer tokens
    amask: torch.Tensor  # (N, A) 1 at answer tokens, A = T-1-start: log-prob targets start+1..T-1
    rm_scores: torch.Tensor | None = None  # (2) (N,) the reward model's score
    scores: torch.Tensor | None = None  # (2) (N,) less the missing-end penalty
    first_epoch: list | None = None  # (3) the first epoch's minibatches (row indices)
    first_forward: tuple | None = None  # (3) the first minibatch's log-probs and values, with their graph: its first update
    old_logp: torch.Tensor | None = None  # (3) (N, A) each, zero where amask is
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    ent: torch.Tensor | None = None
    kl_k1: torch.Tensor | None = None  # (3) (N,) nats per answer
    kl_k3: torch.Tensor | None = None
    beta: float = 0.0  # (3) the KL coefficient of this iteration
    adv: torch.Tensor | None = None  # (4) (N, A)
    returns: torch.Tensor | None = None  # (4) PPO only
    ratio_dev: float = 0.0  # (5) new/old ratio's largest deviation from 1 before any update
    approx_kl: float = 0.0
    seconds: dict = field(default_factory=dict)  # each phase's wall time: rollout, score, old, reference, update

    @property
    def span(self) -> slice:
        """The positions whose next-token logits (and values) RL reads: the answers'."""
        return slice(self.start, self.ids.shape[1] - 1)


def group(cfg: PPOConfig) -> int:
    """Answers per prompt: G for GRPO/RLOO, 1 for PPO."""
    return 1 if cfg.algorithm == "ppo" else cfg.group_size


def check(cfg: PPOConfig) -> None:
    """Settings that cannot work together, named before any model is loaded; "auto" KL
    settings resolved for the algorithm."""
    grpo = cfg.algorithm == "grpo"
    est, place = cfg.kl.estimator, cfg.kl.placement
    if est == "auto":  # from the placement when that is given, else the algorithm's default
        est = "k3" if place == "loss" or (place == "auto" and grpo) else "k1"
    if place == "auto":  # from the estimator when that is given, else the algorithm's default
        place = "loss" if grpo and est == "k3" else "reward"
    cfg.kl.estimator, cfg.kl.placement = est, place
    if cfg.kl.placement == "loss" and cfg.kl.estimator != "k3":
        raise ConfigError("kl.placement=loss takes kl.estimator=k3 (as a loss, k1's expected gradient is zero)")
    if not cfg.policy or not cfg.reward_model:
        raise ConfigError("set policy (the SFT checkpoint) and reward_model (the reward checkpoint)")
    if cfg.run.compile:
        raise ConfigError(f"run.compile is not used by {cfg.algorithm} (generation changes shapes every step); leave it false")
    if cfg.algorithm != "ppo" and cfg.group_size < 2:
        raise ConfigError(f"group_size={cfg.group_size}: {cfg.algorithm} needs at least 2 answers per prompt")
    n = cfg.rollout_batch * group(cfg)
    if cfg.rollout_batch < 1 or cfg.minibatch < 1 or n % cfg.minibatch:
        raise ConfigError(f"minibatch={cfg.minibatch} must divide the {n} answers of an iteration (rollout_batch="
                          f"{cfg.rollout_batch}" + ("" if cfg.algorithm == "ppo" else f" x group_size={cfg.group_size}") + ")")
    if cfg.ppo_epochs < 1:
        raise ConfigError(f"ppo_epochs={cfg.ppo_epochs} must be at least 1")


def main(cfg: PPOConfig) -> Path:
    """Set up (prompts, models, resume), then each iteration the six phases in order; evaluate and save."""
    check(cfg)
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    sft_ckpt, tok_path, tok, mcfg = training.load_base(cfg.policy, "policy", "the SFT checkpoint", cfg.run.out_dir)
    cfg.reward_model = str(resolve_model(cfg.reward_model, run.out_dir, "reward_model")) if cfg.reward_model else ""
    bases = {"policy": str(sft_ckpt), "reward_model": str(checkpoint.resolve(cfg.reward_model))}
    prompts = load_prompts(cfg, tok, mcfg, sft_ckpt)  # before any model is loaded
    m = build_models(cfg, env, mcfg, sft_ckpt)
    ptx = TokenWindows(cfg.ptx_shards, "train", mcfg.max_seq_len, run.seed) if cfg.ptx_coef > 0 else None
    resumed, done = resume(Path(run.out_dir), m, env, cfg, bases)
    s = training.start(cfg.algorithm, cfg, m.policy, mcfg, tok_path, env, prepared=(m.train_ac, m.optimizer, resumed, done))
    training.announce(s, *setup_lines(cfg, m, env, s.log, prompts, sft_ckpt, mcfg.dim, s.start_step))
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tok.stop_ids)
    evaluating = env.is_main or m.sharded  # sharded: every forward is a collective
    if s.start_step == 0 and evaluating:
        evaluate(cfg, m, tok, prompts.val, env, s.log, 0)
    advantages = gae_advantages if cfg.algorithm == "ppo" else group_relative_advantages
    clock = Progress(s.start_step, run.max_steps, unit="iterations")  # times the loop for the closing line
    for it in range(s.start_step, run.max_steps):
        t_it = time.time()
        b = rollout(cfg, m, tok, sampling, prompts.train, env, it)  # (1)
        b.seconds["rollout"] = time.time() - t_it
        timed(b, "score", score, cfg, m, tok, b, env)  # (2)
        logprobs(cfg, m, b, env, it)  # (3) times "old" and "reference" itself
        advantages(cfg, b, env)  # (4)
        stats = timed(b, "update", update, cfg, m, b, ptx, env, it)  # (5)
        rec = log_iteration(cfg, m, b, stats, env, s.log, it, t_it)  # (6)
        d = it + 1
        if evaluating and ((run.eval_every and d % run.eval_every == 0) or d == run.max_steps):
            evaluate(cfg, m, tok, prompts.val, env, s.log, d)
        if (run.save_every and d % run.save_every == 0) or d == run.max_steps:
            training.save(s, d, {"tokens": 0, "bases": bases, **rec, "beta": m.kl_ctl.value},
                          extra_state=extra_state(m, cfg.lora.enabled), train_module=m.ac)
    return training.finish(s, clock)


def timed(b: Batch, phase: str, fn, *args):
    """fn(*args), its wall time kept as b.seconds[phase] (logged per iteration as seconds_<phase>)."""
    t = time.time()
    out = fn(*args)
    b.seconds[phase] = b.seconds.get(phase, 0.0) + time.time() - t
    return out


def load_prompts(cfg: PPOConfig, tok: Tokenizer, mcfg, sft_ckpt: Path) -> Prompts:
    """The same every-Nth split as SFT, so held-out prompts were never trained on. A prompt that
    leaves fewer than max_new_tokens of the policy's context is skipped (counted, logged), never
    a crash at the iteration that draws it."""
    room = prompt_room(mcfg.max_seq_len, cfg.max_new_tokens, "max_new_tokens", f" of the policy {sft_ckpt}")
    train_p, val_p = split(read_prompts(cfg.prompts, columns=cfg.prompt_columns), cfg.val_every)
    n_train, n_val = len(train_p), len(val_p)
    train_p, long_train = fit_prompts(tok, train_p, room)
    val_p, long_val = fit_prompts(tok, val_p, room)
    if not train_p:
        raise DataError(f"{cfg.prompts}: none of its {n_train} training prompts fits: each may have at most {room} tokens "
                        f"(the policy's context window of {mcfg.max_seq_len} tokens, max_seq_len of {sft_ckpt}, "
                        f"less max_new_tokens={cfg.max_new_tokens}); the shortest has {min(long_train)} tokens")
    note = (f"{cfg.algorithm}: {len(long_train)} of {n_train} training and {len(long_val)} of {n_val} held-out prompts "
            f"in {cfg.prompts} longer than {room} tokens skipped (context window {mcfg.max_seq_len} - max_new_tokens "
            f"{cfg.max_new_tokens})") if long_train or long_val else ""
    return Prompts(train_p, val_p[: cfg.eval_prompts or None], len(long_train) + len(long_val), note)


def setup_lines(cfg: PPOConfig, m: Models, env, log: Metrics, prompts: Prompts, sft_ckpt: Path, dim: int,
                step: int) -> list[str]:
    """The setup record (logged) and the opening lines: models, prompts, what is trained."""
    trainable, total = count_params(m.ac)
    if m.value is not None:
        model_note = f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M policy+value parameters trainable"
    else:
        # What PPO would also hold: a value model (the reward model's size; with LoRA its
        # adapters and head) with its gradients and AdamW state, 16 bytes a parameter in fp32.
        rm_params = sum(p.numel() for p in m.reward_model.parameters())
        saved = 16 * ((trainable + dim) if cfg.lora.enabled else rm_params)
        model_note = (f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M policy parameters trainable; no value model: "
                      f"{saved / 2**20:,.1f} MB of value weights, gradients and AdamW state not held")
    log.log(step, "setup", trainable_params=trainable, total_params=total, lora=cfg.lora.enabled,
            algorithm=cfg.algorithm, long_prompts_skipped=prompts.n_long)
    line = (f"{cfg.algorithm}: policy {sft_ckpt}, reward model {checkpoint.resolve(cfg.reward_model)}; "
            f"{len(prompts.train)} train / {len(prompts.val)} held-out prompts; {cfg.rollout_batch} prompts x {group(cfg)} "
            f"answers per iteration per process; {model_note} ({m.note}); KL {cfg.kl.estimator}"
            f"{' as a loss term' if cfg.kl.placement == 'loss' else ' in the reward'}; reward offset "
            f"{m.norm.get('offset', 0):.3f}; rollouts in {'bf16' if m.rollout_dtype == torch.bfloat16 else 'fp32'}, "
            f"reference and reward model in {m.frozen_precision}; {env.world} process(es) on {env.device}")
    return [line, prompts.note] if prompts.note else [line]


def evaluate(cfg: PPOConfig, m: Models, tok: Tokenizer, val_p: list, env, log: Metrics, it: int) -> None:
    with dist.autocast(env.device, cfg.run.precision):
        r = evaluate_policy(m.policy, tok, m.reward_model, m.norm, val_p, cfg.max_new_tokens,
                           RULES[cfg.true_rule] if cfg.true_rule else None)
    log.log(it, "eval", **{k: v for k, v in r.items() if k != "answers"})
    log.print(f"iter {it:>4} | held-out reward {r['reward']:+.3f}" +
              (f" | true score ({cfg.true_rule}) {r['true_score']:+.3f}" if cfg.true_rule else ""))


def epoch_minibatches(cfg: PPOConfig, env, it: int, epoch: int) -> list:
    """This process's minibatches of one epoch, drawn for the global batch (rl.minibatches)."""
    n_local = cfg.rollout_batch * group(cfg)
    return minibatches(n_local * env.world, n_local // cfg.minibatch, [cfg.run.seed, it, epoch], env.rank, env.world)


def rollout(cfg: PPOConfig, m: Models, tok: Tokenizer, sampling: SamplingConfig, train_p: list, env, it: int) -> Batch:
    """(1) The policy answers a batch of prompts (GRPO/RLOO: a group of G rows per prompt), sampled
    with the KV cache. Prompts and random numbers are drawn for the global batch and sliced, so
    each answer is the same on any number of processes."""
    run, G = cfg.run, group(cfg)
    n_local = cfg.rollout_batch * G
    rng = np.random.default_rng([run.seed, it])
    n_prompts = cfg.rollout_batch * env.world
    pick = rng.choice(len(train_p), size=n_prompts, replace=len(train_p) < n_prompts)
    mine = pick[env.rank * cfg.rollout_batch:(env.rank + 1) * cfg.rollout_batch]
    convs = [train_p[i] for i in mine for _ in range(G)]
    prompt_ids = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
    gen = torch.Generator(device=env.device).manual_seed(run.seed * 100003 + it * 101)
    # The policy's weights sample through a decoding copy (llmtrain.model.decoder) in the
    # rollout precision, packed once per iteration; a sharded policy runs its own forward.
    with dist.autocast(env.device, run.precision):
        answers = generate(m.policy, prompt_ids, sampling, pad_id=tok.pad_id, generator=gen,
                           rows=(env.rank * n_local, n_local * env.world), dtype=m.rollout_dtype)
    finished = torch.tensor([bool(a) and a[-1] in sampling.stop_ids for a in answers], dtype=torch.float32)
    texts = [tok.decode(a[:-1] if f else a, skip_special=True).strip() for a, f in zip(answers, finished.tolist())]
    ids, mask, pos, amask = (t.to(env.device) for t in rollout_rows(prompt_ids, answers, tok.pad_id))
    start = max(len(p) for p in prompt_ids) - 1  # every answer starts after the longest prompt
    return Batch(convs, answers, texts, finished, ids, mask, pos, start, amask[:, start:])


def score(cfg: PPOConfig, m: Models, tok: Tokenizer, b: Batch, env) -> None:
    """(2) The reward model on (prompt, answer); an answer cut off without an end pays missing_eos_penalty."""
    with dist.autocast(env.device, m.frozen_precision):
        b.rm_scores = torch.tensor(score_texts(m.reward_model, tok, list(zip(b.convs, b.texts, map(bool, b.finished.tolist()))),
                                               offset=m.norm.get("offset", 0.0)))
    b.scores = (b.rm_scores - cfg.missing_eos_penalty * (1 - b.finished)).to(env.device)


@torch.no_grad()
def logprobs(cfg: PPOConfig, m: Models, b: Batch, env, it: int) -> None:
    """(3) Old log-probs (and values) in the first epoch's minibatches, under the update's
    autocast, so the first update step sees exactly these numbers; the reference's; each
    answer's KL to the reference (k1 and k3); this iteration's KL coefficient. Heads run at
    the answers' positions only (b.span)."""
    dev, amask, span = env.device, b.amask, b.span
    b.first_epoch = epoch_minibatches(cfg, env, it, 0)
    b.old_logp, b.ref_logp = torch.zeros_like(amask), torch.zeros_like(amask)
    b.old_values, b.ent = torch.zeros_like(amask), torch.zeros_like(amask)
    t_old = t_ref = 0.0
    # The first minibatch last, through the module the update trains and with its graph kept:
    # its log-probs and values are those the update's first step would compute again (the
    # weights have not moved), so that step backpropagates through this forward instead.
    for i in [*range(1, len(b.first_epoch)), 0]:
        mb = b.first_epoch[i]
        ids, mask, pos = b.ids[mb], b.mask[mb], b.pos[mb]
        t = time.time()
        with torch.set_grad_enabled(i == 0):
            with dist.autocast(dev, cfg.run.precision):
                logits, v = (m.train_ac if i == 0 else m.ac)(ids, mask, pos, span)
            logp, b.ent[mb] = answer_logprobs_and_entropy(logits, ids, b.start)
        b.old_logp[mb] = logp.detach()
        if m.value is not None:
            b.old_values[mb] = v.detach().float()
        if i == 0:
            b.first_forward = (logp, v)
        t_old, t = t_old + time.time() - t, time.time()
        with dist.autocast(dev, m.frozen_precision):
            b.ref_logp[mb] = answer_logprobs(m.reference(ids, mask, pos, span=span), ids, b.start)
        t_ref += time.time() - t
    b.seconds["old"], b.seconds["reference"] = t_old, t_ref
    b.old_values *= amask
    b.kl_k1 = sequence_kl(b.old_logp, b.ref_logp, amask, "k1")  # per answer, nats
    b.kl_k3 = sequence_kl(b.old_logp, b.ref_logp, amask, "k3")
    b.beta = m.kl_ctl.value


def kl_penalty(cfg: PPOConfig, beta: float) -> float:
    """The KL coefficient in the reward: none when the KL is a loss term instead."""
    return 0.0 if cfg.kl.placement == "loss" else beta


@torch.no_grad()
def gae_advantages(cfg: PPOConfig, b: Batch, env) -> None:
    """(4) PPO: reward_t = -beta KL_t (+ the score on the last token); GAE against the value
    model's estimates; whitened over all processes."""
    rewards, _ = kl_rewards(b.old_logp, b.ref_logp, b.amask, b.scores, kl_penalty(cfg, b.beta), cfg.kl.estimator)
    b.adv, b.returns = gae(rewards, b.old_values, b.amask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        b.adv = whiten(b.adv, b.amask, all_reduce_sum=partial(dist.all_reduce_sum, env=env))


@torch.no_grad()
def group_relative_advantages(cfg: PPOConfig, b: Batch, env) -> None:
    """(4) GRPO/RLOO: each answer's score (- beta x its KL) against the other answers to its prompt."""
    seq_reward = b.scores - kl_penalty(cfg, b.beta) * (b.kl_k1 if cfg.kl.estimator == "k1" else b.kl_k3)
    b.adv = group_advantages(seq_reward, cfg.group_size, cfg.algorithm)[:, None] * b.amask


def update(cfg: PPOConfig, m: Models, b: Batch, ptx: TokenWindows | None, env, it: int) -> dict[str, list]:
    """(5) Several epochs of minibatch updates. Each process's loss is its share of the global
    token mean (DDP averages gradients), so any number of processes computes the same update.
    Returns each loss term per minibatch; sets the ratio's deviation before any update."""
    dev, reduce_sum = env.device, partial(dist.all_reduce_sum, env=env)
    stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "ptx_loss": [], "kl_loss": []}
    for epoch in range(cfg.ppo_epochs):
        for mb_i, mb in enumerate(b.first_epoch if epoch == 0 else epoch_minibatches(cfg, env, it, epoch)):
            ids, am = b.ids[mb], b.amask[mb]
            if epoch == 0 and mb_i == 0:  # computed by logprobs, graph and all
                (logp, values), b.first_forward = b.first_forward, None
            else:
                with dist.autocast(dev, cfg.run.precision):
                    logits, values = m.train_ac(ids, b.mask[mb], b.pos[mb], b.span)
                logp = answer_logprobs(logits, ids, b.start)
            n_tokens = reduce_sum(am.sum()).clamp(min=1)  # this minibatch's answer tokens, all processes
            share = env.world * am.sum() / n_tokens
            pg_loss, clipfrac = ppo_policy_loss(logp, b.old_logp[mb], b.adv[mb], am, cfg.clip)
            loss = pg_loss * share
            if epoch == 0 and mb_i == 0:  # the ratio before any update: exactly 1 when all is right
                log_ratio = (logp - b.old_logp[mb]).detach()
                b.ratio_dev = float(dist.all_reduce_max(((log_ratio.exp() - 1).abs() * am).max(), env))
                b.approx_kl = float(reduce_sum(((log_ratio.exp() - 1 - log_ratio) * am).sum()) / n_tokens)
            if m.value is not None:
                vf_loss = ppo_value_loss(values.float(), b.old_values[mb], b.returns[mb], am, cfg.value_clip)
                loss = loss + cfg.vf_coef * vf_loss * share
                stats["vf_loss"].append(float(vf_loss.detach()))
            if cfg.kl.placement == "loss":
                kl_loss = masked_mean(torch.where(am > 0, kl_estimate(logp, b.ref_logp[mb], "k3"), 0.0), am)
                loss = loss + b.beta * kl_loss * share
                stats["kl_loss"].append(float(kl_loss.detach()))
            if ptx is not None:
                x, y = ptx.batch(it * 1000 + epoch * 100 + mb_i, cfg.ptx_batch, rank=env.rank, world=env.world)
                with dist.autocast(dev, cfg.run.precision):
                    ptx_loss = lm_loss(m.policy(x.to(dev)), y.to(dev))
                loss = loss + cfg.ptx_coef * ptx_loss
                stats["ptx_loss"].append(float(ptx_loss.detach()))
            loss.backward()
            optimizer_step(m.ac, m.optimizer, cfg.optim.grad_clip)
            stats["pg_loss"].append(float(pg_loss.detach()))
            stats["clipfrac"].append(float(clipfrac.detach()))
    return stats


def global_mean(x, env) -> float:
    return float(dist.all_reduce_mean(torch.as_tensor(x, dtype=torch.float32, device=env.device), env))


def log_iteration(cfg: PPOConfig, m: Models, b: Batch, stats: dict, env, log: Metrics, it: int, t_it: float) -> dict:
    """(6) Means over all processes: reward, KL, ratio before the update, entropy, clip fraction,
    value loss, lengths; a few samples. Moves the KL controller. Returns the record logged."""
    run, G, mean = cfg.run, group(cfg), partial(global_mean, env=env)
    reduce_sum = partial(dist.all_reduce_sum, env=env)
    k1, k3 = mean(b.kl_k1.mean()), mean(b.kl_k3.mean())
    mean_kl = k1 if cfg.kl.estimator == "k1" else k3
    m.kl_ctl.update(mean_kl, cfg.rollout_batch * G * env.world)
    rec = {
        "reward": mean(b.rm_scores.mean()), "score_with_penalty": mean(b.scores.mean()), "kl": mean_kl,
        "kl_k1": k1, "kl_k3": k3, "beta": b.beta, "approx_kl": b.approx_kl, "ratio_dev": b.ratio_dev,
        "entropy": float(reduce_sum((b.ent * b.amask).sum()) / reduce_sum(b.amask.sum()).clamp(min=1)),
        "clipfrac": mean(np.mean(stats["clipfrac"])), "first_clipfrac": mean(stats["clipfrac"][0]),
        "pg_loss": mean(np.mean(stats["pg_loss"])), "response_length": mean(b.amask.sum(1).mean()),
        "finished": mean(b.finished.mean()), "seconds": time.time() - t_it, "peak_memory_mb": dist.peak_memory_mb(env.device),
        **{f"seconds_{k}": v for k, v in b.seconds.items()},
    }
    if m.value is not None:
        _, var_ret = masked_moments(b.returns, b.amask, reduce_sum)
        _, var_err = masked_moments(b.returns - b.old_values, b.amask, reduce_sum)
        rec["vf_loss"] = mean(np.mean(stats["vf_loss"]))
        rec["explained_variance"] = 1 - float(var_err / var_ret) if var_ret > 0 else float("nan")
    else:
        rec["reward_std_in_group"] = mean(b.scores.view(-1, G).std(1).mean())
    for k in ("ptx_loss", "kl_loss"):
        if stats[k]:
            rec[k] = mean(np.mean(stats[k]))
    d = it + 1
    log.log(d, "train", **rec)
    if d % run.log_every == 0 or d == run.max_steps:
        log.print(f"iter {d:>4}/{run.max_steps} | reward {rec['reward']:+.3f} | kl {rec['kl']:.3f} | beta {rec['beta']:.4f} "
                  f"| entropy {rec['entropy']:.2f} | clip {rec['clipfrac']:.2f} | ratio_dev {rec['ratio_dev']:.1e} "
                  + (f"| vf {rec['vf_loss']:.3f} | ev {rec['explained_variance']:.2f} " if m.value is not None else "")
                  + f"| len {rec['response_length']:.1f} | {rec['seconds']:.1f}s")
        log.log(d, "samples", samples=[{"prompt": last_user(c), "answer": t} for c, t in list(zip(b.convs, b.texts))[:3 * G:G]])
    return rec
