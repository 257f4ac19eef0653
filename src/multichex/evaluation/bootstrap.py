"""Patient-level (cluster) bootstrap confidence intervals.

Images of one patient are correlated, so the resampling unit is the *group* (patient): each
resample draws groups with replacement and takes every item of each drawn group. The interval is
the percentile interval of the resampled statistic. Hand-written with numpy because neither
torchmetrics' ``BootStrapper`` nor MONAI resamples by group (both resample individual items).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from multichex.numbers import finite_or_none

__all__ = ["DEFAULT_BOOTSTRAP", "bootstrap_ci", "bootstrap_statistic", "bootstrap_statistics"]

# Resamples behind every reported 95% CI, the same for every head (classification, gate, segmentation,
# detection); ``multichex evaluate --bootstrap N`` and the ``bootstrap`` arguments of the evaluation change it.
DEFAULT_BOOTSTRAP = 1000


def _group_index(groups: Sequence[Any] | np.ndarray, n_items: int) -> tuple[np.ndarray, int]:
    """Map each item's group id to ``0..G-1``; returns (item → group index, G)."""
    ids = np.asarray(groups)
    if ids.ndim != 1 or len(ids) != n_items:
        raise ValueError(f"groups must be one id per item ({n_items}), got shape {ids.shape}")
    _, inverse = np.unique(ids.astype(str), return_inverse=True)
    return inverse.reshape(-1), int(inverse.max()) + 1 if n_items else 0


def _draw_counts(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """``n_resamples×G`` matrix: how often each group is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    offsets = (np.arange(n_resamples) * n_groups)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)


def _summarise(value: Any, stats: np.ndarray, n_groups: int, n_resamples: int, confidence: float) -> dict[str, Any]:
    """Percentile interval over the finite resampled statistics."""
    valid = stats[np.isfinite(stats)]
    alpha = (1.0 - confidence) / 2.0
    low = high = None
    if valid.size:
        low, high = (float(q) for q in np.quantile(valid, [alpha, 1.0 - alpha]))
    return {
        "value": finite_or_none(value),
        "low": low,
        "high": high,
        "n_groups": int(n_groups),
        "n_resamples": int(n_resamples),
        "n_valid": int(valid.size),
        "confidence": float(confidence),
    }


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")


def bootstrap_ci(
    values: np.ndarray,
    groups: list[str] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.nanmean,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Group-bootstrap percentile CI of ``statistic(values)``.

    Args:
        values: one value per item (e.g. per-image Dice); NaN allowed (``np.nanmean`` skips them).
        groups: one group id (patient) per item; resampling draws whole groups with replacement.
        statistic: function of a 1-D array → scalar. ``np.nanmean`` and ``np.mean`` use a
            vectorised fast path; anything else is evaluated once per resample.
        n_resamples: number of bootstrap resamples.
        confidence: two-sided coverage of the interval.
        seed: seed of numpy's ``default_rng``; same seed → same interval.

    Returns:
        ``{"value", "low", "high", "n_groups", "n_resamples", "n_valid", "confidence"}``;
        ``n_valid`` counts resamples whose statistic was finite (the others are dropped); bounds
        are ``None`` if no resample was valid, ``value`` is ``None`` if it is not finite.
    """
    _check(n_resamples, confidence)
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    item_group, n_groups = _group_index(groups, len(vals))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for all-NaN input
        value = statistic(vals) if vals.size else float("nan")
    if n_groups == 0:
        return _summarise(value, np.array([]), 0, n_resamples, confidence)

    counts = _draw_counts(n_groups, n_resamples, seed)
    if statistic is np.nanmean or statistic is np.mean:
        # Weighted mean per resample: (counts @ per-group sum) / (counts @ per-group count).
        # (np.mean lets NaN propagate, so such resamples become NaN and are dropped.)
        used = np.isfinite(vals) if statistic is np.nanmean else np.ones(vals.shape, dtype=bool)
        summed = np.where(used, vals, 0.0) if statistic is np.nanmean else vals
        group_sum = np.bincount(item_group, weights=summed, minlength=n_groups)
        group_n = np.bincount(item_group, weights=used.astype(np.float64), minlength=n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = (counts @ group_sum) / (counts @ group_n)
    else:
        stats = np.empty(n_resamples)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for r in range(n_resamples):
                # Each item appears as often as its group was drawn.
                resampled = np.repeat(vals, counts[r, item_group])
                out = statistic(resampled)
                stats[r] = np.nan if out is None else float(out)
    return _summarise(value, stats, n_groups, n_resamples, confidence)


def bootstrap_statistic(
    groups: list[str] | np.ndarray,
    compute: Callable[[np.ndarray], float | None],
    n_resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Group-bootstrap CI of any statistic computed from item indices (e.g. AUROC, mAP).

    Args:
        groups: one group id (patient) per item; ``len(groups)`` is the number of items.
        compute: receives an int array of item indices (with repeats) and returns the statistic,
            or ``None``/NaN when it is undefined for that resample (e.g. AUROC with one class);
            such resamples are dropped and the count of used ones is reported as ``n_valid``.
            The point estimate is ``compute(np.arange(n_items))``.
        n_resamples: number of bootstrap resamples.
        confidence: two-sided coverage of the interval.
        seed: seed of numpy's ``default_rng``; same seed → same draws as :func:`bootstrap_ci`.

    Returns:
        Same dictionary as :func:`bootstrap_ci`.
    """
    return bootstrap_statistics(groups, lambda idx: {"value": compute(idx)}, n_resamples, confidence, seed)["value"]


def bootstrap_statistics(
    groups: list[str] | np.ndarray,
    compute: Callable[[np.ndarray], dict[str, float | None]],
    n_resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Like :func:`bootstrap_statistic` for several statistics from one ``compute`` call per resample
    (e.g. accuracy, F1 and AUROC share the resampled predictions): name → interval dictionary."""
    _check(n_resamples, confidence)
    n_items = len(groups)
    item_group, n_groups = _group_index(groups, n_items)
    all_items = np.arange(n_items)
    values = compute(all_items) if n_items else {}
    if n_groups == 0:
        return {name: _summarise(value, np.array([]), 0, n_resamples, confidence) for name, value in values.items()}

    counts = _draw_counts(n_groups, n_resamples, seed)
    stats = {name: np.empty(n_resamples) for name in values}
    for r in range(n_resamples):
        out = compute(np.repeat(all_items, counts[r, item_group]))
        for name in stats:
            value = out.get(name)
            stats[name][r] = np.nan if value is None else float(value)
    return {name: _summarise(values[name], stats[name], n_groups, n_resamples, confidence) for name in values}
