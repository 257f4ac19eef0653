"""SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019) exactly as published.

Files read from ``root``:

* ``train-rle.csv`` — header ``ImageId, EncodedPixels`` (the second name has a leading space in the
  published file); one row per pneumothorax region, ``-1`` for an image without pneumothorax. Codes
  are column-major, relative-offset run lengths of the 1024×1024 image (see :mod:`multichex.data.rle`).
* ``dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm`` — searched recursively once.

The masks are decoded later, at the DICOM's own size, by ``CXRDataset`` (via ``merge_rle``), so a
code that overruns its image is reported there as an unreadable sample naming the file.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from multichex.data.dicom import dcmread
from multichex.data.ref import SampleRef
from multichex.data.rle import EMPTY

log = logging.getLogger(__name__)

DATASET = "siim-acr-pneumothorax"
LABELS_FILE = "train-rle.csv"
IMAGES_DIR = "dicom-images-train"


def _check_code(code: str, image_id: str, path: Path, line: int) -> str:
    """Return the stripped code, or raise ValueError if it is not ``-1`` or pairs of non-negative integers."""
    code = code.strip()
    if code == EMPTY:
        return code
    problem = ""
    try:
        numbers = [int(token) for token in code.split()]
    except ValueError:
        problem = "not a list of integers"
    else:
        if not numbers:
            problem = "empty (use -1 for no pneumothorax)"
        elif len(numbers) % 2:
            problem = f"odd number of values ({len(numbers)})"
        elif min(numbers) < 0:
            problem = "negative start or length"
    if problem:
        raise ValueError(f"{path}: row {line}: ImageId {image_id}: bad EncodedPixels ({problem}): {code[:60]!r}")
    return code


def read_siim_rle(path: Path) -> dict[str, list[str]]:
    """``train-rle.csv`` → ``{ImageId: [code, ...]}`` in file order (codes checked for syntax only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    codes: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in ("ImageId", "EncodedPixels") if name not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: row 1: missing required column(s) {missing}; header is {reader.fieldnames}")
        for row in reader:
            image_id = (row["ImageId"] or "").strip()
            if not image_id:
                raise ValueError(f"{path}: row {reader.line_num}: empty ImageId")
            code = _check_code(row["EncodedPixels"] or "", image_id, path, reader.line_num)
            codes.setdefault(image_id, []).append(code)
    return codes


def index_dicoms(folder: Path) -> dict[str, Path]:
    """``*.dcm`` file stem → path over the whole tree under ``folder`` (first found wins)."""
    index: dict[str, Path] = {}
    for directory, _, files in os.walk(folder):
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() == ".dcm" and stem not in index:
                index[stem] = Path(directory) / name
    return index


def dicom_patient_id(path: Path) -> str | None:
    """``PatientID`` from the DICOM header (pixels are not read); None if absent or unreadable."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - an unreadable file is reported when its pixels are read
        return None
    return str(ds.get("PatientID", "") or "").strip() or None


def read_siim(
    root: Path,
    *,
    patient_from_dicom: bool = True,
    require_images: bool = True,
    images_dir: str = IMAGES_DIR,
    dataset: str = DATASET,
) -> list[SampleRef]:
    """Read the SIIM-ACR training set: "Pneumothorax" (and the gate) = 1 if any row has a mask code.

    ``mask_rle`` holds the image's codes (``["-1"]`` = known empty mask). Patient ids are
    ``siim:<PatientID>`` from the DICOM header with ``patient_from_dicom``, else ``siim:<ImageId>``.
    With ``require_images``, ImageIds without a DICOM are dropped (one warning gives the count).
    """
    root = Path(root)
    labels_path = root / LABELS_FILE
    codes = read_siim_rle(labels_path)
    dicoms = index_dicoms(root / images_dir)
    refs: list[SampleRef] = []
    missing = unnamed = 0
    for image_id, image_codes in codes.items():
        path = dicoms.get(image_id)
        if path is None:
            if require_images:
                missing += 1
                continue
            path = root / images_dir / f"{image_id}.dcm"
        regions = [code for code in image_codes if code != EMPTY]
        patient = dicom_patient_id(path) if patient_from_dicom and path.is_file() else None
        if patient_from_dicom and patient is None:
            unnamed += 1
        refs.append(
            SampleRef(
                image_path=path,
                dataset=dataset,
                patient_id=f"siim:{patient or image_id}",
                findings={"Pneumothorax": float(bool(regions))},
                positive=float(bool(regions)),
                mask_rle=regions or [EMPTY],
                extra={"image_id": image_id},
            )
        )
    if missing:
        log.warning("%s: %d ImageIds have no DICOM under %s; dropped", labels_path, missing, root / images_dir)
    if unnamed:
        log.warning("%s: %d DICOMs have no readable PatientID; their ImageId is used instead", labels_path, unnamed)
    return refs
