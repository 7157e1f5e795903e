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


def main(cfg: EvaluateConfig) -> dict:
    if not (cfg.a and cfg.b and cfg.reward_model):
        raise ConfigError("set a, b (the two checkpoints) and reward_model")
    rm, tok, norm = load_reward_model(cfg.reward_model)
    convs = split(read_prompts(cfg.prompts), cfg.val_every)[1][: cfg.max_prompts or None]
    res = {}
    for name in ("a", "b"):
        ckpt = checkpoint.resolve(getattr(cfg, name))
        model = Transformer(checkpoint.model_config(ckpt))
        checkpoint.load_weights(ckpt, model)
        res[name] = evaluate_policy(model, tok, rm, norm, convs, cfg.max_new_tokens, cfg.true_rule)
        res[name]["checkpoint"] = str(ckpt)
    out = {"prompts": len(convs), "a": res["a"]["checkpoint"], "b": res["b"]["checkpoint"],
           "reward_a": res["a"]["reward"], "reward_b": res["b"]["reward"],
           "win_rate_b_by_reward_model": win_rate(res["b"]["rewards"], res["a"]["rewards"])}
    if cfg.true_rule:
        out.update(true_rule=cfg.true_rule, true_score_a=res["a"]["true_score"], true_score_b=res["b"]["true_score"],
                   win_rate_b_by_true_rule=win_rate(res["b"]["true_scores"], res["a"]["true_scores"]))
    out["samples"] = [{"prompt": last_user(c), "a": x["text"], "b": y["text"]}
                      for c, x, y in list(zip(convs, res["a"]["answers"], res["b"]["answers"]))[:8]]
    print(f"evaluate on {len(convs)} held-out prompts: reward a {out['reward_a']:+.3f}, b {out['reward_b']:+.3f}; "
          f"b wins {out['win_rate_b_by_reward_model']:.0%} by the reward model" +
          (f", {out['win_rate_b_by_true_rule']:.0%} by the true rule '{cfg.true_rule}'" if cfg.true_rule else ""))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(out, indent=2))
    return out
