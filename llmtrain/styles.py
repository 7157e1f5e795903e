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


def _stem(word: str) -> str:
    """A crude stem, so "human" takes up "humans": drop a possessive and a plural s."""
    word = word.strip("'").removesuffix("'s")
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def subject_words(prompt: str) -> set[str]:
    """The question's content words (stemmed): what its subject is."""
    return {_stem(w) for w in _words(prompt) if w not in _STOP}


def relevance(prompt: str, text: str) -> float:
    """Share of the question's content words that the answer takes up (0 for a question without any)."""
    want = subject_words(prompt)
    if not want:
        return 0.0
    return len(want & {_stem(w) for w in _words(text)}) / len(want)


ARISTOCRAT_RULE = ("A good answer takes up the question's own subject, speaks in the aristocratic voice, and ends by "
                   "itself within 30 words.")
ARISTOCRAT_MAX_WORDS = 30


def score_aristocrat(prompt: str, cand: dict) -> float:
    """The demo's stated preference (ARISTOCRAT_RULE), as a score:

        3 x (share of the question's content words the answer takes up)      the subject
        + 1 if it shows the style (a marker phrase of ARISTOCRAT_MARKERS)     the voice
        + 1 if it ended by itself (not cut off)                               ends when done
        - 0.1 x (words beyond 30)

    The subject term depends on the prompt, so no one canned answer does well everywhere,
    and the fine-tuned model meets it only now and then (the shipped answers take up the
    question's words in about a third of cases): there is something for RLHF to learn."""
    text = cand["text"]
    n = len(_words(text))
    return (3.0 * relevance(prompt, text) + (1.0 if is_aristocratic(text) else 0.0)
            + (1.0 if cand.get("finished", True) else 0.0) - 0.1 * max(0, n - ARISTOCRAT_MAX_WORDS))


def score_markers(prompt: str, cand: dict) -> float:
    """The demo's earlier rule, kept for comparison: mostly marker phrases, which the
    fine-tuned model already writes, so RLHF had little to learn and one canned, marker-rich
    sentence scored as well as the fine-tuned model on every prompt."""
    n = len(_words(cand["text"]))
    return (2.0 * min(3, len(aristocrat_markers(cand["text"]))) + (1.0 if cand.get("finished", True) else 0.0)
            + 0.5 * relevance(prompt, cand["text"]) - 0.02 * max(0, n - 40))


RULES = {
    "aristocrat": score_aristocrat,
    "markers": score_markers,
    "length": lambda prompt, cand: -float(len(_words(cand["text"]))),
    "relevance": lambda prompt, cand: relevance(prompt, cand["text"]),
}
RULE_TEXT = {
    "aristocrat": ARISTOCRAT_RULE,
    "markers": "More marker phrases of the aristocratic style (up to 3) are better; an answer should end by itself.",
    "length": "A shorter answer is better.",
    "relevance": "An answer that takes up more of the question's content words is better.",
}
