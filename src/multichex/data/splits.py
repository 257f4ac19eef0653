"""Patient-wise splits: no patient's images ever fall on both sides of a split."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def patient_split(
    patient_ids: Sequence[str],
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    strata: Sequence[str] | None = None,
) -> dict[str, list[int]]:
    """Assign whole patients to named parts so each part holds about its fraction of the images.

    Patients are shuffled with ``seed`` (ids are sorted first, so input order does not matter) and
    parts are filled greedily by image count. With ``strata`` (one label per image, e.g. the data
    set) each stratum is split on its own, so every source gets its share of every part; a patient
    in several strata belongs to the stratum of its first image. Returns image indices per part.
    """
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    stratum_of: dict[str, str] = {}
    for index, patient in enumerate(patient_ids):
        stratum_of.setdefault(patient, strata[index] if strata is not None else "")
    # Fill each stratum by its own images: a patient shared with another stratum brings its other
    # images along without eating this stratum's quota.
    counts = Counter(p for i, p in enumerate(patient_ids) if strata is None or strata[i] == stratum_of[p])
    names = list(fractions)
    assignment: dict[str, str] = {}
    for stratum in sorted(set(stratum_of.values())):
        patients = sorted(p for p, s in stratum_of.items() if s == stratum)
        np.random.default_rng(seed).shuffle(patients)
        total = sum(counts[p] for p in patients)
        targets = np.cumsum([fractions[n] * total for n in names])
        filled, part = 0, 0
        for patient in patients:
            while part < len(names) - 1 and filled >= targets[part] - 1e-9:
                part += 1
            assignment[patient] = names[part]
            filled += counts[patient]
    result: dict[str, list[int]] = {name: [] for name in names}
    for index, patient in enumerate(patient_ids):
        result[assignment[patient]].append(index)
    return result


def save_split(path: Path, split: dict[str, list[str]], seed: int) -> None:
    """Write the split (per part: the image paths) so a run can be audited and repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "parts": split}, indent=1))
