"""`caploc doctor`: what this machine gives caploc, starting with the sandbox layers model-written code runs in."""

from __future__ import annotations

from caploc import sandbox
from caploc.experiments.results import DoctorResult


def doctor() -> DoctorResult:
    """Which isolation mechanisms work here and which containment layers a probe inside each one saw."""
    report = sandbox.layers()
    return DoctorResult(running_as=report["running_as"], drops_to=report["drops_to"],
                        mechanisms={m: report[m] for m in ("bwrap", "namespaces")}, in_use=report["in_use"],
                        refusal=report.get("refusal"))
