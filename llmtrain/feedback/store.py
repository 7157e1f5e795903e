"""The feedback database: prompts, their K candidate answers, annotators and rankings (SQLite).

WAL mode, parametrised queries only, a schema version checked on open. A submission is one
transaction keyed by a client-made submission id, so a double click or a retry records once;
a ranking that `submit` returned for is committed and survives a killed server.

This module is plain Python + sqlite3: the web app imports it, never the torch training code.
Annotators and sessions are in annotators.py, the blind arena's tables in arena_store.py, the
errors and the write transaction in db.py.

A ranking is a list of tiers, best first; each tier lists candidate indices (0..K-1) that
the annotator judged equal (a tie). Every candidate appears exactly once.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from llmtrain.feedback.annotators import Annotator, AnnotatorsAndSessions
from llmtrain.feedback.arena_store import SCHEMA_ARENA, ArenaTables
from llmtrain.feedback.db import StoreBusy, StoreError, Tx, is_busy

SCHEMA_VERSION = 3
STATUSES = ("ranked", "skipped", "all_bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY, generation_id INTEGER REFERENCES generations(id),
    prompt TEXT NOT NULL, messages TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    prompt_id INTEGER NOT NULL REFERENCES prompts(id), idx INTEGER NOT NULL,
    text TEXT NOT NULL, finished INTEGER NOT NULL DEFAULT 1, n_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (prompt_id, idx));
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, simulated INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    status TEXT NOT NULL, ranking TEXT NOT NULL, submission_id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, imported INTEGER NOT NULL DEFAULT 0,
    UNIQUE (prompt_id, annotator_id));
CREATE INDEX IF NOT EXISTS rankings_by_annotator ON rankings(annotator_id, status);
"""

# Version 2: annotators can be disabled, and the app's logins are server-side sessions (only the
# hash of a session id is stored; the cookie holds the id, never the annotator's token).
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    created REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_annotator ON sessions(annotator_id);
"""
# Version 3: the blind arena (arena_store.SCHEMA_ARENA): models, their answers, matches and votes.
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id can name no row


def check_ranking(ranking, k: int) -> list[list[int]]:
    """Validate tiers of candidate indices: every index 0..k-1 exactly once, no empty tier."""
    if not isinstance(ranking, list) or not ranking:
        raise StoreError("ranking must be a non-empty list of tiers")
    seen = []
    for tier in ranking:
        if not isinstance(tier, list) or not tier or not all(isinstance(i, int) and not isinstance(i, bool) for i in tier):
            raise StoreError("ranking: each tier must be a non-empty list of candidate indices")
        seen += tier
    if sorted(seen) != list(range(k)):
        raise StoreError(f"ranking must name each of the {k} candidates exactly once")
    return [list(t) for t in ranking]


def _check_id(prompt_id) -> None:
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int) or not -MAX_ID - 1 <= prompt_id <= MAX_ID:
        raise StoreError("prompt_id must be an integer from 1 to 2**63-1")


def _check_text(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None


class FeedbackStore(AnnotatorsAndSessions, ArenaTables):
    def __init__(self, path: str | Path, busy_timeout: float = 30.0):
        """busy_timeout: seconds a write waits for another program's write lock before StoreBusy
        (the web app uses a short one and answers 503; commands wait longer)."""
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        try:
            con = self._con()
            with self._tx():
                for stmt in (SCHEMA + SCHEMA_V2 + SCHEMA_ARENA).split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row[0] in ("1", "2"):  # the sessions (2) and arena (3) tables are made above
                    if row[0] == "1":  # version 1 -> 2: the `disabled` flag
                        con.execute("ALTER TABLE annotators ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")
                    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise StoreError(f"{path}: schema version {row[0]}, this llmtrain reads version {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.close()
            if isinstance(e, sqlite3.OperationalError) and is_busy(e):
                raise StoreBusy(f"{path}: the database is locked by another program (tried for {busy_timeout:g} s)") from None
            raise StoreError(f"{path}: not a feedback database ({e})") from None

    def _con(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed transaction survives a killed process
            con.execute("PRAGMA foreign_keys=ON")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            con.row_factory = sqlite3.Row
            self._local.con = con
        return con

    def _tx(self):
        con = self._con()
        return Tx(con)

    def transaction(self):
        """One all-or-nothing write transaction around several store calls (on this thread)."""
        return self._tx()

    # ---- generations, prompts, candidates

    def add_generation(self, settings: dict) -> int:
        with self._tx() as con:
            return con.execute("INSERT INTO generations (created, settings) VALUES (?, ?)",
                               (time.time(), json.dumps(settings))).lastrowid

    def add_prompt(self, prompt: str, candidates: list[dict], generation_id: int | None = None,
                   messages: list[dict] | None = None) -> int:
        """candidates: [{"text": str, "finished": bool, "n_tokens": int}] (K of them, 2..9)."""
        if not 2 <= len(candidates) <= 9:
            raise StoreError(f"need 2 to 9 candidates per prompt, got {len(candidates)}")
        msgs = messages or [{"role": "user", "content": prompt}]
        with self._tx() as con:
            pid = con.execute("INSERT INTO prompts (generation_id, prompt, messages) VALUES (?, ?, ?)",
                              (generation_id, prompt, json.dumps(msgs))).lastrowid
            con.executemany("INSERT INTO candidates (prompt_id, idx, text, finished, n_tokens) VALUES (?, ?, ?, ?, ?)",
                            [(pid, i, c["text"], int(c.get("finished", True)), int(c.get("n_tokens", 0)))
                             for i, c in enumerate(candidates)])
        return pid

    def prompt(self, prompt_id: int) -> dict | None:
        con = self._con()
        row = con.execute("SELECT * FROM prompts WHERE id=?", (prompt_id,)).fetchone()
        if row is None:
            return None
        cands = con.execute("SELECT idx, text, finished, n_tokens FROM candidates WHERE prompt_id=? ORDER BY idx",
                            (prompt_id,)).fetchall()
        return {"id": row["id"], "prompt": row["prompt"], "messages": json.loads(row["messages"]),
                "generation_id": row["generation_id"],
                "candidates": [{"idx": c["idx"], "text": c["text"], "finished": bool(c["finished"]),
                                "n_tokens": c["n_tokens"]} for c in cands]}

    def prompt_ids(self) -> list[int]:
        return [r[0] for r in self._con().execute("SELECT id FROM prompts ORDER BY id")]

    def generation(self, generation_id: int) -> dict:
        row = self._con().execute("SELECT settings FROM generations WHERE id=?", (generation_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    # ---- rankings

    def next_prompt(self, annotator: Annotator) -> int | None:
        """The first prompt this annotator has neither ranked nor skipped."""
        row = self._con().execute(
            "SELECT p.id FROM prompts p WHERE NOT EXISTS "
            "(SELECT 1 FROM rankings r WHERE r.prompt_id = p.id AND r.annotator_id = ?) ORDER BY p.id LIMIT 1",
            (annotator.id,)).fetchone()
        return row[0] if row else None

    def submit(self, annotator: Annotator, prompt_id: int, status: str, ranking: list[list[int]] | None,
               submission_id: str, imported: bool = False) -> bool:
        """Record one judgement in one transaction. Returns True if recorded now, False if this
        submission id (or this annotator's judgement of this prompt) was recorded before.

        The one code path for a person's form, the simulated annotator and imports.
        """
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        if not isinstance(submission_id, str) or not submission_id or len(submission_id) > 100:
            raise StoreError("a submission id (1-100 characters) is required")
        _check_text(submission_id, "submission_id")
        _check_id(prompt_id)
        with self._tx() as con:
            k = con.execute("SELECT COUNT(*) FROM candidates WHERE prompt_id=?", (prompt_id,)).fetchone()[0]
            if k == 0:
                raise StoreError(f"no prompt with id {prompt_id}")
            tiers = check_ranking(ranking, k) if status == "ranked" else []
            dup = con.execute("SELECT annotator_id, prompt_id FROM rankings WHERE submission_id=?", (submission_id,)).fetchone()
            if dup is not None:
                if (dup[0], dup[1]) != (annotator.id, prompt_id):
                    raise StoreError("this submission id belongs to another submission")
                return False
            cur = con.execute(
                "INSERT INTO rankings (prompt_id, annotator_id, status, ranking, submission_id, created, imported) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, annotator_id) DO NOTHING",
                (prompt_id, annotator.id, status, json.dumps(tiers), submission_id, time.time(), int(imported)))
            return cur.rowcount == 1

    def change(self, annotator: Annotator, prompt_id: int, status: str, ranking: list[list[int]] | None) -> None:
        """An annotator revises their own judgement of a prompt."""
        _check_id(prompt_id)
        with self._tx() as con:
            k = con.execute("SELECT COUNT(*) FROM candidates WHERE prompt_id=?", (prompt_id,)).fetchone()[0]
            tiers = check_ranking(ranking, k) if status == "ranked" else []
            cur = con.execute("UPDATE rankings SET status=?, ranking=?, created=? WHERE prompt_id=? AND annotator_id=?",
                              (status, json.dumps(tiers), time.time(), prompt_id, annotator.id))
            if cur.rowcount != 1:
                raise StoreError(f"no judgement of prompt {prompt_id} by {annotator.name} to change")

    def judgements(self, annotator: Annotator | None = None) -> list[dict]:
        q = ("SELECT r.prompt_id, r.status, r.ranking, r.created, r.imported, a.name, a.simulated "
             "FROM rankings r JOIN annotators a ON a.id = r.annotator_id")
        args: tuple = ()
        if annotator is not None:
            q += " WHERE r.annotator_id = ?"
            args = (annotator.id,)
        rows = self._con().execute(q + " ORDER BY r.prompt_id, a.name", args).fetchall()
        return [{"prompt_id": r[0], "status": r[1], "ranking": json.loads(r[2]), "created": r[3],
                 "imported": bool(r[4]), "annotator": r[5], "simulated": bool(r[6])} for r in rows]

    def progress(self, annotator: Annotator) -> tuple[int, int]:
        con = self._con()
        done = con.execute("SELECT COUNT(*) FROM rankings WHERE annotator_id=?", (annotator.id,)).fetchone()[0]
        total = con.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
        return done, total

    def status_counts(self, annotator: Annotator) -> dict[str, int]:
        """This annotator's judgements by status, and "total": the number of prompts."""
        con = self._con()
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in con.execute("SELECT status, COUNT(*) FROM rankings WHERE annotator_id=? GROUP BY status",
                                     (annotator.id,)):
            counts[status] = n
        counts["total"] = con.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
        return counts

    # ---- the round: which prompts still wait for a person, and the admin's "close the round"

    def open_prompts(self) -> list[int]:
        """Prompts no person has judged yet (ranked, all unacceptable or skipped): a skip settles
        a prompt too, it is left out of the rankings. Simulated annotators do not count."""
        return [r[0] for r in self._con().execute(
            "SELECT p.id FROM prompts p WHERE NOT EXISTS (SELECT 1 FROM rankings r JOIN annotators a "
            "ON a.id = r.annotator_id WHERE r.prompt_id = p.id AND a.simulated = 0) ORDER BY p.id")]

    def round_closed(self) -> bool:
        """True once an admin has closed the round: the pipeline goes on with what people ranked."""
        return self._con().execute("SELECT 1 FROM meta WHERE key='round_closed'").fetchone() is not None

    def close_round(self) -> None:
        with self._tx() as con:
            con.execute("INSERT OR IGNORE INTO meta VALUES ('round_closed', ?)", (str(time.time()),))

    def reopen_round(self) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM meta WHERE key='round_closed'")

    def round_of(self, prompt_id: int) -> tuple[int, int]:
        """(n, of): this prompt row is the n-th of `of` asked with the same conversation in its
        generation (with `rounds` R > 1 each prompt is asked R times, K fresh answers each)."""
        row = self._con().execute(
            "SELECT (SELECT COUNT(*) FROM prompts q WHERE q.generation_id IS p.generation_id AND q.messages = p.messages "
            "AND q.id <= p.id), (SELECT COUNT(*) FROM prompts q WHERE q.generation_id IS p.generation_id "
            "AND q.messages = p.messages) FROM prompts p WHERE p.id = ?", (prompt_id,)).fetchone()
        return (row[0], row[1]) if row else (1, 1)

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # now, not at garbage collection (the last close of a WAL database writes it)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
