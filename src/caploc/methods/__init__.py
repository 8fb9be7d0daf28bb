"""Localization methods: small classes over the one shared evaluator (through `Objective`), each registering
itself under its name (`register_method`) with the parameters its `__init__` declares."""

from __future__ import annotations

from caploc.methods.attribution import AttributionPatching
from caploc.methods.base import (DEFAULT_PENALTY, DEFAULT_TOLERANCE, METHODS, Method, MethodResult, NotEvaluated,
                                 Objective, make_method, register_method)
from caploc.methods.compressed_sensing import CompressedSensing, bernoulli_design, stratified_design
from caploc.methods.exchange import DEFAULT_EXCHANGE, DEFAULT_SWAPS
from caploc.methods.greedy import Greedy, OneShotGreedy, RestrictedGreedy
from caploc.methods.hyper_search import HyperSearch
from caploc.methods.joint import JointSearch
from caploc.methods.refine import DEFAULT_CANDIDATES, SCREENS, ScreenRefine

DEFAULT_METHOD = "refine"  # the only method both specific and reproducible across seeds (docs/results.md)

__all__ = ["Method", "MethodResult", "Objective", "NotEvaluated", "CompressedSensing", "Greedy", "OneShotGreedy",
           "RestrictedGreedy", "HyperSearch", "JointSearch", "AttributionPatching", "ScreenRefine", "METHODS", "SCREENS",
           "DEFAULT_METHOD", "DEFAULT_CANDIDATES", "DEFAULT_EXCHANGE", "DEFAULT_SWAPS", "DEFAULT_PENALTY",
           "DEFAULT_TOLERANCE", "make_method", "register_method", "bernoulli_design", "stratified_design"]
