"""The SQLite plumbing under the feedback store: its errors, "is the database busy", and the
write transaction (BEGIN IMMEDIATE, or a savepoint when nested). Plain Python + sqlite3."""
from __future__ import annotations

import sqlite3


class StoreError(ValueError):
    """A request the store refuses (unknown prompt, malformed ranking, ...)."""


class StoreBusy(StoreError):
    """Another program holds the database's write lock for longer than the busy timeout."""


def is_busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


class Tx:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error): one write transaction. Nested inside
    another on the same connection it is a savepoint, so `FeedbackStore.transaction()` can make
    several store calls one all-or-nothing transaction. A write lock held by another program
    for longer than the busy timeout is StoreBusy."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.nested = self.con.in_transaction
        try:
            self.con.execute("SAVEPOINT nested" if self.nested else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if is_busy(e):
                raise StoreBusy("the database is locked by another program; try again in a moment") from None
            raise
        return self.con

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.nested:
            if exc_type:
                self.con.execute("ROLLBACK TO nested")
            self.con.execute("RELEASE nested")
        elif exc_type:
            self.con.execute("ROLLBACK")
        else:
            try:
                self.con.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self.con.execute("ROLLBACK")
                if is_busy(e):
                    raise StoreBusy("the database is locked by another program; try again in a moment") from None
                raise
