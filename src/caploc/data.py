"""Reading datasets in their native schema: local JSONL / JSON / Parquet files, or an HF dataset id."""

from __future__ import annotations

import json
from pathlib import Path

from caploc.errors import CaplocError


def load_records(source: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Records from a local file (.jsonl, .json, .parquet) or, when online, an HF dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        records = _read_file(path)
    elif not is_hub_source(source):
        raise CaplocError(f"dataset file not found: {source}")
    else:
        records = _read_hub(source, split, config)
    if not records:
        raise CaplocError(f"dataset {source} is empty")
    return records


def is_hub_source(source: str) -> bool:
    """True when `source` names a hub dataset rather than a local file."""
    path = Path(source).expanduser()
    return not path.exists() and path.suffix.lower() not in (".jsonl", ".json", ".parquet")


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CaplocError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise CaplocError(f"{path}:{lineno}: expected a JSON object per line")
                records.append(record)
        return records
    except CaplocError:
        raise
    except ImportError as exc:
        raise CaplocError(f"reading {path.name} needs pyarrow: pip install pyarrow") from exc
    except Exception as exc:
        raise CaplocError(f"cannot read dataset {path}: {str(exc).splitlines()[0]}") from exc


def _read_hub(name: str, split: str | None, config: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise CaplocError(
            f"{name!r} is not a local file; loading a hub dataset needs `pip install datasets` and a network"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split or "test")
    except Exception as exc:
        raise CaplocError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0]}") from exc
    return [dict(r) for r in ds]


def require_fields(records: list[dict], fields: tuple[str, ...], source: str) -> None:
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise CaplocError(f"{source}: record {i} lacks field(s) {', '.join(missing)}; expected {', '.join(fields)}")


def split_exemplars(name: str, data: str, records: list[dict], shots: int, fields: tuple[str, ...], key: str,
                    fewshot_data: str | None, fewshot_split: str, config: str | None,
                    preferred=None) -> tuple[list[dict], list[dict]]:
    """(few-shot exemplars, scored records): exemplars from `fewshot_data`, else the hub's `fewshot_split`,
    else set aside from the single file (`preferred` ones first, else its first `shots` records). Records
    whose `key` matches an exemplar's are never scored."""
    if fewshot_data:
        pool = load_records(fewshot_data, split=fewshot_split, config=config)
        require_fields(pool, fields, fewshot_data)
    elif is_hub_source(data):
        pool = load_records(data, split=fewshot_split, config=config)
    else:
        chosen = [r for r in records if preferred and preferred(r)]
        pool = chosen if len(chosen) >= shots else records[:shots]
    if len(pool) < shots:
        raise CaplocError(f"{name}: {shots} few-shot exemplars requested, only {len(pool)} available")
    exemplars = pool[:shots]
    used = {r[key] for r in exemplars}
    scored = [r for r in records if r[key] not in used]
    if not scored:
        raise CaplocError(f"{name}: no items left in {data} after setting aside the few-shot exemplars")
    return exemplars, scored
