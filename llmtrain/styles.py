"""Stated checks and preferences for the shipped data: the style check that measures
fine-tuning, and the scripted rules of the simulated annotator (also the "true" preference
that evaluation compares the reward model against). Plain rules, not models."""
from __future__ import annotations

import re

# The phrases data/sft/build.py writes into every aristocratic response: the openings,
# closings and swapped words. A response "shows the style" when it contains at least one.
ARISTOCRAT_MARKERS = [
    "i dare say", "my dear fellow", "dear fellow", "indeed", "good heavens", "most assuredly", "upon my word",
    "one must confess", "pray allow me", "my dear chap", "old chap", "terribly kind", "capital", "old bean",
    "permit me to say", "mater", "by jove", "i trust this finds you", "quite so", "do give my regards",
    "drawing room", "rather splendid", "splendid", "terribly good of you", "pip pip", "at your service",
    "one simply must", "frightfully", "frightful", "i fear not", "good day to you", "one rather suspects",
    "most obliged", "terribly", "delightful", "daresay", "one's fortune", "jolly good",
]
_MARKER_RE = re.compile("|".join(r"\b" + re.escape(m) + r"\b" for m in ARISTOCRAT_MARKERS), re.IGNORECASE)


def aristocrat_markers(text: str) -> list[str]:
    """The marker phrases found in `text` (lower-cased, in order)."""
    return [m.lower() for m in _MARKER_RE.findall(text)]


def is_aristocratic(text: str) -> bool:
    """The stated check: at least one marker phrase of the shipped style."""
    return bool(_MARKER_RE.search(text))


# ----------------------------------------------------------------------------- simulated preferences

_WORD = re.compile(r"[a-z']+")
_STOP = set("a an the is are was were be to of and or in on at for with what who how why when where which do does did "
            "you your i me my it its this that can could would should will shall have has had about tell".split())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def relevance(prompt: str, text: str) -> float:
    want = {w for w in _words(prompt) if w not in _STOP}
    if not want:
        return 0.0
    return len(want & set(_words(text))) / len(want)


def score_aristocrat(prompt: str, cand: dict) -> float:
    n = len(_words(cand["text"]))
    return (2.0 * min(3, len(aristocrat_markers(cand["text"]))) + (1.0 if cand.get("finished", True) else 0.0)
            + 0.5 * relevance(prompt, cand["text"]) - 0.02 * max(0, n - 40))


RULES = {
    "aristocrat": score_aristocrat,
    "length": lambda prompt, cand: -float(len(_words(cand["text"]))),
    "relevance": lambda prompt, cand: relevance(prompt, cand["text"]),
}
