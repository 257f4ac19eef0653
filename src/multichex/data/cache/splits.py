"""The cache's ``split.json``: patient-wise parts stratified by data set and gate label."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multichex.data.cache.layout import SPLIT_NAME
from multichex.data.splits import patient_split

__all__ = ["DEFAULT_FRACTIONS", "STRATIFY_RULE", "gate_state", "make_split", "read_split"]

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
STRATIFY_RULE = "dataset/gate of the patient's first image by id (gate: positive | negative | unknown)"


def gate_state(positive: float | None) -> str:
    """``positive`` / ``negative`` / ``unknown`` for a gate label (None or NaN = unknown)."""
    if positive is None or math.isnan(positive):
        return "unknown"
    return "positive" if positive >= 0.5 else "negative"


def make_split(records: Sequence[dict[str, Any]], fractions: dict[str, float] | None = None, seed: int = 0) -> dict[str, Any]:
    """Patient-wise parts of the cache, stratified by data set and gate label.

    Stratum of an image = ``"<dataset>/<positive|negative|unknown>"``: every source and both gate
    classes get their share of every part. A patient whose images disagree belongs to the stratum
    of its first image by id (see :func:`patient_split`). Returns the ``split.json`` content.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    ordered = sorted(records, key=lambda r: r["id"])
    strata = [f"{r['dataset']}/{gate_state(r['positive'])}" for r in ordered]
    parts = patient_split([r["patient_id"] for r in ordered], fractions, seed=seed, strata=strata)
    return {
        "seed": seed,
        "fractions": fractions,
        "stratify": STRATIFY_RULE,
        "parts": {name: sorted(ordered[i]["id"] for i in indices) for name, indices in parts.items()},
    }


def read_split(cache_dir: str | Path) -> dict[str, Any]:
    """Content of ``split.json``."""
    path = Path(cache_dir) / SPLIT_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: the cache has no split")
    return json.loads(path.read_text(encoding="utf-8"))
