"""Bootstrap intervals over items; drops use paired differences on the same items (much tighter)."""

from __future__ import annotations

import numpy as np

DEFAULT_BOOTSTRAP = 2000


def bootstrap_mean(values: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a percentile bootstrap over items."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_drop(baseline: np.ndarray, ablated: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                level: float = 0.95) -> dict:
    """Drop = mean(baseline) - mean(ablated) with a paired bootstrap interval, plus the relative drop."""
    baseline = np.asarray(baseline, dtype=np.float64)
    ablated = np.asarray(ablated, dtype=np.float64)
    if baseline.shape != ablated.shape:
        raise ValueError("paired scores must cover the same items")
    drop, lo, hi = bootstrap_mean(baseline - ablated, n_boot, seed, level)
    base = float(baseline.mean())
    relative = drop / abs(base) if base != 0 else float("nan")
    return {"drop": drop, "drop_low": lo, "drop_high": hi, "relative_drop": relative}


def score_summary(base_scores: np.ndarray, ablated_scores: np.ndarray | None, seed: int) -> dict:
    """Baseline mean with its bootstrap interval; with ablated scores also theirs and the paired drop."""
    mean, lo, hi = bootstrap_mean(base_scores, seed=seed)
    out = {"baseline": mean, "baseline_low": lo, "baseline_high": hi}
    if ablated_scores is not None:
        a_mean, a_lo, a_hi = bootstrap_mean(ablated_scores, seed=seed)
        out |= {"ablated": a_mean, "ablated_low": a_lo, "ablated_high": a_hi}
        out |= paired_drop(base_scores, ablated_scores, seed=seed)
    return out


LOW_BASELINE = 0.1


def low_baseline_warning(task_name: str, accuracy: float, identification_metric: str | None = None) -> str | None:
    """One line when the model barely does the task (baseline accuracy below LOW_BASELINE)."""
    if accuracy >= LOW_BASELINE:
        return None
    line = f"the model barely does {task_name}: baseline accuracy {accuracy:.3f} < {LOW_BASELINE}"
    if identification_metric and identification_metric != "acc":
        line += f"; identification runs on the answer's {identification_metric}, a continuous score"
    return line
