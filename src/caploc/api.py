"""The Python API: the same operations as the CLI, with the same names and defaults, and their result types.

Every operation takes its inputs whole: a model (`ModelSpec`, or just a name / path / loaded model), a task
(`TaskSpec`, or just a name) or a `TaskSuite`, and `EvalOptions` for how evaluations run; `locate` also takes a
method (a registered name or a Method), a `Criterion` and `LocateOptions`.
"""

from caploc.experiments.density import SAEOptions, compress, density
from caploc.experiments.doctor import doctor
from caploc.experiments.evaluate import evaluate, heads
from caploc.experiments.export import export
from caploc.experiments.locate import Criterion, LocateOptions, locate
from caploc.experiments.neurons import CNLOptions, neurons
from caploc.experiments.report import report
from caploc.experiments.results import (SCHEMA_VERSION, CompareResult, CompressResult, DensityResult, DoctorResult,
                                        EvaluateResult, ExportResult, HeadsResult, LocateResult, NeuronsResult,
                                        ReportResult, Result, SpecificityResult, UniversalResult)
from caploc.experiments.specs import EvalOptions, ModelSpec, TaskSpec, TaskSuite
from caploc.experiments.suite import compare, specificity, universal
from caploc.methods import make_method

__all__ = ["evaluate", "heads", "locate", "specificity", "universal", "compare", "report", "export", "neurons",
           "density", "compress", "doctor", "make_method", "ModelSpec", "TaskSpec", "TaskSuite", "EvalOptions",
           "Criterion", "LocateOptions", "CNLOptions", "SAEOptions", "Result", "DoctorResult", "HeadsResult",
           "EvaluateResult", "LocateResult", "SpecificityResult", "UniversalResult", "CompareResult",
           "NeuronsResult", "DensityResult", "CompressResult", "ExportResult", "ReportResult", "SCHEMA_VERSION"]
