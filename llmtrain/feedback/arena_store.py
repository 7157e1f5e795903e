"""The blind arena's tables in the feedback database: models, the prompts they all answered, one
match per prompt and pair of models, and the votes people (or simulated voters) cast on them.

A match shows one prompt and two models' answers on sides A and B. Which model is on which side
is drawn per (annotator, prompt, pair) by a hash (`arena_sides`): the same on every reload for one
annotator, independent between annotators. A vote is "a", "b", "tie" or "both_bad", stored with
the two models as that annotator saw them, in one transaction keyed by a client-made submission
id: a double click or a retried request records once.

A prompt is either held out (no owner: every annotator may vote on its matches) or a person's
own (owner: only they see it; its answers come from a live model worker, see arena_api.py).

`FeedbackStore` (store.py) has these methods through `ArenaTables`. Plain Python + sqlite3.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import time

from llmtrain.feedback.annotators import Annotator
from llmtrain.feedback.db import StoreError

VOTES = ("a", "b", "tie", "both_bad")
VISIBLE = "(p.owner_id IS NULL OR p.owner_id = ?)"  # the matches an annotator (the parameter) may see

# Schema version 3: the arena (the tables are made on open; older databases gain them).
SCHEMA_ARENA = """
CREATE TABLE IF NOT EXISTS arena_models (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, checkpoint TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS arena_prompts (
    id INTEGER PRIMARY KEY, generation_id INTEGER REFERENCES generations(id),
    prompt TEXT NOT NULL, messages TEXT NOT NULL, owner_id INTEGER REFERENCES annotators(id));
CREATE TABLE IF NOT EXISTS arena_answers (
    prompt_id INTEGER NOT NULL REFERENCES arena_prompts(id), model_id INTEGER NOT NULL REFERENCES arena_models(id),
    text TEXT NOT NULL, finished INTEGER NOT NULL DEFAULT 1, n_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (prompt_id, model_id));
CREATE TABLE IF NOT EXISTS arena_matches (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES arena_prompts(id),
    model_x INTEGER NOT NULL REFERENCES arena_models(id), model_y INTEGER NOT NULL REFERENCES arena_models(id),
    CHECK (model_x < model_y), UNIQUE (prompt_id, model_x, model_y));
CREATE TABLE IF NOT EXISTS arena_votes (
    id INTEGER PRIMARY KEY, match_id INTEGER NOT NULL REFERENCES arena_matches(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    side_a INTEGER NOT NULL REFERENCES arena_models(id), side_b INTEGER NOT NULL REFERENCES arena_models(id),
    vote TEXT NOT NULL CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),
    submission_id TEXT NOT NULL UNIQUE, created REAL NOT NULL, UNIQUE (match_id, annotator_id));
CREATE INDEX IF NOT EXISTS arena_votes_by_annotator ON arena_votes(annotator_id);
"""


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def arena_sides(annotator_id: int, prompt_id: int, x: int, y: int) -> tuple[int, int]:
    """(model on side A, model on side B) of the pair x < y on this prompt for this annotator:
    a fair coin per (annotator, prompt, pair), seeded by a hash, so the same on every reload."""
    return (y, x) if _hash("llmtrain-arena-sides", annotator_id, prompt_id, x, y) & 1 else (x, y)


def check_model_name(name: str) -> None:
    """The one rule for a model's name, in the arena and on the chat page (a served model answers
    the arena's own prompts under its arena name, so the two must accept the same names)."""
    if not isinstance(name, str) or not name or len(name) > 64 or \
            not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or not name.isascii():
        raise StoreError(f"model names are 1-64 ASCII letters, digits, '-', '_' or '.' (got {name!r})")


class ArenaTables:
    """The arena methods of `FeedbackStore` (which gives `_con` and `_tx`)."""

    # ---- what arena-generate writes

    def add_arena_model(self, name: str, checkpoint: str) -> int:
        """The id of the arena model `name`, added now or before with the same checkpoint."""
        check_model_name(name)
        with self._tx() as con:
            row = con.execute("SELECT id, checkpoint FROM arena_models WHERE name=?", (name,)).fetchone()
            if row is not None:
                if row[1] != checkpoint:
                    raise StoreError(f"the arena has a model named {name!r} already, from {row[1]}: "
                                     f"give {checkpoint} another name")
                return row[0]
            return con.execute("INSERT INTO arena_models (name, checkpoint, created) VALUES (?, ?, ?)",
                               (name, checkpoint, time.time())).lastrowid

    def add_arena_prompt(self, messages: list[dict], answers: dict[int, dict], generation_id: int | None = None,
                         owner: Annotator | None = None) -> tuple[int, list[int]]:
        """A prompt, each model's answer ({model id: {"text", "finished", "n_tokens"}}, two or more)
        and one match per pair of models, in one transaction -> (prompt id, match ids). The
        matches are numbered in a shuffled order of the pairs: an id says nothing of its pair."""
        if len(answers) < 2:
            raise StoreError(f"an arena prompt needs the answers of at least 2 models, got {len(answers)}")
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        with self._tx() as con:
            pid = con.execute("INSERT INTO arena_prompts (generation_id, prompt, messages, owner_id) VALUES (?, ?, ?, ?)",
                              (generation_id, prompt, json.dumps(messages), owner.id if owner else None)).lastrowid
            con.executemany("INSERT INTO arena_answers (prompt_id, model_id, text, finished, n_tokens) VALUES (?, ?, ?, ?, ?)",
                            [(pid, m, a["text"], int(a.get("finished", True)), int(a.get("n_tokens", 0)))
                             for m, a in sorted(answers.items())])
            pairs = list(itertools.combinations(sorted(answers), 2))
            random.Random(_hash("llmtrain-arena-pairs", pid)).shuffle(pairs)
            ids = [con.execute("INSERT INTO arena_matches (prompt_id, model_x, model_y) VALUES (?, ?, ?)",
                               (pid, x, y)).lastrowid for x, y in pairs]
        return pid, ids

    # ---- what the arena page reads

    def arena_match(self, match_id: int) -> dict | None:
        """A match: its prompt and both models (id, name, answer); the names are for the store's
        callers, which must not show them before the vote."""
        con = self._con()
        m = con.execute("SELECT m.id, m.prompt_id, m.model_x, m.model_y, p.prompt, p.messages, p.owner_id "
                        "FROM arena_matches m JOIN arena_prompts p ON p.id = m.prompt_id WHERE m.id=?",
                        (match_id,)).fetchone()
        if m is None:
            return None
        models = {}
        for r in con.execute("SELECT a.model_id, o.name, a.text, a.finished, a.n_tokens FROM arena_answers a "
                             "JOIN arena_models o ON o.id = a.model_id WHERE a.prompt_id=? AND a.model_id IN (?, ?)",
                             (m[1], m[2], m[3])):
            models[r[0]] = {"id": r[0], "name": r[1], "text": r[2], "finished": bool(r[3]), "n_tokens": r[4]}
        return {"id": m[0], "prompt_id": m[1], "prompt": m[4], "messages": json.loads(m[5]), "owner_id": m[6],
                "x": models[m[2]], "y": models[m[3]]}

    def arena_next(self, annotator: Annotator) -> int | None:
        """A match this annotator may vote on and has not: the first in an order of their own
        (a hash of annotator and match), so a reload shows the same one and annotators spread out."""
        rows = self._con().execute(
            "SELECT m.id FROM arena_matches m JOIN arena_prompts p ON p.id = m.prompt_id WHERE " + VISIBLE
            + " AND NOT EXISTS (SELECT 1 FROM arena_votes v WHERE v.match_id = m.id AND v.annotator_id = ?)",
            (annotator.id, annotator.id)).fetchall()
        return min((r[0] for r in rows), key=lambda i: (_hash("llmtrain-arena-next", annotator.id, i), i), default=None)

    def arena_progress(self, annotator: Annotator) -> dict:
        con = self._con()
        total = con.execute("SELECT COUNT(*) FROM arena_matches m JOIN arena_prompts p ON p.id = m.prompt_id WHERE "
                            + VISIBLE, (annotator.id,)).fetchone()[0]
        voted = con.execute("SELECT COUNT(*) FROM arena_votes WHERE annotator_id=?", (annotator.id,)).fetchone()[0]
        return {"voted": voted, "total": total}

    def arena_visible(self, annotator: Annotator, match: dict | None) -> bool:
        """A held-out prompt's match is everyone's; a person's own prompt is theirs alone."""
        return match is not None and match["owner_id"] in (None, annotator.id)

    def arena_my_vote(self, annotator: Annotator, match_id: int) -> dict | None:
        row = self._con().execute(
            "SELECT v.vote, a.name, b.name, v.created, v.submission_id FROM arena_votes v "
            "JOIN arena_models a ON a.id = v.side_a JOIN arena_models b ON b.id = v.side_b "
            "WHERE v.match_id=? AND v.annotator_id=?", (match_id, annotator.id)).fetchone()
        return None if row is None else {"vote": row[0], "reveal": {"A": row[1], "B": row[2]}, "created": row[3],
                                         "submission_id": row[4]}

    # ---- votes

    def arena_vote(self, annotator: Annotator, match_id: int, prompt_id: int, vote: str, submission_id: str) -> bool:
        """Record one vote in one transaction, with the sides as this annotator sees them. True if
        recorded now; False if this submission id (or this annotator's vote on this match) was
        recorded before. The one code path for the arena page and the simulated voter."""
        if vote not in VOTES:
            raise StoreError(f"vote must be one of {', '.join(VOTES)}")
        if not isinstance(submission_id, str) or not 1 <= len(submission_id) <= 100:
            raise StoreError("a submission id (1-100 characters) is required")
        try:
            submission_id.encode("utf-8")
        except UnicodeEncodeError:
            raise StoreError("submission_id is not valid Unicode text (it holds a lone surrogate)") from None
        with self._tx() as con:
            m = self.arena_match(match_id)
            if not self.arena_visible(annotator, m):
                raise StoreError(f"no arena match with id {match_id}")
            if m["prompt_id"] != prompt_id:
                raise StoreError(f"arena match {match_id} is of prompt {m['prompt_id']}, not of prompt {prompt_id}")
            dup = con.execute("SELECT annotator_id, match_id FROM arena_votes WHERE submission_id=?",
                              (submission_id,)).fetchone()
            if dup is not None:
                if (dup[0], dup[1]) != (annotator.id, match_id):
                    raise StoreError("this submission id belongs to another vote")
                return False
            a, b = arena_sides(annotator.id, m["prompt_id"], m["x"]["id"], m["y"]["id"])
            cur = con.execute("INSERT INTO arena_votes (match_id, annotator_id, side_a, side_b, vote, submission_id, "
                              "created) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (match_id, annotator_id) DO NOTHING",
                              (match_id, annotator.id, a, b, vote, submission_id, time.time()))
            return cur.rowcount == 1

    def arena_votes(self) -> list[dict]:
        """Every vote with the models by name as their voter saw them ("a", "b"), for statistics and export."""
        rows = self._con().execute(
            "SELECT v.match_id, m.prompt_id, n.name, n.simulated, a.name, b.name, v.vote, v.created, v.side_a, v.side_b "
            "FROM arena_votes v JOIN arena_matches m ON m.id = v.match_id JOIN annotators n ON n.id = v.annotator_id "
            "JOIN arena_models a ON a.id = v.side_a JOIN arena_models b ON b.id = v.side_b "
            "ORDER BY m.prompt_id, v.match_id, n.name").fetchall()
        return [{"match_id": r[0], "prompt_id": r[1], "annotator": r[2], "simulated": bool(r[3]), "a": r[4], "b": r[5],
                 "vote": r[6], "created": r[7], "a_id": r[8], "b_id": r[9]} for r in rows]

    def arena_models(self) -> list[dict]:
        return [{"id": r[0], "name": r[1], "checkpoint": r[2]}
                for r in self._con().execute("SELECT id, name, checkpoint FROM arena_models ORDER BY id")]

    def arena_generation(self, prompt_id: int) -> dict:
        """The settings recorded with an arena prompt's answers ({} for a person's own prompt)."""
        row = self._con().execute("SELECT g.settings FROM arena_prompts p JOIN generations g ON g.id = p.generation_id "
                                  "WHERE p.id=?", (prompt_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def has_arena(self) -> bool:
        return self._con().execute("SELECT 1 FROM arena_matches LIMIT 1").fetchone() is not None

    def arena_counts(self) -> dict:
        con = self._con()
        return {t: con.execute(f"SELECT COUNT(*) FROM arena_{t}").fetchone()[0]
                for t in ("models", "prompts", "matches", "votes")}
