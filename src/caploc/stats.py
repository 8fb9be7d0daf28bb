"""Bootstrap intervals over items; drops use paired differences on the same items (much tighter).

How much of a capability a drop removes: for a score (accuracy, pass@1, a logit difference) the drop relative
to the baseline; for a log-probability of the answer (`LOG_PROBABILITIES`) the share of the answer's
probability removed, 1 - exp(-drop) (a geometric mean over items; per token for the per-token metrics). The
latter is what stays meaningful when the model is confident: a 2-nat drop from -0.017 nats is 87% of the
probability, where its relative drop would read 11,700%.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BOOTSTRAP = 2000
# metrics that are log-probabilities of the answer (summed, or per token: ref_logprob, own_logprob, token_logprob)
LOG_PROBABILITIES = ("logprob", "logprob_all", "ref_logprob", "own_logprob", "token_logprob")


def share_removed(drop, baseline, metric: str | None):
    """The share of the capability a drop removes (module docstring); arrays work elementwise."""
    drop = np.asarray(drop, dtype=np.float64)
    if metric in LOG_PROBABILITIES:
        return -np.expm1(-drop)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(baseline != 0, drop / np.abs(baseline), np.nan)


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
                level: float = 0.95, metric: str | None = None) -> dict:
    """Drop = mean(baseline) - mean(ablated) with a paired bootstrap interval, plus the relative drop (the share
    removed, `share_removed`)."""
    baseline = np.asarray(baseline, dtype=np.float64)
    ablated = np.asarray(ablated, dtype=np.float64)
    if baseline.shape != ablated.shape:
        raise ValueError("paired scores must cover the same items")
    drop, lo, hi = bootstrap_mean(baseline - ablated, n_boot, seed, level)
    relative = float(share_removed(drop, float(baseline.mean()), metric))
    return {"drop": drop, "drop_low": lo, "drop_high": hi, "relative_drop": relative}


def score_summary(base_scores: np.ndarray, ablated_scores: np.ndarray | None, seed: int,
                  metric: str | None = None) -> dict:
    """Baseline mean with its bootstrap interval; with ablated scores also theirs and the paired drop."""
    mean, lo, hi = bootstrap_mean(base_scores, seed=seed)
    out = {"baseline": mean, "baseline_low": lo, "baseline_high": hi}
    if ablated_scores is not None:
        a_mean, a_lo, a_hi = bootstrap_mean(ablated_scores, seed=seed)
        out |= {"ablated": a_mean, "ablated_low": a_lo, "ablated_high": a_hi}
        out |= paired_drop(base_scores, ablated_scores, seed=seed, metric=metric)
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
