"""Montgomery County and Shenzhen tuberculosis chest X-ray sets (U.S. NLM), as published.

Both sets share one layout (root = ``MontgomerySet`` / ``ChinaSet_AllFiles``, or a folder above it):

* ``CXR_png/<name>_<0|1>.png`` — the last character of the stem is the label: 0 normal, 1 TB;
* ``ClinicalReadings/<name>_<0|1>.txt`` — free text with sex, age and the radiologist's reading;
* Montgomery only: ``ManualMask/leftMask/<image>.png`` and ``ManualMask/rightMask/<image>.png``.

Labels: ``Tuberculosis`` 0/1 and ``No Finding = 1 - Tuberculosis``: the publishers describe the
label-0 images as "normal" (no abnormality), so a normal image is a known "no finding" and a TB
image a known finding. Both sets predate 2019, so ``COVID-19`` is a known 0. The gate label is TB.
One image per patient in these sets: the patient id is the stem without the ``_0`` / ``_1`` suffix.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["parse_clinical_reading", "read_montgomery", "read_shenzhen"]

_MONTGOMERY_SEX = re.compile(r"patient'?s\s+sex\s*:\s*([MF])", re.IGNORECASE)
_MONTGOMERY_AGE = re.compile(r"patient'?s\s+age\s*:\s*(\d+)\s*([YMWD])?", re.IGNORECASE)
_SHENZHEN_HEAD = re.compile(
    r"^\s*(male|female)(?![a-z])[\s,:]*(?:(\d+)\s*(yrs?|years?|y|months?|mon|m|days?|d)?\b\.?)?", re.IGNORECASE
)
_UNIT_YEARS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}


def _age_years(number: str | None, unit: str | None) -> float | None:
    """Age in years from a count and a unit (years when the unit is absent)."""
    if number is None:
        return None
    return int(number) * _UNIT_YEARS.get((unit or "y")[0].lower(), 1.0)


def parse_clinical_reading(text: str) -> dict[str, Any]:
    """Sex (``"M"``/``"F"``), age in years and the reading text of a ClinicalReadings file.

    Montgomery files carry ``Patient's Sex: M`` / ``Patient's Age: 040Y`` lines; Shenzhen files
    start with a line like ``male 35yrs``. Unparsed fields are None; ``reading`` is the remaining
    text (lines joined with a space).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sex: str | None = None
    age: float | None = None
    rest: list[str] = []
    for index, line in enumerate(lines):
        sex_match, age_match = _MONTGOMERY_SEX.search(line), _MONTGOMERY_AGE.search(line)
        head = _SHENZHEN_HEAD.match(line) if index == 0 else None
        if sex_match:
            sex = sex_match.group(1).upper()
        elif age_match:
            age = _age_years(age_match.group(1), age_match.group(2))
        elif head:
            sex = "M" if head.group(1).lower() == "male" else "F"
            age = _age_years(head.group(2), head.group(3))
            tail = line[head.end():].strip(" ,;:")
            if tail:
                rest.append(tail)
        else:
            rest.append(line)
    return {"sex": sex, "age": age, "reading": " ".join(rest)}


def _set_root(root: Path) -> Path:
    """``root`` itself or the first folder up to two levels below it that holds ``CXR_png``."""
    root = Path(root)
    if (root / "CXR_png").is_dir():
        return root
    for depth in ("*", "*/*"):
        for candidate in sorted(root.glob(depth)):
            if "__MACOSX" not in candidate.parts and (candidate / "CXR_png").is_dir():
                return candidate
    raise ValueError(f"{root}: no CXR_png folder found (expected <root>/CXR_png/<name>_0.png ...)")


def _label_from_stem(path: Path) -> tuple[str, float]:
    """``(patient stem, TB label)`` from ``<name>_0.png`` / ``<name>_1.png``."""
    stem = path.stem
    if len(stem) < 3 or stem[-2] != "_" or stem[-1] not in "01":
        raise ValueError(f"{path}: file name must end in _0 (normal) or _1 (TB) before the suffix")
    return stem[:-2], float(stem[-1])


def _reading(folder: Path, stem: str, base: str) -> dict[str, Any]:
    """Parsed ClinicalReadings file for the image (``<stem>.txt``, else ``<base>.txt``); {} if absent."""
    for name in (f"{stem}.txt", f"{base}.txt"):
        path = folder / "ClinicalReadings" / name
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            return {"clinical_reading": text.strip(), **parse_clinical_reading(text)}
    log.debug("%s: no clinical reading for %s", folder, stem)
    return {}


def _read_set(root: Path, dataset: str, namespace: str, masks: Any) -> list[SampleRef]:
    """Shared reader; ``masks(image_path, folder)`` gives the mask path(s) or None."""
    folder = _set_root(root)
    images = sorted(
        p for p in (folder / "CXR_png").iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".png"
    )
    if not images:
        raise ValueError(f"{folder / 'CXR_png'}: no .png images")
    refs = []
    for image in images:
        base, tb = _label_from_stem(image)
        refs.append(
            SampleRef(
                image_path=image,
                dataset=dataset,
                patient_id=f"{namespace}:{base}",
                findings={"Tuberculosis": tb, "No Finding": 1.0 - tb, "COVID-19": 0.0},
                positive=tb,
                mask_path=masks(image, folder),
                extra=_reading(folder, image.stem, base),
            )
        )
    return refs


def read_montgomery(root: Path, dataset: str = "montgomery-tb") -> list[SampleRef]:
    """Montgomery County set; lung mask = union of ``ManualMask/leftMask`` and ``rightMask``.

    The mask is used only when both halves exist (``mask_path = [left, right]``); an image with
    one half alone gets no mask and a warning, since half a lung field would teach wrong targets.
    """

    def masks(image: Path, folder: Path) -> list[Path] | None:
        left = folder / "ManualMask" / "leftMask" / image.name
        right = folder / "ManualMask" / "rightMask" / image.name
        if left.is_file() and right.is_file():
            return [left, right]
        if left.is_file() or right.is_file():
            log.warning("%s: only one lung mask half found (%s); no mask used", image, left if left.is_file() else right)
        return None

    return _read_set(root, dataset, "montgomery", masks)


def read_shenzhen(root: Path, masks_dir: Path | None = None, dataset: str = "shenzhen-tb") -> list[SampleRef]:
    """Shenzhen set; optional third-party lung masks ``masks_dir/<stem>_mask.png`` or ``<stem>.png``."""

    def masks(image: Path, folder: Path) -> Path | None:
        if masks_dir is None:
            return None
        for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
            candidate = Path(masks_dir) / name
            if candidate.is_file():
                return candidate
        return None

    return _read_set(root, dataset, "shenzhen", masks)
