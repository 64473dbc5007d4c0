"""SQLite store for served completions and the feedback users leave on them, exported as
TRL-convention datasets (DPO, KTO, SFT).

One connection, shared by the server's worker threads behind a lock; WAL so other processes
(exports, dashboards) can read while the server writes; synchronous=FULL so a row is on disk
when record() / add_feedback() return.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_write_text
from genlab.sqlitedb import SqliteFile

SCHEMA_VERSION = 2  # 2: image generations (endpoint 'images', choices.token_ids)
KINDS = ("dpo", "kto", "sft")
IMAGE_KINDS = ("dpo", "kto")
ENDPOINTS = ("chat", "completions", "images")
MAX_CORRECTION = 100_000
MAX_COMMENT = 10_000

COMPLETIONS_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
        id TEXT PRIMARY KEY, created REAL NOT NULL,
        endpoint TEXT NOT NULL CHECK (endpoint IN ('chat', 'completions', 'images')),
        model TEXT NOT NULL, adapter TEXT, model_version TEXT, user TEXT,
        request TEXT NOT NULL, messages TEXT, prompt TEXT NOT NULL, params TEXT NOT NULL,
        prompt_tokens INTEGER, completion_tokens INTEGER, latency_ms REAL, sources TEXT)"""
SCHEMA = [
    COMPLETIONS_TABLE.format(name="completions"),
    """CREATE TABLE IF NOT EXISTS choices (
        completion_id TEXT NOT NULL REFERENCES completions(id), idx INTEGER NOT NULL,
        text TEXT NOT NULL, finish_reason TEXT, tokens INTEGER,
        token_ids TEXT,  -- images: the generated token ids (JSON list), what preference tuning trains on
        PRIMARY KEY (completion_id, idx))""",
    """CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY, created REAL NOT NULL,
        completion_id TEXT NOT NULL REFERENCES completions(id), choice INTEGER NOT NULL DEFAULT 0,
        rating INTEGER, rating_scale TEXT CHECK (rating_scale IN ('thumbs', 'stars')),
        correction TEXT, comment TEXT,
        preferred TEXT REFERENCES completions(id), rejected TEXT REFERENCES completions(id),
        user TEXT)""",
    "CREATE INDEX IF NOT EXISTS feedback_completion ON feedback(completion_id)",
    "CREATE INDEX IF NOT EXISTS completions_created ON completions(created)",
]
JSON_COLUMNS = ("request", "messages", "params", "sources")


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_urlsafe(18)}"  # 18 bytes -> 24 url-safe characters


@dataclass
class ChoiceRecord:
    idx: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    token_ids: list[int] | None = None  # images: the image's tokens (codes + EOS)


@dataclass
class CompletionRecord:
    id: str
    endpoint: str  # "chat" | "completions" | "images"
    model: str
    prompt: str  # the text actually fed to the model (after chat template, RAG context)
    choices: list[ChoiceRecord]
    request: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    messages: list[dict] | None = None
    adapter: str | None = None
    model_version: str | None = None
    user: str | None = None
    sources: list | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    created: float = field(default_factory=time.time)


def _row(cur: sqlite3.Cursor, row: tuple) -> dict:
    return {d[0]: v for d, v in zip(cur.description, row)}


def _decode(row: dict) -> dict:
    for key in JSON_COLUMNS:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


def _dump(x: Any) -> str | None:
    return None if x is None else json.dumps(x, ensure_ascii=False)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int in Python, not a rating


def _check_rating(rating: Any, scale: str | None) -> str:
    """Validate a rating and return its scale (inferred when not given)."""
    if scale not in (None, "thumbs", "stars"):
        raise InvalidParameterError(f"rating_scale must be 'thumbs' or 'stars', got {scale!r}")
    if not _is_int(rating):
        raise InvalidParameterError(f"rating must be an integer, got {rating!r}")
    if scale is None:  # 1 is ambiguous: read as thumbs-up unless the caller says stars
        scale = "thumbs" if rating in (-1, 1) else "stars"
    if scale == "thumbs" and rating not in (-1, 1):
        raise InvalidParameterError(f"rating must be -1 or 1 on the thumbs scale, got {rating}")
    if scale == "stars" and not 1 <= rating <= 5:
        raise InvalidParameterError(f"rating must be 1..5 on the stars scale (or -1/1 thumbs), got {rating}")
    return scale


def _check_text(name: str, value: Any, limit: int) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidParameterError(f"{name} must be a non-empty string")
    if value is not None and len(value) > limit:
        raise InvalidParameterError(f"{name} is longer than {limit} characters")


def _verdict(rating: int, scale: str) -> bool | None:
    """True (good), False (bad) or None (neutral: 3 stars)."""
    if scale == "thumbs":
        return rating > 0
    return True if rating >= 4 else False if rating <= 2 else None


def _check_record(rec: CompletionRecord) -> None:
    if rec.endpoint not in ENDPOINTS:
        raise InvalidParameterError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {rec.endpoint!r}")
    if rec.endpoint == "chat" and not isinstance(rec.messages, list):
        raise InvalidParameterError("messages must be a list of chat messages for a chat completion")
    if not rec.choices:
        raise InvalidParameterError(f"completion {rec.id} has no choices")
    for c in rec.choices:
        if (rec.endpoint == "images") != (c.token_ids is not None):
            raise InvalidParameterError("token_ids are recorded for image choices, and only for them")
        if c.token_ids is not None and (not c.token_ids or not all(_is_int(t) for t in c.token_ids)):
            raise InvalidParameterError("token_ids must be a non-empty list of integers")


class FeedbackStore(SqliteFile):
    def __init__(self, path: str | Path):
        super().__init__(path, "feedback database")

    def _migrate(self) -> None:
        # SQLite's table rebuild (v1 -> v2 widens a CHECK): foreign keys off around the one
        # transaction, so dropping the old table does not touch its children; checked before commit.
        self._conn.execute("PRAGMA foreign_keys=OFF")
        try:
            with self._tx() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise DataError(f"{self.path}: feedback database schema version {version} is newer than this "
                                    f"genlab supports ({SCHEMA_VERSION}); upgrade genlab")
                if version == 1:
                    _upgrade_v1(conn)
                if version < SCHEMA_VERSION:
                    for stmt in SCHEMA:
                        conn.execute(stmt)
                    if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
                        raise DataError(f"{self.path}: feedback database has rows that point at missing ones")
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            self._conn.execute("PRAGMA foreign_keys=ON")

    # -- writing ---------------------------------------------------------------------------

    def record(self, rec: CompletionRecord) -> None:
        self.record_all([rec])

    def record_all(self, recs: list[CompletionRecord]) -> None:
        """Record completions in one transaction (an image request's images: one completion each)."""
        for rec in recs:
            _check_record(rec)
        try:
            with self._tx() as conn:
                for rec in recs:
                    conn.execute(
                        "INSERT INTO completions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (rec.id, rec.created, rec.endpoint, rec.model, rec.adapter, rec.model_version, rec.user,
                         _dump(rec.request), _dump(rec.messages), rec.prompt, _dump(rec.params),
                         rec.prompt_tokens, rec.completion_tokens, rec.latency_ms, _dump(rec.sources)))
                    conn.executemany("INSERT INTO choices VALUES (?,?,?,?,?,?)",
                                     [(rec.id, c.idx, c.text, c.finish_reason, c.tokens, _dump(c.token_ids))
                                      for c in rec.choices])
        except sqlite3.IntegrityError as e:  # duplicate id or choice index
            raise InvalidParameterError(f"cannot record completion {', '.join(r.id for r in recs)}: {e}") from None

    def add_feedback(self, completion_id: str, *, choice: int = 0, rating: int | None = None,
                     rating_scale: str | None = None, correction: str | None = None,
                     comment: str | None = None, preferred: str | None = None,
                     rejected: str | None = None, user: str | None = None) -> dict:
        if rating is None and correction is None and comment is None and preferred is None and rejected is None:
            raise InvalidParameterError("feedback needs at least one of rating, correction, comment or "
                                        "preferred+rejected")
        if rating is not None:
            rating_scale = _check_rating(rating, rating_scale)
        elif rating_scale is not None:
            raise InvalidParameterError("rating_scale given without a rating")
        _check_text("correction", correction, MAX_CORRECTION)
        _check_text("comment", comment, MAX_COMMENT)
        if (preferred is None) != (rejected is None):
            raise InvalidParameterError("preferred and rejected must be given together")
        if preferred is not None and preferred == rejected:
            raise InvalidParameterError("preferred and rejected must be different completions")
        if preferred is not None and completion_id not in (preferred, rejected):
            raise InvalidParameterError(f"one of preferred/rejected must be the rated completion {completion_id}")
        if not _is_int(choice):
            raise InvalidParameterError(f"choice must be an integer, got {choice!r}")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM completions WHERE id=?", (completion_id,)).fetchone() is None:
                raise LookupError(f"unknown completion_id {completion_id!r}")
            if conn.execute("SELECT 1 FROM choices WHERE completion_id=? AND idx=?",
                            (completion_id, choice)).fetchone() is None:
                raise InvalidParameterError(f"choice {choice} does not exist in completion {completion_id}")
            if preferred is not None:
                prompts = {}
                for cid in (preferred, rejected):
                    row = conn.execute("SELECT prompt FROM completions WHERE id=?", (cid,)).fetchone()
                    if row is None:
                        raise LookupError(f"unknown completion_id {cid!r}")
                    prompts[cid] = row[0]
                if prompts[preferred] != prompts[rejected]:
                    raise InvalidParameterError("preferred and rejected answer different prompts")
            cur = conn.execute(
                "INSERT INTO feedback (created, completion_id, choice, rating, rating_scale, correction, comment,"
                " preferred, rejected, user) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (time.time(), completion_id, choice, rating, rating_scale, correction, comment,
                 preferred, rejected, user))
            cur = conn.execute("SELECT * FROM feedback WHERE id=?", (cur.lastrowid,))
            return _row(cur, cur.fetchone())

    # -- reading ---------------------------------------------------------------------------

    def get_completion(self, id: str) -> dict | None:
        rows = self._query("SELECT * FROM completions WHERE id=?", (id,))
        if not rows:
            return None
        out = _decode(rows[0])
        out["choices"] = self._query("SELECT idx, text, finish_reason, tokens, token_ids FROM choices "
                                     "WHERE completion_id=? ORDER BY idx", (id,))
        for c in out["choices"]:  # image generations only: text answers keep their v1 shape
            ids = c.pop("token_ids")
            if ids is not None:
                c["token_ids"] = json.loads(ids)
        return out

    def list_feedback(self, limit: int = 50, offset: int = 0, completion_id: str | None = None) -> list[dict]:
        if not _is_int(limit) or not 1 <= limit <= 10_000:
            raise InvalidParameterError(f"limit must be an integer in 1..10000, got {limit!r}")
        if not _is_int(offset) or offset < 0:
            raise InvalidParameterError(f"offset must be a non-negative integer, got {offset!r}")
        where, args = ("WHERE f.completion_id=?", (completion_id,)) if completion_id is not None else ("", ())
        rows = self._query(
            "SELECT f.*, c.endpoint, c.model, c.prompt, c.messages, ch.text AS choice_text FROM feedback f"
            " JOIN completions c ON c.id = f.completion_id"
            " LEFT JOIN choices ch ON ch.completion_id = f.completion_id AND ch.idx = f.choice"
            f" {where} ORDER BY f.created DESC, f.id DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        return [_decode(r) for r in rows]

    def count_feedback(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM feedback")[0]["n"]

    def count_completions(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM completions")[0]["n"]

    # -- datasets --------------------------------------------------------------------------

    def dataset(self, kind: str) -> list[dict]:
        """TRL rows: dpo (A/B pairs, corrections over originals), kto (latest rating per answer; 3 stars
        skipped; corrections give correction=True, original=False and outrank a rating of the original), sft (corrections, positively rated
        answers that were not corrected). Chat prompts are message lists; identical rows appear once."""
        if kind not in KINDS:
            raise InvalidParameterError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
        used = ("(SELECT completion_id FROM feedback UNION SELECT preferred FROM feedback"
                " UNION SELECT rejected FROM feedback)")
        comps = {r["id"]: _decode(r) for r in self._query(
            f"SELECT id, endpoint, prompt, messages FROM completions WHERE id IN {used} AND endpoint != 'images'")}
        texts = {(r["completion_id"], r["idx"]): r["text"] for r in self._query(
            f"SELECT completion_id, idx, text FROM choices WHERE completion_id IN {used}")}
        feedback = self._query("SELECT * FROM feedback ORDER BY id")  # insertion order: deterministic output
        latest = {(f["completion_id"], f["choice"]): f["id"] for f in feedback if f["rating"] is not None}
        corrected = {(f["completion_id"], f["choice"]) for f in feedback if f["correction"] is not None}

        def prompt(cid: str) -> str | list[dict]:
            c = comps[cid]  # chat: TRL conversational format; completions: standard (strings)
            return c["messages"] if c["endpoint"] == "chat" else c["prompt"]

        def answer(cid: str, text: str) -> str | list[dict]:
            return [{"role": "assistant", "content": text}] if comps[cid]["endpoint"] == "chat" else text

        rows: list[dict] = []
        for f in feedback:
            if f["completion_id"] not in comps:  # an image generation: see image_dataset
                continue
            cid, key = f["completion_id"], (f["completion_id"], f["choice"])
            original, fix = texts.get(key), f["correction"]
            fix_differs = fix is not None and original is not None and fix.strip() != original.strip()
            good = None
            if f["rating"] is not None and latest[key] == f["id"]:  # several ratings: the latest wins
                good = _verdict(f["rating"], f["rating_scale"])
            if kind == "dpo":
                if f["preferred"] is not None:
                    chosen, rejected = texts.get((f["preferred"], 0)), texts.get((f["rejected"], 0))
                    if chosen is not None and rejected is not None and chosen.strip() != rejected.strip():
                        rows.append({"prompt": prompt(f["preferred"]), "chosen": answer(f["preferred"], chosen),
                                     "rejected": answer(f["preferred"], rejected), "source": "ab",
                                     "completion_id": cid})
                if fix_differs:
                    rows.append({"prompt": prompt(cid), "chosen": answer(cid, fix),
                                 "rejected": answer(cid, original), "source": "correction", "completion_id": cid})
            elif kind == "kto":
                if good is not None and original is not None and key not in corrected:  # a correction outranks a rating
                    rows.append({"prompt": prompt(cid), "completion": answer(cid, original), "label": good,
                                 "completion_id": cid})
                if fix_differs:
                    rows.append({"prompt": prompt(cid), "completion": answer(cid, fix), "label": True,
                                 "completion_id": cid})
                    rows.append({"prompt": prompt(cid), "completion": answer(cid, original), "label": False,
                                 "completion_id": cid})
            else:
                text = fix if fix_differs else original if good and key not in corrected else None
                if text is not None and comps[cid]["endpoint"] == "chat":
                    rows.append({"messages": prompt(cid) + answer(cid, text)})
                elif text is not None:
                    rows.append({"prompt": prompt(cid), "completion": text})
        return _dedup(rows)

    def image_dataset(self, kind: str) -> list[dict]:
        """Preference rows over image generations, with token ids as the answers: dpo {"prompt":
        caption, "chosen": ids, "rejected": ids} from A/B choices; kto {"prompt", "completion": ids,
        "label"} from each image's latest rating (3 stars skipped)."""
        if kind not in IMAGE_KINDS:
            raise InvalidParameterError(f"image dataset kind must be one of {', '.join(IMAGE_KINDS)}, got {kind!r}")
        images = {(r["completion_id"], r["idx"]): (r["prompt"], json.loads(r["token_ids"])) for r in self._query(
            "SELECT ch.completion_id, ch.idx, ch.token_ids, c.prompt FROM choices ch JOIN completions c"
            " ON c.id = ch.completion_id WHERE c.endpoint = 'images'")}
        feedback = self._query("SELECT * FROM feedback ORDER BY id")
        rows: list[dict] = []
        if kind == "dpo":
            for f in feedback:
                chosen, rejected = images.get((f["preferred"], 0)), images.get((f["rejected"], 0))
                if chosen is not None and rejected is not None and chosen[1] != rejected[1]:
                    rows.append({"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1],
                                 "completion_id": f["completion_id"]})
        else:
            latest = {(f["completion_id"], f["choice"]): f for f in feedback if f["rating"] is not None}
            for key, f in latest.items():
                good = _verdict(f["rating"], f["rating_scale"])
                if key in images and good is not None:
                    rows.append({"prompt": images[key][0], "completion": images[key][1], "label": good,
                                 "completion_id": key[0]})
        return _dedup(rows)

    def export(self, kind: str, path: str | Path) -> int:
        rows = self.dataset(kind)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise DataError(f"{path}: cannot write the {kind} export ({e.strerror or e})") from None
        return len(rows)


def _upgrade_v1(conn: sqlite3.Connection) -> None:
    """v1 -> v2 (inside the migration's transaction): completions may come from the images
    endpoint, choices keep token ids. SQLite cannot change a CHECK in place: rebuild the table."""
    conn.execute(COMPLETIONS_TABLE.format(name="completions_v2"))
    conn.execute("INSERT INTO completions_v2 SELECT * FROM completions")
    conn.execute("DROP TABLE completions")
    conn.execute("ALTER TABLE completions_v2 RENAME TO completions")
    conn.execute("ALTER TABLE choices ADD COLUMN token_ids TEXT")


def _dedup(rows: list[dict]) -> list[dict]:
    """Keep the first of rows that are equal apart from their completion_id / source."""
    seen, out = set(), []
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k not in ("completion_id", "source")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
