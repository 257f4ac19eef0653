"""Preparing one item (the worker side): letterbox a ref exactly as :class:`CXRDataset` does, write its PNGs, return its record."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multichex.data.cache.layout import png_bytes, relative_path
from multichex.data.dataset import CXRDataset
from multichex.data.dicom import read_dicom_spacing
from multichex.data.labels import canonical_name
from multichex.data.pixels import ImageReadError
from multichex.data.ref import SampleRef
from multichex.data.sniff import looks_like_dicom_file
from multichex.data.transforms import Letterbox
from multichex.fileio import atomic_write_bytes
from multichex.numbers import finite_or_none

__all__ = ["DELAY_ENV", "ItemResult", "init_worker", "letterbox_ref", "prepare_chunk", "prepare_item"]

DELAY_ENV = "MULTICHEX_PREPARE_DELAY"
"""Seconds to sleep per item in the workers (tests only: makes an interruption easy to hit)."""


def _pixel_spacing(path: Path) -> list[float] | None:
    """Row/column pixel spacing (mm) from a DICOM header; None for other formats or when absent."""
    if not looks_like_dicom_file(path):
        return None
    spacing = read_dicom_spacing(path)
    return [float(v) for v in spacing] if spacing is not None else None


def letterbox_ref(ref: SampleRef, size: int) -> tuple[np.ndarray, np.ndarray | None, list[list[float]] | None, list[str] | None, Letterbox, tuple[int, int]]:
    """Read and letterbox one ref exactly as :class:`CXRDataset` does (it runs ``CXRDataset._load``).

    Returns the uint8 image, the 0/1 uint8 mask (or None), every box in letterbox pixels with its
    canonical name (None = not annotated), the letterbox and the original ``(height, width)``.
    Boxes fitted to masks are not stored: :class:`PreparedDataset` fits them at load time.
    """
    names = list(dict.fromkeys(canonical_name(n) for n in ref.box_names or []))
    loader = CXRDataset([replace(ref, mask_box_label=None)], [], names, size, cache=False)
    image, mask, boxes, labels, letterbox, original = loader._load(0)
    box_list = box_names = None
    if boxes is not None:
        box_list = [[float(v) for v in row] for row in boxes.tolist()]
        box_names = [names[i] for i in labels.tolist()]
    mask_array = mask[0].numpy() if mask is not None else None
    return image[0].numpy(), mask_array, box_list, box_names, letterbox, original


def prepare_item(ref: SampleRef, item: str, root: Path, size: int, out: Path) -> dict[str, Any]:
    """Letterbox one ref, write its PNGs atomically and return its index record (JSON-native values)."""
    image, mask, boxes, box_names, letterbox, (height, width) = letterbox_ref(ref, size)
    image_rel = f"images/{item}.png"
    atomic_write_bytes(out / image_rel, png_bytes(image))
    mask_rel = ""
    if mask is not None:
        mask_rel = f"masks/{item}.png"
        atomic_write_bytes(out / mask_rel, png_bytes(mask * 255))
    findings = {canonical_name(k): float(v) for k, v in ref.findings.items() if v is not None and not math.isnan(float(v))}
    return {
        "id": item,
        "image": image_rel,
        "mask": mask_rel,
        "boxes": boxes,
        "box_names": box_names,
        "findings": findings,
        "positive": finite_or_none(ref.positive),
        "patient_id": ref.patient_id,
        "dataset": ref.dataset,
        "path": str(ref.image_path),
        "rel_path": relative_path(ref.image_path, root),
        "orig_height": int(height),
        "orig_width": int(width),
        "size": int(size),
        "scale": float(letterbox.scale),
        "pad_x": int(letterbox.pad_x),
        "pad_y": int(letterbox.pad_y),
        "pixel_spacing": _pixel_spacing(Path(ref.image_path)),
        "extra": json.loads(json.dumps(ref.extra, default=str)),
    }


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one item in a worker: its record, or the reason it failed."""

    item: str
    path: str
    record: dict[str, Any] | None = None
    error: str | None = None


def prepare_chunk(chunk: list[tuple[str, SampleRef]], root: Path, size: int, out: Path) -> list[ItemResult]:
    """Worker entry point: prepare a chunk of items; a failure is reported, never raised."""
    delay = float(os.environ.get(DELAY_ENV) or 0.0)
    results = []
    for item, ref in chunk:
        if delay:
            time.sleep(delay)
        try:
            results.append(ItemResult(item, str(ref.image_path), record=prepare_item(ref, item, root, size, out)))
        except Exception as error:  # noqa: BLE001 - one bad file must never stop a preparation
            reason = error.reason if isinstance(error, ImageReadError) else f"{type(error).__name__}: {error}"
            results.append(ItemResult(item, str(ref.image_path), error=str(reason)))
    return results


def init_worker() -> None:
    """One torch thread per worker process: the parallelism is across processes."""
    torch.set_num_threads(1)
