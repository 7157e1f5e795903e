"""The pipeline's report: report.md and report.html with PNG plots, headline figures, sample
answers side by side, and a few plain sentences on what each stage did."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from llmtrain.metrics import fmt_duration, read_metrics


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


def headline(r, cfg) -> tuple[list[tuple[str, str, str]], dict]:
    """Rows (figure, value, how to read it) and the raw numbers."""
    nums: dict = {}
    rows = []
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
    rv = _metrics(r.reward, "val")
    if rv:
        nums.update(rm_accuracy=rv[-1]["accuracy"], rm_pairs=rv[-1]["pairs"])
        base = rv[-1].get("longer_text_baseline")
        rows.append(("Reward model held-out pairwise accuracy", f"{rv[-1]['accuracy']:.1%}",
                     f"{rv[-1]['pairs']} pairs of prompts never trained on; 50% is chance"
                     + (f", always preferring the longer answer scores {base:.1%}" if base is not None else "")))
    ev = json.loads(r.evaluation.read_text()) if r.evaluation.is_file() else {}
    ppo_train = _metrics(r.ppo, "train")
    for name in ("ppo", "dpo"):
        e = ev.get(name)
        if not e:
            continue
        nums[f"{name}_win_rm"] = e["win_rate_b_by_reward_model"]
        nums[f"{name}_reward"] = e["reward_b"]
        nums["sft_reward"] = e["reward_a"]
        rows.append((f"{name.upper()} vs SFT: mean reward-model score", f"{e['reward_a']:+.3f} → {e['reward_b']:+.3f}",
                     f"greedy answers to {e['prompts']} held-out prompts (the reward's zero is set on the SFT model's sampled answers)"))
        rows.append((f"{name.upper()} wins over SFT, by the reward model", f"{e['win_rate_b_by_reward_model']:.0%}", "ties count half"))
        if "win_rate_b_by_true_rule" in e:
            nums[f"{name}_win_true"] = e["win_rate_b_by_true_rule"]
            rows.append((f"{name.upper()} wins over SFT, by the true preference", f"{e['win_rate_b_by_true_rule']:.0%}",
                         f"the simulated annotator's rule '{e['true_rule']}'; a gap to the line above would be reward hacking"))
    if ppo_train:
        tail = ppo_train[-max(1, len(ppo_train) // 5):]
        kl = sum(x["kl"] for x in tail) / len(tail)
        nums.update(ppo_kl=kl, ppo_kl_target=cfg.ppo.kl.target)
        rows.append(("PPO KL to the SFT model (last fifth of iterations)", f"{kl:.3f} nats",
                     f"target {cfg.ppo.kl.target} ({'adaptive' if cfg.ppo.kl.adaptive else 'fixed'} beta)"))
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
     "The fine-tuned model wrote several answers to each of a set of prompts; an annotator ranked them (here a "
     "simulated one with a stated rule, so the demo runs unattended; `llmtrain demo --human` lets people rank them "
     "in the browser). A copy of the model with a single-number head, the reward model, learnt to score answers so "
     "that better-ranked ones score higher. Its accuracy is on prompts it never saw."),
    ("RLHF with PPO", "ppo.png",
     "The fine-tuned model then practised: it answered prompts, the reward model scored the answers, and PPO nudged "
     "it towards higher scores, while a KL penalty kept it close to the fine-tuned model so it would not drift into "
     "nonsense. The true score is the annotator's own rule, which PPO never sees."),
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
    ppo_tr, ppo_ev = _metrics(r.ppo, "train"), _metrics(r.ppo, "eval")
    made["ppo.png"] = _plot(plots / "ppo.png", "PPO", [("reward (rollouts)", *_xy(ppo_tr, "reward")),
                                                       ("held-out reward", *_xy(ppo_ev, "reward")),
                                                       ("held-out true score", *_xy(ppo_ev, "true_score")),
                                                       ("KL to SFT", *_xy(ppo_tr, "kl"))], "iteration", "value")
    dv = _metrics(r.dpo, "val")
    made["dpo.png"] = _plot(plots / "dpo.png", "DPO (held-out pairs)", [("margin", *_xy(dv, "margin")),
                                                                        ("accuracy", *_xy(dv, "accuracy"))], "step", "value")
    rows, nums = headline(r, cfg)
    total = sum(timings.values())

    md = [f"# {cfg.name}: pretraining, fine-tuning and RLHF of a small language model", "",
          f"Everything below was produced by one run in `{r.root}` in {fmt_duration(total)} "
          f"({', '.join(f'{k} {fmt_duration(v)}' for k, v in timings.items())}).", "",
          "## Headline figures", "", "| figure | value | how to read it |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    for title, png, text in EXPLAIN:
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
    for title, png, text in EXPLAIN:
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
