"""The pipeline's report: report.md and report.html with PNG plots, headline figures, sample
answers side by side, and a few plain sentences on what each stage did."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from llmtrain.metrics import fmt_duration, read_metrics
from llmtrain import styles

RL_METHODS = ("ppo", "grpo", "rloo")  # trained with the reward model; each has a training plot
KNOWN_ORDER = ("ppo", "grpo", "rloo", "dpo")
HACKING_GAP = 0.2  # a reward-model win rate this far above the true one is flagged as reward hacking


def _metrics(d: Path, kind: str) -> list[dict]:
    p = Path(d) / "metrics.jsonl"
    return read_metrics(p, kind) if p.is_file() else []


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], xlabel: str, ylabel: str,
          hline: tuple[float, str] | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(xs for _, xs, _ in series):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    if hline:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _xy(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


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


def _rule_of(cfg, ev: dict) -> str:
    fb = getattr(cfg, "feedback", None)
    return getattr(fb, "rule", "") or next((e["true_rule"] for e in ev.values() if isinstance(e, dict) and e.get("true_rule")), "")


def rule_sentence(cfg, ev: dict, src: dict | None = None) -> str:
    """The rule in one sentence: the simulated annotator's, or, when people ranked, the stated
    rule the evaluation scores by (a yardstick, not what the people were asked)."""
    texts = getattr(styles, "RULE_TEXT", {})
    rule = _rule_of(cfg, ev)
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


def _pct(x) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) else "—"


def methods_table(ev: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The RLHF methods side by side against SFT: header, rows (SFT's reference row first) and
    warning lines (collapse; reward hacking)."""
    header = ["method", "wins by the true rule", "wins by the reward model", "gap (hacking)", "KL to SFT (nats/answer)",
              "distinct answers", "distinct-2", "mean words"]
    names = methods_of(ev)
    if not names:
        return header, [], []
    first = ev[names[0]]
    rows = [["SFT (reference)", "—", "—", "—", "0", _pct(first.get("distinct_a")),
             f"{first['distinct2_a']:.2f}" if "distinct2_a" in first else "—",
             f"{first['mean_words_a']:.1f}" if "mean_words_a" in first else "—"]]
    warnings = []
    for n in names:
        e = ev[n]
        gap = e.get("hacking_gap")
        if gap is None and "win_rate_b_by_true_rule" in e:
            gap = e["win_rate_b_by_reward_model"] - e["win_rate_b_by_true_rule"]
        rows.append([n.upper(), _pct(e.get("win_rate_b_by_true_rule")), _pct(e["win_rate_b_by_reward_model"]),
                     f"{gap * 100:+.0f} points" if gap is not None else "—",
                     f"{e['kl_b']:.3f}" if "kl_b" in e else "—", _pct(e.get("distinct_b")),
                     f"{e['distinct2_b']:.2f}" if "distinct2_b" in e else "—",
                     f"{e['mean_words_b']:.1f}" if "mean_words_b" in e else "—"])
        if "distinct_b" in e and "distinct_a" in e and e["distinct_b"] < 0.5 * e["distinct_a"]:
            warnings.append(f"collapse: {n.upper()} answers {e['distinct_b']:.0%} distinct vs SFT's {e['distinct_a']:.0%}")
        if gap is not None and gap > HACKING_GAP:
            warnings.append(f"reward hacking: {n.upper()} wins {e['win_rate_b_by_reward_model']:.0%} by the reward model "
                            f"but {e['win_rate_b_by_true_rule']:.0%} by the true rule")
    return header, rows, warnings


METHODS_NOTE = ("Greedy answers of each model to the same held-out prompts, against the SFT model's. Win rates count "
                "ties half; the gap is the reward-model win rate minus the true one: a method that games the reward "
                "model wins by the reward model but not by the rule. KL to SFT is measured the same way for every "
                "method, DPO included: on one answer per prompt sampled from the method at temperature 1, the sum "
                "over its tokens of log pi - log pi_SFT. Distinct answers is the share of different answers over "
                "the prompts; under half of SFT's is flagged as collapse (one answer for every prompt).")


def headline(r, cfg) -> tuple[list[tuple[str, str, str]], dict]:
    """Rows (figure, value, how to read it) and the raw numbers."""
    nums: dict = {}
    rows = []
    src = ranking_sources(r)
    from_people = src["people"] and not src["rule"]
    pv = _metrics(r.pretrain, "val")
    vocab = json.loads((r.data / "meta.json").read_text())["vocab_size"] if (r.data / "meta.json").is_file() else 0
    if pv:
        nums.update(pretrain_val_first=pv[0]["loss"], pretrain_val_last=pv[-1]["loss"], ln_vocab=math.log(vocab))
        rows.append(("Pretraining validation loss", f"{pv[0]['loss']:.3f} → {pv[-1]['loss']:.3f}",
                     f"ln(vocabulary {vocab}) = {math.log(vocab):.3f} is guessing uniformly"))
    sv = _metrics(r.sft, "val")
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
    rv = _metrics(r.reward, "val")
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
        train = [x for x in _metrics(method_dir(r, name), "train") if isinstance(x.get("kl"), (int, float))]
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
    dv = _metrics(r.dpo, "val")
    if dv:
        nums.update(dpo_accuracy=dv[-1]["accuracy"], dpo_margin=dv[-1]["margin"])
        rows.append(("DPO held-out reward accuracy / margin", f"{dv[0]['accuracy']:.0%} → {dv[-1]['accuracy']:.0%} / "
                     f"{dv[0]['margin']:+.3f} → {dv[-1]['margin']:+.3f}", "implicit reward beta·log(pi/pi_ref), chosen vs rejected"))
    return rows, nums


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


def write_report(r, cfg, timings: dict, samples: list[dict]) -> Path:
    plots = r.root / "plots"
    plots.mkdir(exist_ok=True)
    tr, va = _metrics(r.pretrain, "train"), _metrics(r.pretrain, "val")
    vocab = json.loads((r.data / "meta.json").read_text())["vocab_size"]
    made = {}
    made["pretrain.png"] = _plot(plots / "pretrain.png", "Pretraining", [("train", *_xy(tr, "loss")), ("validation", *_xy(va, "loss"))],
                                 "step", "loss (nats/token)", (math.log(vocab), "ln(vocab)"))
    made["sft.png"] = _plot(plots / "sft.png", "Fine-tuning (SFT)", [("train", *_xy(_metrics(r.sft, "train"), "loss")),
                                                                     ("held-out responses", *_xy(_metrics(r.sft, "val"), "loss"))],
                            "step", "loss (nats/token)")
    made["reward.png"] = _plot(plots / "reward.png", "Reward model: held-out pairwise accuracy",
                               [("accuracy", *_xy(_metrics(r.reward, "val"), "accuracy"))], "step", "accuracy", (0.5, "chance"))
    for name in RL_METHODS:
        d = method_dir(r, name)
        m_tr, m_ev = _metrics(d, "train"), _metrics(d, "eval")
        made[f"{name}.png"] = _plot(plots / f"{name}.png", name.upper(), [("reward (rollouts)", *_xy(m_tr, "reward")),
                                                                          ("held-out reward", *_xy(m_ev, "reward")),
                                                                          ("held-out true score", *_xy(m_ev, "true_score")),
                                                                          ("KL to SFT", *_xy(m_tr, "kl"))], "iteration", "value")
    dv = _metrics(r.dpo, "val")
    made["dpo.png"] = _plot(plots / "dpo.png", "DPO (held-out pairs)", [("margin", *_xy(dv, "margin")),
                                                                        ("accuracy", *_xy(dv, "accuracy"))], "step", "value")
    rows, nums = headline(r, cfg)
    total = sum(timings.values())
    ev = json.loads(r.evaluation.read_text()) if r.evaluation.is_file() else {}
    ran = set(methods_of(ev))
    src = ranking_sources(r)
    sources = sources_sentence(src, _rule_of(cfg, ev))
    sections = [(t, png, text.replace("{sources}", sources)) for t, png, text in EXPLAIN
                if png[:-4] not in RL_METHODS or png[:-4] in ran or made.get(png)]
    m_header, m_rows, warnings = methods_table(ev)
    rule = rule_sentence(cfg, ev, src)
    for w in warnings:
        print(f"report: warning: {w}")

    md = [f"# {cfg.name}: pretraining, fine-tuning and RLHF of a small language model", "",
          f"Everything below was produced by one run in `{r.root}` in {fmt_duration(total)} "
          f"({', '.join(f'{k} {fmt_duration(v)}' for k, v in timings.items())}).", "",
          "## Headline figures", "", "| figure | value | how to read it |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if m_rows or rule:
        md += ["", "## RLHF methods against SFT on held-out prompts", ""]
        md += [rule, ""] if rule else []
        if m_rows:
            md += [METHODS_NOTE, "", "| " + " | ".join(m_header) + " |", "|---" * len(m_header) + "|"]
            md += ["| " + " | ".join(row) + " |" for row in m_rows]
        md += [f"\n**Warning — {w}**" for w in warnings]
    for title, png, text in sections:
        md += ["", f"## {title}", "", text]
        if made.get(png):
            md += ["", f"![{title}](plots/{png})"]
    if samples:
        names = [k for k in samples[0] if k != "prompt"]
        md += ["", "## The same held-out prompts, answered by each model", "",
               "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        md += ["| " + " | ".join(_cell(s[k]) for k in ["prompt", *names]) + " |" for s in samples]
    (r.root / "report.md").write_text("\n".join(md) + "\n")
    (r.root / "headline.json").write_text(json.dumps(nums, indent=2))

    h = ["<!doctype html><html><head><meta charset='utf-8'><title>llmtrain report</title><style>",
         "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}",
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}",
         "img{max-width:100%}</style></head><body>",
         f"<h1>{html.escape(cfg.name)}: pretraining, fine-tuning and RLHF of a small language model</h1>",
         f"<p>One run in <code>{html.escape(str(r.root))}</code>, {fmt_duration(total)} in all.</p>",
         "<h2>Headline figures</h2><table><tr><th>figure</th><th>value</th><th>how to read it</th></tr>"]
    h += [f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>" for a, b, c in rows]
    h.append("</table>")
    if m_rows or rule:
        h.append("<h2>RLHF methods against SFT on held-out prompts</h2>")
        if rule:
            h.append(f"<p>{html.escape(rule)}</p>")
        if m_rows:
            h.append(f"<p>{html.escape(METHODS_NOTE)}</p><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in m_header) + "</tr>")
            h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in m_rows]
            h.append("</table>")
        h += [f"<p style='color:#b00020'><strong>Warning — {html.escape(w)}</strong></p>" for w in warnings]
    for title, png, text in sections:
        h.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        if made.get(png):
            h.append(f"<img src='plots/{png}' alt='{html.escape(title)}'>")
    if samples:
        names = [k for k in samples[0] if k != "prompt"]
        h.append("<h2>The same held-out prompts, answered by each model</h2><table><tr><th>prompt</th>" +
                 "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(s[k])}</td>" for k in ["prompt", *names]) + "</tr>" for s in samples]
        h.append("</table>")
    h.append("</body></html>")
    (r.root / "report.html").write_text("\n".join(h))
    return r.root / "report.md"


MD_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", **{c: "\\" + c for c in "\\`*_[]()!|~"}}


def md_text(text: str) -> str:
    """Model text as plain text in Markdown, as html.escape makes it in report.html: no HTML
    tags, images, links, code spans or emphasis; a pipe stays inside its table cell."""
    return "".join(MD_ESCAPES.get(c, c) for c in " ".join(str(text).split()))


def _cell(text: str) -> str:
    return md_text(text) or "(empty)"
