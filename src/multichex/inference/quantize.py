"""Int8 variant of an ONNX export: ONNX Runtime static quantisation calibrated on real X-rays.

The float32 export matches PyTorch to 1e-4 but is no more than ~1.3× faster: on a 2-core CPU both runtimes
already run this convolutional encoder near the cores' float32 peak. Int8 convolutions (VNNI) do roughly
three times the work per cycle, at the price of small differences from the float32 model, which
:func:`agreement` measures and the export records in its JSON sidecar (``precision``, ``agreement``).

Each graph is calibrated on what it sees at inference: the encoder graph on the calibration images, the head
graphs on the float32 encoder's features of the same images. Weights are quantised per output channel
(int8), activations per tensor (uint8), in QDQ form so ONNX Runtime fuses them into integer kernels.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from multichex.device import module_device
from multichex.inference.onnx_runtime import FEATURES, OnnxModel, export_onnx, onnx_paths
from multichex.models.decision import at_or_above
from multichex.models.multichexnet import GatedPrediction, MultiCheXNet

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class _Feeds:
    """ONNX Runtime calibration reader over a fixed list of input dictionaries."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the reader protocol's optional method; one pass is all calibration needs
        pass


def _batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch)]


def _quantize_graph(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], method: str, work: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = work / f"{source.stem}.pre.onnx"
    quant_pre_process(str(source), str(prepared))  # shape inference + graph clean-up, as ORT recommends
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(str(prepared), str(target), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate)


def quantize_onnx(model: MultiCheXNet, path: str | Path, calibration: np.ndarray | torch.Tensor, method: str = "minmax",
                  opset: int = 18, batch: int = 8) -> dict[str, Path]:
    """Export ``model`` as int8 graphs at ``path`` (same layout as :func:`export_onnx`), calibrated on ``calibration``.

    ``calibration``: ``N×1×S×S`` float32 model inputs in [0, 1], ideally a few dozen X-rays like those the
    model will see. Returns the written paths; the sidecar records the precision and calibration.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    images = np.asarray(calibration, dtype=np.float32)
    size = model.config.image_size
    if images.ndim != 4 or images.shape[1:] != (1, size, size) or len(images) == 0:
        raise ValueError(f"calibration images must be N×1×{size}×{size}, got {images.shape}")
    paths = onnx_paths(path)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        float_paths = export_onnx(model, work / "float.onnx", opset)
        float_model = OnnxModel(float_paths["encoder"])
        image_feeds = [{"images": chunk} for chunk in _batches(images, batch)]
        feature_feeds = []
        for feed in image_feeds:
            _, features = float_model.encode_and_classify(torch.from_numpy(feed["images"]))
            feature_feeds.append(dict(zip(FEATURES, features)))
        paths["encoder"].parent.mkdir(parents=True, exist_ok=True)
        _quantize_graph(float_paths["encoder"], paths["encoder"], image_feeds, method, work)
        for head in ("seg", "det"):
            wanted = {i.name for i in float_model.sessions[head].get_inputs()}
            feeds = [{k: v for k, v in feed.items() if k in wanted} for feed in feature_feeds]
            _quantize_graph(float_paths[head], paths[head], feeds, method, work)
        meta = json.loads(float_paths["meta"].read_text())
    meta["graphs"] = {name: p.name for name, p in paths.items() if name != "meta"}
    meta["precision"] = "int8"
    meta["calibration"] = {"images": int(len(images)), "method": method}
    paths["meta"].write_text(json.dumps(meta, indent=2))
    return paths


def agreement(reference: MultiCheXNet | OnnxModel, candidate: MultiCheXNet | OnnxModel, images: torch.Tensor,
              batch: int = 8, mask_threshold: float = 0.5) -> dict[str, float]:
    """How closely ``candidate`` reproduces ``reference`` on ``images`` (every head run, gate off; a PyTorch model
    runs on its own device, e.g. the same checkpoint on the CPU and on a GPU).

    Class probabilities (max and mean absolute difference), gate probabilities (max absolute difference), decisions at the model's class thresholds and
    gate threshold (share of equal decisions), masks (mean and lowest Dice of the thresholded masks; 1 when
    both are empty; largest absolute difference of the mask probabilities) and the number of boxes (share
    of images with the same count).
    """
    config = reference.config
    thresholds = torch.tensor(config.class_thresholds or [0.5] * len(config.class_names))
    diffs, gate_diffs, decisions, gates, dices, box_counts, mask_diffs = [], [], [], [], [], [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        a, b = _predict_on_cpu(reference, x), _predict_on_cpu(candidate, x)
        diffs.append((a.class_probs - b.class_probs).abs())
        gate_diffs.append((a.gate_probs - b.gate_probs).abs())
        decisions.append((at_or_above(a.class_probs, thresholds) == at_or_above(b.class_probs, thresholds)).float())
        gates.append((a.gate_positive == b.gate_positive).float())
        for seg_a, seg_b, det_a, det_b in zip(a.seg_probs, b.seg_probs, a.detections, b.detections):
            if seg_a is not None and seg_b is not None:
                mask_diffs.append(float((seg_a - seg_b).abs().max()))
                mask_a, mask_b = seg_a >= mask_threshold, seg_b >= mask_threshold
                total = int(mask_a.sum() + mask_b.sum())
                dices.append(1.0 if total == 0 else 2 * float((mask_a & mask_b).sum()) / total)
            if det_a is not None and det_b is not None:
                box_counts.append(float(len(det_a.boxes) == len(det_b.boxes)))
    diff = torch.cat(diffs)
    return {
        "images": int(len(images)),
        "max_abs_class_probability": float(diff.max()),
        "mean_abs_class_probability": float(diff.mean()),
        "max_abs_gate_probability": float(torch.cat(gate_diffs).max()),
        "same_class_decisions": float(torch.cat(decisions).mean()),
        "same_gate_decisions": float(torch.cat(gates).mean()),
        "mask_dice": float(np.mean(dices)) if dices else float("nan"),
        "min_mask_dice": float(np.min(dices)) if dices else float("nan"),
        "max_abs_mask_probability": max(mask_diffs) if mask_diffs else float("nan"),
        "same_box_count": float(np.mean(box_counts)) if box_counts else float("nan"),
    }


def _predict_on_cpu(model: MultiCheXNet | OnnxModel, images: torch.Tensor) -> GatedPrediction:
    """Every head's prediction (gate off) from the model's own device, back on the CPU as float32."""
    device = module_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    return model.predict(images.to(device), use_gate=False).to_cpu()


def calibration_images(paths: Sequence[Path], size: int, limit: int = 64) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Up to ``limit`` model inputs, evenly spread over ``paths`` (sorted), read like ``predict`` reads them.

    Returns the ``N×1×size×size`` batch and the files that could not be read, with their reasons.
    """
    from multichex.data.io import ImageReadError
    from multichex.inference.predictor import prepare_image

    ordered = sorted(paths)
    if len(ordered) > limit:
        ordered = [ordered[i] for i in np.linspace(0, len(ordered) - 1, limit).round().astype(int)]
    tensors, errors = [], []
    for path in ordered:
        try:
            tensors.append(prepare_image(path, size).tensor)
        except (ImageReadError, OSError, ValueError) as error:
            errors.append((str(path), str(getattr(error, "reason", error))))
    if not tensors:
        raise ValueError("no readable calibration image among " + ", ".join(str(p) for p in ordered[:5]))
    return torch.stack(tensors), errors

