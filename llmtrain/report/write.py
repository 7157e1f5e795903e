"""Writing the report: the plots (PNG), then report.md and report.html, which say the same in
the same order (a Report record), and headline.json with the raw figures."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from llmtrain.files import write_file
from llmtrain.metrics import fmt_duration
from llmtrain.report.figures import (RL_METHODS, headline, method_dir, methods_of, methods_table, ranking_sources,
                                     rounds_table, run_metrics)
from llmtrain.report.prose import EXPLAIN, METHODS_NOTE, ROUNDS_NOTE, rule_of, rule_sentence, sources_sentence


@dataclass
class Report:
    """What both report.md and report.html say, in the order they say it."""
    name: str
    root: Path
    timings: dict
    rows: list  # headline figures: (figure, value, how to read it)
    methods: tuple  # methods_table: header, rows, warnings
    rule: str
    sections: list  # (title, png, text) of each stage that ran
    made: dict  # png -> whether its plot was drawn
    samples: list
    rounds: tuple = ([], [])  # rounds_table: header, rows (none with one round)


def write_report(r, cfg, timings: dict, samples: list[dict]) -> Path:
    """report.md, report.html (with plots/) and headline.json in the run folder `r.root`; returns report.md."""
    made = make_plots(r, r.root / "plots")
    rows, nums = headline(r, cfg)
    ev = json.loads(r.evaluation.read_text()) if r.evaluation.is_file() else {}
    ran, src = set(methods_of(ev)), ranking_sources(r)
    sources = sources_sentence(src, rule_of(cfg, ev))
    sections = [(t, png, text.replace("{sources}", sources)) for t, png, text in EXPLAIN
                if png[:-4] not in RL_METHODS or png[:-4] in ran or made.get(png)]
    rep = Report(cfg.name, r.root, timings, rows, methods_table(ev), rule_sentence(cfg, ev, src), sections, made, samples,
                 rounds_table(r))
    for w in rep.methods[2]:
        print(f"report: warning: {w}")
    write_file(r.root / "report.md", "\n".join(markdown(rep)) + "\n")
    write_file(r.root / "headline.json", json.dumps(nums, indent=2))
    write_file(r.root / "report.html", "\n".join(html_page(rep)))
    return r.root / "report.md"


def make_plots(r, plots: Path) -> dict[str, bool]:
    """One PNG per stage in `plots`: {file name: whether it was drawn (a stage with no records has none)}."""
    plots.mkdir(exist_ok=True)
    tr, va = run_metrics(r.pretrain, "train"), run_metrics(r.pretrain, "val")
    vocab = json.loads((r.data / "meta.json").read_text())["vocab_size"]
    made = {}
    made["pretrain.png"] = _plot(plots / "pretrain.png", "Pretraining", [("train", *_xy(tr, "loss")), ("validation", *_xy(va, "loss"))],
                                 "step", "loss (nats/token)", (math.log(vocab), "ln(vocab)"))
    made["sft.png"] = _plot(plots / "sft.png", "Fine-tuning (SFT)", [("train", *_xy(run_metrics(r.sft, "train"), "loss")),
                                                                     ("held-out responses", *_xy(run_metrics(r.sft, "val"), "loss"))],
                            "step", "loss (nats/token)")
    made["reward.png"] = _plot(plots / "reward.png", "Reward model: held-out pairwise accuracy",
                               [("accuracy", *_xy(run_metrics(r.reward, "val"), "accuracy"))], "step", "accuracy", (0.5, "chance"))
    for name in RL_METHODS:
        d = method_dir(r, name)
        m_tr, m_ev = run_metrics(d, "train"), run_metrics(d, "eval")
        made[f"{name}.png"] = _plot(plots / f"{name}.png", name.upper(), [("reward (rollouts)", *_xy(m_tr, "reward")),
                                                                          ("held-out reward", *_xy(m_ev, "reward")),
                                                                          ("held-out true score", *_xy(m_ev, "true_score")),
                                                                          ("KL to SFT", *_xy(m_tr, "kl"))], "iteration", "value")
    dv = run_metrics(r.dpo, "val")
    made["dpo.png"] = _plot(plots / "dpo.png", "DPO (held-out pairs)", [("margin", *_xy(dv, "margin")),
                                                                        ("accuracy", *_xy(dv, "accuracy"))], "step", "value")
    return made


def markdown(rep: Report) -> list[str]:
    """report.md's lines."""
    m_header, m_rows, warnings = rep.methods
    md = [f"# {rep.name}: pretraining, fine-tuning and RLHF of a small language model", "",
          f"Everything below was produced by one run in `{rep.root}` in {fmt_duration(sum(rep.timings.values()))} "
          f"({', '.join(f'{k} {fmt_duration(v)}' for k, v in rep.timings.items())}).", "",
          "## Headline figures", "", "| figure | value | how to read it |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rep.rows]
    if m_rows or rep.rule:
        md += ["", "## RLHF methods against SFT on held-out prompts", ""]
        md += [rep.rule, ""] if rep.rule else []
        if m_rows:
            md += [METHODS_NOTE, "", *md_table(m_header, m_rows)]
        md += [f"\n**Warning — {w}**" for w in warnings]
    if rep.rounds[1]:
        md += ["", "## Iterative RLHF, round by round", "", ROUNDS_NOTE, "", *md_table(*rep.rounds)]
    for title, png, text in rep.sections:
        md += ["", f"## {title}", "", text]
        if rep.made.get(png):
            md += ["", f"![{title}](plots/{png})"]
    if rep.samples:
        names = [k for k in rep.samples[0] if k != "prompt"]
        md += ["", "## The same held-out prompts, answered by each model", "",
               "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        md += ["| " + " | ".join(_cell(s[k]) for k in ["prompt", *names]) + " |" for s in rep.samples]
    return md


def html_page(rep: Report) -> list[str]:
    """report.html's lines: what report.md says, every model- or config-made text escaped."""
    m_header, m_rows, warnings = rep.methods
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>llmtrain report</title><style>",
         "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}",
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}",
         "img{max-width:100%}</style></head><body>",
         f"<h1>{html.escape(rep.name)}: pretraining, fine-tuning and RLHF of a small language model</h1>",
         f"<p>One run in <code>{html.escape(str(rep.root))}</code>, {fmt_duration(sum(rep.timings.values()))} in all.</p>",
         "<h2>Headline figures</h2><table><tr><th>figure</th><th>value</th><th>how to read it</th></tr>"]
    h += [f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>" for a, b, c in rep.rows]
    h.append("</table>")
    if m_rows or rep.rule:
        h.append("<h2>RLHF methods against SFT on held-out prompts</h2>")
        if rep.rule:
            h.append(f"<p>{html.escape(rep.rule)}</p>")
        if m_rows:
            h += [f"<p>{html.escape(METHODS_NOTE)}</p>", *html_table(m_header, m_rows)]
        h += [f"<p style='color:#b00020'><strong>Warning — {html.escape(w)}</strong></p>" for w in warnings]
    if rep.rounds[1]:
        h += [f"<h2>Iterative RLHF, round by round</h2><p>{html.escape(ROUNDS_NOTE)}</p>", *html_table(*rep.rounds)]
    for title, png, text in rep.sections:
        h.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        if rep.made.get(png):
            h.append(f"<img src='plots/{png}' alt='{html.escape(title)}'>")
    if rep.samples:
        names = [k for k in rep.samples[0] if k != "prompt"]
        h.append("<h2>The same held-out prompts, answered by each model</h2><table><tr><th>prompt</th>" +
                 "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(s[k])}</td>" for k in ["prompt", *names]) + "</tr>" for s in rep.samples]
        h.append("</table>")
    h.append("</body></html>")
    return h


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


MD_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", **{c: "\\" + c for c in "\\`*_[]()!|~"}}


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def html_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """An HTML table's lines, every cell escaped."""
    return (["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"]
            + ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows] + ["</table>"])


def md_text(text: str) -> str:
    """Model text as plain text in Markdown, as html.escape makes it in report.html: no HTML
    tags, images, links, code spans or emphasis; a pipe stays inside its table cell."""
    return "".join(MD_ESCAPES.get(c, c) for c in " ".join(str(text).split()))


def _cell(text: str) -> str:
    return md_text(text) or "(empty)"
