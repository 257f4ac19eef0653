"""Counts of a prepared cache for ``multichex data info``: images, patients, labels, tasks, split parts, errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multichex.data.cache.index import read_errors, read_index
from multichex.data.cache.layout import MANIFEST_NAME, SPLIT_NAME
from multichex.data.cache.splits import gate_state, read_split

__all__ = ["cache_summary"]


def cache_summary(cache_dir: str | Path) -> dict[str, Any]:
    """Counts of a cache: images, patients, per label, per task, per split part, errors."""
    cache_dir = Path(cache_dir)
    records = read_index(cache_dir)
    manifest_path = cache_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    labels = sorted({name for r in records for name in r["findings"] or {}})
    per_label = {name: _label_counts([(r["findings"] or {}).get(name) for r in records]) for name in labels}
    per_label["gate (positive)"] = _label_counts([r["positive"] for r in records])
    split = read_split(cache_dir) if (cache_dir / SPLIT_NAME).exists() else {"parts": {}}
    by_id = {r["id"]: r for r in records}
    parts = {name: _part_counts([by_id[i] for i in ids if i in by_id]) for name, ids in split.get("parts", {}).items()}
    errors = read_errors(cache_dir)
    return {
        "source": manifest.get("source"),
        "size": manifest.get("size"),
        "complete": manifest.get("complete"),
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "datasets": dict(sorted(Counter(r["dataset"] for r in records).items())),
        "labels": per_label,
        "tasks": _task_counts(records),
        "parts": parts,
        "errors": len(errors),
        "error_rows": errors,
    }


def _label_counts(values: Sequence[float | None]) -> dict[str, int]:
    known = [v for v in values if v is not None and not math.isnan(v)]
    positives = sum(v >= 0.5 for v in known)
    return {"positive": positives, "negative": len(known) - positives, "unknown": len(values) - len(known)}


def _task_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {
        "class labels": sum(bool(r["findings"]) for r in records),
        "gate label": sum(r["positive"] is not None for r in records),
        "mask": sum(bool(r["mask"]) for r in records),
        "boxes": sum(r["boxes"] is not None and len(r["boxes"]) > 0 for r in records),
        "known-empty boxes": sum(r["boxes"] == [] for r in records),
    }


def _part_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    gates = Counter(gate_state(r["positive"]) for r in records)
    return {
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "gate positive": gates["positive"],
        "gate negative": gates["negative"],
        "gate unknown": gates["unknown"],
        **{k: v for k, v in _task_counts(records).items() if k in {"mask", "boxes"}},
    }
