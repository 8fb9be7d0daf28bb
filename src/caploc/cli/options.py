"""Options of the commands themselves (output, run directories), declared once; the library's own parameters
come from its specs and registries (`expand`)."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

Seed = Annotated[int, typer.Option("--seed", help="seed for every random choice")]
FromRun = Annotated[Optional[str], typer.Option("--from", help="take the top-k heads of a locate run directory")]
RunK = Annotated[Optional[int], typer.Option("--k", help="with --from: how many of its heads (default: its k)")]
AsJson = Annotated[bool, typer.Option("--json", help="print the full result as JSON on stdout instead of tables")]
JsonFile = Annotated[Optional[str], typer.Option("--json-file", help="also write the full result as JSON to this "
                                                                     "file")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
