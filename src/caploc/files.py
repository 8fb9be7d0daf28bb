"""Files that must never be left half-written, and caches keyed by the hash of what they depend on.

- `atomic_write(path, write)`: `write` fills a temporary sibling (file or directory), which then replaces
  `path` in one rename, so a killed run leaves either the old content or the new one.
- `content_key(payload)`: the one content hash (of a JSON-able description) used for every cache and store key.
- `HashCache`: a directory of results keyed by `content_key`, computed once (CNL attributions, SAE density).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from caploc.errors import CaplocError


def cache_dir() -> Path:
    """Where caploc keeps what is expensive to recompute: $CAPLOC_CACHE, else the platform's cache dir."""
    env = os.environ.get("CAPLOC_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("caploc"))


def content_key(payload, length: int = 24) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def atomic_write(path: str | Path, write: Callable[[Path], None], *, keep_existing: bool = False) -> Path:
    """Let `write(tmp)` create a temporary sibling of `path` (a file or a directory), then rename it over
    `path`. With `keep_existing`, a `path` that another process finished first is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if keep_existing and path.exists():
            return path
        tmp.replace(path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


def json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | Path, payload) -> Path:
    text = json.dumps(payload, indent=2, default=json_default)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path, what: str = "result") -> dict:
    path = Path(path)
    if not path.exists():
        raise CaplocError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaplocError(f"{path} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise CaplocError(f"{path} is corrupt: expected a JSON object")
    return data


class HashCache:
    """Results in `directory`, one file per content key; `suffix` .json (dicts) or .npy (arrays)."""

    def __init__(self, name: str, suffix: str, root: Path | None = None):
        if suffix not in (".json", ".npy"):
            raise ValueError(f"unsupported cache suffix {suffix}")
        self.directory = (root or cache_dir()) / name
        self.suffix = suffix

    def path(self, key_payload) -> Path:
        return self.directory / f"{content_key(key_payload)}{self.suffix}"

    def get_or_compute(self, key_payload, compute: Callable[[], object]):
        path = self.path(key_payload)
        if path.exists():
            return np.load(path) if self.suffix == ".npy" else json.loads(path.read_text(encoding="utf-8"))
        value = compute()
        if self.suffix == ".npy":
            atomic_write(path, lambda tmp: _save_npy(tmp, value))
        else:
            write_json(path, value)
        return value


def _save_npy(path: Path, value) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a bare temporary name
        np.save(f, np.asarray(value))
