"""Reading datasets as their releases ship them: local JSONL / JSON / CSV / Parquet files (each also gzipped),
a directory of such files, or an HF dataset id when online.

Every record remembers where it came from, so a bad one is one line naming the file, the record and the field
and what was expected (`Record.fail`), never a bare KeyError deep inside a task.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from caploc.errors import CaplocError

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


class RecordError(CaplocError):
    """A record that does not say what its dataset's layout promises."""


class Record(dict):
    """One dataset record (a plain dict) plus its origin: the file or hub id, its 1-based number in that
    source and, for line-based files, its line."""

    source: str = "?"
    number: int = 0
    line: int | None = None
    position: int = 0  # 0-based over everything one load_records call read (a directory's files in order)

    @classmethod
    def at(cls, data: dict, source: str, number: int, line: int | None = None) -> "Record":
        record = cls(data)
        record.source, record.number, record.line = source, number, line
        return record

    def where(self) -> str:
        line = f" (line {self.line})" if self.line and self.line != self.number else ""
        return f"{self.source}: record {self.number}{line}"

    def fail(self, field: str, expected: str, got=...) -> RecordError:
        """The error for `field` not being `expected`: raise what this returns."""
        shown = "" if got is ... else f", got {_short(got)}"
        return RecordError(f"{self.where()}: field {field!r}: expected {expected}{shown}")

    def __missing__(self, key):
        raise RecordError(f"{self.where()}: field {key!r} is missing (fields present: "
                          f"{', '.join(map(str, self)) or 'none'})")

    def value(self, path: str):
        """A field, `a.b` reaching into nested objects (the AI2 release's `question.stem`)."""
        node = self
        for depth, part in enumerate(path.split(".")):
            if not isinstance(node, dict) or part not in node:
                parent = ".".join(path.split(".")[:depth])
                if parent and not isinstance(node, dict):
                    raise self.fail(parent, "an object", node)
                raise RecordError(f"{self.where()}: field {path!r} is missing")
            node = node[part]
        return node

    def text(self, path: str, allow_empty: bool = False) -> str:
        value = self.value(path)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or \
                (not allow_empty and not str(value).strip()):
            raise self.fail(path, "non-empty text", value)
        return str(value)

    def texts(self, path: str, at_least: int = 2) -> list[str]:
        value = self.value(path)
        if hasattr(value, "tolist"):  # Parquet lists arrive as arrays
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or len(value) < at_least or \
                not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(path, f"a list of at least {at_least} non-empty texts", value)
        return list(value)

    def choice(self, path: str, labels: list[str], base: int = 0) -> int:
        """An answer naming one of `labels` (A/B/C/D, 1/2/3/4), or its index (`base`: 0 or 1 for indices
        written from 1): the 0-based index of the correct choice."""
        value = self.value(path)
        text = str(value).strip() if not isinstance(value, bool) else None
        if text in labels:
            return labels.index(text)
        if text is not None and text.lstrip("-").isdigit() and 0 <= int(text) - base < len(labels):
            return int(text) - base
        expected = " / ".join(labels) if labels else "a choice index"
        raise self.fail(path, f"one of {expected}" + (f" or an index {base}..{base + len(labels) - 1}"
                                                        if labels and not labels[0].isdigit() else ""), value)

    def boolean(self, path: str) -> bool:
        """true/false as JSON booleans, 0/1, or the strings "true"/"false" (SuperGLUE files have all three)."""
        value = self.value(path)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise self.fail(path, 'true/false, 0/1 or "true"/"false"', value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_records(source: str, split: str | None = None, config: str | None = None,
                 csv_columns: tuple[str, ...] | None = None) -> list[Record]:
    """Records from a local file or directory, or (online) an HF dataset id. `csv_columns` names the columns
    of headerless CSV files (MMLU's release); a first row equal to those names is read as a header."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and file_format(p))
        if not files:
            raise CaplocError(f"{source}: a directory with no {', '.join(FILE_FORMATS)} files")
        records = [r for f in files for r in _read_file(f, csv_columns)]
    elif path.is_file():
        records = _read_file(path, csv_columns)
    elif not is_hub_source(source):
        raise CaplocError(f"dataset file not found: {source}")
    else:
        records = _read_hub(source, split, config)
    if not records:
        raise CaplocError(f"dataset {source} is empty")
    for position, record in enumerate(records):
        record.position = position
    return records


def file_format(path: Path) -> str | None:
    """'.jsonl', '.json', '.csv' or '.parquet' for a data file (gzipped or not), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_FORMATS else None


def is_hub_source(source: str) -> bool:
    """True when `source` names a hub dataset rather than a local file or directory."""
    path = Path(source).expanduser()
    return not path.exists() and file_format(path) is None and not source.startswith((".", "/", "~"))


def read_lines(path: Path) -> list[str]:
    """A text file's lines (gzipped or not), for side files such as PIQA's labels."""
    return _open_text(path).read().splitlines()


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_file(path: Path, csv_columns: tuple[str, ...] | None) -> list[Record]:
    fmt = file_format(path)
    if fmt is None:
        raise CaplocError(f"{path}: not a dataset file (expected {', '.join(FILE_FORMATS)}, optionally .gz)")
    source = str(path)
    try:
        if fmt == ".parquet":
            import pyarrow.parquet as pq

            return [Record.at(r, source, n) for n, r in enumerate(pq.read_table(path).to_pylist(), 1)]
        with _open_text(path) as handle:
            if fmt == ".csv":
                return _read_csv(handle, source, csv_columns)
            if fmt == ".json":
                return _read_json(handle.read(), source)
            return _read_jsonl(handle, source)
    except CaplocError:
        raise
    except ImportError as exc:
        raise CaplocError(f"reading {path.name} needs pyarrow: pip install pyarrow") from exc
    except Exception as exc:  # unreadable, not UTF-8, a broken gzip, a Parquet file pyarrow rejects
        raise CaplocError(f"cannot read dataset {path}: {str(exc).splitlines()[0]}") from exc


def _read_jsonl(handle, source: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaplocError(f"{source}: line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise CaplocError(f"{source}: line {lineno}: expected a JSON object per line, got {type(data).__name__}")
        records.append(Record.at(data, source, len(records) + 1, lineno))
    return records


def _read_json(text: str, source: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if "Extra data" in exc.msg:  # JSON Lines saved as .json
            return _read_jsonl(io.StringIO(text), source)
        raise CaplocError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} wrappers, or one record
        data = next((data[k] for k in ("data", "rows", "examples") if isinstance(data.get(k), list)), [data])
    if not isinstance(data, list):
        raise CaplocError(f"{source}: expected a JSON list of records")
    records = []
    for n, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise CaplocError(f"{source}: record {n}: expected a JSON object, got {type(item).__name__}")
        records.append(Record.at(item, source, n))
    return records


def _read_csv(handle, source: str, columns: tuple[str, ...] | None) -> list[Record]:
    rows = list(csv.reader(handle))
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    start = 1
    if columns and [h.lower() for h in header] != [c.lower() for c in columns]:
        header, start = list(columns), 0  # headerless (MMLU's release)
    records = []
    for lineno, row in enumerate(rows[start:], start + 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CaplocError(f"{source}: line {lineno}: {len(row)} columns, expected {len(header)} "
                              f"({', '.join(header)})")
        records.append(Record.at(dict(zip(header, row)), source, len(records) + 1, lineno))
    return records


def _read_hub(name: str, split: str | None, config: str | None) -> list[Record]:
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
    source = f"{name}" + (f" ({config})" if config else "") + f" [{split or 'test'}]"
    return [Record.at(dict(r), source, n) for n, r in enumerate(ds, 1)]


def require_fields(records: list[dict], fields: tuple[str, ...], source: str) -> None:
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            where = record.where() if isinstance(record, Record) else f"{source}: record {i + 1}"
            raise RecordError(f"{where}: field(s) {', '.join(map(repr, missing))} missing; "
                              f"expected {', '.join(fields)}")


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
