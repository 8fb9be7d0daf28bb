"""The batched evaluator: requests (what to score), runner (batched forward/generate under masks), cache
(memory + persistent store), composed by `Evaluator`."""

from caploc.evaluator.batches import pad_batch
from caploc.evaluator.core import EvalResult, Evaluator
from caploc.evaluator.requests import Requests, Sequence
from caploc.evaluator.runner import EvalStats

__all__ = ["Evaluator", "EvalResult", "EvalStats", "Requests", "Sequence", "pad_batch"]
