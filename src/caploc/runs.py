"""Run directories: what `locate` (result.json), `specificity` and `universal` leave behind, read back safely."""

from __future__ import annotations

import json
from pathlib import Path

from caploc.errors import CaplocError

RESULT = "result.json"
SPECIFICITY = "specificity.json"
UNIVERSAL = "universal.json"


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


def load_run(run: str | Path) -> dict:
    """The result.json of a `locate` run, given its directory or the file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULT
    elif not path.exists():
        raise CaplocError(f"run directory not found: {run}")
    data = read_json(path)
    for key in ("heads", "ranking", "model"):
        if key not in data:
            raise CaplocError(f"{path} is not a caploc locate result (no {key!r})")
    data["_path"] = str(path)
    return data


def run_heads(run: dict, k: int | None = None) -> list[str]:
    """The run's top-k heads (its own k when k is None)."""
    k = k or run.get("k") or len(run["heads"])
    return list(run["ranking"][:k])


def universal_heads(source: str | Path) -> list[str]:
    """Heads flagged universal by a `caploc universal` result (its directory or file)."""
    path = Path(source)
    if path.is_dir():
        path = path / UNIVERSAL
    data = read_json(path, "universal result")
    if "heads" not in data:
        raise CaplocError(f"{path} is not a caploc universal result")
    return [h["head"] for h in data["heads"] if h.get("universal")]
