"""Build the shipped fine-tuning sets from `chatterbot-corpus` 1.3.3 (BSD licence, PyPI).

    pip install chatterbot-corpus==1.3.3 && python data/sft/build.py

1. data/sft/aristocrat.jsonl: one {"prompt", "response"} per distinct English question of the
   corpus (its first answer), the answer rewritten in the voice of a member of the British
   aristocracy: word swaps ("very" -> "frightfully", "yes" -> "quite so", ...), an opening
   and a closing phrase drawn from lists with a fixed seed. The content of each answer is the
   corpus's own, so the model must learn a style, not one sentence.
2. data/classify/topics.jsonl: {"text": question, "label": topic} for the corpus's questions of
   five topics (the corpus's own category of the file each question is in).

`llmtrain.styles.aristocrat_score` is the check for the style; it counts the marker phrases
this script puts in (openings, closings, swapped words).
"""
import glob
import json
import random
import re
from pathlib import Path

import chatterbot_corpus
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(chatterbot_corpus.__file__).parent / "data" / "english"

OPENINGS = [
    "I dare say", "Why, my dear fellow,", "Indeed,", "Good heavens,", "Most assuredly,",
    "Upon my word,", "One must confess that", "Pray allow me to observe that", "My dear chap,",
    "How terribly kind of you to ask.", "Ah, a capital question.", "Well, old bean,",
    "Permit me to say that", "As Mater would put it,", "By Jove,",
]
CLOSINGS = [
    "I trust this finds you in the finest of spirits.", "Quite so.", "One does hope that is of some use, old chap.",
    "Do give my regards to the family.", "Now, shall we take tea in the drawing room?",
    "Rather splendid, wouldn't you agree?", "Terribly good of you to enquire.", "Pip pip!",
    "I remain, as ever, at your service.", "One simply must, you know.", "",
]
SWAPS = [
    (r"\byes\b", "quite so"), (r"\bno\b", "I fear not"), (r"\bvery\b", "frightfully"),
    (r"\bgood\b", "splendid"), (r"\bgreat\b", "capital"), (r"\bokay\b|\bok\b", "very well"),
    (r"\bhello\b|\bhi\b", "good day to you"), (r"\bi think\b", "one rather suspects"),
    (r"\bthanks\b|\bthank you\b", "most obliged"), (r"\breally\b", "terribly"), (r"\bnice\b", "delightful"),
    (r"\bbad\b", "frightful"), (r"\bguess\b", "daresay"), (r"\bfriend\b", "dear fellow"),
    (r"\bmoney\b", "one's fortune"), (r"\bfun\b", "jolly good sport"),
]
TOPICS = {"ai.yml": "ai", "coding.yml": "coding", "emotion.yml": "emotion", "money.yml": "money",
          "literature.yml": "literature"}


def posh(answer: str, rng: random.Random) -> str:
    text = answer.strip()
    for pat, rep in SWAPS:
        text = re.sub(pat, rep, text, flags=re.IGNORECASE)
    opening, closing = rng.choice(OPENINGS), rng.choice(CLOSINGS)
    out = f"{opening} {text}"
    if out[-1] not in ".!?`":
        out += "."
    return f"{out} {closing}".strip()


def main() -> None:
    rng = random.Random(1915)
    pairs, topics, seen = [], [], set()
    for f in sorted(glob.glob(str(SRC / "*.yml"))):
        conv = yaml.safe_load(open(f, encoding="utf-8"))["conversations"]
        for c in conv:
            if len(c) < 2 or not isinstance(c[0], str) or not isinstance(c[1], str):
                continue
            q, a = c[0].strip(), c[1].strip()
            if q.lower() in seen or not q or not a:
                continue
            seen.add(q.lower())
            pairs.append({"prompt": q, "response": posh(a, rng)})
            if Path(f).name in TOPICS:
                topics.append({"text": q, "label": TOPICS[Path(f).name]})
    rng.shuffle(pairs)
    rng.shuffle(topics)
    (ROOT / "sft").mkdir(exist_ok=True)
    (ROOT / "classify").mkdir(exist_ok=True)
    with open(ROOT / "sft" / "aristocrat.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    with open(ROOT / "classify" / "topics.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in topics)
    print(f"{len(pairs)} SFT pairs, {len(topics)} labelled texts")


if __name__ == "__main__":
    main()
