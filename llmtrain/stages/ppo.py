"""Stage 3b, RLHF: the policy writes answers, the reward model scores them, the policy is
updated to score better, held near the fine-tuned model by a KL penalty. Three algorithms:

    llmtrain ppo  policy=runs/sft reward_model=runs/reward      PPO: policy + value model, GAE
    llmtrain grpo policy=runs/sft reward_model=runs/reward      GRPO: G answers per prompt, no value model
    llmtrain rloo policy=runs/sft reward_model=runs/reward      RLOO: G answers per prompt, no value model

PPO's models: the policy (from the SFT checkpoint; all, some (freeze) or LoRA weights
trained), the value model (from the reward model, as in InstructGPT), and, without
gradients, the reference (the SFT model) and the reward model, optionally in bf16. With LoRA
the frozen two are not copies: the reference is the policy with its adapters off, and the
reward model is the value model's backbone with its adapters off under the reward model's
own head, so two models sit in memory instead of four.

GRPO and RLOO (critic-free) sample G answers to each prompt and judge each answer against the
others to the same prompt (llmtrain.rl.group_advantages); they hold no value model, so no
second trainable model, its gradients or its optimizer state.

Every model runs in eval mode throughout (no dropout; as TRL's PPO), and everything an
iteration computes before its update (samples, old log-probs, values, reference, reward) runs
under the same autocast as the update, in the same batches as the first epoch's minibatches:
before the first update the new/old ratio is exactly 1 (logged as `ratio_dev`).

Each iteration, in the numbered phases marked below:
 (1) rollouts   sample answers to a batch of prompts (batched, KV cache; G per prompt for GRPO/RLOO)
 (2) score      reward model on (prompt, answer), minus a penalty if cut off without an end
 (3) log-probs  old log-probs (and values) of the policy, the reference's; per-token KL (k1 and k3)
 (4) advantage  PPO: reward_t = -beta KL_t (+ score on the last token), GAE, whitened over all
                processes. GRPO/RLOO: score (- beta sum KL), against its group. With kl.in_loss
                the KL is a loss term instead (beta x mean k3).
 (5) update     several epochs of minibatches: clipped policy loss (+ clipped value loss)
                (+ KL term) (+ PPO-ptx: a pretraining loss)
 (6) log        reward, KL, ratio before the update, entropy, clip fraction, value loss, lengths, samples
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from llmtrain import checkpoint, dist
from llmtrain.config import PPOConfig, to_dict
from llmtrain.data.prompts import fit_prompts, last_user, prompt_room, read_prompts
from llmtrain.data.sft import split
from llmtrain.errors import CheckpointError, ConfigError, DataError
from llmtrain.generate import SamplingConfig, generate
from llmtrain.losses import lm_loss, ppo_policy_loss, ppo_value_loss
from llmtrain.metrics import Metrics, fmt_duration
from llmtrain.model import Transformer
from llmtrain.model.adapters import adapters_off, apply_lora, freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.rl import (AdaptiveKL, FixedKL, entropy_from_logits, gae, group_advantages, kl_estimate, kl_rewards,
                         masked_mean, masked_moments, minibatches, rollout_rows, sequence_kl, token_logprobs, whiten)
from llmtrain.scoring import evaluate_policy, load_reward_model, score_texts
from llmtrain.tokenizer import Tokenizer, render_chat
from llmtrain.training import build_optimizer, count_params, optimizer_step


class AdaptersOffScore(torch.nn.Module):
    """The reward model inside a LoRA value model: the value model's backbone with its adapters
    off (LoRA leaves the base weights, i.e. the reward model's, untouched) under a frozen copy
    of the reward model's head (the value head trains, this one does not)."""

    def __init__(self, body: ScoreModel, head: torch.nn.Linear):
        super().__init__()
        self.body, self.score, self.config = body, head, body.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As `ScoreModel.forward`: at each row's last token with `lengths`, else at every position."""
        with adapters_off(self.body):
            if lengths is None:
                return self.score(self.body.model(input_ids, attention_mask, position_ids))
            return self.score(self.body.last_hidden(input_ids, lengths))


class ActorCritic(torch.nn.Module):
    """Policy and value model (None for GRPO/RLOO) under one module, so one DDP wrapper and one
    optimizer serve both."""

    def __init__(self, policy: Transformer, value: ScoreModel | None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, ids, mask, pos):
        logits = self.policy(ids, mask, pos)
        return logits, (self.value.forward_tokens(ids, mask, pos)[..., 0] if self.value is not None else None)


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
    n = cfg.rollout_batch * (1 if cfg.algorithm == "ppo" else cfg.group_size)
    if cfg.rollout_batch < 1 or cfg.minibatch < 1 or n % cfg.minibatch:
        raise ConfigError(f"minibatch={cfg.minibatch} must divide the {n} answers of an iteration (rollout_batch="
                          f"{cfg.rollout_batch}" + ("" if cfg.algorithm == "ppo" else f" x group_size={cfg.group_size}") + ")")
    if cfg.ppo_epochs < 1:
        raise ConfigError(f"ppo_epochs={cfg.ppo_epochs} must be at least 1")


def main(cfg: PPOConfig) -> Path:
    check(cfg)
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    run_dir = Path(run.out_dir)
    dev = env.device
    critic = cfg.algorithm == "ppo"
    G = 1 if critic else cfg.group_size
    frozen_dtype = torch.bfloat16 if cfg.frozen_precision == "bf16" else torch.float32
    frozen_precision = "bf16" if cfg.frozen_precision == "bf16" else run.precision
    reduce_sum = lambda t: dist.all_reduce_sum(t, env)  # noqa: E731

    # ---- models
    sft_ckpt = checkpoint.resolve(cfg.policy)
    bases = {"policy": str(sft_ckpt), "reward_model": str(checkpoint.resolve(cfg.reward_model))}
    tok_path = checkpoint.tokenizer_of(sft_ckpt)
    tok = Tokenizer.load(tok_path)
    mcfg = checkpoint.model_config(sft_ckpt)

    # ---- prompts: the same every-Nth split as SFT, so held-out prompts were never trained on.
    # Lengths are checked here, before any model is loaded: a prompt that leaves fewer than
    # max_new_tokens of the policy's context is skipped (counted, logged below), never a crash
    # at the iteration that draws it.
    room = prompt_room(mcfg.max_seq_len, cfg.max_new_tokens, "max_new_tokens", f" of the policy {sft_ckpt}")
    train_p, val_p = split(read_prompts(cfg.prompts), cfg.val_every)
    n_train, n_val = len(train_p), len(val_p)
    train_p, long_train = fit_prompts(tok, train_p, room)
    val_p, long_val = fit_prompts(tok, val_p, room)
    if not train_p:
        raise DataError(f"{cfg.prompts}: none of its {n_train} training prompts fits: each may have at most {room} tokens "
                        f"(the policy's context window of {mcfg.max_seq_len} tokens, max_seq_len of {sft_ckpt}, "
                        f"less max_new_tokens={cfg.max_new_tokens}); the shortest has {min(long_train)} tokens")
    val_p = val_p[: cfg.eval_prompts or None]
    long_note = (f"{cfg.algorithm}: {len(long_train)} of {n_train} training and {len(long_val)} of {n_val} held-out prompts "
                 f"in {cfg.prompts} longer than {room} tokens skipped (context window {mcfg.max_seq_len} - max_new_tokens "
                 f"{cfg.max_new_tokens})") if long_train or long_val else ""

    torch.manual_seed(run.seed)
    policy = Transformer(mcfg)
    checkpoint.load_weights(sft_ckpt, policy)
    value = None
    if critic:
        value, _, norm = load_reward_model(cfg.reward_model, dev)  # the value model starts as the reward model

    if cfg.lora.enabled:
        n = apply_lora(policy, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        if critic:
            apply_lora(value, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
            rm_head = torch.nn.Linear(value.config.dim, 1, bias=False, device=dev)
            rm_head.load_state_dict(value.score.state_dict())
            rm_head.requires_grad_(False)
            value.score.weight.requires_grad_(True)  # the value head itself is always trained
            reward_model = AdaptersOffScore(value, rm_head)
        else:
            reward_model, _, norm = load_reward_model(cfg.reward_model, dev)
            reward_model.requires_grad_(False)
            reward_model.to(frozen_dtype)

        def reference(ids, mask, pos):
            with adapters_off(policy):
                return policy(ids, mask, pos)
        lora_note = f"LoRA r={cfg.lora.r} on {n} layers; the reference is the policy with its adapters off"
    else:
        reference = Transformer(mcfg)
        checkpoint.load_weights(sft_ckpt, reference)
        reference.requires_grad_(False)
        reference.to(dev, frozen_dtype).eval()
        reward_model, _, norm = load_reward_model(cfg.reward_model, dev)
        reward_model.requires_grad_(False)
        reward_model.to(frozen_dtype)
        freeze(policy, cfg.freeze.patterns, cfg.freeze.first_layers)
        if critic:
            freeze(value, cfg.freeze.patterns, cfg.freeze.first_layers)
        lora_note = "no LoRA"
    ac = ActorCritic(policy, value).to(dev).eval()  # eval mode throughout: no dropout in RL
    # ddp: one DDP wrapper over policy and value. fsdp: each sharded as its own root, so the
    # policy can also be called alone (rollouts, evaluation); reference and reward model are
    # replicated (frozen, no gradients, no optimizer state).
    sharded = run.strategy == "fsdp" and env.distributed
    if sharded and cfg.lora.enabled:
        raise ConfigError(f"{cfg.algorithm} with lora.enabled runs under run.strategy=ddp (adapters are small; "
                          "LoRA shares the frozen models' weights, which FSDP would shard)")
    if sharded:
        for m in (policy, value):
            if m is not None:
                dist.wrap(m, env, "fsdp", run.precision, run.activation_checkpointing)
        train_ac = ac
    else:
        train_ac = dist.wrap(ac, env, "ddp", run.precision, run.activation_checkpointing)
    optimizer = build_optimizer(ac, cfg.optim, dev)
    for g in optimizer.param_groups:
        g["lr"] = cfg.optim.lr
    kl_ctl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)

    ptx = None
    if cfg.ptx_coef > 0:
        from llmtrain.data.pretrain import TokenWindows

        ptx = TokenWindows(cfg.ptx_shards, "train", mcfg.max_seq_len, run.seed)

    start_it = 0
    steps = checkpoint.step_dirs(run_dir)
    if run.resume and steps:
        start_it = resume(steps[-1], ac, optimizer, kl_ctl, env, cfg.lora.enabled, sharded, bases, cfg.algorithm)

    log = Metrics(run_dir, enabled=env.is_main, tensorboard=run.tensorboard, resume_step=start_it if start_it else None)
    trainable, total = count_params(ac)
    if critic:
        model_note = f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M policy+value parameters trainable"
    else:
        # What PPO would also hold: a value model (the reward model's size; with LoRA its
        # adapters and head) with its gradients and AdamW state, 16 bytes a parameter in fp32.
        rm_params = sum(p.numel() for p in reward_model.parameters())
        saved = 16 * ((trainable + mcfg.dim) if cfg.lora.enabled else rm_params)
        model_note = (f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M policy parameters trainable; no value model: "
                      f"{saved / 2**20:,.1f} MB of value weights, gradients and AdamW state not held")
    log.print(f"{cfg.algorithm}: policy {sft_ckpt}, reward model {checkpoint.resolve(cfg.reward_model)}; "
              f"{len(train_p)} train / {len(val_p)} held-out prompts; {cfg.rollout_batch} prompts x {G} answers per "
              f"iteration per process; {model_note} ({lora_note}); KL {cfg.kl.estimator}"
              f"{' as a loss term' if cfg.kl.placement == 'loss' else ' in the reward'}; reward offset {norm.get('offset', 0):.3f}; "
              f"{env.world} process(es) on {dev}")
    if long_note:
        log.print(long_note)
    log.log(start_it, "setup", trainable_params=trainable, total_params=total, lora=cfg.lora.enabled,
            algorithm=cfg.algorithm, long_prompts_skipped=len(long_train) + len(long_val))
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, (tok.end_id, tok.eos_id))

    def evaluate(it: int) -> dict:
        with dist.autocast(dev, run.precision):
            r = evaluate_policy(policy, tok, reward_model, norm, val_p, cfg.max_new_tokens, cfg.true_rule)
        log.log(it, "eval", **{k: v for k, v in r.items() if k != "answers"})
        log.print(f"iter {it:>4} | held-out reward {r['reward']:+.3f}" +
                  (f" | true score ({cfg.true_rule}) {r['true_score']:+.3f}" if cfg.true_rule else ""))
        return r

    if start_it == 0 and (env.is_main or sharded):  # sharded: every forward is a collective
        evaluate(0)

    n_local = cfg.rollout_batch * G  # answers per iteration on this process
    n_global = n_local * env.world
    n_mb = n_local // cfg.minibatch
    t0 = time.time()
    for it in range(start_it, run.max_steps):
        t_it = time.time()
        rng = np.random.default_rng([run.seed, it])
        n_prompts = cfg.rollout_batch * env.world
        pick = rng.choice(len(train_p), size=n_prompts, replace=len(train_p) < n_prompts)
        mine = pick[env.rank * cfg.rollout_batch:(env.rank + 1) * cfg.rollout_batch]
        convs = [train_p[i] for i in mine for _ in range(G)]  # GRPO/RLOO: a group of G rows per prompt

        # (1) rollouts: the policy answers, sampled with the KV cache. The random numbers are
        # drawn for the global batch and sliced, so each answer is the same on any number of processes.
        prompt_ids = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
        gen = torch.Generator(device=dev).manual_seed(run.seed * 100003 + it * 101)
        with dist.autocast(dev, run.precision):
            answers = generate(policy, prompt_ids, sampling, pad_id=tok.pad_id, generator=gen,
                               rows=(env.rank * n_local, n_global))
        finished = torch.tensor([bool(a) and a[-1] in sampling.stop_ids for a in answers], dtype=torch.float32)
        texts = [tok.decode(a[:-1] if f else a, skip_special=True).strip() for a, f in zip(answers, finished.tolist())]

        # (2) score: the reward model on (prompt, answer); cut-off answers pay a penalty
        with dist.autocast(dev, frozen_precision):
            scores = torch.tensor(score_texts(reward_model, tok, list(zip(convs, texts, map(bool, finished.tolist()))),
                                              offset=norm.get("offset", 0.0)))
        rm_scores = scores.clone()
        scores = (scores - cfg.missing_eos_penalty * (1 - finished)).to(dev)

        # (3) old log-probs (and values) in the first epoch's minibatches, under the update's
        # autocast, so the first update step sees exactly these numbers; the reference's.
        ids, mask, pos, amask = (t.to(dev) for t in rollout_rows(prompt_ids, answers, tok.pad_id))
        first_epoch = minibatches(n_global, n_mb, [run.seed, it, 0], env.rank, env.world)
        old_logp, ref_logp = torch.zeros_like(amask), torch.zeros_like(amask)
        old_values, ent = torch.zeros_like(amask), torch.zeros_like(amask)
        with torch.no_grad():
            for mb in first_epoch:
                with dist.autocast(dev, run.precision):
                    logits, v = ac(ids[mb], mask[mb], pos[mb])
                old_logp[mb] = token_logprobs(logits, ids[mb])
                ent[mb] = entropy_from_logits(logits[:, :-1])
                if critic:
                    old_values[mb] = v[:, :-1].float()
                with dist.autocast(dev, frozen_precision):
                    ref_logp[mb] = token_logprobs(reference(ids[mb], mask[mb], pos[mb]), ids[mb]).float()
            old_values *= amask
            kl_k1 = sequence_kl(old_logp, ref_logp, amask, "k1")  # per answer, nats
            kl_k3 = sequence_kl(old_logp, ref_logp, amask, "k3")
            beta = kl_ctl.value
            # (4) advantages
            penalty = 0.0 if cfg.kl.placement == "loss" else beta
            if critic:
                rewards, _ = kl_rewards(old_logp, ref_logp, amask, scores, penalty, cfg.kl.estimator)
                adv, returns = gae(rewards, old_values, amask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    adv = whiten(adv, amask, all_reduce_sum=reduce_sum)
            else:
                seq_reward = scores - penalty * (kl_k1 if cfg.kl.estimator == "k1" else kl_k3)
                adv = group_advantages(seq_reward, G, cfg.algorithm)[:, None] * amask
                returns = None

        # (5) several epochs of minibatch updates. Each process's loss is its share of the
        # global token mean (DDP averages gradients), so any number of processes computes the
        # same update.
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "ptx_loss": [], "kl_loss": []}
        for epoch in range(cfg.ppo_epochs):
            epoch_mbs = first_epoch if epoch == 0 else minibatches(n_global, n_mb, [run.seed, it, epoch], env.rank, env.world)
            for mb_i, mb in enumerate(epoch_mbs):
                m = amask[mb]
                with dist.autocast(dev, run.precision):
                    logits, values = train_ac(ids[mb], mask[mb], pos[mb])
                logp = token_logprobs(logits, ids[mb])
                n_tokens = reduce_sum(m.sum()).clamp(min=1)  # this minibatch's answer tokens, all processes
                share = env.world * m.sum() / n_tokens
                pg_loss, clipfrac = ppo_policy_loss(logp, old_logp[mb], adv[mb], m, cfg.clip)
                loss = pg_loss * share
                if epoch == 0 and mb_i == 0:  # the ratio before any update: exactly 1 when all is right
                    log_ratio = (logp - old_logp[mb]).detach()
                    ratio_dev = float(dist.all_reduce_max(((log_ratio.exp() - 1).abs() * m).max(), env))
                    approx_kl = float(reduce_sum(((log_ratio.exp() - 1 - log_ratio) * m).sum()) / n_tokens)
                if critic:
                    vf_loss = ppo_value_loss(values[:, :-1].float(), old_values[mb], returns[mb], m, cfg.value_clip)
                    loss = loss + cfg.vf_coef * vf_loss * share
                    stats["vf_loss"].append(float(vf_loss.detach()))
                if cfg.kl.placement == "loss":
                    kl_loss = masked_mean(torch.where(m > 0, kl_estimate(logp, ref_logp[mb], "k3"), 0.0), m)
                    loss = loss + beta * kl_loss * share
                    stats["kl_loss"].append(float(kl_loss.detach()))
                if ptx is not None:
                    x, y = ptx.batch(it * 1000 + epoch * 100 + mb_i, cfg.ptx_batch, rank=env.rank, world=env.world)
                    with dist.autocast(dev, run.precision):
                        ptx_loss = lm_loss(policy(x.to(dev)), y.to(dev))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    stats["ptx_loss"].append(float(ptx_loss.detach()))
                loss.backward()
                optimizer_step(ac, optimizer, cfg.optim.grad_clip)
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["clipfrac"].append(float(clipfrac.detach()))

        # (6) log: means over all processes
        mean = lambda x: float(dist.all_reduce_mean(torch.as_tensor(x, dtype=torch.float32, device=dev), env))  # noqa: E731
        k1, k3 = mean(kl_k1.mean()), mean(kl_k3.mean())
        mean_kl = k1 if cfg.kl.estimator == "k1" else k3
        kl_ctl.update(mean_kl, n_global)
        rec = {
            "reward": mean(rm_scores.mean()), "score_with_penalty": mean(scores.mean()), "kl": mean_kl,
            "kl_k1": k1, "kl_k3": k3, "beta": beta, "approx_kl": approx_kl, "ratio_dev": ratio_dev,
            "entropy": float(reduce_sum((ent * amask).sum()) / reduce_sum(amask.sum()).clamp(min=1)),
            "clipfrac": mean(np.mean(stats["clipfrac"])), "first_clipfrac": mean(stats["clipfrac"][0]),
            "pg_loss": mean(np.mean(stats["pg_loss"])), "response_length": mean(amask.sum(1).mean()),
            "finished": mean(finished.mean()), "seconds": time.time() - t_it, "peak_memory_mb": dist.peak_memory_mb(dev),
        }
        if critic:
            _, var_ret = masked_moments(returns, amask, reduce_sum)
            _, var_err = masked_moments(returns - old_values, amask, reduce_sum)
            rec["vf_loss"] = mean(np.mean(stats["vf_loss"]))
            rec["explained_variance"] = 1 - float(var_err / var_ret) if var_ret > 0 else float("nan")
        else:
            rec["reward_std_in_group"] = mean(scores.view(-1, G).std(1).mean())
        for k in ("ptx_loss", "kl_loss"):
            if stats[k]:
                rec[k] = mean(np.mean(stats[k]))
        d = it + 1
        log.log(d, "train", **rec)
        if d % run.log_every == 0 or d == run.max_steps:
            log.print(f"iter {d:>4}/{run.max_steps} | reward {rec['reward']:+.3f} | kl {rec['kl']:.3f} | beta {rec['beta']:.4f} "
                      f"| entropy {rec['entropy']:.2f} | clip {rec['clipfrac']:.2f} | ratio_dev {rec['ratio_dev']:.1e} "
                      + (f"| vf {rec['vf_loss']:.3f} | ev {rec['explained_variance']:.2f} " if critic else "")
                      + f"| len {rec['response_length']:.1f} | {rec['seconds']:.1f}s")
            log.log(d, "samples", samples=[{"prompt": last_user(c), "answer": t} for c, t in list(zip(convs, texts))[:3 * G:G]])
        if (env.is_main or sharded) and ((run.eval_every and d % run.eval_every == 0) or d == run.max_steps):
            evaluate(d)
        if (run.save_every and d % run.save_every == 0) or d == run.max_steps:
            lora_state = {k: v.detach().cpu() for k, v in ac.state_dict().items() if ".lora_" in k}
            extra = {"lora": lora_state}
            if critic:
                extra["value"] = {} if sharded else value_state(value, cfg.lora.enabled)
            checkpoint.save(run_dir, d, policy, config={"model": to_dict(mcfg), "stage": cfg.algorithm, "config": to_dict(cfg)},
                            meta={"tokens": 0, "bases": bases, **rec, "beta": kl_ctl.value}, tokenizer_path=str(tok_path),
                            optimizer=optimizer, rng=dist.rng_state(), keep_last=run.keep_last, rank=env.rank,
                            barrier=lambda: dist.barrier(env), extra_state=extra, train_module=ac)
    log.print(f"{cfg.algorithm} done in {fmt_duration(time.time() - t0)}; peak memory {dist.peak_memory_mb(dev):,.0f} MB; "
              f"{'checkpoint in ' + str(run_dir / 'checkpoints') if checkpoint.step_dirs(run_dir) else 'no checkpoint written (run.max_steps=0)'}")
    log.close()
    dist.teardown()
    return run_dir


def value_state(value: ScoreModel, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the value model: all of it, or with LoRA only its head (its
    adapters are in the LoRA state, its base weights are the reward model's)."""
    if lora:
        return {"score.weight": value.score.weight.detach().cpu().clone()}
    return checkpoint.model_state(value)


def resume(step_dir: Path, ac: ActorCritic, optimizer, kl_ctl, env, lora: bool, sharded: bool = False,
           bases: dict | None = None, algorithm: str = "ppo") -> int:
    """Continue from an RL checkpoint: policy (and value model), optimizer, KL coefficient. With
    LoRA the base weights never changed (they are still those of the SFT and reward checkpoints
    the run started from): only the adapters and the value head are restored, exactly. A
    sharded run's checkpoint holds policy, value and optimizer in dcp/."""
    stage = checkpoint.read_config(step_dir).get("stage")
    if stage != algorithm:
        raise CheckpointError(f"{step_dir}: a {stage} checkpoint, but this run is {algorithm}; "
                              f"resume it with `llmtrain {stage}` or start {algorithm} in another run.out_dir")
    saved = checkpoint.read_meta(step_dir).get("bases")
    if lora and bases and saved and saved != bases:
        raise CheckpointError(f"{step_dir}: its LoRA adapters sit on {saved}, but this run starts from {bases}; "
                              "resume with the same policy and reward_model checkpoints")
    state = checkpoint.load_train_state(step_dir, env.rank)
    if sharded or (checkpoint.resolve(step_dir) / "dcp").is_dir():
        checkpoint.load_model_and_optimizer(step_dir, ac, optimizer, state)
    elif lora:
        ac.load_state_dict(state["extra"]["lora"], strict=False)
        if ac.value is not None:
            ac.value.score.weight.data.copy_(state["extra"]["value"]["score.weight"])
    else:
        checkpoint.load_weights(step_dir, ac.policy)
        if ac.value is not None:
            ac.value.load_state_dict(state["extra"]["value"], strict=False)
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state.get("rng"):
        dist.set_rng_state(state["rng"])
    meta = checkpoint.read_meta(step_dir)
    kl_ctl.value = meta.get("beta", kl_ctl.value)
    return meta["step"]
