"""The batched evaluator: requests (what to score), scoring / gradients / generation (passes under masks),
backend (where they run), cache (memory + persistent store), composed by `Evaluator`."""

from caploc.evaluator.backend import IN_PROCESS, Backend, InProcess
from caploc.evaluator.batches import pad_batch
from caploc.evaluator.core import EvalResult, Evaluator
from caploc.evaluator.requests import Requests, Sequence
from caploc.evaluator.runner import EvalStats

__all__ = ["Evaluator", "EvalResult", "EvalStats", "Requests", "Sequence", "pad_batch", "Backend", "InProcess",
           "IN_PROCESS"]
