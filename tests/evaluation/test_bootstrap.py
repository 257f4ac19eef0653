"""Tests for the patient-level bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from multichex.evaluation.bootstrap import bootstrap_ci, bootstrap_statistic


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    groups = np.repeat([f"p{i}" for i in range(20)], 3)
    values = rng.normal(0.7, 0.1, size=len(groups))
    return values, groups


@pytest.mark.parametrize("statistic", [np.nanmean, np.mean, np.median, lambda x: float(np.nanmean(x))])
def test_ci_contains_value(data: tuple[np.ndarray, np.ndarray], statistic) -> None:
    values, groups = data
    out = bootstrap_ci(values, groups, statistic=statistic, n_resamples=500)
    assert out["value"] == pytest.approx(float(statistic(values)))
    assert out["low"] <= out["value"] <= out["high"]
    assert out["low"] < out["high"]
    assert out["n_groups"] == 20
    assert out["n_resamples"] == 500
    assert out["n_valid"] == 500


def test_deterministic_for_seed(data: tuple[np.ndarray, np.ndarray]) -> None:
    values, groups = data
    assert bootstrap_ci(values, groups, seed=3) == bootstrap_ci(values, groups, seed=3)
    assert bootstrap_ci(values, groups, seed=3) != bootstrap_ci(values, groups, seed=4)


def test_fast_path_matches_generic_and_index_version(data: tuple[np.ndarray, np.ndarray]) -> None:
    values, groups = data
    values = values.copy()
    values[[1, 7]] = np.nan
    fast = bootstrap_ci(values, groups, n_resamples=300, seed=1)
    generic = bootstrap_ci(values, groups, statistic=lambda x: np.nanmean(x), n_resamples=300, seed=1)
    by_index = bootstrap_statistic(groups, lambda idx: np.nanmean(values[idx]), n_resamples=300, seed=1)
    for other in (generic, by_index):
        for key in ("value", "low", "high"):
            assert fast[key] == pytest.approx(other[key])


def test_single_group_gives_zero_width() -> None:
    values = np.array([0.2, 0.4, 0.9])
    out = bootstrap_ci(values, ["p"] * 3, n_resamples=50)
    assert out["value"] == pytest.approx(0.5)
    assert out["low"] == pytest.approx(0.5)
    assert out["high"] == pytest.approx(0.5)
    assert out["n_groups"] == 1


def test_resamples_whole_groups() -> None:
    # Patient "big" has 100 identical images (0.0); 10 other patients one image each (1.0).
    groups = np.array(["big"] * 100 + [f"p{i}" for i in range(10)])
    values = np.array([0.0] * 100 + [1.0] * 10)
    sizes = {"big": 100, **{f"p{i}": 1 for i in range(10)}}

    seen: list[np.ndarray] = []

    def record(idx: np.ndarray) -> float:
        seen.append(idx)
        return float(values[idx].mean())

    bootstrap_statistic(groups, record, n_resamples=200, seed=0)
    for idx in seen[1:]:  # seen[0] is the point estimate on all items
        drawn = groups[idx]
        names, counts = np.unique(drawn, return_counts=True)
        # every drawn patient contributes all its images, once per draw ...
        draws = [c // sizes[n] for n, c in zip(names, counts)]
        assert all(c % sizes[n] == 0 for n, c in zip(names, counts))
        # ... and each resample draws as many patients as there are (11).
        assert sum(draws) == 11

    patient = bootstrap_ci(values, groups, n_resamples=2000, seed=0)
    image = bootstrap_ci(values, np.arange(len(values)), n_resamples=2000, seed=0)
    assert patient["value"] == image["value"] == pytest.approx(10 / 110)
    patient_width = patient["high"] - patient["low"]
    image_width = image["high"] - image["low"]
    # Image level: ~binomial over 110 items, width ≈ 0.11; patient level: the big patient is drawn
    # 0 times with probability (10/11)^11 ≈ 0.35 (mean 1.0), so the upper bound reaches 1.0.
    assert image_width < 0.15
    assert patient["high"] == pytest.approx(1.0)
    assert patient_width > 5 * image_width


def test_undefined_resamples_are_dropped() -> None:
    # Two patients, one all-negative, one all-positive: AUROC is undefined whenever only one
    # patient is drawn (probability 1/2), so roughly half the resamples are dropped.
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])
    groups = np.array(["neg"] * 3 + ["pos"] * 3)

    def auroc(idx: np.ndarray) -> float | None:
        y = labels[idx]
        if y.min() == y.max():
            return None
        return float(binary_auroc(torch.tensor(scores[idx]), torch.tensor(y)))

    out = bootstrap_statistic(groups, auroc, n_resamples=400, seed=0)
    # (8 of 9 positive/negative pairs ordered correctly)
    assert out["value"] == pytest.approx(8 / 9)
    assert 150 < out["n_valid"] < 250
    assert out["n_resamples"] == 400
    # each valid resample draws both patients once → always the same AUROC
    assert out["low"] == pytest.approx(8 / 9) and out["high"] == pytest.approx(8 / 9)


def test_nan_statistic_everywhere_gives_none() -> None:
    out = bootstrap_ci(np.array([np.nan, np.nan]), ["a", "b"], n_resamples=20)
    assert out["value"] is None and out["low"] is None and out["high"] is None
    assert out["n_valid"] == 0


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(3), ["a", "b", "c"], **kwargs)


def test_groups_length_must_match() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(3), ["a", "b"])


def test_confidence_changes_width(data: tuple[np.ndarray, np.ndarray]) -> None:
    values, groups = data
    wide = bootstrap_ci(values, groups, confidence=0.99)
    narrow = bootstrap_ci(values, groups, confidence=0.5)
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"]


def test_interval_covers_the_estimate_and_narrows_with_more_patients() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n_patients in (10, 40, 160):
        groups = np.repeat(np.arange(n_patients), 2)
        values = rng.normal(0.8, 0.1, size=len(groups))
        result = bootstrap_ci(values, groups, n_resamples=500, seed=1)
        assert result["low"] <= result["value"] <= result["high"]
        widths.append(result["high"] - result["low"])
    assert widths[0] > widths[1] > widths[2]


def test_several_statistics_share_one_resampling() -> None:
    from multichex.evaluation.bootstrap import bootstrap_statistics

    values = np.arange(20, dtype=float)
    groups = np.repeat(np.arange(10), 2)
    both = bootstrap_statistics(groups, lambda idx: {"mean": values[idx].mean(), "max": values[idx].max()}, n_resamples=200, seed=3)
    single = bootstrap_statistic(groups, lambda idx: values[idx].mean(), n_resamples=200, seed=3)
    assert both["mean"] == single
    assert both["max"]["value"] == 19.0 and both["max"]["high"] == 19.0
