"""COVID-19 image data collection (Cohen et al., github.com/ieee8023/covid-chestxray-dataset), as published.

Layout: ``<root>/metadata.csv`` and images at ``<root>/<folder>/<filename>`` (``folder`` is usually
``images``; ``volumes`` rows hold CT volumes such as ``.nii.gz``, skipped as non-images).

The ``finding`` column is a hierarchy such as ``Pneumonia/Viral/COVID-19``,
``Pneumonia/Bacterial/Streptococcus``, ``Pneumonia/Fungal/Pneumocystis``, ``Tuberculosis``,
``No Finding`` or plain ``Pneumonia``; older releases used flat names (``COVID-19``, ``SARS``,
``Streptococcus``, ``Pneumocystis``, ``ARDS``, ...) and comma-joined pairs (``COVID-19, ARDS``).
Flat names are placed in the hierarchy (see :data:`FLAT_NAMES`); see :func:`finding_labels` for the
labels derived from a finding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from multichex.data.io import IMAGE_SUFFIXES
from multichex.data.native.generic import read_table
from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["FLAT_NAMES", "FRONTAL_VIEWS", "finding_labels", "read_cohen"]

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP semi erect", "AP erect")

_VIRAL = ("COVID-19", "SARS", "MERS-CoV", "Influenza", "Varicella", "Herpes")
_BACTERIAL = (
    "Streptococcus", "Klebsiella", "Legionella", "Staphylococcus", "E.Coli", "Chlamydophila", "Mycoplasma", "Nocardia",
)
_FUNGAL = ("Pneumocystis", "Aspergillosis")

FLAT_NAMES: dict[str, str] = {
    **{name.lower(): f"Pneumonia/Viral/{name}" for name in _VIRAL},
    **{name.lower(): f"Pneumonia/Bacterial/{name}" for name in _BACTERIAL},
    **{name.lower(): f"Pneumonia/Fungal/{name}" for name in _FUNGAL},
    "covid19": "Pneumonia/Viral/COVID-19",
    "mers": "Pneumonia/Viral/MERS-CoV",
}
"""Old flat ``finding`` names (lower case) → their place in the current hierarchy."""

_UNKNOWN = frozenset({"", "unknown", "todo"})
_PATHOGENS = {"viral": "Viral Pneumonia", "bacterial": "Bacterial Pneumonia", "fungal": "Fungal Pneumonia"}
_NON_INFECTIOUS = frozenset({"lipoid"})
_REQUIRED = ("patientid", "finding", "view", "modality", "folder", "filename")
_EXTRA = ("finding", "view", "modality", "sex", "age", "offset", "date", "RT_PCR_positive", "survival", "license")


def _part_labels(part: str) -> dict[str, float] | None:
    """Labels one finding says something about (absent key = says nothing); None if unrecognised."""
    path = FLAT_NAMES.get(part.lower(), part)
    levels = [level.strip() for level in path.split("/") if level.strip()]
    top = levels[0].lower()
    if top == "no finding":
        negatives = ("Pneumonia", *_PATHOGENS.values(), "COVID-19", "Tuberculosis")
        return {**{name: 0.0 for name in negatives}, "No Finding": 1.0}
    if top == "tuberculosis":
        return {"Tuberculosis": 1.0, "Viral Pneumonia": 0.0, "Fungal Pneumonia": 0.0, "COVID-19": 0.0, "No Finding": 0.0}
    if top == "ards":
        return {"COVID-19": 0.0, "Tuberculosis": 0.0, "No Finding": 0.0}
    if top != "pneumonia":
        return None
    labels = {"Pneumonia": 1.0, "Tuberculosis": 0.0, "No Finding": 0.0}
    kind = levels[1].lower() if len(levels) > 1 else ""
    if kind in _PATHOGENS:
        labels.update({name: float(key == kind) for key, name in _PATHOGENS.items()})
    else:
        labels.update({name: 0.0 if kind in _NON_INFECTIOUS else math.nan for name in _PATHOGENS.values()})
    if kind == "viral":
        labels["COVID-19"] = float(levels[2].lower().startswith("covid")) if len(levels) > 2 else math.nan
    else:
        labels["COVID-19"] = 0.0 if kind else math.nan
    return labels


def finding_labels(finding: str) -> dict[str, float] | None:
    """Labels of a ``finding`` cell; None when the finding is blank / ``Unknown`` / ``todo``.

    * Pneumonia: 1 under ``Pneumonia/...``, 0 for No Finding, NaN otherwise (ARDS, Tuberculosis).
    * Viral / Bacterial / Fungal Pneumonia: one-hot under ``Pneumonia/<kind>``; 0 for No Finding and
      non-infectious (lipoid) pneumonia; NaN for pneumonia of unstated cause and for ARDS.
      Tuberculosis gives Viral 0 and Fungal 0 but leaves Bacterial NaN (a mycobacterial infection;
      counting it as bacterial pneumonia is a labelling choice this reader does not make).
    * COVID-19: 1 for ``Pneumonia/Viral/COVID-19``; NaN for pneumonia of unstated (viral) cause;
      0 for every other known finding, No Finding included.
    * Tuberculosis: 1 for Tuberculosis, 0 for every other known finding.
    * No Finding: 1 for No Finding, 0 for any other known finding.

    Comma-joined findings (``COVID-19, ARDS``) combine: 1 if any part says 1, NaN if a part gives
    NaN or no part speaks to the label, else 0. An unrecognised finding is still "some finding"
    (No Finding 0), every other label NaN.
    """
    parts = [p.strip() for p in finding.split(",") if p.strip()]
    if not parts or any(p.lower() in _UNKNOWN for p in parts):
        return None
    spoken: list[dict[str, float]] = []
    for part in parts:
        labels = _part_labels(part)
        if labels is None:
            log.warning("unrecognised finding %r: only No Finding = 0 is known", part)
            labels = {"No Finding": 0.0}
        spoken.append(labels)
    names = ("Pneumonia", *_PATHOGENS.values(), "COVID-19", "Tuberculosis", "No Finding")
    combined = {}
    for name in names:
        values = [labels[name] for labels in spoken if name in labels]
        if any(v == 1.0 for v in values):
            combined[name] = 1.0
        elif not values or any(math.isnan(v) for v in values):
            combined[name] = math.nan
        else:
            combined[name] = 0.0
    return combined


def _matches(value: str, allowed: Sequence[str] | str | None) -> bool:
    """Case-insensitive membership; ``allowed=None`` accepts everything."""
    if allowed is None:
        return True
    options = [allowed] if isinstance(allowed, str) else allowed
    return value.strip().lower() in {o.strip().lower() for o in options}


def _is_image_file(name: str) -> bool:
    """Whether the file name has a 2-D image suffix (CT volumes such as ``.nii.gz`` do not)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES | {".gif"}


def read_cohen(
    root: Path,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    modality: str | None = "X-ray",
    masks_dir: Path | None = None,
    skip_missing: bool = False,
    dataset: str = "covid-chestxray",
) -> list[SampleRef]:
    """Read ``<root>/metadata.csv`` of the COVID-19 image data collection.

    Args:
        root: repository checkout (holds ``metadata.csv`` and the image folders).
        views: ``view`` values kept (case-insensitive); default frontal X-ray views; None = all.
        modality: ``modality`` kept (case-insensitive), default ``X-ray`` (CT skipped); None = all.
        masks_dir: optional folder of lung masks named ``<image stem>.png`` (as the V7 Labs masks
            distributed with torchxrayvision); used where present.
        skip_missing: skip rows whose image file is absent (warning) instead of raising.
        dataset: ``SampleRef.dataset`` value.

    Gate label ``positive``: 1 for any known finding other than No Finding, 0 for No Finding,
    NaN for unknown findings. Patient ids are ``cohen:<patientid>``.

    Raises:
        ValueError: missing ``metadata.csv`` / column, empty patient id or file name, missing image.
    """
    root = Path(root)
    csv_path = root / "metadata.csv"
    _, rows = read_table(csv_path, required=_REQUIRED)
    refs = []
    for row in rows:
        if not (_matches(row.get("modality"), modality) and _matches(row.get("view"), views)):
            continue
        filename, folder, patient = row.get("filename"), row.get("folder") or "images", row.get("patientid")
        if not filename or not patient:
            raise ValueError(f"{csv_path}: line {row.line}: empty 'filename' or 'patientid' cell")
        if not _is_image_file(filename):
            log.debug("%s: line %d: skipping non-image file %s", csv_path, row.line, filename)
            continue
        image_path = root / folder / filename
        if not image_path.is_file():
            if not skip_missing:
                raise ValueError(f"{csv_path}: line {row.line}: image file not found: {image_path}")
            log.warning("%s: line %d: skipping missing image %s", csv_path, row.line, image_path)
            continue
        labels = finding_labels(row.get("finding"))
        mask = Path(masks_dir) / f"{Path(filename).stem}.png" if masks_dir is not None else None
        refs.append(
            SampleRef(
                image_path=image_path,
                dataset=dataset,
                patient_id=f"cohen:{patient}",
                findings=labels if labels is not None else {},
                positive=math.nan if labels is None else 1.0 - labels["No Finding"],
                mask_path=mask if mask is not None and mask.is_file() else None,
                extra={key: row.get(key) for key in _EXTRA} | {"csv_line": row.line},
            )
        )
    return refs
