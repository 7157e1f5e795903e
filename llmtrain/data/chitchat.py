"""Real human preferences from `chitchat-dataset` (MIT licence; pip install chitchat-dataset).

People chatted in pairs, starting from a shared "starter" prompt, and rated each whole chat
1-10 on several qualities (witty, upbeat, interesting). The rule used here:
  - a chat's score is the mean of its ratings;
  - chats sharing a starter prompt are candidates for that prompt, ranked by score (equal
    scores tie), at most `k_max` per ranking (larger groups are cut into several rankings);
  - a pair counts only when the scores differ by at least `min_gap` (the reward stage's
    `data.min_score_gap`, 3 by default for this data), so small rating noise is not learnt.
The candidate text is the chat's first turns, one per line, cut to `max_chars` characters.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmtrain.data.preference import Ranking
from llmtrain.errors import DataError
from llmtrain.files import write_file


def load_chats() -> dict:
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("chitchat-dataset is not installed (pip install chitchat-dataset, or -e '.[data]')") from None
    return json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text())


def chat_text(conv: dict, max_chars: int) -> str:
    turns = [" ".join(m["text"] for m in turn).strip() for turn in conv["messages"]]
    text = "\n".join(t for t in turns if t)
    return text[:max_chars].rsplit(" ", 1)[0] if len(text) > max_chars else text


def convert(out: str | Path, k_max: int = 4, max_chars: int = 400) -> dict:
    data = load_chats()
    by_prompt: dict[str, list[tuple[float, str]]] = {}
    for conv in data.values():
        ratings = [v for v in (conv.get("ratings") or {}).values() if isinstance(v, (int, float))]
        prompt = (conv.get("prompt") or "").strip()
        if not ratings or not prompt or not conv.get("messages"):
            continue
        by_prompt.setdefault(prompt, []).append((sum(ratings) / len(ratings), chat_text(conv, max_chars)))
    rankings = []
    for prompt in sorted(by_prompt):
        chats = by_prompt[prompt]
        for g in range(0, len(chats), k_max):
            group = sorted(chats[g:g + k_max], key=lambda c: -c[0])
            if len(group) < 2 or group[0][0] == group[-1][0]:
                continue
            ranks = [1 + sum(1 for o in group if o[0] > c[0]) for c in group]
            rankings.append(Ranking([{"role": "user", "content": prompt}], [c[1] for c in group], ranks,
                                    [round(c[0], 3) for c in group], None, "ranked", "chitchat-raters", False,
                                    {"dataset": "chitchat-dataset", "rule": "mean rating; pairs need gap >= min_score_gap"}))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rankings))
    return {"prompts": len(by_prompt), "rankings": len(rankings), "chats": sum(len(r.texts) for r in rankings)}
