"""Localization methods: small classes over the one shared evaluator (through `Objective`)."""

from __future__ import annotations

from caploc.errors import ParameterError, require
from caploc.methods.attribution import AttributionPatching
from caploc.methods.base import DEFAULT_PENALTY, DEFAULT_TOLERANCE, Method, MethodResult, NotEvaluated, Objective
from caploc.methods.compressed_sensing import CompressedSensing, bernoulli_design, stratified_design
from caploc.methods.exchange import DEFAULT_SWAPS
from caploc.methods.greedy import Greedy, OneShotGreedy
from caploc.methods.refine import ScreenRefine
from caploc.methods.search import HyperSearch

METHODS = ("refine", "atp", "css", "csb", "1s-greedy", "greedy", "search")
SCREENS = ("atp", "csb", "css")
# bench/locate_quality.py (SmolLM2, arithmetic 2D+, seeds 0-2; README): the AtP screen refined by exact greedy
# under the control-aware criterion was the only method both specific and reproducible across seeds
DEFAULT_METHOD = "refine"
DEFAULT_SCREEN = "atp"
# candidates refine's greedy decides among, per screen. AtP is taken again at every round's ablation, so each
# round sees the heads that matter then: 8 matched 16's held-out drop on arithmetic, IOI and induction (seeds
# 0-2) with more shared heads (arithmetic 3.0 of 5 vs 2.7) at 0.07-0.08 of greedy's tokens instead of 0.11;
# 32 drifted to what greedy over every head finds (overlap 1.7). A regression screen is not redone, so it keeps
# a wider list.
DEFAULT_CANDIDATES = {"atp": 8, "csb": 16, "css": 16}
# exact swap passes after refine's greedy (methods.exchange, where DEFAULT_SWAPS, the swaps each pass
# evaluates, lives): one pass (about 0.02 of greedy's tokens) tests the chosen set against its closest
# competitors and records them
DEFAULT_EXCHANGE = 1
DEFAULT_MASKS = 100
DEFAULT_SPARSITY = 0.05


def make_method(name: str, *, n_masks: int = DEFAULT_MASKS, sparsity: float = DEFAULT_SPARSITY, alpha="cv",
                seed: int = 0, screen: str = DEFAULT_SCREEN, n_candidates: int | None = None,
                exchange: int = DEFAULT_EXCHANGE) -> Method:
    """The method `name`; for refine, `n_candidates` None is the screen's default (DEFAULT_CANDIDATES) and
    `exchange` the swap passes after its greedy."""
    if name == "greedy":
        return Greedy()
    if name == "1s-greedy":
        return OneShotGreedy()
    if name == "atp":
        return AttributionPatching()
    if name in ("css", "csb"):
        return CompressedSensing("stratified" if name == "css" else "bernoulli", n_masks, sparsity, alpha, seed)
    if name == "search":
        return HyperSearch(alpha=alpha, seed=seed)
    if name == "refine":
        require(screen in SCREENS, f"unknown {{screen}} {screen!r}: choose one of {', '.join(SCREENS)}", "screen")
        n_candidates = DEFAULT_CANDIDATES[screen] if n_candidates is None else n_candidates
        require(n_candidates >= 1, "{n_candidates} must be positive", "n_candidates")
        require(exchange >= 0, "{exchange} must be >= 0", "exchange")
        return ScreenRefine(make_method(screen, n_masks=n_masks, sparsity=sparsity, alpha=alpha, seed=seed),
                            n_candidates, exchange)
    raise ParameterError(f"unknown {{method}} {name!r}: choose one of {', '.join(METHODS)}", "method")


__all__ = ["Method", "MethodResult", "Objective", "NotEvaluated", "CompressedSensing", "Greedy", "OneShotGreedy",
           "HyperSearch", "AttributionPatching", "ScreenRefine", "METHODS", "SCREENS", "DEFAULT_METHOD",
           "DEFAULT_SCREEN", "DEFAULT_CANDIDATES", "DEFAULT_EXCHANGE", "DEFAULT_SWAPS", "DEFAULT_MASKS",
           "DEFAULT_SPARSITY", "DEFAULT_PENALTY", "DEFAULT_TOLERANCE", "make_method", "bernoulli_design",
           "stratified_design"]
