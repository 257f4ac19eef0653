"""JSRT digital image database (Japanese Society of Radiological Technology), as published.

Images are headerless ``.IMG`` files: 2048×2048, 12 bits stored in big-endian uint16, 0.175 mm
pixels. :func:`multichex.data.io.read_image` reads them (via ``read_jsrt_raw``) and INVERTS the
raw values — ``(4095 - raw) / 4095`` — because JSRT stores film-density-like numbers (air-filled
lung high, bone low); after inversion lungs are dark and bone bright, like every other image in
the package. Source: the standard JSRT conversion ``1.0 - raw / 4096`` used by
github.com/imlab-uiip/lung-segmentation-2d and the many works built on it.
``multichex.data.io.read_jsrt_raw(path, invert=False)`` gives the raw polarity.

* ``JPCLN###.IMG``: 154 images with a lung nodule → ``Nodule = 1``;
* ``JPCNN###.IMG``: 93 images without a nodule → ``Nodule = 0``.

Optional clinical files ``CLNDAT_EN.txt`` / ``CNNDAT_EN.txt`` (tab separated; nodule rows are
``file, subtlety, size mm, age, sex, x, y, malignant/benign, location, diagnosis``; non-nodule
rows ``file, age, sex, ...``) add age / sex / nodule details to ``extra`` and, with
``nodule_boxes=True``, a nodule box centred on ``(x, y)`` with the nodule diameter as side.

Lung masks come from the SCR database (van Ginneken et al.): ``<scr>/masks/{left lung,right
lung}/<stem>.gif`` at 1024×1024 — half the image resolution. :func:`prepare_scr_masks` merges
both lungs and upsamples them (nearest neighbour, each pixel → 2×2) into 2048×2048 PNGs;
:func:`read_jsrt` takes that folder as ``masks_root`` and checks every mask's size.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multichex.data.io import JSRT_PIXEL_SPACING, JSRT_SHAPE
from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["prepare_scr_masks", "read_jsrt", "read_jsrt_clinical"]

_NAME = re.compile(r"^JPC(LN|NN)\d{3}$", re.IGNORECASE)
_LUNGS = ("left lung", "right lung")


def _number(text: str) -> float:
    """A numeric field, NaN when not a number (e.g. ``?``)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _clinical_file(root: Path, name: str) -> Path | None:
    """The clinical file ``name`` (any case) anywhere under ``root``, or None."""
    matches = sorted(p for p in root.rglob("*") if p.name.lower() == name.lower() and "__MACOSX" not in p.parts)
    return matches[0] if matches else None


def read_jsrt_clinical(root: Path) -> dict[str, dict[str, Any]]:
    """Per-image clinical data (by upper-case stem) from ``CLNDAT_EN.txt`` / ``CNNDAT_EN.txt`` under ``root``.

    Raises:
        ValueError: a nodule row with fewer than 7 fields or non-numeric size / coordinates,
            naming the file and line.
    """
    table: dict[str, dict[str, Any]] = {}
    nodules = _clinical_file(Path(root), "CLNDAT_EN.txt")
    if nodules is not None:
        for number, line in enumerate(nodules.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            fields = [f.strip() for f in line.split("\t")]
            while fields and not fields[-1]:
                fields.pop()
            if not fields:
                continue
            if len(fields) < 7:
                raise ValueError(f"{nodules}: line {number}: expected at least 7 tab-separated fields, got {fields}")
            size, x, y = _number(fields[2]), _number(fields[5]), _number(fields[6])
            if not all(math.isfinite(v) for v in (size, x, y)):
                raise ValueError(
                    f"{nodules}: line {number}: nodule size / x / y must be numbers, "
                    f"got {fields[2]!r}, {fields[5]!r}, {fields[6]!r}"
                )
            table[Path(fields[0]).stem.upper()] = {
                "subtlety": _number(fields[1]), "nodule_size_mm": size, "age": _number(fields[3]), "sex": fields[4],
                "nodule_x": x, "nodule_y": y, "malignancy": fields[7] if len(fields) > 7 else "",
                "nodule_location": fields[8] if len(fields) > 8 else "", "diagnosis": " ".join(fields[9:]),
            }
    normals = _clinical_file(Path(root), "CNNDAT_EN.txt")
    if normals is not None:
        for line in normals.read_bytes().decode("utf-8", errors="replace").splitlines():
            fields = [f.strip() for f in line.split("\t")]
            if fields and fields[0]:
                table[Path(fields[0]).stem.upper()] = {
                    "age": _number(fields[1]) if len(fields) > 1 else math.nan,
                    "sex": fields[2] if len(fields) > 2 else "",
                }
    return table


def _nodule_box(info: dict[str, Any]) -> tuple[float, float, float, float]:
    """Square ``(x, y, w, h)`` around the nodule centre with side = diameter, clipped to the image."""
    side = info["nodule_size_mm"] / JSRT_PIXEL_SPACING[0]
    x0 = max(0.0, info["nodule_x"] - side / 2)
    y0 = max(0.0, info["nodule_y"] - side / 2)
    x1 = min(float(JSRT_SHAPE[1]), info["nodule_x"] + side / 2)
    y1 = min(float(JSRT_SHAPE[0]), info["nodule_y"] + side / 2)
    return (x0, y0, x1 - x0, y1 - y0)


def _mask_for(masks_root: Path, stem: str) -> Path | list[Path] | None:
    """Prepared ``<stem>.png`` (or raw SCR left+right lung pair) whose size must be 2048×2048."""
    prepared = masks_root / f"{stem}.png"
    pair = [masks_root / organ / f"{stem}.gif" for organ in _LUNGS]
    if prepared.is_file():
        candidates: list[Path] = [prepared]
    elif all(p.is_file() for p in pair):
        candidates = pair
    else:
        return None
    for path in candidates:
        with Image.open(path) as image:
            size = (image.height, image.width)
        if size != JSRT_SHAPE:
            raise ValueError(
                f"{path}: mask is {size[0]}×{size[1]} but JSRT images are {JSRT_SHAPE[0]}×{JSRT_SHAPE[1]}; "
                f"run multichex.data.native.jsrt.prepare_scr_masks(scr_masks, out_dir) and pass out_dir"
            )
    return candidates[0] if len(candidates) == 1 else candidates


def read_jsrt(
    root: Path,
    masks_root: Path | None = None,
    nodule_boxes: bool = True,
    dataset: str = "jsrt",
) -> list[SampleRef]:
    """Read every ``JPCLN###.IMG`` / ``JPCNN###.IMG`` under ``root`` (recursively).

    Args:
        root: JSRT folder (e.g. holding ``All247images`` and the clinical ``.txt`` files).
        masks_root: folder of 2048×2048 lung masks ``<stem>.png`` (see :func:`prepare_scr_masks`);
            a mask of another size raises ``ValueError``. Images without a mask get none.
        nodule_boxes: add nodule boxes from ``CLNDAT_EN.txt`` (``[]`` for non-nodule images, which
            are confirmed nodule-free; ``None`` for a nodule image missing from the file).
        dataset: ``SampleRef.dataset`` value.

    Labels: ``Nodule`` 1 / 0 by file name, ``COVID-19`` 0 (1990s data); gate label = Nodule.
    Patient id ``jsrt:<stem>`` (one image per patient).

    Raises:
        ValueError: no ``.IMG`` files, a ``.IMG`` not named like JSRT, bad clinical rows, wrong-size masks.
    """
    root = Path(root)
    images = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() == ".img" and p.is_file() and not p.name.startswith(".") and "__MACOSX" not in p.parts
    )
    if not images:
        raise ValueError(f"{root}: no JSRT .IMG files found")
    clinical = read_jsrt_clinical(root)
    refs = []
    for image in images:
        match = _NAME.match(image.stem)
        if match is None:
            raise ValueError(f"{image}: not a JSRT file name (expected JPCLN###.IMG or JPCNN###.IMG)")
        stem = image.stem.upper()
        nodule = float(match.group(1).upper() == "LN")
        info = clinical.get(stem, {})
        boxes: list[tuple[float, float, float, float]] | None = None
        if nodule_boxes and not nodule:
            boxes = []
        elif nodule_boxes and "nodule_x" in info:
            boxes = [_nodule_box(info)]
        refs.append(
            SampleRef(
                image_path=image,
                dataset=dataset,
                patient_id=f"jsrt:{stem}",
                findings={"Nodule": nodule, "COVID-19": 0.0},
                positive=nodule,
                mask_path=_mask_for(Path(masks_root), image.stem) if masks_root is not None else None,
                boxes_xywh=boxes,
                box_names=["Nodule"] * len(boxes) if boxes is not None else None,
                extra=dict(info),
            )
        )
    return refs


def _upsample(mask: np.ndarray, size: tuple[int, int], path: Path) -> np.ndarray:
    """Nearest-neighbour upsampling by whole factors (each pixel → an ``fy×fx`` block)."""
    height, width = mask.shape
    if size[0] % height or size[1] % width:
        raise ValueError(f"{path}: mask size {height}×{width} does not divide the target size {size[0]}×{size[1]}")
    return np.repeat(np.repeat(mask, size[0] // height, axis=0), size[1] // width, axis=1)


def prepare_scr_masks(
    masks_root: Path,
    out_dir: Path,
    organs: Sequence[str] = _LUNGS,
    size: tuple[int, int] = JSRT_SHAPE,
) -> list[Path]:
    """Merge SCR organ masks and upsample them to JSRT resolution as 0/255 PNGs.

    Reads ``masks_root/<organ>/<stem>.gif`` for every organ (default left and right lung; any
    non-zero pixel is foreground), takes their union, repeats each pixel into a block so the mask
    is ``size`` (1024 → 2048: 2×2 blocks, exactly the nearest-neighbour upsampling) and writes
    ``out_dir/<stem>.png``. Returns the written paths, sorted.

    Raises:
        ValueError: an organ folder is missing, an image lacks one of its organ masks, masks of
            one image differ in size, or the size does not divide ``size``.
    """
    masks_root, out_dir = Path(masks_root), Path(out_dir)
    folders = [masks_root / organ for organ in organs]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder}: SCR mask folder not found")
    stems = sorted({p.stem for folder in folders for p in folder.glob("*.gif") if not p.name.startswith(".")})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in stems:
        merged: np.ndarray | None = None
        for folder in folders:
            path = folder / f"{stem}.gif"
            if not path.is_file():
                raise ValueError(f"{path}: missing {folder.name!r} mask for {stem}")
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L")) > 0
            if merged is not None and merged.shape != mask.shape:
                raise ValueError(f"{path}: mask size {mask.shape} differs from the other organs' {merged.shape}")
            merged = mask if merged is None else merged | mask
        assert merged is not None
        target = out_dir / f"{stem}.png"
        Image.fromarray(_upsample(merged, size, masks_root / stem).astype(np.uint8) * 255).save(target)
        written.append(target)
    log.info("wrote %d JSRT lung masks to %s", len(written), out_dir)
    return written
