"""Compare two checkpoints on held-out prompts: `llmtrain evaluate a=runs/sft b=runs/ppo reward_model=runs/reward`.

For each held-out prompt both models answer greedily. Reported: the mean reward-model score
of each, the win rate of b over a by the reward model (ties count half), and, with a
simulated rule (`true_rule`), the win rate by that rule: the *true* preference. A policy
that games the reward model shows a high reward-model win rate and a low true one
(`hacking_gap`, the first minus the second).

Collapse shows in the greedy answers of each model: `distinct_*`, the share of distinct
answers over the prompts, `distinct2_*`, distinct word bigrams over all bigrams, and
`mean_words_*`. `kl_b` is KL(b || a) in nats per answer (a is the SFT model, the reference of
every RL method): on one answer per prompt sampled from b at temperature 1, the mean of the sum
of log pi_b - log pi_a over the answer's tokens; `kl_b_k3` the same with the k3 estimator. So
every method, DPO too (which logs no KL), has one comparable figure.

With `samples` = n > 0, each model also samples n answers per prompt at temperature 1 (seeded,
the same seed for each model): `sampled` holds the same win rates and mean scores on those,
per prompt the mean over its n answers. Greedy answers show a policy's most likely answer;
sampled ones show the distribution RL optimizes, which is also what writes the next round's
candidates and what a person chatting at temperature 1 reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmtrain import checkpoint
from llmtrain.config import EvaluateConfig
from llmtrain.data.prompts import fit_prompts, last_user, prompt_room, read_prompts
from llmtrain.data.jsonl import split
from llmtrain.errors import ConfigError, DataError
from llmtrain.files import write_file
from llmtrain.model import Transformer
from llmtrain.scoring import evaluate_policy, evaluate_sampled, load_reward_model, sampled_kl, win_rate
from llmtrain.styles import RULES


def _load(path: str) -> tuple[Path, Transformer]:
    ckpt = checkpoint.resolve(path)
    return ckpt, checkpoint.load_transformer(ckpt).eval()


def compare(baseline: str, challengers: dict[str, str], reward_model: str, convs: list[list[dict]], true_rule: str,
            max_new_tokens: int, samples: int = 0) -> dict[str, dict]:
    """Each model answers once (greedily), and `samples` times sampled; every challenger is
    compared with the baseline, and its KL to the baseline measured on answers it samples
    (seeded, the same seed for each). Holds the baseline and one challenger at a time."""
    j = _Judge(reward_model, convs, [baseline, *challengers.values()], max_new_tokens, true_rule, samples)
    model_a, a = j.measure(baseline)
    out = {}
    for name, path in challengers.items():
        model, b = j.measure(path)
        out[name] = j.pair(a, b, sampled_kl(model, model_a, j.tok, j.convs, max_new_tokens, seed=0), name)
        del model
    return out


def compare_to_baselines(challenger: str, baselines: dict[str, str], reward_model: str, convs: list[list[dict]],
                         true_rule: str, max_new_tokens: int, samples: int = 0) -> dict[str, dict]:
    """`compare(baseline, {"b": challenger})["b"]` for each baseline, with the challenger's
    answers made once (an RLHF round's policy against the last round's and against SFT), on
    the held-out prompts that fit every model's context (the same as compare's when the
    models share one context window, as a run's do). Holds the challenger and one baseline
    at a time."""
    j = _Judge(reward_model, convs, [challenger, *baselines.values()], max_new_tokens, true_rule, samples)
    model_b, b = j.measure(challenger)
    out = {}
    for name, path in baselines.items():
        model, a = j.measure(path)
        out[name] = j.pair(a, b, sampled_kl(model_b, model, j.tok, j.convs, max_new_tokens, seed=0), "b")
        del model
    return out


class _Judge:
    """The reward model, the held-out prompts that fit every model's context, and the rule:
    what `compare` measures each model with and pairs the measurements by."""

    def __init__(self, reward_model: str, convs: list[list[dict]], paths: list[str], max_new_tokens: int,
                 true_rule: str, samples: int):
        self.rm, self.tok, self.norm = load_reward_model(reward_model)
        self.max_new_tokens, self.true_rule, self.samples = max_new_tokens, true_rule, samples
        self.rule = RULES[true_rule] if true_rule else None
        # Lengths up front: prompts that leave fewer than max_new_tokens of any model's context are skipped.
        ctx = min(checkpoint.model_config(checkpoint.resolve(p)).max_seq_len for p in paths)
        n_all = len(convs)
        self.convs, long = fit_prompts(self.tok, convs, prompt_room(ctx, max_new_tokens, "max_new_tokens"))
        if not self.convs:
            raise DataError(f"none of the {n_all} held-out prompts fits: each may have at most {ctx - max_new_tokens} "
                            f"tokens (the context window of {ctx} tokens less max_new_tokens={max_new_tokens})")
        if long:
            print(f"evaluate: {len(long)} of {n_all} held-out prompts longer than {ctx - max_new_tokens} tokens skipped "
                  f"(context window {ctx} - max_new_tokens {max_new_tokens})")

    def measure(self, path: str) -> tuple[Transformer, dict]:
        """Load a checkpoint; its greedy (and sampled) answers, scored."""
        ckpt, model = _load(path)
        m = evaluate_policy(model, self.tok, self.rm, self.norm, self.convs, self.max_new_tokens, self.rule)
        m["checkpoint"] = str(ckpt)
        if self.samples:
            m["sampled"] = evaluate_sampled(model, self.tok, self.rm, self.norm, self.convs, self.max_new_tokens,
                                            self.samples, self.rule)
        return model, m

    def pair(self, a: dict, b: dict, kl: dict, name: str) -> dict:
        """b's measurements against a's (kl: KL(b || a)), printed in one line as `name`."""
        true_rule, samples = self.true_rule, self.samples
        o = {"prompts": len(self.convs), "a": a["checkpoint"], "b": b["checkpoint"], "reward_a": a["reward"],
             "reward_b": b["reward"], "win_rate_b_by_reward_model": win_rate(b["rewards"], a["rewards"])}
        if true_rule:
            o.update(true_rule=true_rule, true_score_a=a["true_score"], true_score_b=b["true_score"],
                     win_rate_b_by_true_rule=win_rate(b["true_scores"], a["true_scores"]))
            o["hacking_gap"] = o["win_rate_b_by_reward_model"] - o["win_rate_b_by_true_rule"]
        for k in ("distinct", "distinct2", "mean_words"):
            o[f"{k}_a"], o[f"{k}_b"] = a[k], b[k]
        o["kl_b"], o["kl_b_k3"] = kl["kl"], kl["kl_k3"]
        if samples:
            sa, sb = a["sampled"], b["sampled"]
            o["sampled"] = {"per_prompt": samples, "reward_a": sa["reward"], "reward_b": sb["reward"],
                            "win_rate_b_by_reward_model": win_rate(sb["rewards"], sa["rewards"])}
            if true_rule:
                o["sampled"].update(true_score_a=sa["true_score"], true_score_b=sb["true_score"],
                                    win_rate_b_by_true_rule=win_rate(sb["true_scores"], sa["true_scores"]))
        o["samples"] = [{"prompt": last_user(c), "a": x["text"], "b": y["text"]}
                        for c, x, y in list(zip(self.convs, a["answers"], b["answers"]))[:8]]
        print(f"evaluate {name} against {Path(a['checkpoint']).parent.parent.name} on {len(self.convs)} held-out prompts: "
              f"reward {o['reward_a']:+.3f} -> {o['reward_b']:+.3f}; wins {o['win_rate_b_by_reward_model']:.0%} by the "
              f"reward model" + (f", {o['win_rate_b_by_true_rule']:.0%} by the true rule '{true_rule}'" if true_rule else "")
              + f"; distinct answers {o['distinct_a']:.0%} -> {o['distinct_b']:.0%}; KL to the baseline "
              f"{o['kl_b']:.3f} nats/answer (k3 {o['kl_b_k3']:.3f})" + (sampled_words(o["sampled"]) if samples else ""))
        return o


def sampled_words(s: dict) -> str:
    return (f"; on {s['per_prompt']} sampled answers per prompt: wins {s['win_rate_b_by_reward_model']:.0%} by the reward "
            f"model" + (f", {s['win_rate_b_by_true_rule']:.0%} by the true rule (true score {s['true_score_a']:.2f} -> "
                        f"{s['true_score_b']:.2f})" if "win_rate_b_by_true_rule" in s else ""))


def main(cfg: EvaluateConfig) -> dict:
    if not (cfg.a and cfg.b and cfg.reward_model):
        raise ConfigError("set a, b (the two checkpoints) and reward_model")
    convs = split(read_prompts(cfg.prompts, columns=cfg.prompt_columns), cfg.val_every)[1][: cfg.max_prompts or None]
    out = compare(cfg.a, {"b": cfg.b}, cfg.reward_model, convs, cfg.true_rule, cfg.max_new_tokens, cfg.samples)["b"]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_file(cfg.out, json.dumps(out, indent=2))
    return out
