"""Writes to a sqlite store outlast a lock (docs/design.md §9, parallel jobs on one store).

MLflow's sqlite sessions wait up to 20 s for a lock (PRAGMA busy_timeout) and then fail with "database is
locked"; medexp's client (medexp.tracking.store.LockRetrying) then retries with backoff. The retry is tested
here on a real sqlite file with a short busy timeout, so the lock need not be held for 20 s; the end-to-end
check is tests/test_resilience.py (4 jobs, 2 at a time, one store).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from medexp.tracking.store import LockRetrying

HOLD = 1.0  # seconds the other writer keeps the lock; the writer under test gives up after 0.05 s


class Writer:
    """A store client stand-in with one real write: an insert under a 0.05 s busy timeout."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.tries = 0

    def log(self, value: float) -> None:
        self.tries += 1
        with sqlite3.connect(self.database, timeout=0.05) as con:
            con.execute("insert into metrics values (?)", (value,))


def locked_database(tmp_path: Path) -> Path:
    """A database another connection holds an exclusive lock on for HOLD seconds."""
    database = tmp_path / "store.db"
    with sqlite3.connect(database) as con:
        con.execute("create table metrics (value real)")
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(HOLD, lambda: (holder.execute("COMMIT"), holder.close())).start()
    return database


def values(database: Path) -> list[float]:
    with sqlite3.connect(database) as con:
        return [v for (v,) in con.execute("select value from metrics")]


def test_without_retry_a_locked_write_fails(tmp_path: Path):
    database = locked_database(tmp_path)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        Writer(database).log(1.0)
    time.sleep(HOLD + 0.2)
    assert values(database) == []


def test_with_retry_the_write_waits_out_the_lock_and_lands_once(tmp_path: Path):
    database = locked_database(tmp_path)
    writer = Writer(database)
    started = time.monotonic()
    LockRetrying(writer).log(1.0)
    assert time.monotonic() - started >= HOLD * 0.9
    assert writer.tries > 1, "it was retried"
    assert values(database) == [1.0], "one row: a failed try wrote nothing"


def test_other_errors_are_not_retried(tmp_path: Path):
    writer = Writer(tmp_path / "no-table.db")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        LockRetrying(writer).log(1.0)
    assert writer.tries == 1
