"""Annotators and their sessions in the feedback database: tokens (only their hashes are
stored), revoking and rotating them, and the web app's server-side logins. `FeedbackStore`
(store.py) has these methods through `AnnotatorsAndSessions`. Plain Python + sqlite3."""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

from llmtrain.feedback.db import StoreError


@dataclass
class Annotator:
    id: int
    name: str
    is_admin: bool
    simulated: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class AnnotatorsAndSessions:
    """The annotator and session methods of `FeedbackStore` (which gives `path`, `_con` and `_tx`)."""

    # ---- annotators

    def add_annotator(self, name: str, is_admin: bool = False, simulated: bool = False) -> str:
        """Create an annotator; returns the secret token (only its hash is stored)."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise StoreError("annotator names are 1-64 letters, digits, '-', '_' or '.'")
        token = secrets.token_urlsafe(32)  # 256 random bits
        try:
            with self._tx() as con:
                con.execute("INSERT INTO annotators (name, token_hash, is_admin, simulated, created) VALUES (?, ?, ?, ?, ?)",
                            (name, hash_token(token), int(is_admin), int(simulated), time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"an annotator named {name!r} exists already") from None
        return token

    def annotator_by_token(self, token: str | None) -> Annotator | None:
        """The enabled annotator whose token this is (None for a wrong, rotated or revoked one)."""
        if not token:
            return None
        row = self._con().execute("SELECT id, name, is_admin, simulated FROM annotators WHERE token_hash=? AND disabled=0",
                                  (hash_token(token),)).fetchone()
        return Annotator(row[0], row[1], bool(row[2]), bool(row[3])) if row else None

    def annotator(self, name: str) -> Annotator | None:
        row = self._con().execute("SELECT id, name, is_admin, simulated FROM annotators WHERE name=?", (name,)).fetchone()
        return Annotator(row[0], row[1], bool(row[2]), bool(row[3])) if row else None

    def ensure_annotator(self, name: str, simulated: bool = False) -> Annotator:
        a = self.annotator(name)
        if a is None:
            self.add_annotator(name, simulated=simulated)
            a = self.annotator(name)
        return a

    def annotators(self) -> list[Annotator]:
        return [Annotator(r[0], r[1], bool(r[2]), bool(r[3]))
                for r in self._con().execute("SELECT id, name, is_admin, simulated FROM annotators ORDER BY id")]

    def _named(self, con: sqlite3.Connection, name: str) -> int:
        row = con.execute("SELECT id FROM annotators WHERE name=?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"no annotator named {name!r} in {self.path}")
        return row[0]

    def revoke_annotator(self, name: str) -> int:
        """Disable an annotator: their token stops working and their sessions end at once (their
        rankings stay). Returns the number of sessions ended. `rotate_token` re-admits them."""
        with self._tx() as con:
            aid = self._named(con, name)
            con.execute("UPDATE annotators SET disabled=1 WHERE id=?", (aid,))
            return con.execute("DELETE FROM sessions WHERE annotator_id=?", (aid,)).rowcount

    def rotate_token(self, name: str) -> str:
        """Issue a new token (returned; only its hash is stored): the old token and every session
        made with it stop working. Re-enables a revoked annotator."""
        token = secrets.token_urlsafe(32)  # 256 random bits
        with self._tx() as con:
            aid = self._named(con, name)
            con.execute("UPDATE annotators SET token_hash=?, disabled=0 WHERE id=?", (hash_token(token), aid))
            con.execute("DELETE FROM sessions WHERE annotator_id=?", (aid,))
        return token

    # ---- sessions (the web app's logins)

    def create_session(self, annotator: Annotator, ttl: float) -> str:
        """A new random session id for this annotator, valid for ttl seconds; only its hash is stored."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._tx() as con:
            con.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            con.execute("INSERT INTO sessions (id_hash, annotator_id, created, expires) VALUES (?, ?, ?, ?)",
                        (hash_token(sid), annotator.id, now, now + ttl))
        return sid

    def session_annotator(self, session_id: str | None) -> Annotator | None:
        """The enabled annotator of a live (unexpired, unrevoked) session; None otherwise. A read."""
        if not session_id:
            return None
        row = self._con().execute(
            "SELECT a.id, a.name, a.is_admin, a.simulated FROM sessions s JOIN annotators a ON a.id = s.annotator_id "
            "WHERE s.id_hash=? AND s.expires > ? AND a.disabled=0", (hash_token(session_id), time.time())).fetchone()
        return Annotator(row[0], row[1], bool(row[2]), bool(row[3])) if row else None

    def revoke_session(self, session_id: str) -> bool:
        with self._tx() as con:
            return con.execute("DELETE FROM sessions WHERE id_hash=?", (hash_token(session_id),)).rowcount == 1
