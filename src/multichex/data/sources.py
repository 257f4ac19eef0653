"""Readers for the chest X-ray folders shipped with the package and in ``shared/data`` (the "shared" layouts).

Each reader turns one folder layout into a list of :class:`SampleRef` — where the image is and
which labels that data set really has; :data:`READERS` maps a source name to its reader. The data
sets as their publishers ship them are read by :mod:`multichex.data.native`.

:class:`SampleRef` / :func:`read_mask` (:mod:`multichex.data.ref`) and :class:`CXRDataset`
(:mod:`multichex.data.dataset`) are re-exported here, where they used to live.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from multichex.data.dataset import CXRDataset
from multichex.data.labels import NIH_FINDINGS, canonical_name
from multichex.data.ref import SampleRef, read_mask

__all__ = [
    "READERS",
    "CXRDataset",
    "SampleRef",
    "bundled_sample_root",
    "nih_ref",
    "read_covid_chestxray",
    "read_hannover",
    "read_mask",
    "read_shared_kermany",
    "read_shared_nih",
]

Box = tuple[float, float, float, float]


def _read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file; a missing file or column is a ValueError naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: label file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if None in row or any(row.get(c) is None for c in required):
            raise ValueError(f"{path}: row {number}: wrong number of cells")
    return rows


def _read_boxes(path: Path) -> dict[str, list[tuple[str, Box]]]:
    """``image,label,x,y,w,h`` rows grouped by image."""
    grouped: dict[str, list[tuple[str, Box]]] = {}
    if not path.exists():
        return grouped
    for number, row in enumerate(_read_csv(path, ("image", "label", "x", "y", "w", "h")), start=2):
        try:
            box = (float(row["x"]), float(row["y"]), float(row["w"]), float(row["h"]))
        except ValueError as error:
            raise ValueError(f"{path}: row {number}: bad box {row}: {error}") from error
        grouped.setdefault(row["image"], []).append((canonical_name(row["label"]), box))
    return grouped


def _flag(value: str | None) -> float:
    """CSV cell → 0/1 float, NaN when blank."""
    if value is None or value.strip() == "":
        return math.nan
    return float(value)


def nih_ref(
    image_path: Path,
    patient_id: str,
    findings: Mapping[str, float],
    boxes: Sequence[tuple[str, Box]] | None,
    *,
    dataset: str,
    extra: dict[str, Any],
) -> SampleRef:
    """One NIH ChestX-ray14 image as a :class:`SampleRef` (both NIH layouts build their refs here).

    ``findings``: the 14 findings and "No Finding"; COVID-19 is added as a known 0 (the images
    predate it) and the gate label is ``1 - "No Finding"``. Patient ids are ``nih:<id>``. Box
    annotation is not exhaustive: ``boxes`` (``(label, (x, y, w, h))`` pairs) None or empty gives
    ``boxes_xywh=None`` (unknown), never "no lesion".
    """
    labels = {**findings, "COVID-19": 0.0}
    return SampleRef(
        image_path=image_path,
        dataset=dataset,
        patient_id=f"nih:{patient_id}",
        findings=labels,
        positive=1.0 - labels["No Finding"],
        boxes_xywh=[box for _, box in boxes] if boxes else None,
        box_names=[label for label, _ in boxes] if boxes else None,
        extra=extra,
    )


def read_shared_nih(root: Path, dataset: str = "nih-cxr14") -> list[SampleRef]:
    """NIH ChestX-ray14 in the shared layout: ``labels.csv`` with 14 0/1 finding columns, optional ``boxes.csv``.

    Images without a box row have ``boxes_xywh=None`` (unknown); see :func:`nih_ref`.
    """
    boxes = _read_boxes(root / "boxes.csv")
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patient_id", *NIH_FINDINGS, "No_Finding")):
        findings = {name: _flag(row.get(name)) for name in NIH_FINDINGS}
        findings["No Finding"] = _flag(row.get("No_Finding"))
        refs.append(nih_ref(root / "images" / row["image"], row["patient_id"], findings, boxes.get(row["image"]),
                            dataset=dataset, extra={"view": row.get("view", "")}))
    return refs


def read_covid_chestxray(root: Path, dataset: str = "covid-chestxray") -> list[SampleRef]:
    """COVID-19 image data collection subset: lung masks, COVID-19 flag, Hannover patient ids for joint splits.

    Patient ids: the Hannover id where the image is also in the Hannover repository (so both folders
    split jointly), else ``split_group`` (the non-commercial folder's grouping), else the collection id.
    """
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patientid")):
        hannover = (row.get("hannover_patient_id") or "").strip()
        group = (row.get("split_group") or "").strip()
        if hannover:
            patient = f"hannover:{hannover}"
        elif group:
            patient = f"cohen:{group}"
        else:
            patient = f"cohen:{row['patientid']}"
        covid = _flag(row.get("covid19"))
        finding = (row.get("finding") or "").strip()
        mask_path = root / "masks" / row["image"]
        has_mask = (row.get("has_lung_mask") or "0").strip() == "1" and mask_path.exists()
        refs.append(
            SampleRef(
                image_path=root / "images" / row["image"],
                dataset=dataset,
                patient_id=patient,
                findings={"COVID-19": covid, "No Finding": float(finding == "No Finding") if finding else math.nan},
                positive=float(finding != "No Finding") if finding else math.nan,
                mask_path=mask_path if has_mask else None,
                extra={"view": row.get("view", "")},
            )
        )
    return refs


def read_hannover(root: Path) -> list[SampleRef]:
    """Hannover COVID-19 image repository: every patient is a COVID-19 case."""
    return [
        SampleRef(
            image_path=root / "images" / row["image"],
            dataset="hannover-covid19",
            patient_id=f"hannover:{row['patient_id']}",
            findings={"COVID-19": 1.0, "No Finding": 0.0},
            positive=1.0,
            extra={"view": row.get("projection", "")},
        )
        for row in _read_csv(root / "labels.csv", ("image", "patient_id"))
    ]


def read_shared_kermany(root: Path) -> list[SampleRef]:
    """Kermany pediatric set in the shared layout (``labels.csv``): NORMAL / PNEUMONIA, COVID-19 a known 0 (2018 data)."""
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patient_id", "pneumonia")):
        pneumonia = _flag(row.get("pneumonia"))
        refs.append(
            SampleRef(
                image_path=root / "images" / row["image"],
                dataset="kermany-pediatric",
                patient_id=f"kermany:{row['patient_id']}",
                findings={"Pneumonia": pneumonia, "COVID-19": 0.0, "No Finding": 1.0 - pneumonia},
                positive=pneumonia,
                extra={"pathogen": row.get("pathogen", "")},
            )
        )
    return refs


READERS: dict[str, Callable[[Path], list[SampleRef]]] = {
    "nih-cxr14-bbox": lambda root: read_shared_nih(root, "nih-cxr14-bbox"),
    "nih-cxr14-sample": lambda root: read_shared_nih(root, "nih-cxr14-sample"),
    "covid-chestxray": read_covid_chestxray,
    "covid-chestxray-nc": lambda root: read_covid_chestxray(root, "covid-chestxray-nc"),
    "hannover-covid19": read_hannover,
    "kermany-pediatric": read_shared_kermany,
}
"""Source name → reader of its shared layout (the names users write in YAML)."""


def bundled_sample_root() -> Path:
    """Folder of the small permissively licensed sample shipped inside the package."""
    return Path(str(resources.files("multichex") / "sample_data"))
