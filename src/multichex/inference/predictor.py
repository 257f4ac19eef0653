"""Gated prediction on image files: the per-image JSON/mask/overlay output contract.

For each input ``<stem>`` the output folder gets ``<stem>.json``::

    {"image", "classes": {name: prob}, "findings": [names at or above their threshold],
     "gate": {"probability", "positive"}, "heatmaps": {class: "<stem>_cam_<class>.png"} (with explain),
     "boxes": [{"x1", "y1", "x2", "y2", "score", "label"}], "mask": "<stem>_mask.png" | null}

plus the mask as a 0/255 PNG at the input image's original size and ``<stem>_overlay.png``; one
``predictions.csv`` sums up every image. Coordinates are pixels of the original image. Unreadable files are
logged to ``errors.csv``. A restarted run skips the images whose JSON is already written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from multichex import CLINICAL_DISCLAIMER
from multichex.data.io import ImageReadError, LoadedImage, read_image, to_uint8
from multichex.data.transforms import Letterbox, normalize_intensity
from multichex.device import autocast, resolve_device, resolve_precision
from multichex.evaluation.overlay import render_overlay
from multichex.fileio import atomic_write_bytes, atomic_write_text
from multichex.inference.explain import GradCamExplainer, heatmap_overlay
from multichex.inference.onnx_runtime import OnnxModel
from multichex.inference.runtimes import load_inference_model
from multichex.models.decision import at_or_above
from multichex.models.multichexnet import MultiCheXNet
from multichex.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """A read image, its network input and the letterbox that maps results back."""

    path: Path
    loaded: LoadedImage
    tensor: torch.Tensor  # 1×S×S in [0, 1]
    letterbox: Letterbox


def prepare_image(path: str | Path, size: int) -> PreparedImage:
    """Read an image file and letterbox its normalised intensities into the model's ``size``×``size`` input."""
    loaded = read_image(path)
    height, width = loaded.array.shape
    letterbox = Letterbox.fit(height, width, size)
    tensor = letterbox.apply_image(torch.from_numpy(normalize_intensity(loaded.array))[None]).clamp(0, 1)
    return PreparedImage(Path(path), loaded, tensor, letterbox)


class Predictor:
    """Loads a checkpoint once and predicts for files, arrays or batches."""

    def __init__(
        self, model: "MultiCheXNet | OnnxModel", use_gate: bool = True, score_threshold: float = 0.25, mask_threshold: float = 0.5,
        explain: bool = False, device: str | torch.device | None = "auto", precision: str | None = "auto",
    ) -> None:
        """``explain``: also a Grad-CAM heat map per predicted finding (or for the top class when none is predicted).
        ``device`` / ``precision`` (:mod:`multichex.device`): where the PyTorch model runs and in which arithmetic;
        an ONNX Runtime model runs on the CPU in its own precision. Results always come back to the CPU."""
        if isinstance(model, torch.nn.Module):
            self.device = resolve_device(device)
            self.precision = resolve_precision(precision, self.device)
            model = model.to(self.device)
        else:  # ONNX Runtime (or another runtime with the same predict): on the CPU, in its own precision
            if device not in (None, "auto") and str(device) != "cpu":
                raise ValueError(f"device {device}: the ONNX runtime runs on the CPU here; use --runtime torch for a GPU")
            self.device, self.precision = torch.device("cpu"), "fp32"
        self.model = model.eval()
        self.use_gate = use_gate
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.explainer = GradCamExplainer(model) if explain else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, runtime: str = "torch", threads: int | None = None, **kwargs: Any) -> "Predictor":
        """A ``.safetensors`` checkpoint (PyTorch) or, with ``runtime="onnx"``, a ``multichex export`` model.onnx.
        ``kwargs``: those of :class:`Predictor`, e.g. ``device="cuda"``, ``precision="bf16"`` (loaded on the CPU, then moved)."""
        return cls(load_inference_model(path, runtime, threads), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str | None = None, **kwargs: Any) -> "Predictor":
        """A registered model by name (``multichex models list``; ``None``: the default model) or a checkpoint path."""
        from multichex.models.pretrained import resolve_checkpoint

        return cls.from_checkpoint(resolve_checkpoint(name), **kwargs)

    @property
    def size(self) -> int:
        return self.model.config.image_size

    def prepare(self, path: str | Path) -> PreparedImage:
        return prepare_image(path, self.size)

    def predict_prepared(self, items: Sequence[PreparedImage]) -> list[dict[str, Any]]:
        """Results (original-image coordinates) for already prepared images, in one gated batch."""
        images = torch.stack([item.tensor for item in items]).to(self.device)
        with autocast(self.device, self.precision):
            out = self.model.predict(images, use_gate=self.use_gate, score_threshold=self.score_threshold)
        out = out.to_cpu()
        names = self.model.config.class_names
        box_names = self.model.config.box_classes
        thresholds = self.model.config.class_thresholds or [0.5] * len(self.model.config.class_names)
        results = []
        for index, item in enumerate(items):
            mask = None
            seg = out.seg_probs[index]
            if seg is not None:
                mask = at_or_above(item.letterbox.invert_map(seg)[0].numpy(), self.mask_threshold)
            boxes = []
            found = out.detections[index]
            if found is not None:
                original = item.letterbox.invert_boxes(found.boxes)
                for box, score, label in zip(original.tolist(), found.scores.tolist(), found.labels.tolist()):
                    boxes.append({"x1": round(box[0], 1), "y1": round(box[1], 1), "x2": round(box[2], 1), "y2": round(box[3], 1),
                                  "score": round(score, 4), "label": box_names[label]})
            probs = out.class_probs[index].tolist()
            explained = {}
            if self.explainer is not None:
                chosen = [i for i, (p, t) in enumerate(zip(probs, thresholds)) if at_or_above(p, t)] or [int(np.argmax(probs))]
                explained = {names[i]: heat for i, heat in self.explainer.maps(item.tensor, chosen).items()}
            results.append({
                "heat_arrays": explained,
                "image": str(item.path),
                "classes": {name: round(float(p), 5) for name, p in zip(names, out.class_probs[index])},
                "findings": [name for name, p, t in zip(names, probs, thresholds) if at_or_above(p, t)],
                "gate": {"probability": round(float(out.gate_probs[index]), 5), "positive": bool(out.gate_positive[index])},
                "boxes": boxes,
                "mask_array": mask,
            })
        return results


def output_stems(inputs: Sequence[tuple[Path, Path]]) -> list[str]:
    """One output name per ``(file, folder it was found in)``: its path relative to that folder with ``/`` → ``__``.

    The name depends only on the file and its folder, not on the order of the run, so a restarted run finds
    the outputs it already wrote. Names that still collide (``x.png`` and ``x.dcm``) get a short hash of the
    absolute path.
    """
    stems = [path.relative_to(root).with_suffix("").as_posix().replace("/", "__") for path, root in inputs]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [
        f"{stem}__{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}" if counts[stem] > 1 else stem
        for stem, (path, _) in zip(stems, inputs)
    ]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_result(result: dict[str, Any], item: PreparedImage, out_dir: Path, stem: str) -> dict[str, Any]:
    """Write ``<stem>_mask.png``, ``<stem>_overlay.png`` and, last, ``<stem>.json`` (each atomically), so a
    JSON on disk always means a finished image. Returns the JSON record."""
    mask = result.pop("mask_array")
    heat_arrays = result.pop("heat_arrays", {})
    record = {**result, "mask": None}
    if mask is not None:
        atomic_write_bytes(out_dir / f"{stem}_mask.png", _png_bytes(Image.fromarray((mask * 255).astype(np.uint8))))
        record["mask"] = f"{stem}_mask.png"
    overlay = render_overlay(to_uint8(item.loaded.array), mask, record["boxes"], record["classes"], record["gate"], title=item.path.name)
    atomic_write_bytes(out_dir / f"{stem}_overlay.png", _png_bytes(overlay))
    record["overlay"] = f"{stem}_overlay.png"
    if heat_arrays:
        gray = to_uint8(item.loaded.array)
        record["heatmaps"] = {}
        for name, heat in heat_arrays.items():
            filename = f"{stem}_cam_{re.sub(r'[^A-Za-z0-9_-]+', '-', name)}.png"
            atomic_write_bytes(out_dir / filename, _png_bytes(heatmap_overlay(gray, heat, item.letterbox)))
            record["heatmaps"][name] = filename
    record["disclaimer"] = CLINICAL_DISCLAIMER
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(record, indent=2))
    return record


def finished_record(out_dir: Path, stem: str, path: Path) -> dict[str, Any] | None:
    """The record a previous run wrote for ``path`` under ``stem``, or None if there is none (or it is another file's)."""
    target = out_dir / f"{stem}.json"
    if not target.is_file():
        return None
    try:
        record = json.loads(target.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("image") == str(path) else None


def summary_rows(records: Iterable[dict[str, Any]], class_names: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """``predictions.csv``: one row per image with the gate, findings, box count, files and every class probability."""
    header = ["image", "gate_probability", "gate_positive", "findings", "n_boxes", "top_box", "mask", "overlay", *class_names]
    rows = []
    for record in records:
        top = max(record["boxes"], key=lambda b: b["score"], default=None)
        rows.append({
            "image": record["image"], "gate_probability": record["gate"]["probability"], "gate_positive": int(record["gate"]["positive"]),
            "findings": "|".join(record.get("findings", [])), "n_boxes": len(record["boxes"]),
            "top_box": f"{top['label']}:{top['score']}" if top else "", "mask": record["mask"] or "", "overlay": record.get("overlay", ""),
            **{name: record["classes"].get(name, "") for name in class_names},
        })
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def predict_files(
    predictor: Predictor,
    paths: Iterable[str | Path | tuple[Path, Path]],
    out_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    resume: bool = True,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Predict for every file, writing per-image outputs, ``predictions.csv`` and ``errors.csv``.

    ``paths`` are files, or ``(file, folder)`` pairs for files found by walking a folder (the output name is
    the path within it). With ``resume`` an image whose JSON is already in ``out_dir`` is not predicted again,
    so an interrupted run restarts where it stopped with nothing lost or duplicated. Unreadable files are
    logged with their reason; the rest go on. Returns every image's record (old and new) and the errors.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [(Path(p[0]), Path(p[1])) if isinstance(p, tuple) else (Path(p), Path(p).parent) for p in paths]
    stems = output_stems(inputs)
    records: dict[int, dict[str, Any]] = {}
    if resume:
        for index, ((path, _), stem) in enumerate(zip(inputs, stems)):
            if (record := finished_record(out_dir, stem, path)) is not None:
                records[index] = record
    todo = [i for i in range(len(inputs)) if i not in records]
    errors: list[tuple[str, str]] = []
    bar = progress_bar(total=len(inputs), initial=len(records), enabled=progress, desc="predict", unit="img")
    for start in range(0, len(todo), batch_size):
        prepared, slots = [], []
        for index in todo[start : start + batch_size]:
            path = inputs[index][0]
            try:
                prepared.append(predictor.prepare(path))
                slots.append(index)
            except (ImageReadError, OSError, ValueError) as error:
                log.warning("skipping %s", error)
                errors.append((str(path), str(getattr(error, "reason", error))))
        if prepared:
            for result, item, index in zip(predictor.predict_prepared(prepared), prepared, slots):
                records[index] = write_result(result, item, out_dir, stems[index])
        bar.update(len(todo[start : start + batch_size]))
        bar.set_postfix(errors=len(errors))
    bar.close()
    ordered = [records[i] for i in sorted(records)]
    _write_csv(out_dir / "predictions.csv", *summary_rows(ordered, predictor.model.config.class_names))
    if errors or (out_dir / "errors.csv").exists():
        _write_csv(out_dir / "errors.csv", ["path", "reason"], [{"path": p, "reason": r} for p, r in errors])
    return ordered, errors
