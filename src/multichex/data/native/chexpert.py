"""CheXpert (Irvin et al., 2019) label CSVs, as published (``train.csv`` / ``valid.csv``).

Columns: ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and 14 observations with values ``1.0``
(positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank (not mentioned). ``Path`` is relative,
e.g. ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``: it is resolved against the
CSV's grandparent folder or against ``root``, whichever holds the file.

Observation names go through :func:`multichex.data.labels.canonical_name` (``Pleural Effusion`` →
``Effusion``). CheXpert studies date from 2002–2017, so ``COVID-19`` is a known 0.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

from multichex.data.labels import canonical_name
from multichex.data.native.generic import Row, read_table
from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["OBSERVATIONS", "read_chexpert"]

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
_POLICIES = {"uncertain": ("ignore", "ones", "zeros"), "blank": ("unknown", "zeros")}
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(study\d+)")


def _value(text: str, uncertain: str, blank: str, where: str) -> float:
    """One observation cell under the uncertainty / blank policies."""
    text = text.strip()
    if text == "":
        return 0.0 if blank == "zeros" else math.nan
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number == -1.0:
        return {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    if number in (0.0, 1.0):
        return number
    raise ValueError(f"{where}: value must be 1.0, 0.0, -1.0 or blank, got {text!r}")


def _positive(findings: dict[str, float]) -> float:
    """Gate label: 1 if any pathology (Support Devices aside) is 1, else ``1 - No Finding``, else NaN."""
    pathologies = [v for k, v in findings.items() if k not in ("No Finding", "Support Devices", "COVID-19")]
    if any(v == 1.0 for v in pathologies):
        return 1.0
    no_finding = findings.get("No Finding", math.nan)
    return math.nan if math.isnan(no_finding) else 1.0 - no_finding


def _image_path(csv_path: Path, root: Path, relative: str) -> Path | None:
    """The existing file among ``<csv grandparent>/<relative>`` and ``<root>/<relative>``."""
    for base in (csv_path.parent.parent, root):
        candidate = base / relative
        if candidate.is_file():
            return candidate
    return None


def _ref(row: Row, csv_path: Path, root: Path, split: str, uncertain: str, blank: str, dataset: str) -> SampleRef | None:
    """One CSV row as a ref; None when its image is missing (caller decides)."""
    relative = row.get("Path")
    patient = _PATIENT.search(relative)
    if not relative or patient is None:
        raise ValueError(f"{csv_path}: line {row.line}: 'Path' {relative!r} has no patientNNNNN component")
    image = _image_path(csv_path, root, relative)
    if image is None:
        return None
    findings = {
        canonical_name(name): _value(row.get(name), uncertain, blank, f"{csv_path}: line {row.line}: column {name!r}")
        for name in OBSERVATIONS
    }
    findings["COVID-19"] = 0.0
    study = _STUDY.search(relative)
    return SampleRef(
        image_path=image,
        dataset=dataset,
        patient_id=f"chexpert:{patient.group(1)}",
        findings=findings,
        positive=_positive(findings),
        extra={
            "official_split": split, "study": study.group(1) if study else "", "sex": row.get("Sex"),
            "age": row.get("Age"), "view": row.get("Frontal/Lateral"), "projection": row.get("AP/PA"),
        },
    )


def read_chexpert(
    root: Path,
    splits: Sequence[str] = ("train", "valid"),
    uncertain: str = "ignore",
    blank: str = "unknown",
    frontal_only: bool = True,
    skip_missing: bool = False,
    dataset: str = "chexpert",
) -> list[SampleRef]:
    """Read ``<root>/<split>.csv`` for each split.

    Args:
        root: folder holding the CSVs (e.g. ``CheXpert-v1.0-small``).
        splits: CSV names without ``.csv``.
        uncertain: ``-1.0`` cells → ``"ignore"`` NaN (default), ``"ones"`` 1 or ``"zeros"`` 0.
        blank: blank cells → ``"unknown"`` NaN (default) or ``"zeros"`` 0 (common in CheXpert papers).
        frontal_only: keep only ``Frontal/Lateral == Frontal`` rows.
        skip_missing: skip rows whose image is absent (warning) instead of raising.
        dataset: ``SampleRef.dataset`` value.

    Gate label: 1 when any pathology (Support Devices aside) is 1 after the policies, else
    ``1 - No Finding`` where that is known, else NaN. Patient ids ``chexpert:patientNNNNN``.

    Raises:
        ValueError: unknown policy, missing CSV / column, bad cell, missing image.
    """
    for option, value in (("uncertain", uncertain), ("blank", blank)):
        if value not in _POLICIES[option]:
            raise ValueError(f"{option}={value!r}; expected one of {_POLICIES[option]}")
    root = Path(root)
    refs = []
    for split in splits:
        csv_path = root / f"{split}.csv"
        _, rows = read_table(csv_path, required=("Path", "Frontal/Lateral", *OBSERVATIONS))
        for row in rows:
            if frontal_only and row.get("Frontal/Lateral").lower() != "frontal":
                continue
            ref = _ref(row, csv_path, root, split, uncertain, blank, dataset)
            if ref is None:
                message = (
                    f"{csv_path}: line {row.line}: image not found under {csv_path.parent.parent} "
                    f"or {root}: {row.get('Path')}"
                )
                if not skip_missing:
                    raise ValueError(message)
                log.warning("skipping %s", message)
                continue
            refs.append(ref)
    return refs
