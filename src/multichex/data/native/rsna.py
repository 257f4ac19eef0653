"""RSNA Pneumonia Detection Challenge (Kaggle, 2018) exactly as published.

Files read from ``root`` (stage 2 names, or the stage 1 ones):

* ``stage_2_train_labels.csv`` — ``patientId,x,y,width,height,Target``: one row per box for Target 1,
  one row with empty coordinates for Target 0.
* ``stage_2_detailed_class_info.csv`` — ``patientId,class`` with class ``Lung Opacity``,
  ``No Lung Opacity / Not Normal`` or ``Normal`` (rows repeat for patients with several boxes).
* ``stage_2_train_images/<patientId>.dcm`` — one DICOM per patientId.

RSNA's Target marks lung opacities that radiologists judged to be evidence of pneumonia, so it is
used both as "Lung Opacity" and as "Pneumonia". Box annotation is exhaustive: Target 0 → ``[]``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

DATASET = "rsna-pneumonia"
STAGES = ("stage_2", "stage_1")
CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
BOX_LABEL = "Lung Opacity"
COORDINATES = ("x", "y", "width", "height")

Box = tuple[float, float, float, float]


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row with stripped keys and values)`` of a CSV that must have ``required`` columns."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in required if name not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: row 1: missing required column(s) {missing}; header is {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, {key: (value or "").strip() for key, value in row.items() if key is not None}


def _find_stage(root: Path, stage: str | None) -> str:
    stages = STAGES if stage is None else (stage,)
    for name in stages:
        if (root / f"{name}_train_labels.csv").is_file():
            return name
    expected = [str(root / f"{name}_train_labels.csv") for name in stages]
    raise ValueError(f"{root}: RSNA label file not found (looked for {expected})")


def _box(row: dict[str, str], target: int, path: Path, line: int) -> Box | None:
    """The row's box for Target 1; None for Target 0 (whose coordinates must be empty)."""
    cells = [row.get(name, "") for name in COORDINATES]
    if target == 0:
        if any(cells):
            raise ValueError(f"{path}: row {line}: Target 0 with box coordinates {cells}")
        return None
    if not all(cells):
        raise ValueError(f"{path}: row {line}: Target 1 without complete box coordinates {cells}")
    try:
        x, y, w, h = (float(cell) for cell in cells)
    except ValueError as error:
        raise ValueError(f"{path}: row {line}: box coordinates are not numbers: {cells}") from error
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"{path}: row {line}: invalid box {(x, y, w, h)}")
    return x, y, w, h


def read_rsna_labels(path: Path) -> dict[str, tuple[int, list[Box], int]]:
    """``*_train_labels.csv`` → ``{patientId: (Target, boxes, line of its first row)}`` in file order."""
    path = Path(path)
    patients: dict[str, tuple[int, list[Box], int]] = {}
    for line, row in _rows(path, ("patientId", *COORDINATES, "Target")):
        patient = row["patientId"]
        if not patient:
            raise ValueError(f"{path}: row {line}: empty patientId")
        if row["Target"] not in ("0", "1"):
            raise ValueError(f"{path}: row {line}: Target must be 0 or 1, found {row['Target']!r}")
        target = int(row["Target"])
        box = _box(row, target, path, line)
        known, boxes, _ = patients.setdefault(patient, (target, [], line))
        if known != target:
            raise ValueError(f"{path}: row {line}: patient {patient} has both Target 0 and Target 1 rows")
        if box is not None:
            boxes.append(box)
    return patients


def read_rsna_classes(path: Path) -> dict[str, tuple[str, int]]:
    """``*_detailed_class_info.csv`` → ``{patientId: (class, line of its first row)}`` (repeated rows must agree)."""
    path = Path(path)
    classes: dict[str, tuple[str, int]] = {}
    for line, row in _rows(path, ("patientId", "class")):
        patient, name = row["patientId"], row["class"]
        if name not in CLASSES:
            raise ValueError(f"{path}: row {line}: unknown class {name!r} (expected one of {CLASSES})")
        if not patient:
            raise ValueError(f"{path}: row {line}: empty patientId")
        if classes.setdefault(patient, (name, line))[0] != name:
            raise ValueError(f"{path}: row {line}: patient {patient} has classes {classes[patient][0]!r} and {name!r}")
    return classes


def read_rsna(
    root: Path,
    *,
    stage: str | None = None,
    require_images: bool = True,
    dataset: str = DATASET,
) -> list[SampleRef]:
    """Read the RSNA training set: "Lung Opacity" = "Pneumonia" = Target, "No Finding" = class is Normal.

    ``stage`` is ``"stage_2"`` or ``"stage_1"`` (None: the first present). With ``require_images``,
    patients whose DICOM is absent are dropped (one warning gives the count).
    """
    root = Path(root)
    stage = _find_stage(root, stage)
    labels_path = root / f"{stage}_train_labels.csv"
    classes_path = root / f"{stage}_detailed_class_info.csv"
    patients = read_rsna_labels(labels_path)
    classes = read_rsna_classes(classes_path)
    image_dir = root / f"{stage}_train_images"
    present: set[str] = set()
    if image_dir.is_dir():
        with os.scandir(image_dir) as entries:
            present = {entry.name for entry in entries if entry.is_file()}
    refs: list[SampleRef] = []
    missing = 0
    for patient, (target, boxes, line) in patients.items():
        if patient not in classes:
            raise ValueError(f"{classes_path}: no row for patient {patient} (row {line} of {labels_path})")
        name, class_line = classes[patient]
        if (name == "Lung Opacity") != (target == 1):
            raise ValueError(
                f"{classes_path}: row {class_line}: patient {patient} has class {name!r} "
                f"but Target {target} (row {line} of {labels_path})"
            )
        if require_images and f"{patient}.dcm" not in present:
            missing += 1
            continue
        refs.append(
            SampleRef(
                image_path=image_dir / f"{patient}.dcm",
                dataset=dataset,
                patient_id=f"rsna:{patient}",
                findings={"Lung Opacity": float(target), "Pneumonia": float(target), "No Finding": float(name == "Normal")},
                positive=float(target),
                boxes_xywh=list(boxes),
                box_names=[BOX_LABEL] * len(boxes),
                extra={"class": name},
            )
        )
    if missing:
        log.warning("%s: %d patients have no DICOM in %s; dropped", labels_path, missing, image_dir)
    return refs
