"""Parameters declared once, and the registries of what declares them.

A method or a task declares its parameters in its `__init__` signature, as scikit-learn estimators do:
each is stored under its own name, its default is the signature's, and an `Annotated[..., Param(...)]`
gives its help text (and its command-line flag where that is not `--name-with-dashes`). `params()`,
`clone()`, the command line's flags and its help text are all derived from that one declaration.

A `Registry` holds what registers itself with `@REGISTRY.register("name")`: the methods and the tasks.
Code of one's own (a test module, a plugin named by `CAPLOC_PLUGINS` or the `caploc.plugins` entry-point
group) registers the same way and then appears in the command line's help and runs through `locate`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from caploc.errors import ParameterError


@dataclass(frozen=True)
class Param:
    """What the signature alone does not say about a parameter: its help text and, where it is not
    `--name-with-dashes`, its command-line flag."""

    help: str = ""
    flag: str | None = None


@dataclass(frozen=True)
class Declared:
    name: str
    annotation: Any  # the type, without Annotated
    default: Any
    help: str
    flag: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def declared(cls: type) -> list[Declared]:
    """The parameters `cls.__init__` declares (self, *args and **kwargs left out), in order."""
    init = cls.__init__
    if init is object.__init__:
        return []
    hints = typing.get_type_hints(init, include_extras=True)
    out = []
    for p in inspect.signature(init).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation, marker = hints.get(p.name, Any), Param()
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *extras = typing.get_args(annotation)
            marker = next((e for e in extras if isinstance(e, Param)), marker)
        out.append(Declared(p.name, annotation, p.default, marker.help, marker.flag or flag_of(p.name)))
    return out


class Configurable:
    """Derives `params()` and `clone()` from the declaration (every parameter kept as an attribute of its
    own name)."""

    def params(self) -> dict:
        return {p.name: getattr(self, p.name) for p in declared(type(self))}

    def clone(self, **changes):
        return type(self)(**(self.params() | changes))


def _options(annotation) -> tuple:
    """The types a value of `annotation` may take (None left out)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def coerce(text: str, annotation, name: str):
    """A command-line string as the type `annotation` declares (int, float, bool, str, or a union of them
    tried in order: `float | str` takes 0.01 as a number and `cv` as text; a tuple is comma-separated)."""
    for kind in _options(annotation):
        if kind is tuple or typing.get_origin(kind) is tuple:
            element = (typing.get_args(kind) or (str,))[0]
            return tuple(coerce(part.strip(), element, name) for part in text.split(",") if part.strip())
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            continue
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind in (str, Any) or isinstance(kind, typing.TypeVar):
            return text
    raise ParameterError(f"{{{name}}}: not a valid value: {text!r}", name)


def cli_type(annotation) -> type:
    """The type the command line parses a parameter as: its own for int, float and bool, else text."""
    kinds = _options(annotation)
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool) else str


@dataclass(frozen=True)
class Entry:
    """One registered name: the class it builds, fixed arguments, and the parameters a user may set."""

    name: str
    cls: type
    fixed: dict = field(default_factory=dict)

    @property
    def params(self) -> list[Declared]:
        return [p for p in declared(self.cls) if p.name not in self.fixed]

    @property
    def summary(self) -> str:
        doc = inspect.cleandoc(self.cls.__dict__.get("__doc__") or "")  # its own: a base class's would mislead
        return doc.split("\n\n")[0].replace("\n", " ")

    def build(self, **given):
        return self.cls(**self.fixed, **given)


class Registry(Mapping):
    """Name -> Entry, filled by `@registry.register(name)` on the classes."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **fixed) -> Callable[[type], type]:
        """A class decorator; `fixed` arguments are passed on every build (two names, one class)."""
        def add(cls: type) -> type:
            self._entries[name] = Entry(name, cls, fixed)
            return cls
        return add

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise ParameterError(f"unknown {{{self.kind}}} {name!r}: choose one of {', '.join(self._entries)}",
                                 self.kind)
        return self._entries[name]

    def __contains__(self, name) -> bool:
        return name in self._entries

    def get(self, name, default=None):
        return self._entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def build(self, name: str, **given):
        """Build `name` with the parameters given (None keeps a default); a parameter it does not declare
        is a ParameterError naming it."""
        entry = self[name]
        accepted = {p.name for p in entry.params}
        given = {k: v for k, v in given.items() if v is not None}
        unknown = [k for k in given if k not in accepted]
        if unknown:
            raise ParameterError(f"{self.kind} {name} does not take " + ", ".join("{%s}" % u for u in unknown),
                                 *unknown)
        return entry.build(**given)

    def parameters(self) -> dict[str, tuple[Declared, list[str]]]:
        """Every parameter some entry declares, once: its first declaration and the entries that take it."""
        out: dict[str, tuple[Declared, list[str]]] = {}
        for entry in self._entries.values():
            for p in entry.params:
                out.setdefault(p.name, (p, []))[1].append(entry.name)
        return out
