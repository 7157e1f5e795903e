"""Stage 3b, RLHF with PPO: the policy writes answers, the reward model scores them, the policy
is updated to score better, held near the fine-tuned model by a KL penalty.

    llmtrain ppo -c configs/ppo.yaml policy=runs/sft reward_model=runs/reward

Models: the policy (from the SFT checkpoint; all, some (freeze) or LoRA weights trained),
the value model (from the reward model, as in InstructGPT), and, without gradients, the
reference (the SFT model) and the reward model, optionally in bf16. With LoRA the frozen two
are not copies: the reference is the policy with its adapters off, and the reward model is the
value model's backbone with its adapters off under the reward model's own head, so two models
sit in memory instead of four.

Each iteration, in the numbered phases marked below:
 (1) rollouts   sample answers to a batch of prompts (batched, KV cache)
 (2) score      reward model on (prompt, answer), minus a penalty if cut off without an end
 (3) KL         per-token log-probs of policy and reference; reward_t = -beta (log pi - log pi_ref),
                plus the score on the last answer token
 (4) advantage  values from the value head; GAE (gamma, lambda); whitened
 (5) update     several epochs of minibatches: clipped policy loss + clipped value loss
                (+ PPO-ptx: a pretraining loss)
 (6) log        reward, KL, entropy, clip fraction, value loss, explained variance, lengths, samples
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from llmtrain import checkpoint, dist
from llmtrain.config import PPOConfig, to_dict
from llmtrain.data.prompts import last_user, read_prompts
from llmtrain.data.sft import split
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.generate import SamplingConfig, generate
from llmtrain.losses import lm_loss, ppo_policy_loss, ppo_value_loss
from llmtrain.metrics import Metrics, fmt_duration
from llmtrain.model import Transformer
from llmtrain.model.adapters import adapters_off, apply_lora, freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.rl import AdaptiveKL, FixedKL, entropy_from_logits, gae, kl_rewards, masked_mean, token_logprobs, whiten
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
    """Policy and value model under one module, so one DDP wrapper and one optimizer serve both."""

    def __init__(self, policy: Transformer, value: ScoreModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, ids, mask, pos):
        return self.policy(ids, mask, pos), self.value.forward_tokens(ids, mask, pos)[..., 0]


def pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """[left pad | prompt | answer | right pad] rows -> ids, attention mask, position ids, and
    the answer mask over log-prob targets (B, T-1): 1 where the target token is an answer token."""
    Lp = max(len(p) for p in prompts)
    La = max(1, max(len(a) for a in answers))
    B = len(prompts)
    ids = torch.full((B, Lp + La), pad_id, dtype=torch.long)
    mask = torch.zeros((B, Lp + La), dtype=torch.long)
    amask = torch.zeros((B, Lp + La - 1), dtype=torch.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, Lp - len(p):Lp] = torch.tensor(p)
        mask[i, Lp - len(p):Lp + len(a)] = 1
        if a:
            ids[i, Lp:Lp + len(a)] = torch.tensor(a)
            amask[i, Lp - 1:Lp - 1 + len(a)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, amask


def main(cfg: PPOConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    run_dir = Path(run.out_dir)
    if not cfg.policy or not cfg.reward_model:
        raise ConfigError("set policy (the SFT checkpoint) and reward_model (the reward checkpoint)")
    dev = env.device
    frozen_dtype = torch.bfloat16 if cfg.frozen_precision == "bf16" else torch.float32

    # ---- models
    sft_ckpt = checkpoint.resolve(cfg.policy)
    bases = {"policy": str(sft_ckpt), "reward_model": str(checkpoint.resolve(cfg.reward_model))}
    tok_path = checkpoint.tokenizer_of(sft_ckpt)
    tok = Tokenizer.load(tok_path)
    mcfg = checkpoint.model_config(sft_ckpt)
    torch.manual_seed(run.seed)
    policy = Transformer(mcfg)
    checkpoint.load_weights(sft_ckpt, policy)
    value, _, norm = load_reward_model(cfg.reward_model, dev)  # the value model starts as the reward model

    if cfg.lora.enabled:
        n = apply_lora(policy, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        apply_lora(value, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        rm_head = torch.nn.Linear(value.config.dim, 1, bias=False, device=dev)
        rm_head.load_state_dict(value.score.state_dict())
        rm_head.requires_grad_(False)
        value.score.weight.requires_grad_(True)  # the value head itself is always trained
        reward_model = AdaptersOffScore(value, rm_head)

        def reference(ids, mask, pos):
            with adapters_off(policy):
                return policy(ids, mask, pos)
        lora_note = f"LoRA r={cfg.lora.r} on {n} layers; reference and reward model share their base weights"
    else:
        reference = Transformer(mcfg)
        checkpoint.load_weights(sft_ckpt, reference)
        reference.requires_grad_(False)
        reference.to(dev, frozen_dtype).eval()
        reward_model, _, _ = load_reward_model(cfg.reward_model, dev)
        reward_model.requires_grad_(False)
        reward_model.to(frozen_dtype)
        freeze(policy, cfg.freeze.patterns, cfg.freeze.first_layers)
        freeze(value, cfg.freeze.patterns, cfg.freeze.first_layers)
        lora_note = "no LoRA"
    value.train()
    ac = ActorCritic(policy, value).to(dev)
    # ddp: one DDP wrapper over policy and value. fsdp: each sharded as its own root, so the
    # policy can also be called alone (rollouts, evaluation); reference and reward model are
    # replicated (frozen, no gradients, no optimizer state).
    sharded = run.strategy == "fsdp" and env.distributed
    if run.compile:
        raise ConfigError("run.compile is not used by ppo (generation changes shapes every step); leave it false")
    if sharded and cfg.lora.enabled:
        raise ConfigError("ppo with lora.enabled runs under run.strategy=ddp (adapters are small; "
                          "LoRA shares the frozen models' weights, which FSDP would shard)")
    if sharded:
        for m in (policy, value):
            dist.wrap(m, env, "fsdp", run.precision, run.activation_checkpointing)
        train_ac = ac
    else:
        train_ac = dist.wrap(ac, env, "ddp", run.precision, run.activation_checkpointing)
    optimizer = build_optimizer(ac, cfg.optim, dev)
    for g in optimizer.param_groups:
        g["lr"] = cfg.optim.lr
    kl_ctl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)

    # ---- prompts: the same every-Nth split as SFT, so held-out prompts were never trained on
    train_p, val_p = split(read_prompts(cfg.prompts), cfg.val_every)
    val_p = val_p[: cfg.eval_prompts or None]
    ptx = None
    if cfg.ptx_coef > 0:
        from llmtrain.data.pretrain import TokenWindows

        ptx = TokenWindows(cfg.ptx_shards, "train", mcfg.max_seq_len, run.seed)

    start_it = 0
    steps = checkpoint.step_dirs(run_dir)
    if run.resume and steps:
        start_it = resume(steps[-1], ac, optimizer, kl_ctl, env, cfg.lora.enabled, sharded, bases)

    log = Metrics(run_dir, enabled=env.is_main, tensorboard=run.tensorboard, resume_step=start_it if start_it else None)
    trainable, total = count_params(ac)
    log.print(f"ppo: policy {sft_ckpt}, reward model {checkpoint.resolve(cfg.reward_model)}; {len(train_p)} train / "
              f"{len(val_p)} held-out prompts; {trainable / 1e6:.3f}M of {total / 1e6:.2f}M policy+value parameters "
              f"trainable ({lora_note}); reward offset {norm.get('offset', 0):.3f}; {env.world} process(es) on {dev}")
    log.log(start_it, "setup", trainable_params=trainable, total_params=total, lora=cfg.lora.enabled)
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

    t0 = time.time()
    for it in range(start_it, run.max_steps):
        t_it = time.time()
        rng = np.random.default_rng([run.seed, it])
        pick = rng.choice(len(train_p), size=cfg.rollout_batch * env.world, replace=len(train_p) < cfg.rollout_batch * env.world)
        convs = [train_p[i] for i in pick[env.rank * cfg.rollout_batch:(env.rank + 1) * cfg.rollout_batch]]

        # (1) rollouts: the policy answers, sampled with the KV cache
        prompt_ids = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
        gen = torch.Generator(device=dev).manual_seed(run.seed * 100003 + it * 101 + env.rank)
        with dist.autocast(dev, run.precision):
            answers = generate(policy, prompt_ids, sampling, pad_id=tok.pad_id, generator=gen)
        finished = torch.tensor([bool(a) and a[-1] in sampling.stop_ids for a in answers], dtype=torch.float32)
        texts = [tok.decode(a[:-1] if f else a, skip_special=True).strip() for a, f in zip(answers, finished.tolist())]

        # (2) score: the reward model on (prompt, answer); cut-off answers pay a penalty
        with dist.autocast(dev, cfg.frozen_precision):
            scores = torch.tensor(score_texts(reward_model, tok, list(zip(convs, texts, map(bool, finished.tolist()))),
                                              offset=norm.get("offset", 0.0)))
        rm_scores = scores.clone()
        scores = scores - cfg.missing_eos_penalty * (1 - finished)

        ids, mask, pos, amask = (t.to(dev) for t in pack(prompt_ids, answers, tok.pad_id))
        with torch.no_grad():
            # (3) log-probs of policy and reference; per-token KL penalty plus the score
            logits, old_values = ac(ids, mask, pos)
            old_logp = token_logprobs(logits, ids)
            entropy = masked_mean(entropy_from_logits(logits[:, :-1]), amask)
            with dist.autocast(dev, cfg.frozen_precision):
                ref_logp = token_logprobs(reference(ids, mask, pos), ids)
            rewards, kl = kl_rewards(old_logp, ref_logp.float(), amask, scores.to(dev), kl_ctl.value)
            # (4) values and GAE advantages, whitened
            old_values = old_values[:, :-1].float() * amask
            adv, returns = gae(rewards, old_values, amask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, amask)

        # (5) several epochs of minibatch updates, clipped policy and value losses
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "ptx_loss": []}
        n = len(convs)
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng([run.seed, it, epoch]).permutation(n)
            for mb_i, s in enumerate(range(0, n, cfg.minibatch)):
                mb = torch.tensor(order[s:s + cfg.minibatch], device=dev)
                with dist.autocast(dev, run.precision):
                    logits, values = train_ac(ids[mb], mask[mb], pos[mb])
                logp = token_logprobs(logits, ids[mb])
                pg_loss, clipfrac = ppo_policy_loss(logp, old_logp[mb], adv[mb], amask[mb], cfg.clip)
                vf_loss = ppo_value_loss(values[:, :-1].float(), old_values[mb], returns[mb], amask[mb], cfg.value_clip)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if ptx is not None:
                    x, y = ptx.batch(it * 1000 + epoch * 100 + mb_i, cfg.ptx_batch, rank=env.rank, world=env.world)
                    with dist.autocast(dev, run.precision):
                        ptx_loss = lm_loss(policy(x.to(dev)), y.to(dev))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    stats["ptx_loss"].append(float(ptx_loss.detach()))
                loss.backward()
                optimizer_step(ac, optimizer, cfg.optim.grad_clip)
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["vf_loss"].append(float(vf_loss.detach()))
                stats["clipfrac"].append(float(clipfrac.detach()))

        # (6) log
        seq_kl = (kl.sum(1)).mean()
        mean_kl = float(dist.all_reduce_mean(seq_kl.detach(), env))
        kl_ctl.update(mean_kl, cfg.rollout_batch * env.world)
        var_ret = float(torch.var(returns[amask > 0]))
        explained = 1 - float(torch.var((returns - old_values)[amask > 0])) / var_ret if var_ret > 0 else float("nan")
        mean = lambda x: float(dist.all_reduce_mean(torch.as_tensor(x, dtype=torch.float32, device=dev), env))  # noqa: E731
        rec = {  # means over all processes (explained variance: this process's)
            "reward": mean(rm_scores.mean()), "score_with_penalty": mean(scores.mean()), "kl": mean_kl,
            "beta": kl_ctl.value, "entropy": mean(entropy), "clipfrac": mean(np.mean(stats["clipfrac"])),
            "pg_loss": mean(np.mean(stats["pg_loss"])), "vf_loss": mean(np.mean(stats["vf_loss"])),
            "explained_variance": explained, "response_length": mean(amask.sum(1).mean()),
            "finished": mean(finished.mean()), "seconds": time.time() - t_it,
            "peak_memory_mb": dist.peak_memory_mb(dev),
        }
        if stats["ptx_loss"]:
            rec["ptx_loss"] = float(np.mean(stats["ptx_loss"]))
        d = it + 1
        log.log(d, "train", **rec)
        if d % run.log_every == 0 or d == run.max_steps:
            log.print(f"iter {d:>4}/{run.max_steps} | reward {rec['reward']:+.3f} | kl {rec['kl']:.3f} | beta {rec['beta']:.4f} "
                      f"| entropy {rec['entropy']:.2f} | clip {rec['clipfrac']:.2f} | vf {rec['vf_loss']:.3f} "
                      f"| ev {rec['explained_variance']:.2f} | len {rec['response_length']:.1f} | {rec['seconds']:.1f}s")
            log.log(d, "samples", samples=[{"prompt": last_user(c), "answer": t} for c, t in list(zip(convs, texts))[:3]])
        if (env.is_main or sharded) and ((run.eval_every and d % run.eval_every == 0) or d == run.max_steps):
            evaluate(d)
        if (run.save_every and d % run.save_every == 0) or d == run.max_steps:
            lora_state = {k: v.detach().cpu() for k, v in ac.state_dict().items() if ".lora_" in k}
            checkpoint.save(run_dir, d, policy, config={"model": to_dict(mcfg), "stage": "ppo", "config": to_dict(cfg)},
                            meta={"tokens": 0, "beta": kl_ctl.value, "bases": bases, **rec}, tokenizer_path=str(tok_path),
                            optimizer=optimizer, rng=dist.rng_state(), keep_last=run.keep_last, rank=env.rank,
                            barrier=lambda: dist.barrier(env),
                            extra_state={"value": {} if sharded else value_state(value, cfg.lora.enabled),
                                         "lora": lora_state}, train_module=ac)
    log.print(f"ppo done in {fmt_duration(time.time() - t0)}; peak memory {dist.peak_memory_mb(dev):,.0f} MB; "
              f"checkpoint in {run_dir / 'checkpoints'}")
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
           bases: dict | None = None) -> int:
    """Continue from a PPO checkpoint: policy and value model, optimizer, KL coefficient. With
    LoRA the base weights never changed (they are still those of the SFT and reward checkpoints
    the run started from): only the adapters and the value head are restored, exactly. A
    sharded run's checkpoint holds policy, value and optimizer in dcp/."""
    saved = checkpoint.read_meta(step_dir).get("bases")
    if lora and bases and saved and saved != bases:
        raise CheckpointError(f"{step_dir}: its LoRA adapters sit on {saved}, but this run starts from {bases}; "
                              "resume with the same policy and reward_model checkpoints")
    state = checkpoint.load_train_state(step_dir, env.rank)
    if sharded or (checkpoint.resolve(step_dir) / "dcp").is_dir():
        checkpoint.load_model_and_optimizer(step_dir, ac, optimizer, state)
    elif lora:
        ac.load_state_dict(state["extra"]["lora"], strict=False)
        ac.value.score.weight.data.copy_(state["extra"]["value"]["score.weight"])
    else:
        checkpoint.load_weights(step_dir, ac.policy)
        ac.value.load_state_dict(state["extra"]["value"], strict=False)
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state.get("rng"):
        dist.set_rng_state(state["rng"])
    meta = checkpoint.read_meta(step_dir)
    kl_ctl.value = meta.get("beta", kl_ctl.value)
    return meta["step"]
