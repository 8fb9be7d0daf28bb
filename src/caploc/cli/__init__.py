"""The `caploc` command line: commands generated from the library's specs and registries (app, expand), shared
options, and renderers per result type."""

from __future__ import annotations

import logging
import sys

from caploc.errors import CaplocError, ParameterError


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        from caploc.plugins import load_plugins

        load_plugins()
        from caploc.cli.app import build

        build()(args=argv, standalone_mode=False)
    except ParameterError as exc:  # the library names its parameters; here they are the flags that set them
        from caploc.cli.expand import render_error

        print(f"error: {render_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except CaplocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed evaluations are kept", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors and anything unexpected: one line, no traceback
        exit_code = getattr(exc, "exit_code", None)
        if hasattr(exc, "show") and exit_code is not None:  # click/typer usage errors print themselves
            exc.show()
            sys.exit(exit_code)
        if type(exc).__name__ in ("Exit", "Abort"):
            sys.exit(exit_code or (0 if type(exc).__name__ == "Exit" else 1))
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
