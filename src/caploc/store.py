"""Persistent evaluation store: every (model, task+items, ablation mode, mask) -> per-item scores.

SQLite in WAL mode, one committed row per evaluated mask, so a run killed at any point (even kill -9)
keeps everything it computed, and any method or later run that needs the same mask reads it back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np

from caploc.errors import CaplocError
from caploc.files import content_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    context TEXT NOT NULL,      -- hash of the evaluator key: model, task+items, mode
    mask TEXT NOT NULL,         -- hex of the packed bool mask
    n_ablated INTEGER NOT NULL,
    record TEXT NOT NULL,       -- JSON: {"scores": {metric: [per-item]}, "texts": [...]}
    created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (context, mask)
);
CREATE TABLE IF NOT EXISTS contexts (
    context TEXT PRIMARY KEY,
    key TEXT NOT NULL
);
"""


def context_id(key: dict) -> str:
    return content_key(key)


def mask_hex(mask_row) -> str:
    row = np.asarray(mask_row, dtype=bool)
    return f"{row.size}:" + np.packbits(row).tobytes().hex()


class EvalStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise CaplocError(f"evaluation store {self.path} is not a readable SQLite file: {exc}") from exc
        self._lock = threading.Lock()
        self._known_contexts: set[str] = set()
        self.hits = 0
        self.writes = 0

    def _context(self, key: dict) -> str:
        cid = context_id(key)
        if cid not in self._known_contexts:
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)", (cid, json.dumps(key, sort_keys=True)))
            self._known_contexts.add(cid)
        return cid

    def get(self, key: dict, mask_row) -> dict | None:
        row = self._db.execute("SELECT record FROM evaluations WHERE context=? AND mask=?",
                               (self._context(key), mask_hex(mask_row))).fetchone()
        if row is None:
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: dict, mask_row, record: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO evaluations (context, mask, n_ablated, record) VALUES (?, ?, ?, ?)",
                             (self._context(key), mask_hex(mask_row), int(np.asarray(mask_row).sum()),
                              json.dumps(record)))
        self.writes += 1

    def count(self, key: dict | None = None) -> int:
        if key is None:
            return self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM evaluations WHERE context=?", (self._context(key),)).fetchone()[0]

    def close(self) -> None:
        self._db.close()
