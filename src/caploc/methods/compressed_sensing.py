"""Compressed sensing localization (paper section 4): random ablation designs + Lasso.

Assumes sparsity (few heads matter) and additivity (a set's drop ~ sum of single drops). Evaluate m
random masks, regress the score change (y - y0) on the binary design X with an L1 penalty; the heads
with the most negative coefficients carry the capability.
"""

from __future__ import annotations

import warnings

import numpy as np

from typing import Annotated

from caploc.errors import require
from caploc.masks import Masks
from caploc.methods.base import Method, MethodResult, Objective, register_method
from caploc.params import Param

DESIGNS = ("bernoulli", "stratified")


def bernoulli_design(n_masks: int, n_components: int, sparsity: float, seed: int) -> np.ndarray:
    """X[j, i] ~ Bernoulli(p), i.i.d."""
    rng = np.random.default_rng([seed, 0xB])
    return rng.random((n_masks, n_components)) < sparsity


def stratified_design(n_masks: int, n_components: int, sparsity: float, seed: int) -> np.ndarray:
    """Every mask ablates exactly round(p*N) heads: the least-used so far, random tie-breaks.
    Column sums differ by at most 1, and the first m rows of a larger design are the m-row design."""
    per_mask = max(1, int(round(sparsity * n_components)))
    rng = np.random.default_rng([seed, 0x5])
    usage = np.zeros(n_components, dtype=np.int64)
    design = np.zeros((n_masks, n_components), dtype=bool)
    for j in range(n_masks):
        order = np.lexsort((rng.random(n_components), usage))  # least used first, ties broken at random
        design[j, order[:per_mask]] = True
        usage[order[:per_mask]] += 1
    return design


def check_design(design: str, n_masks: int, sparsity: float) -> None:
    require(design in DESIGNS, f"unknown {{design}} {design!r}: choose one of {', '.join(DESIGNS)}", "design")
    require(0 < sparsity < 1, "{sparsity} must be between 0 and 1", "sparsity")
    require(n_masks >= 2, "compressed sensing needs at least 2 masks ({n_masks})", "n_masks")


def make_design(design: str, n_masks: int, n_components: int, sparsity: float, seed: int) -> np.ndarray:
    check_design(design, n_masks, sparsity)
    fn = bernoulli_design if design == "bernoulli" else stratified_design
    return fn(n_masks, n_components, sparsity, seed)


def fit_lasso(design: np.ndarray, delta: np.ndarray, alpha, seed: int) -> dict:
    """Lasso of delta = y - y0 on the design. alpha='cv' picks the penalty by 5-fold cross-validation
    over the regularization path; a float fixes it. The target is scaled to unit variance first so one
    alpha grid fits every metric; coefficients are returned in the metric's own units."""
    from sklearn.linear_model import Lasso, LassoCV
    from sklearn.model_selection import KFold

    X = design.astype(np.float64)
    scale = float(delta.std()) or 1.0
    target = delta / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        if alpha == "cv":
            folds = min(5, len(delta))
            model = LassoCV(cv=KFold(folds, shuffle=True, random_state=seed), alphas=60, max_iter=20000,
                            random_state=seed)
            model.fit(X, target)
            chosen_alpha = float(model.alpha_)
        else:
            chosen_alpha = float(alpha)
            model = Lasso(alpha=chosen_alpha, max_iter=20000, random_state=seed)
            model.fit(X, target)
    r2 = float(model.score(X, target))
    return {"coef": model.coef_ * scale, "intercept": float(model.intercept_) * scale, "alpha": chosen_alpha,
            "r2": r2}


def marginal_effects(design: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Mean delta of masks that ablate a head minus mean delta of those that do not: the tie-breaker for
    heads the Lasso sets to zero."""
    with_head = design.astype(np.float64)
    n_with = with_head.sum(0)
    n_without = len(delta) - n_with
    mean_with = np.divide(with_head.T @ delta, n_with, out=np.zeros(design.shape[1]), where=n_with > 0)
    mean_without = np.divide((1 - with_head).T @ delta, n_without, out=np.zeros(design.shape[1]),
                             where=n_without > 0)
    return mean_with - mean_without


def rank_from_fit(coef: np.ndarray, marginal: np.ndarray) -> list[int]:
    # most negative coefficient first; exact ties (mostly zeros) by the most negative marginal effect
    return [int(i) for i in np.lexsort((marginal, coef))]


MASKS = Annotated[int, Param("compressed sensing: number of random ablation masks", flag="--masks")]
SPARSITY = Annotated[float, Param("compressed sensing: fraction of heads per mask")]
ALPHA = Annotated[float | str, Param("compressed sensing: the Lasso penalty, cv (cross-validated) or a number")]


@register_method("csb", design="bernoulli")
@register_method("css", design="stratified")
class CompressedSensing(Method):
    """Compressed sensing (the paper's CSS, stratified, and CSB, Bernoulli): random ablation masks, then a
    Lasso of the score change on the design."""

    def __init__(self, design: str = "stratified", n_masks: MASKS = 100, sparsity: SPARSITY = 0.05,
                 alpha: ALPHA = "cv", seed: int = 0):
        check_design(design, n_masks, sparsity)  # before any model time is spent
        self.design = design
        self.n_masks = n_masks
        self.sparsity = sparsity
        self.alpha = alpha
        self.seed = seed
        self.fixed_alphas: tuple | None = None  # (target, control) penalties of a replay

    def for_replay(self, details: dict) -> "CompressedSensing":
        replay = CompressedSensing(self.design, self.n_masks, self.sparsity, self.alpha, self.seed)
        replay.fixed_alphas = (details["alpha"], details.get("control_alpha"))
        return replay

    @property
    def name(self) -> str:
        return "css" if self.design == "stratified" else "csb"

    def run(self, objective: Objective, k: int) -> MethodResult:
        design = make_design(self.design, self.n_masks, objective.n_components, self.sparsity, self.seed)
        target, control = objective.responses(Masks(design))
        return self.fit(design, -target, None if control is None else -control, objective)

    def fit(self, design: np.ndarray, delta: np.ndarray, control_delta: np.ndarray | None = None,
            objective: Objective | None = None) -> MethodResult:
        """Regress the target's score change (and the control's, on the same design) on the design."""
        alphas = self.fixed_alphas or (self.alpha, self.alpha)
        fit = fit_lasso(design, delta, alphas[0], self.seed)
        marginal = marginal_effects(design, delta)
        usage = design.sum(0)
        details = {
            "alpha": fit["alpha"], "r2": fit["r2"], "intercept": fit["intercept"],
            "coefficients": fit["coef"].tolist(), "marginal_effects": marginal.tolist(),
            "coverage": {"min_ablations_per_head": int(usage.min()), "max_ablations_per_head": int(usage.max()),
                         "heads_never_ablated": int((usage == 0).sum()),
                         "mean_heads_per_mask": float(design.sum(1).mean())},
            "nonzero_coefficients": int((fit["coef"] != 0).sum()),
        }
        if details["nonzero_coefficients"] == 0:
            details["warning"] = ("the Lasso kept no coefficient, so the ranking is by marginal effect alone; with "
                                  f"{usage.mean():.1f} ablations per head on average, use more masks or a higher "
                                  "sparsity (masks x sparsity >= 2)")
        target_effects = -fit["coef"]
        if control_delta is None:
            return MethodResult(ranking=rank_from_fit(fit["coef"], marginal), head_scores=target_effects,
                                score_name="-lasso coefficient", details=details, target_effects=target_effects)
        control_fit = fit_lasso(design, control_delta, alphas[1], self.seed)
        control_effects = -control_fit["coef"]
        details |= {"control_alpha": control_fit["alpha"], "control_r2": control_fit["r2"],
                    "control_coefficients": control_fit["coef"].tolist()}
        scores = objective.specificity(target_effects, control_effects)
        # best specificity first; exact ties (both coefficients zero) by the most negative marginal effect
        ranking = [int(i) for i in np.lexsort((marginal, -scores))]
        return MethodResult(ranking=ranking, head_scores=scores, score_name="specificity of lasso coefficients",
                            details=details, target_effects=target_effects, control_effects=control_effects)
