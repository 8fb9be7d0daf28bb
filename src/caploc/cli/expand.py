"""Commands generated from what the library declares: a command's parameter annotated with a spec class
(ModelSpec, TaskSpec, EvalOptions, Criterion, ...) becomes one flag per field that carries `cli` metadata, and
a `method` parameter becomes `--method` plus every registered method's parameters. A field or a method
parameter added in the library is then a flag, with its help, without touching the command line.

`flag_of(name)` maps a library parameter name to the flag that sets it, for error messages.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, List, Optional

import typer

from caploc.errors import ParameterError
from caploc.params import Declared, Registry, cli_type, coerce
from caploc.params import flag_of as default_flag

_FLAGS: dict[str, str] = {}  # library parameter -> its flag, filled as commands are built


def flag_of(name: str) -> str:
    return _FLAGS.get(name, default_flag(name))


def _note_flag(name: str, flag: str) -> None:
    _FLAGS.setdefault(name, flag.split("/")[0])


def _plain_type(annotation) -> tuple[type, bool]:
    """(the command-line type of a field's annotation, whether it repeats)."""
    kinds = [a for a in (typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType)
                         else (annotation,)) if a is not type(None)]
    for kind in kinds:
        if kind is tuple or typing.get_origin(kind) is tuple:
            return str, True
    for kind in kinds:
        if kind in (bool, int, float, str):
            return kind, False
    return str, False


def _spec_parameters(owner: str, cls: type, default) -> tuple[list[inspect.Parameter], list[tuple]]:
    hints = typing.get_type_hints(cls)
    params, fields = [], []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        if not meta:
            continue
        kind, repeats = _plain_type(hints[f.name])
        if meta["parse"] is not None:
            kind, repeats = str, False
        value = getattr(default, f.name)
        shown = value if isinstance(value, (bool, int, float, str)) else None
        help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
        option = typer.Option(None if repeats else shown, *meta["flags"], help=help_text, hidden=meta["hidden"],
                              show_default=shown is not None)
        annotation = List[kind] if repeats else Optional[kind]
        name = f"{owner}__{f.name}"
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
        fields.append((f.name, name, meta["parse"], repeats))
        _note_flag(f.name, meta["flags"][0])
    return params, fields


def _method_parameters(registry: Registry) -> tuple[list[inspect.Parameter], dict[str, Declared]]:
    params, declared = [], {}
    seen_flags: dict[str, str] = {}
    for name, (p, owners) in registry.parameters().items():
        if name == "seed":  # the run's seed
            continue
        if p.flag in seen_flags and seen_flags[p.flag] != name:
            raise RuntimeError(f"methods {owners} declare {name} with flag {p.flag}, already {seen_flags[p.flag]}'s")
        seen_flags[p.flag] = name
        kind = cli_type(p.annotation)
        shown = f" (default {p.default})" if len(owners) == 1 and p.default not in (None, inspect.Parameter.empty) else ""
        help_text = (p.help or f"{', '.join(owners)}: {name}") + shown
        params.append(inspect.Parameter(f"method__{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                        default=typer.Option(None, p.flag, help=help_text, show_default=False)))
        declared[name] = p
        _note_flag(name, p.flag)
    return params, declared


def expanded(registry: Registry | None = None):
    """Decorator: the command with its spec-typed parameters expanded into flags (and, with `registry`, its
    `method` parameter's registered parameters); the function receives the specs built."""
    def wrap(fn):
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        parameters, groups, methods = [], {}, None
        for p in signature.parameters.values():
            if p.name == "method_params":  # filled from the registered methods' flags
                continue
            cls = hints.get(p.name)
            if isinstance(cls, type) and dataclasses.is_dataclass(cls):
                default = p.default if p.default is not inspect.Parameter.empty else cls()
                expanded_params, fields = _spec_parameters(p.name, cls, default)
                parameters += expanded_params
                groups[p.name] = (default, fields)
            else:
                annotation = hints.get(p.name, p.annotation)
                parameters.append(p.replace(annotation=annotation))
                markers = typing.get_args(annotation)[1:] if typing.get_origin(annotation) is typing.Annotated else ()
                _note_flag(p.name, next(filter(None, map(_first_flag, (p.default, *markers))), default_flag(p.name)))
        if registry is not None:
            method_params, methods = _method_parameters(registry)
            parameters += method_params

        @functools.wraps(fn)
        def command(**given):
            for owner, (default, fields) in groups.items():
                values = {}
                for field_name, key, parse, repeats in fields:
                    value = given.pop(key)
                    if repeats:
                        value = tuple(value or ())
                    elif parse is not None and value is not None:
                        value = parse(value)
                    if value is not None:
                        values[field_name] = value
                given[owner] = dataclasses.replace(default, **values)
            if methods is not None:
                chosen = {}
                for name, p in methods.items():
                    value = given.pop(f"method__{name}")
                    if value is not None:
                        chosen[name] = coerce(value, p.annotation, name) if isinstance(value, str) else value
                given["method_params"] = chosen
            return fn(**given)

        # keyword-only: options keep the order they are declared in, whatever their defaults
        command.__signature__ = signature.replace(parameters=[
            q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in parameters])
        command.__annotations__ = {q.name: q.annotation for q in parameters}
        del command.__wrapped__  # typer must read the generated signature, not the function's
        return command
    return wrap


def note_registry_flags(registry: Registry, flag) -> None:
    """Flags of the parameters of what is registered that no spec names (a task's own: `--task-arg NAME`)."""
    for name, (declared, _) in registry.parameters().items():
        _note_flag(name, flag(declared))


def _first_flag(option: Any) -> str | None:
    """The first long flag of a typer option (declared as a default or inside Annotated)."""
    names = [*(getattr(option, "param_decls", None) or ()), getattr(option, "default", None)]
    return next((d for d in names if isinstance(d, str) and d.startswith("--")), None)


def render_error(error: ParameterError) -> str:
    return error.render(flag_of)
