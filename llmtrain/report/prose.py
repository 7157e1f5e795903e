"""The report's sentences: who ranked (people, a stated rule), the rule in words, how to read the
methods table, and a few plain sentences on what each stage did."""
from __future__ import annotations

from llmtrain import styles


def sources_sentence(src: dict, rule: str) -> str:
    """Where the rankings came from, in one sentence: how many from people, how many from a rule."""
    n_people = len(src["annotators"])
    by_people = (f"{src['people']} by people ({n_people} annotator{'s' if n_people != 1 else ''}, in the browser with "
                 f"`llmtrain demo --human`)")
    by_rule = f"{src['rule']} by a simulated annotator following the rule '{rule}'"
    if src["people"] and src["rule"]:
        return f"The rankings: {by_people} and {by_rule}."
    if src["people"]:
        return f"The rankings: {by_people}; none by a rule."
    if src["rule"]:
        return (f"The rankings: {by_rule} (so the demo runs unattended); none by people (`llmtrain demo --human` "
                "lets people rank them in the browser).")
    return ("An annotator ranked them (a simulated one with a stated rule, or people in the browser with "
            "`llmtrain demo --human`).")

def rule_of(cfg, ev: dict) -> str:
    """The rule the run names: the feedback step's, else the one the evaluation scored by."""
    fb = getattr(cfg, "feedback", None)
    return getattr(fb, "rule", "") or next((e["true_rule"] for e in ev.values() if isinstance(e, dict) and e.get("true_rule")), "")

def rule_sentence(cfg, ev: dict, src: dict | None = None) -> str:
    """The rule in one sentence: the simulated annotator's, or, when people ranked, the stated
    rule the evaluation scores by (a yardstick, not what the people were asked)."""
    texts = getattr(styles, "RULE_TEXT", {})
    rule = rule_of(cfg, ev)
    if not rule:
        return ""
    if src and src["people"] and not src["rule"]:
        out = (f"The rankings came from people; the true score below is the stated rule '{rule}', a yardstick the "
               f"people were not asked to follow: {texts.get(rule, rule)}")
    else:
        out = f"The simulated annotator's rule ('{rule}'): {texts.get(rule, rule)}"
    used = {e.get("true_rule") for e in ev.values() if isinstance(e, dict) and e.get("true_rule")} - {rule}
    if used:
        u = sorted(used)[0]
        out += f" The evaluation's true rule is '{u}': {texts.get(u, u)}"
    return out

METHODS_NOTE = ("Greedy answers of each model to the same held-out prompts, against the SFT model's. Win rates count "
                "ties half; the gap is the reward-model win rate minus the true one: a method that games the reward "
                "model wins by the reward model but not by the rule. KL to SFT is measured the same way for every "
                "method, DPO included: on one answer per prompt sampled from the method at temperature 1, the sum "
                "over its tokens of log pi - log pi_SFT. Distinct answers is the share of different answers over "
                "the prompts; under half of SFT's is flagged as collapse (one answer for every prompt).")

ROUNDS_NOTE = ("Each round after the first: the last round's policy wrote new candidates, they were ranked, the reward "
               "model went on learning from every ranking so far, and the policy went on from the last round's (which "
               "was also its KL reference). The reward model's accuracy is on the held-out prompts of the new "
               "candidates' rankings (neither reward model trained on them): the last one's shows how far the policy "
               "moved off what it knew, this one's what learning the new answers gave back. Win rates are on greedy "
               "answers to the held-out SFT prompts, ties half, by the true rule and by the round's reward model.")

EXPLAIN = [
    ("Pretraining", "pretrain.png",
     "A small transformer read about a million words of real English chat and learnt to guess the next word "
     "(next-token prediction). The loss measures how surprised it is by text it has not seen; it falls as the "
     "model picks up spelling, words and phrases."),
    ("Fine-tuning (SFT)", "sft.png",
     "The pretrained model was then shown question → answer pairs whose answers speak like a member of the British "
     "aristocracy, and learnt only from the answers. The held-out loss is measured on pairs it never saw."),
    ("Human feedback and the reward model", "reward.png",
     "The fine-tuned model wrote several answers to each of a set of prompts, and they were ranked. {sources} "
     "A copy of the model with a single-number head, the reward model, learnt to score answers so "
     "that better-ranked ones score higher. Its accuracy is on prompts it never saw."),
    ("RLHF with PPO", "ppo.png",
     "The fine-tuned model then practised: it answered prompts, the reward model scored the answers, and PPO nudged "
     "it towards higher scores, while a KL penalty kept it close to the fine-tuned model so it would not drift into "
     "nonsense. The true score is the stated rule of the evaluation, which PPO never sees."),
    ("RLHF with GRPO", "grpo.png",
     "GRPO practised like PPO but without a value model: it sampled a group of answers to each prompt and pushed "
     "each answer up or down by how its reward compared with the group's mean (in units of the group's spread), "
     "with a KL penalty to the fine-tuned model in the loss."),
    ("RLHF with RLOO", "rloo.png",
     "RLOO (REINFORCE leave-one-out) also sampled several answers per prompt and used, as each answer's baseline, "
     "the mean reward of the other answers to the same prompt, with no value model."),
    ("DPO", "dpo.png",
     "DPO learns from the same rankings without a reward model: it raises the probability of preferred answers "
     "relative to the fine-tuned model and lowers that of the others."),
]
