"""One exception type for every user-facing failure: the CLI prints its message as one line.

Library code names its own parameters, never command-line flags: a `ParameterError` carries the names of the
parameters it is about, written into the message as `{name}` fields. `str(error)` fills them with the
parameter names (`k must be positive`); the CLI fills them with its flags (`--k must be positive`).
"""

from __future__ import annotations

from typing import Callable


class CaplocError(Exception):
    """A problem with the user's input or environment (bad model spec, bad head, empty dataset...)."""


class ParameterError(CaplocError, ValueError):
    """A bad argument. `template` names parameters as {name} fields; `params` lists them."""

    def __init__(self, template: str, *params: str):
        self.template = template
        self.params = params
        super().__init__(self.render(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with each parameter spelled by `spell` (its name in Python, its flag on the CLI)."""
        return self.template.format(**{p: spell(p) for p in self.params})


def require(condition: bool, template: str, *params: str) -> None:
    """Raise a ParameterError unless `condition` holds."""
    if not condition:
        raise ParameterError(template, *params)


def check_positive(name: str, value) -> None:
    require(value > 0, "{%s} must be positive" % name, name)
