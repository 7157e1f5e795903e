"""Iterative RLHF (`rounds: N`), as InstructGPT and Llama 2 iterated: after round 1 (the chain up
to the RL methods), each round n = 2..N
    candidates  round n-1's policy (of `round_method`) answers the prompts to rank, K each
    rankings    they are ranked (the simulated rule, or people with --human)
    reward      the last reward model continues on every ranking so far
    <method>    the policy continues from round n-1's (which is also its KL reference)
    check       round.json: what the round changed (below)
and the report shows each round. The check asks what a person steering the loop would ask:
- is the reward model still right on what the policy now writes? Pairwise accuracy of the last
  round's and of this round's reward model on the held-out rankings of this round's candidates
  (the prompts the reward model holds out, by hash: neither trained on them);
- did the policy improve by the stated rule, and what does the reward model say? Greedy answers
  to the held-out SFT prompts, and evaluate.samples sampled ones per prompt: win rates of this
  round's policy over the last round's and over the SFT model, by the true rule and by this
  round's reward model, and the KL to each.
Stages are imported inside the functions (lazily), as in steps.py.
"""
from __future__ import annotations

import dataclasses
import json

from llmtrain.files import write_file
from llmtrain.pipeline import steps
from llmtrain.pipeline.config import method_of
from llmtrain.pipeline.prompts import held_out


def run_rounds(cfg, base, r, human: bool, stage) -> None:
    """Rounds 2..cfg.rounds, each step skipped when its output is complete (`stage` is run()'s)."""
    m = method_of(cfg)
    c = getattr(cfg, m)
    for n in range(2, cfg.rounds + 1):
        rd = r.round(n, m)
        stage(f"candidates@{n}", rd.db.is_file(), lambda: steps.candidates(cfg, base, r, rd))
        stage(f"rankings@{n}", rd.all_rankings.is_file(), lambda: steps.rankings(cfg, r, human, rd))
        stage(f"reward@{n}", steps.finished(rd.reward, cfg.reward.run.max_steps), lambda: steps.reward(cfg, r, rd))
        train = (lambda: steps.dpo(cfg, r, rd)) if m == "dpo" else (lambda: steps.rl(cfg, base, r, m, rd))
        stage(f"{m}@{n}", steps.finished(rd.policy(m), c.run.max_steps), train)
        stage(f"check@{n}", rd.summary.is_file(), lambda: check_round(cfg, base, r, rd, m))


def reward_accuracy(cfg, reward_model, rankings) -> dict:
    """Pairwise accuracy of a reward model on the held-out side (reward.data.val_every, by a hash
    of the prompt) of a rankings file."""
    from llmtrain.data.preference import load_pairs_data
    from llmtrain.scoring import load_reward_model
    from llmtrain.stages.reward import evaluate_pairs

    model, tok, _ = load_reward_model(reward_model)
    _, val, _ = load_pairs_data(dataclasses.replace(cfg.reward.data, train=str(rankings), val=""))
    max_len = cfg.reward.data.max_len or model.config.max_seq_len
    res = evaluate_pairs(model, tok, val, max_len, cfg.reward.run.batch_size, cfg.reward.data.min_score_gap, "cpu")
    return {"accuracy": res["accuracy"], "pairs": res["pairs"], "prompts": len(val)}


def check_round(cfg, base, r, rd, method: str) -> dict:
    """round.json of round rd.n (see the module doc); printed in one paragraph."""
    from llmtrain.stages.evaluate import compare_to_baselines

    last = r.round(rd.n - 1, method)
    before = reward_accuracy(cfg, last.reward, rd.rankings)
    after = reward_accuracy(cfg, rd.reward, rd.rankings)
    e = cfg.evaluate
    convs = held_out(cfg, base)[1][: e.max_prompts or None]
    rule = e.true_rule or cfg.feedback.rule
    policy = str(rd.policy(method))
    # the policy's answers once; against the last round's policy and against SFT
    vs = compare_to_baselines(policy, {"last": str(last.policy(method)), "sft": str(r.sft)}, str(rd.reward), convs,
                              rule, e.max_new_tokens, e.samples)
    vs_last, vs_sft = vs["last"], vs["sft"]
    keep = ("prompts", "win_rate_b_by_true_rule", "win_rate_b_by_reward_model", "kl_b", "true_score_a", "true_score_b",
            "distinct_b", "mean_words_b", "sampled", "samples")
    out = {"round": rd.n, "method": method, "true_rule": rule,
           "candidates_by": rd.writer_name,
           "reward_accuracy": {"last_round_rm": before, "this_round_rm": after,
                               "on": f"held-out rankings of round {rd.n}'s candidates"},
           "vs_last_round": {k: vs_last[k] for k in keep if k in vs_last},
           "vs_sft": {k: vs_sft[k] for k in keep if k in vs_sft}}
    write_file(rd.summary, json.dumps(out, indent=2))
    print(f"round {rd.n}: reward-model accuracy on the new candidates {before['accuracy']:.0%} (round {rd.n - 1}'s) -> "
          f"{after['accuracy']:.0%} (this round's), {after['pairs']} held-out pairs; {method.upper()} round {rd.n} "
          f"wins {vs_last['win_rate_b_by_true_rule']:.0%} over round {rd.n - 1}'s by the true rule "
          f"({vs_last['win_rate_b_by_reward_model']:.0%} by the reward model), "
          f"{vs_sft['win_rate_b_by_true_rule']:.0%} over SFT"
          + (f"; on {e.samples} sampled answers per prompt {vs_last['sampled']['win_rate_b_by_true_rule']:.0%} over round "
             f"{rd.n - 1}'s and {vs_sft['sampled']['win_rate_b_by_true_rule']:.0%} over SFT by the true rule" if e.samples else "")
          + f"; KL {vs_last['kl_b']:.2f} nats to round {rd.n - 1}'s, "
          f"{vs_sft['kl_b']:.2f} to SFT", flush=True)
    return out
