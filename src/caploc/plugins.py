"""Methods and tasks of one's own: a module that registers them (`@register_method(...)`, `@register_task()`) is
loaded before the command line is built when it is named in $CAPLOC_PLUGINS (comma-separated module names) or
by a package's `caploc.plugins` entry point. docs/extending.md shows one."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from caploc.errors import CaplocError

ENV = "CAPLOC_PLUGINS"
GROUP = "caploc.plugins"


def load_plugins() -> list[str]:
    """Import every plugin module; returns their names. A plugin that fails to import is one line."""
    loaded = []
    for name in [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise CaplocError(f"plugin {name} (from ${ENV}) failed to import: {type(exc).__name__}: {exc}") from exc
        loaded.append(name)
    for point in entry_points(group=GROUP):
        try:
            point.load()
        except Exception as exc:
            raise CaplocError(f"plugin {point.name} ({point.value}, entry point {GROUP}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        loaded.append(point.value)
    return loaded
