"""Gated prediction on image files: the per-image JSON/mask/overlay output contract.

For each input ``<stem>`` the output folder gets ``<stem>.json``::

    {"image", "classes": {name: prob}, "findings": [names at or above their threshold],
     "gate": {"probability", "positive"},
     "boxes": [{"x1", "y1", "x2", "y2", "score", "label"}], "mask": "<stem>_mask.png" | null}

plus the mask as a 0/255 PNG at the input image's original size and ``<stem>_overlay.png``.
Coordinates are pixels of the original image. Unreadable files are logged to ``errors.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from multichex import CLINICAL_DISCLAIMER
from multichex.data.io import ImageReadError, LoadedImage, read_image, to_uint8
from multichex.data.transforms import Letterbox, normalize_intensity
from multichex.evaluation.overlay import render_overlay
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import load_model

log = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """A read image, its network input and the letterbox that maps results back."""

    path: Path
    loaded: LoadedImage
    tensor: torch.Tensor  # 1×S×S in [0, 1]
    letterbox: Letterbox


class Predictor:
    """Loads a checkpoint once and predicts for files, arrays or batches."""

    def __init__(self, model: MultiCheXNet, use_gate: bool = True, score_threshold: float = 0.25, mask_threshold: float = 0.5) -> None:
        self.model = model.eval()
        self.use_gate = use_gate
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> "Predictor":
        model, _ = load_model(path)
        return cls(model, **kwargs)

    @property
    def size(self) -> int:
        return self.model.config.image_size

    def prepare(self, path: str | Path) -> PreparedImage:
        loaded = read_image(path)
        height, width = loaded.array.shape
        letterbox = Letterbox.fit(height, width, self.size)
        tensor = letterbox.apply_image(torch.from_numpy(normalize_intensity(loaded.array))[None]).clamp(0, 1)
        return PreparedImage(Path(path), loaded, tensor, letterbox)

    def predict_prepared(self, items: Sequence[PreparedImage]) -> list[dict[str, Any]]:
        """Results (original-image coordinates) for already prepared images, in one gated batch."""
        images = torch.stack([item.tensor for item in items])
        out = self.model.predict(images, use_gate=self.use_gate, score_threshold=self.score_threshold)
        names = self.model.config.class_names
        box_names = self.model.config.box_classes
        thresholds = self.model.config.class_thresholds or [0.5] * len(self.model.config.class_names)
        results = []
        for index, item in enumerate(items):
            mask = None
            seg = out.seg_probs[index]
            if seg is not None:
                mask = item.letterbox.invert_map(seg)[0].numpy() >= self.mask_threshold
            boxes = []
            found = out.detections[index]
            if found is not None:
                original = item.letterbox.invert_boxes(found.boxes)
                for box, score, label in zip(original.tolist(), found.scores.tolist(), found.labels.tolist()):
                    boxes.append({"x1": round(box[0], 1), "y1": round(box[1], 1), "x2": round(box[2], 1), "y2": round(box[3], 1),
                                  "score": round(score, 4), "label": box_names[label]})
            results.append({
                "image": str(item.path),
                "classes": {name: round(float(p), 5) for name, p in zip(names, out.class_probs[index])},
                "findings": [name for name, p, t in zip(names, out.class_probs[index].tolist(), thresholds) if p >= t],
                "gate": {"probability": round(float(out.gate_probs[index]), 5), "positive": bool(out.gate_positive[index])},
                "boxes": boxes,
                "mask_array": mask,
            })
        return results


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def write_result(result: dict[str, Any], item: PreparedImage, out_dir: Path, stem: str) -> dict[str, Any]:
    """Write ``<stem>.json``, ``<stem>_mask.png`` and ``<stem>_overlay.png``; return the JSON record."""
    mask = result.pop("mask_array")
    record = {**result, "mask": None}
    if mask is not None:
        Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / f"{stem}_mask.png")
        record["mask"] = f"{stem}_mask.png"
    overlay = render_overlay(to_uint8(item.loaded.array), mask, record["boxes"], record["classes"], record["gate"], title=item.path.name)
    overlay.save(out_dir / f"{stem}_overlay.png")
    record["overlay"] = f"{stem}_overlay.png"
    record["disclaimer"] = CLINICAL_DISCLAIMER
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return record


def predict_files(
    predictor: Predictor,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Predict for every file; unreadable ones are logged (and listed in ``errors.csv``), the rest go on."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    used: set[str] = set()
    stems = [_unique_stem(p, used) for p in paths]
    records: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    for start in tqdm(range(0, len(paths), batch_size), disable=not progress, desc="predict"):
        prepared, prepared_stems = [], []
        for path, stem in zip(paths[start : start + batch_size], stems[start : start + batch_size]):
            try:
                prepared.append(predictor.prepare(path))
                prepared_stems.append(stem)
            except (ImageReadError, OSError, ValueError) as error:
                log.warning("skipping %s", error)
                errors.append((str(path), str(getattr(error, "reason", error))))
        if prepared:
            for result, item, stem in zip(predictor.predict_prepared(prepared), prepared, prepared_stems):
                records.append(write_result(result, item, out_dir, stem))
    if errors:
        with (out_dir / "errors.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(errors)
    return records, errors
