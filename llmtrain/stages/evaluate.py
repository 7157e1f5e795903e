"""Compare two checkpoints on held-out prompts: `llmtrain evaluate a=runs/sft b=runs/ppo reward_model=runs/reward`.

For each held-out prompt both models answer greedily. Reported: the mean reward-model score
of each, the win rate of b over a by the reward model (ties count half), and, with a
simulated rule (`true_rule`), the win rate by that rule: the *true* preference. A policy
that games the reward model shows a high reward-model win rate and a low true one.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmtrain import checkpoint
from llmtrain.config import EvaluateConfig
from llmtrain.data.prompts import last_user, read_prompts
from llmtrain.data.sft import split
from llmtrain.errors import ConfigError
from llmtrain.model import Transformer
from llmtrain.scoring import evaluate_policy, load_reward_model, win_rate


def compare(baseline: str, challengers: dict[str, str], reward_model: str, convs: list[list[dict]], true_rule: str,
            max_new_tokens: int) -> dict[str, dict]:
    """Each model answers once; every challenger is compared with the baseline."""
    rm, tok, norm = load_reward_model(reward_model)
    res = {}
    for name, path in {"a": baseline, **challengers}.items():
        ckpt = checkpoint.resolve(path)
        model = Transformer(checkpoint.model_config(ckpt))
        checkpoint.load_weights(ckpt, model)
        res[name] = evaluate_policy(model, tok, rm, norm, convs, max_new_tokens, true_rule)
        res[name]["checkpoint"] = str(ckpt)
    out = {}
    for name in challengers:
        a, b = res["a"], res[name]
        o = {"prompts": len(convs), "a": a["checkpoint"], "b": b["checkpoint"], "reward_a": a["reward"],
             "reward_b": b["reward"], "win_rate_b_by_reward_model": win_rate(b["rewards"], a["rewards"])}
        if true_rule:
            o.update(true_rule=true_rule, true_score_a=a["true_score"], true_score_b=b["true_score"],
                     win_rate_b_by_true_rule=win_rate(b["true_scores"], a["true_scores"]))
        o["samples"] = [{"prompt": last_user(c), "a": x["text"], "b": y["text"]}
                        for c, x, y in list(zip(convs, a["answers"], b["answers"]))[:8]]
        print(f"evaluate {name} against {Path(a['checkpoint']).parent.parent.name} on {len(convs)} held-out prompts: "
              f"reward {o['reward_a']:+.3f} -> {o['reward_b']:+.3f}; wins {o['win_rate_b_by_reward_model']:.0%} by the "
              f"reward model" + (f", {o['win_rate_b_by_true_rule']:.0%} by the true rule '{true_rule}'" if true_rule else ""))
        out[name] = o
    return out


def main(cfg: EvaluateConfig) -> dict:
    if not (cfg.a and cfg.b and cfg.reward_model):
        raise ConfigError("set a, b (the two checkpoints) and reward_model")
    convs = split(read_prompts(cfg.prompts), cfg.val_every)[1][: cfg.max_prompts or None]
    out = compare(cfg.a, {"b": cfg.b}, cfg.reward_model, convs, cfg.true_rule, cfg.max_new_tokens)["b"]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(out, indent=2))
    return out
