"""The paper's hyper-parameter search (appendix A.1) over compressed-sensing settings.

For each sparsity p, ONE stratified design of the largest mask count is evaluated; a smaller count m
uses its first m rows (stratified designs nest), so every evaluation is shared between settings. Each
setting's top-k is ablated on the identification items and the setting with the largest drop wins.
"""

from __future__ import annotations


from typing import Annotated

from caploc.masks import Masks
from caploc.methods.base import Method, MethodResult, Objective, register_method
from caploc.methods.compressed_sensing import ALPHA, CompressedSensing, make_design
from caploc.params import Param


@register_method("search")
class HyperSearch(Method):
    """The paper's hyper-parameter search: stratified compressed sensing over a grid of mask counts and
    sparsities, the setting whose top-k does best kept."""

    name = "search"

    def __init__(self, mask_counts: Annotated[tuple[int, ...], Param("search: mask counts tried")] = (100, 200, 400),
                 sparsities: Annotated[tuple[float, ...], Param("search: sparsities tried")] = (0.01, 0.02, 0.05, 0.1),
                 design: str = "stratified", alpha: ALPHA = "cv", seed: int = 0):
        self.mask_counts = tuple(sorted(mask_counts))
        self.sparsities = tuple(sparsities)
        self.design = design
        self.alpha = alpha
        self.seed = seed

    def for_replay(self, details: dict) -> Method:
        """The winning setting alone (its masks are the first rows of the nested design the search evaluated)."""
        setting = details["setting"]
        return CompressedSensing(self.design, setting["n_masks"], setting["sparsity"], self.alpha,
                                 self.seed).for_replay(details)

    def run(self, objective: Objective, k: int) -> MethodResult:
        grid = []
        best: tuple[float, MethodResult] | None = None
        for p in self.sparsities:
            full = make_design(self.design, self.mask_counts[-1], objective.n_components, p, self.seed)
            target, control = objective.responses(Masks(full))
            for m in self.mask_counts:
                cs = CompressedSensing(self.design, m, p, self.alpha, self.seed)
                result = cs.fit(full[:m], -target[:m], None if control is None else -control[:m], objective)
                top = result.top(k)
                # the setting whose top-k does best by the objective's criterion (the drop, or specificity)
                score = float(objective.criterion(objective.set_masks([top]))[0])
                grid.append({"n_masks": m, "sparsity": p, "top": top, "criterion": score, "r2": result.details["r2"]})
                if best is None or score > best[0]:
                    best = (score, result)
                    result.details["setting"] = {"n_masks": m, "sparsity": p}
        result = best[1]
        result.details["grid"] = grid
        return result
