"""What the run's files say, as numbers: headline figures (losses, style, reward-model accuracy,
win rates, KL) from each stage's metrics.jsonl and evaluation.json, the methods table against
SFT with its warnings, and who made the rankings."""
from __future__ import annotations

import json
import math
from pathlib import Path

from llmtrain.metrics import read_metrics

RL_METHODS = ("ppo", "grpo", "rloo")  # trained with the reward model; each has a training plot
KNOWN_ORDER = ("ppo", "grpo", "rloo", "dpo")
HACKING_GAP = 0.2  # a reward-model win rate this far above the true one is flagged as reward hacking


def run_metrics(d: Path, kind: str) -> list[dict]:
    """A stage's records of one kind from its metrics.jsonl; none when it did not run."""
    p = Path(d) / "metrics.jsonl"
    return read_metrics(p, kind) if p.is_file() else []


def methods_of(ev: dict) -> list[str]:
    """The methods compared with SFT in evaluation.json, in a fixed order (then any others)."""
    names = [k for k, v in ev.items() if isinstance(v, dict) and "win_rate_b_by_reward_model" in v]
    return sorted(names, key=lambda n: (KNOWN_ORDER.index(n) if n in KNOWN_ORDER else len(KNOWN_ORDER), names.index(n)))


def method_dir(r, name: str) -> Path:
    """A method's run folder: the Run's attribute when it has one, else root/name."""
    d = getattr(r, name, None)
    return d if isinstance(d, Path) else r.root / name


def ranking_sources(r) -> dict:
    """Who made the rankings the reward model and DPO learnt from (the lines of rankings.jsonl):
    {"people": n, "rule": n, "annotators": people's names, "rules": the simulated annotators}."""
    out = {"people": 0, "rule": 0, "annotators": [], "rules": []}
    path = getattr(r, "rankings", None)
    if not isinstance(path, Path) or not path.is_file():
        return out
    people, rules = set(), set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if obj.get("simulated"):
            out["rule"] += 1
            rules.add(str(obj.get("annotator", "")))
        else:
            out["people"] += 1
            people.add(str(obj.get("annotator", "")))
    out["annotators"], out["rules"] = sorted(people), sorted(rules)
    return out


def _pct(x) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) else "—"


def _sampled(e: dict) -> str:
    """'true / RM' win rates on sampled answers (evaluate.samples), or a dash when none were sampled."""
    s = e.get("sampled")
    return f"{_pct(s.get('win_rate_b_by_true_rule'))} / {_pct(s['win_rate_b_by_reward_model'])}" if s else "—"


def methods_table(ev: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The RLHF methods side by side against SFT: header, rows (SFT's reference row first) and
    warning lines (collapse; reward hacking)."""
    header = ["method", "wins by the true rule", "wins by the reward model", "gap (hacking)",
              "sampled answers: wins by the true rule / RM", "KL to SFT (nats/answer)", "distinct answers", "distinct-2",
              "mean words"]
    names = methods_of(ev)
    if not names:
        return header, [], []
    first = ev[names[0]]
    rows = [["SFT (reference)", "—", "—", "—", "—", "0", _pct(first.get("distinct_a")),
             f"{first['distinct2_a']:.2f}" if "distinct2_a" in first else "—",
             f"{first['mean_words_a']:.1f}" if "mean_words_a" in first else "—"]]
    warnings = []
    for n in names:
        e = ev[n]
        gap = e.get("hacking_gap")
        if gap is None and "win_rate_b_by_true_rule" in e:
            gap = e["win_rate_b_by_reward_model"] - e["win_rate_b_by_true_rule"]
        rows.append([n.upper(), _pct(e.get("win_rate_b_by_true_rule")), _pct(e["win_rate_b_by_reward_model"]),
                     f"{gap * 100:+.0f} points" if gap is not None else "—", _sampled(e),
                     f"{e['kl_b']:.3f}" if "kl_b" in e else "—", _pct(e.get("distinct_b")),
                     f"{e['distinct2_b']:.2f}" if "distinct2_b" in e else "—",
                     f"{e['mean_words_b']:.1f}" if "mean_words_b" in e else "—"])
        if "distinct_b" in e and "distinct_a" in e and e["distinct_b"] < 0.5 * e["distinct_a"]:
            warnings.append(f"collapse: {n.upper()} answers {e['distinct_b']:.0%} distinct vs SFT's {e['distinct_a']:.0%}")
        if gap is not None and gap > HACKING_GAP:
            warnings.append(f"reward hacking: {n.upper()} wins {e['win_rate_b_by_reward_model']:.0%} by the reward model "
                            f"but {e['win_rate_b_by_true_rule']:.0%} by the true rule")
    return header, rows, warnings


def rounds_table(r) -> tuple[list[str], list[list[str]]]:
    """Iterative RLHF, one row a round from round<n>/round.json (none with one round): the
    reward model's accuracy on the round's new candidates before and after it learnt them, and
    the round's policy against the last round's and against SFT."""
    header = ["round", "candidates by", "RM accuracy on them: last RM -> this RM", "wins over last round: true rule / RM",
              "same, sampled answers", "wins over SFT: true rule / RM", "same, sampled answers",
              "KL to last round / to SFT (nats/answer)"]
    rows = []
    for path in sorted(Path(r.root).glob("round[0-9]*/round.json"), key=lambda p: int(p.parent.name[5:])):
        s = json.loads(path.read_text())
        acc, last, sft = s["reward_accuracy"], s["vs_last_round"], s["vs_sft"]
        rows.append([f"{s['round']} ({s['method'].upper()})", s["candidates_by"],
                     f"{_pct(acc['last_round_rm']['accuracy'])} -> {_pct(acc['this_round_rm']['accuracy'])} "
                     f"({acc['this_round_rm']['pairs']} pairs)",
                     f"{_pct(last.get('win_rate_b_by_true_rule'))} / {_pct(last['win_rate_b_by_reward_model'])}",
                     _sampled(last),
                     f"{_pct(sft.get('win_rate_b_by_true_rule'))} / {_pct(sft['win_rate_b_by_reward_model'])}", _sampled(sft),
                     f"{last['kl_b']:.2f} / {sft['kl_b']:.2f}"])
    return header, rows


def headline(r, cfg) -> tuple[list[tuple[str, str, str]], dict]:
    """Rows (figure, value, how to read it) and the raw numbers."""
    nums: dict = {}
    rows = []
    src = ranking_sources(r)
    from_people = src["people"] and not src["rule"]
    pv = run_metrics(r.pretrain, "val")
    vocab = json.loads((r.data / "meta.json").read_text())["vocab_size"] if (r.data / "meta.json").is_file() else 0
    if pv:
        nums.update(pretrain_val_first=pv[0]["loss"], pretrain_val_last=pv[-1]["loss"], ln_vocab=math.log(vocab))
        rows.append(("Pretraining validation loss", f"{pv[0]['loss']:.3f} → {pv[-1]['loss']:.3f}",
                     f"ln(vocabulary {vocab}) = {math.log(vocab):.3f} is guessing uniformly"))
    sv = run_metrics(r.sft, "val")
    if sv:
        drop = 1 - sv[-1]["loss"] / sv[0]["loss"]
        nums.update(sft_val_first=sv[0]["loss"], sft_val_last=sv[-1]["loss"], sft_drop=drop)
        rows.append(("SFT held-out response loss", f"{sv[0]['loss']:.3f} → {sv[-1]['loss']:.3f} ({drop:.0%} lower)",
                     "loss on the answers of held-out pairs, before and after fine-tuning"))
    style_path = r.root / "style.json"
    if style_path.is_file():
        st = json.loads(style_path.read_text())["models"]
        nums.update(style_pretrain=st["pretrain"]["rate"], style_sft=st["sft"]["rate"])
        rows.append(("Held-out answers in the aristocratic style", f"{st['pretrain']['rate']:.0%} → {st['sft']['rate']:.0%}",
                     f"pretrained → fine-tuned, {st['sft']['n']} prompts (llmtrain/styles.py marker check)"))
    if src["people"] or src["rule"]:
        nums.update(rankings_by_people=src["people"], rankings_by_rule=src["rule"])
        rows.append(("Rankings learnt from", f"{src['people']} by people, {src['rule']} by a rule",
                     "people in the ranking app (`--human`); a simulated annotator's stated rule"))
    rv = run_metrics(r.reward, "val")
    if rv:
        nums.update(rm_accuracy=rv[-1]["accuracy"], rm_pairs=rv[-1]["pairs"])
        base = rv[-1].get("longer_text_baseline")
        rows.append(("Reward model held-out pairwise accuracy", f"{rv[-1]['accuracy']:.1%}",
                     f"{rv[-1]['pairs']} pairs of prompts never trained on; 50% is chance"
                     + (f", always preferring the longer answer scores {base:.1%}" if base is not None else "")))
    ev = json.loads(r.evaluation.read_text()) if r.evaluation.is_file() else {}
    for name in methods_of(ev):
        e = ev[name]
        nums[f"{name}_win_rm"] = e["win_rate_b_by_reward_model"]
        nums[f"{name}_reward"] = e["reward_b"]
        nums["sft_reward"] = e["reward_a"]
        rows.append((f"{name.upper()} vs SFT: mean reward-model score", f"{e['reward_a']:+.3f} → {e['reward_b']:+.3f}",
                     f"greedy answers to {e['prompts']} held-out prompts (the reward's zero is set on the SFT model's sampled answers)"))
        rows.append((f"{name.upper()} wins over SFT, by the reward model", f"{e['win_rate_b_by_reward_model']:.0%}", "ties count half"))
        if "win_rate_b_by_true_rule" in e:
            nums[f"{name}_win_true"] = e["win_rate_b_by_true_rule"]
            nums[f"{name}_hacking_gap"] = e["win_rate_b_by_reward_model"] - e["win_rate_b_by_true_rule"]
            rows.append((f"{name.upper()} wins over SFT, by the true preference", f"{e['win_rate_b_by_true_rule']:.0%}",
                         (f"the stated rule '{e['true_rule']}' (the people ranked by their own judgement)" if from_people
                          else f"the simulated annotator's rule '{e['true_rule']}'")
                         + "; a gap to the line above would be reward hacking"))
        for k in ("distinct", "distinct2", "mean_words"):
            if f"{k}_b" in e:
                nums[f"{name}_{k}"] = e[f"{k}_b"]
                nums[f"sft_{k}"] = e[f"{k}_a"]
        if "kl_b" in e:
            nums[f"{name}_kl_sft"] = e["kl_b"]
            nums[f"{name}_kl_sft_k3"] = e["kl_b_k3"]
    for name in RL_METHODS:
        train = [x for x in run_metrics(method_dir(r, name), "train") if isinstance(x.get("kl"), (int, float))]
        if not train:
            continue
        tail = train[-max(1, len(train) // 5):]
        kl = sum(x["kl"] for x in tail) / len(tail)
        nums[f"{name}_kl"] = kl
        kc = getattr(getattr(cfg, name, None), "kl", None)
        if kc is not None:
            nums[f"{name}_kl_target"] = kc.target
        rows.append((f"{name.upper()} KL to the SFT model (last fifth of iterations)", f"{kl:.3f} nats",
                     f"target {kc.target} ({'adaptive' if kc.adaptive else 'fixed'} beta)" if kc is not None else
                     "as logged in training"))
    dv = run_metrics(r.dpo, "val")
    if dv:
        nums.update(dpo_accuracy=dv[-1]["accuracy"], dpo_margin=dv[-1]["margin"])
        rows.append(("DPO held-out reward accuracy / margin", f"{dv[0]['accuracy']:.0%} → {dv[-1]['accuracy']:.0%} / "
                     f"{dv[0]['margin']:+.3f} → {dv[-1]['margin']:+.3f}", "implicit reward beta·log(pi/pi_ref), chosen vs rejected"))
    return rows, nums
