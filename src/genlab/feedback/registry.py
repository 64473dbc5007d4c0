"""Model versions with lineage, promotion and rollback, in SQLite.

A version is a base model folder plus an optional LoRA adapter folder, with the version it was
trained from, the feedback it was trained on (`data`), its gate metrics and a status: candidate,
promoted (it has served), rejected (the gate said no; `note` says why) or retired (rolled back).
One row of `state` says which version serves; a server polls it (`serving_id`) and switches
between requests. Every change is one transaction that also appends to the `events` audit log,
and the serving history (what a rollback returns to) is replayed from those events.

Same conventions as feedback/store.py: WAL so a polling server and a training job in another
process work side by side, synchronous=FULL, one connection behind a lock, BEGIN IMMEDIATE.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from genlab.errors import DataError, InvalidParameterError
from genlab.sqlitedb import SqliteFile

SCHEMA_VERSION = 1
STATUSES = ("candidate", "promoted", "rejected", "retired")
METHODS = ("dpo", "kto", "orpo", "sft")
TABLES = {"versions", "events", "state"}
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS versions (
        id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL,
        base TEXT NOT NULL, adapter TEXT, parent INTEGER REFERENCES versions(id),
        method TEXT, data TEXT, metrics TEXT,
        status TEXT NOT NULL CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')), note TEXT)""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY, created REAL NOT NULL, version INTEGER NOT NULL REFERENCES versions(id),
        action TEXT NOT NULL CHECK (action IN ('register', 'promote', 'reject', 'rollback')), detail TEXT)""",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER)",
    "CREATE INDEX IF NOT EXISTS events_version ON events(version)",
]


def _dump(name: str, x: Any) -> str | None:
    try:
        return None if x is None else json.dumps(x, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidParameterError(f"{name} must be JSON-serialisable ({e})") from None


def _folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: {what} folder {'is not a folder' if p.exists() else 'does not exist'}")
    return p.resolve()


class Registry(SqliteFile):
    def __init__(self, path: str | Path):
        super().__init__(path, "version registry")

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if (tables and not TABLES <= tables) or (not version and tables - TABLES):
                # e.g. the feedback database given as --registry (whatever its schema version):
                # refuse rather than add tables to it
                raise DataError(f"{self.path}: an SQLite database but not a genlab version registry "
                                f"(tables: {', '.join(sorted(tables))})")
            if version > SCHEMA_VERSION:
                raise DataError(f"{self.path}: version registry schema {version} is newer than this genlab "
                                f"supports ({SCHEMA_VERSION}); upgrade genlab")
            if version < SCHEMA_VERSION:
                for stmt in SCHEMA:
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _fetch(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
        rows = SqliteFile._fetch(conn, sql, args)
        for r in rows:
            for key in ("data", "metrics"):
                if r.get(key) is not None:
                    r[key] = json.loads(r[key])
        return rows

    # -- reading -----------------------------------------------------------------------------

    def _find(self, conn: sqlite3.Connection, version: int | str) -> dict:
        if isinstance(version, bool) or not isinstance(version, (int, str)):
            raise InvalidParameterError(f"a version is an id (3) or a name ('v3'), got {version!r}")
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        column = "id" if isinstance(version, int) else "name"
        rows = self._fetch(conn, f"SELECT * FROM versions WHERE {column} = ?", (version,))
        if not rows:
            raise LookupError(f"unknown version {version!r} in {self.path}")
        return rows[0]

    def get(self, version: int | str) -> dict:
        with self._lock:
            return self._find(self._conn, version)

    def list(self) -> list[dict]:
        """Every version, oldest first."""
        return self._query("SELECT * FROM versions ORDER BY id")

    def serving_id(self) -> int | None:
        """The serving version's id: one primary-key read, cheap enough to poll every second."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = 'serving'").fetchone()
        return row[0] if row else None

    def current(self) -> dict | None:
        """The serving version (None in an empty registry)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = 'serving'").fetchone()
            return self._find(self._conn, row[0]) if row else None

    def lineage(self, version: int | str) -> list[dict]:
        """The version, its parent, its parent's parent ... up to the root."""
        with self._lock:
            start = self._find(self._conn, version)["id"]
            return self._fetch(self._conn, """
                WITH RECURSIVE chain(id, depth) AS (
                    SELECT ?, 0 UNION ALL
                    SELECT v.parent, c.depth + 1 FROM versions v JOIN chain c ON v.id = c.id
                    WHERE v.parent IS NOT NULL)
                SELECT versions.* FROM chain JOIN versions USING (id) ORDER BY depth""", (start,))

    def events(self, version: int | str | None = None) -> list[dict]:
        """The audit log, oldest first (of one version if given)."""
        if version is None:
            return self._query("SELECT * FROM events ORDER BY id")
        with self._lock:
            vid = self._find(self._conn, version)["id"]
            return self._fetch(self._conn, "SELECT * FROM events WHERE version = ? ORDER BY id", (vid,))

    def history(self) -> list[dict]:
        """The versions a rollback walks back through, oldest first; the last one serves."""
        with self._lock:
            return [self._find(self._conn, vid) for vid in self._history(self._conn)]

    @staticmethod
    def _history(conn: sqlite3.Connection) -> list[int]:
        # replay: a promotion pushes the version it serves, a rollback pops the one it retires
        stack: list[int] = []
        for vid, action in conn.execute(
                "SELECT version, action FROM events WHERE action IN ('promote', 'rollback') ORDER BY id"):
            if action == "promote" and (not stack or stack[-1] != vid):
                stack.append(vid)
            elif action == "rollback" and stack:
                stack.pop()
        return stack

    # -- writing -----------------------------------------------------------------------------

    def register(self, base: str | Path, adapter: str | Path | None = None, parent: int | str | None = None,
                 method: str | None = None, data: Any = None, metrics: Any = None, status: str = "candidate",
                 note: str | None = None) -> dict:
        """Add a version (v1, v2, ...); status 'promoted' also makes it the serving version."""
        if status not in ("candidate", "promoted", "rejected"):
            raise InvalidParameterError(f"a new version's status must be candidate, promoted or rejected, got {status!r}")
        if method is not None and method not in METHODS:
            raise InvalidParameterError(f"method must be one of {', '.join(METHODS)} or None, got {method!r}")
        base_dir = _folder(base, "base model")
        adapter_dir = _folder(adapter, "adapter") if adapter is not None else None
        data_json, metrics_json = _dump("data", data), _dump("metrics", metrics)
        with self._tx() as conn:
            vid = self._insert(conn, base_dir, adapter_dir, parent, method, data_json, metrics_json, status, note)
            return self._find(conn, vid)

    def _insert(self, conn: sqlite3.Connection, base: Path, adapter: Path | None, parent: int | str | None,
                method: str | None, data: str | None, metrics: str | None, status: str, note: str | None) -> int:
        first = conn.execute("SELECT base FROM versions ORDER BY id LIMIT 1").fetchone()
        if first is not None and first[0] != str(base):
            raise InvalidParameterError(f"{self.path} belongs to base model {first[0]}, not {base}")
        parent_id = self._find(conn, parent)["id"] if parent is not None else None
        vid = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM versions").fetchone()[0]
        conn.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (vid, f"v{vid}", time.time(), str(base), str(adapter) if adapter else None, parent_id,
                      method, data, metrics, status, note))
        self._event(conn, vid, "register", note)
        if status == "promoted":
            self._serve(conn, vid, "promote", note)
        elif status == "rejected":
            self._event(conn, vid, "reject", note)
        return vid

    def ensure_initial(self, base: str | Path, adapter: str | Path | None = None) -> dict:
        """The serving version; when nothing serves yet, `base` (+ `adapter`) is registered as it, promoted."""
        base_dir = _folder(base, "base model")
        adapter_dir = _folder(adapter, "adapter") if adapter is not None else None
        with self._tx() as conn:  # check and insert in one transaction: two processes may start at once
            row = conn.execute("SELECT value FROM state WHERE key = 'serving'").fetchone()
            if row is None:
                vid = self._insert(conn, base_dir, adapter_dir, None, None, None, None, "promoted",
                                   "serving when the registry started")
                return self._find(conn, vid)
            current = self._find(conn, row[0])
            if current["base"] != str(base_dir):
                raise InvalidParameterError(f"{self.path} belongs to base model {current['base']}, not {base_dir}")
            return current

    def promote(self, version: int | str, note: str | None = None, force: bool = False) -> dict:
        """Serve `version` from now on; a rejected version needs force=True."""
        with self._tx() as conn:
            v = self._find(conn, version)
            if v["status"] == "rejected" and not force:
                raise InvalidParameterError(f"{v['name']} was rejected ({v['note'] or 'no reason recorded'}); "
                                            f"use force=True to promote it anyway")
            conn.execute("UPDATE versions SET status = 'promoted', note = COALESCE(?, note) WHERE id = ?",
                         (note, v["id"]))
            self._serve(conn, v["id"], "promote", note)
            return self._find(conn, v["id"])

    def reject(self, version: int | str, note: str, metrics: Any = None) -> dict:
        """Mark a version rejected with the reason (the gate's explanation)."""
        if not isinstance(note, str) or not note.strip():
            raise InvalidParameterError("reject needs a reason (note)")
        metrics_json = _dump("metrics", metrics)
        with self._tx() as conn:
            v = self._find(conn, version)
            if v["id"] == self._serving(conn):
                raise InvalidParameterError(f"{v['name']} is serving; roll back or promote another version first")
            conn.execute("UPDATE versions SET status = 'rejected', note = ?, metrics = COALESCE(?, metrics) "
                         "WHERE id = ?", (note, metrics_json, v["id"]))
            self._event(conn, v["id"], "reject", note)
            return self._find(conn, v["id"])

    def rollback(self, note: str | None = None) -> dict:
        """Serve the version that served before the current one; the current one is retired."""
        with self._tx() as conn:
            stack = self._history(conn)
            if len(stack) < 2:
                only = f"v{stack[0]} is the first version that served" if stack else "no version has served"
                raise InvalidParameterError(f"nothing to roll back to: {only}")
            current, previous = stack[-1], stack[-2]
            conn.execute("UPDATE versions SET status = 'retired' WHERE id = ?", (current,))
            detail = f"v{current} -> v{previous}" + (f": {note}" if note else "")
            self._set_serving(conn, previous)
            self._event(conn, current, "rollback", detail)  # the event names the version rolled back
            return self._find(conn, previous)

    @staticmethod
    def _serving(conn: sqlite3.Connection) -> int | None:
        row = conn.execute("SELECT value FROM state WHERE key = 'serving'").fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_serving(conn: sqlite3.Connection, version: int) -> None:
        conn.execute("INSERT INTO state VALUES ('serving', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                     (version,))

    def _serve(self, conn: sqlite3.Connection, version: int, action: str, note: str | None) -> None:
        self._set_serving(conn, version)
        self._event(conn, version, action, note)

    @staticmethod
    def _event(conn: sqlite3.Connection, version: int, action: str, detail: str | None) -> None:
        conn.execute("INSERT INTO events (created, version, action, detail) VALUES (?,?,?,?)",
                     (time.time(), version, action, detail))
