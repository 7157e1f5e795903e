"""Checks for the target styles of the shipped data, used to measure fine-tuning and, later,
by the simulated annotator. Each is a plain, stated rule, not a model."""
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
