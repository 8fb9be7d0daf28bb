"""Persistent evaluation store: every (model, task+items, ablation mode, mask) -> per-item scores, and every
array computed from the model that a rerun would otherwise compute again (gradients, attention scores).

SQLite in WAL mode, one short committed write per evaluated mask, so a run killed at any point (even kill -9)
keeps everything it computed, and any method or later run that needs the same mask reads it back. Several
processes on one machine may share one store: readers never wait, writers wait their turn (a busy timeout,
then retries with backoff). WAL needs shared memory between the processes, so it does not work on network
filesystems: machines share results through Ray's driver (`--workers`, `--ray-address`), not through one file.

Every failure is a `StoreError`, one line naming the file: locked past the timeout, disk full, read-only,
not a store, or written by a newer caploc.
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from caploc.errors import CaplocError
from caploc.files import content_key

SCHEMA = 2  # PRAGMA user_version: 1 (or 0) evaluations only, 2 with arrays
_TABLES = """
CREATE TABLE IF NOT EXISTS evaluations (
    context TEXT NOT NULL,      -- hash of the evaluator key: model, task+items, mode
    mask TEXT NOT NULL,         -- masks.mask_key: width and packed bits in hex
    n_ablated INTEGER NOT NULL,
    record TEXT NOT NULL,       -- JSON: {"scores": {metric: [per-item]}, "texts": [...]}
    created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (context, mask)
);
CREATE TABLE IF NOT EXISTS contexts (
    context TEXT PRIMARY KEY,
    key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS arrays (
    context TEXT NOT NULL,      -- hash of what the array depends on besides its name
    name TEXT NOT NULL,
    value BLOB NOT NULL,        -- .npy bytes
    created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (context, name)
);
"""
BUSY_TIMEOUT = 60.0  # seconds a statement waits for another process's write before it is retried
RETRY_FOR = 600.0  # seconds of retries (with backoff) before a locked store is an error


class StoreError(CaplocError):
    """The store cannot be used: the message is one line that names the file and what happened."""


def context_id(key: dict) -> str:
    return content_key(key)


def _why(path: Path, exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return (f"evaluation store {path} stayed locked by another process for more than {RETRY_FOR:.0f} s; "
                f"what was stored is kept, rerun to continue")
    if "full" in text:
        return f"evaluation store {path}: the disk is full; what was stored before is kept, free space and rerun"
    if "readonly" in text or "read-only" in text or "unable to open" in text or "permission" in text:
        return f"evaluation store {path} is read-only or cannot be opened for writing: give --store a writable path"
    if "not a database" in text or "malformed" in text or "file is encrypted" in text:
        return f"evaluation store {path} is not a caploc store (not a SQLite database): give --store another path"
    return f"evaluation store {path}: {exc}"


def _transient(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


class EvalStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._known_contexts: set[str] = set()
        self.hits = 0
        self.writes = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"evaluation store {self.path}: cannot create its directory ({exc.strerror})") from None
        self._db = self._retrying(self._open)

    # -- connection and retries --------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise StoreError(f"evaluation store {self.path} was written by a newer caploc (store schema "
                                 f"{version}, this caploc reads up to {SCHEMA}): upgrade caploc or use another store")
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if version < SCHEMA:
                db.executescript(_TABLES + f"PRAGMA user_version={SCHEMA};")
            return db
        except BaseException:
            db.close()
            raise

    def _retrying(self, operation: Callable):
        """Run `operation`, retrying with backoff while another process holds the lock (beyond SQLite's own
        busy timeout); every other failure, and a lock held past RETRY_FOR, is a StoreError."""
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.05
        while True:
            try:
                return operation()
            except sqlite3.Error as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise StoreError(_why(self.path, exc)) from None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)

    def _write(self, sql: str, args: tuple) -> None:
        def write():
            with self._lock:
                self._db.execute(sql, args)
        self._retrying(write)
        self.writes += 1

    def _read(self, sql: str, args: tuple):
        return self._retrying(lambda: self._db.execute(sql, args).fetchone())

    def _context(self, key: dict) -> str:
        cid = context_id(key)
        if cid not in self._known_contexts:
            self._write("INSERT OR IGNORE INTO contexts VALUES (?, ?)", (cid, json.dumps(key, sort_keys=True)))
            self._known_contexts.add(cid)
        return cid

    # -- evaluations ---------------------------------------------------------------------------------
    def get(self, key: dict, mask: str) -> dict | None:
        """The record stored for the mask key `mask` (`masks.mask_key`) under `key`, or None."""
        row = self._read("SELECT record FROM evaluations WHERE context=? AND mask=?", (self._context(key), mask))
        if row is None:
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: dict, mask: str, n_ablated: int, record: dict) -> None:
        self._write("INSERT OR REPLACE INTO evaluations (context, mask, n_ablated, record) VALUES (?, ?, ?, ?)",
                    (self._context(key), mask, int(n_ablated), json.dumps(record)))

    def count(self, key: dict | None = None) -> int:
        if key is None:
            return self._read("SELECT COUNT(*) FROM evaluations", ())[0]
        return self._read("SELECT COUNT(*) FROM evaluations WHERE context=?", (self._context(key),))[0]

    # -- arrays --------------------------------------------------------------------------------------
    def get_array(self, key: dict, name: str) -> np.ndarray | None:
        row = self._read("SELECT value FROM arrays WHERE context=? AND name=?", (context_id(key), name))
        if row is None:
            return None
        self.hits += 1
        return np.load(io.BytesIO(row[0]), allow_pickle=False)

    def put_array(self, key: dict, name: str, value: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        self._write("INSERT OR REPLACE INTO arrays (context, name, value) VALUES (?, ?, ?)",
                    (context_id(key), name, buffer.getvalue()))

    def array(self, key: dict, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array stored under (key, name), computed and stored first if it is not there."""
        value = self.get_array(key, name)
        if value is None:
            value = np.asarray(compute())
            self.put_array(key, name, value)
        return value

    def close(self) -> None:
        self._db.close()
