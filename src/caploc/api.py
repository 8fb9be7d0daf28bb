"""The Python API: the same operations as the CLI, with the same names and defaults, and their result types."""

from caploc.experiments.density import compress, density
from caploc.experiments.doctor import doctor
from caploc.experiments.evaluate import evaluate, heads
from caploc.experiments.export import export
from caploc.experiments.locate import locate
from caploc.experiments.neurons import neurons
from caploc.experiments.report import report
from caploc.experiments.results import (SCHEMA_VERSION, CompareResult, CompressResult, DensityResult, DoctorResult,
                                        EvaluateResult, ExportResult, HeadsResult, LocateResult, NeuronsResult,
                                        ReportResult, Result, SpecificityResult, UniversalResult)
from caploc.experiments.suite import compare, specificity, universal

__all__ = ["evaluate", "heads", "locate", "specificity", "universal", "compare", "report", "export", "neurons",
           "density", "compress", "doctor", "Result", "DoctorResult", "HeadsResult", "EvaluateResult", "LocateResult", "SpecificityResult",
           "UniversalResult", "CompareResult", "NeuronsResult", "DensityResult", "CompressResult", "ExportResult",
           "ReportResult", "SCHEMA_VERSION"]
