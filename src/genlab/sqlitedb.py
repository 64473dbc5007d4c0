"""An SQLite file that threads and processes share safely: WAL (readers never block the writer),
synchronous=FULL (a committed row survives a crash), foreign keys, one connection behind a lock,
BEGIN IMMEDIATE write transactions (the write lock is taken up front: no upgrade deadlocks), and
the schema version in PRAGMA user_version. The feedback store and the version registry build on it.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from genlab.errors import DataError


class SqliteFile:
    def __init__(self, path: str | Path, what: str):
        """Open (or create) `path`; `what` names the file in errors ("feedback database" ...)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:  # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), so DDL and reads can share one
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        except sqlite3.Error as e:
            raise DataError(f"{self.path}: cannot open the {what} ({e})") from None
        try:
            for pragma in ("busy_timeout=5000", "journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
                self._conn.execute(f"PRAGMA {pragma}")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise DataError(f"{self.path}: not a readable {what} ({e})") from None
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        """Create or upgrade the schema (inside self._tx())."""
        raise NotImplementedError

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._fetch(self._conn, sql, args)

    @staticmethod
    def _fetch(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
        cur = conn.execute(sql, args)
        return [{d[0]: v for d, v in zip(cur.description, r)} for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
