"""ONNX export and ONNX Runtime inference that keeps the gate able to skip heads.

``export_onnx(model, "model.onnx")`` writes three graphs and a JSON sidecar:

* ``model.onnx`` — images (``B×1×S×S`` in [0, 1]) → classifier logits, gate logits and the four encoder
  feature maps (the cached encoder output);
* ``model.seg.onnx`` and ``model.det.onnx`` — encoder features → raw segmentation / detection outputs;
* ``model.json`` — the model config (classes, thresholds, preprocessing) and the graphs' file names.

:class:`OnnxModel` runs the encoder graph once per batch and feeds the head graphs only the features of
the images the gate passed, then decodes with the same code as PyTorch (sigmoid, box decoding, NMS), so
both runtimes give the same boxes and masks. The batch dimension is dynamic; the image size is the
model's (fixed at training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from multichex.models.config import ModelConfig
from multichex.models.heads.detection import CheXDet
from multichex.models.multichexnet import GatedPrediction, MultiCheXNet, assemble_prediction, gate_probability

FEATURES = ("f4", "f8", "f16", "f32")
FORMAT = "multichex-onnx/1"


class _EncoderGraph(nn.Module):
    def __init__(self, model: MultiCheXNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.encode(images)
        outputs = self.model.run_heads(features, ["cls", "gate"], images.shape[-2:])
        return (outputs["cls"], outputs["gate"], *features)


class _HeadGraph(nn.Module):
    def __init__(self, model: MultiCheXNet, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head
        self.size = (model.config.image_size, model.config.image_size)

    def forward(self, f4: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        return self.model.run_heads([f4, f8, f16, f32], [self.head], self.size)[self.head]


def onnx_paths(path: str | Path) -> dict[str, Path]:
    """The encoder graph, the two head graphs and the JSON sidecar for an export named ``path``."""
    path = Path(path)
    stem = path.with_suffix("")
    return {"encoder": path, "seg": Path(f"{stem}.seg.onnx"), "det": Path(f"{stem}.det.onnx"), "meta": Path(f"{stem}.json")}


def export_onnx(model: MultiCheXNet, path: str | Path, opset: int = 18, batch_example: int = 2) -> dict[str, Path]:
    """Export ``model`` (eval mode, float32, CPU) as three graphs with a dynamic batch axis; returns their paths."""
    if model.config.saliency_bridge:
        raise ValueError("a model with a saliency bridge needs input gradients at inference, which ONNX graphs do not have: "
                         "use the PyTorch runtime")
    model = model.eval().float().cpu().to(memory_format=torch.contiguous_format)
    paths = onnx_paths(path)
    paths["encoder"].parent.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    images = torch.rand(batch_example, 1, size, size)
    with torch.no_grad():
        features = model.encode(images)
    _export(_EncoderGraph(model), (images,), paths["encoder"], ["images"], ["cls", "gate", *FEATURES], ({0: batch},), opset)
    feature_shapes = tuple({0: batch} for _ in FEATURES)
    _export(_HeadGraph(model, "seg"), tuple(features), paths["seg"], list(FEATURES), ["seg"], feature_shapes, opset)
    _export(_HeadGraph(model, "det"), tuple(features), paths["det"], list(FEATURES), ["det"], feature_shapes, opset)
    meta = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "encoder_channels": list(model.encoder.out_channels),
        "graphs": {name: p.name for name, p in paths.items() if name != "meta"},
        "opset": opset,
        "precision": "float32",
        "torch": torch.__version__,
    }
    paths["meta"].write_text(json.dumps(meta, indent=2))
    return paths


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], shapes: tuple, opset: int) -> None:
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=opset, verbose=False)
    program.save(str(path))


class OnnxModel:
    """ONNX Runtime twin of :class:`MultiCheXNet` for inference: same ``config`` and ``predict`` contract."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        paths = onnx_paths(path)
        if not paths["meta"].is_file():
            raise FileNotFoundError(f"{paths['meta']}: the export's JSON sidecar is missing (export with `multichex export`)")
        meta = json.loads(paths["meta"].read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{paths['meta']}: not a multichex ONNX export (format {meta.get('format')!r})")
        self.config = ModelConfig.from_dict(meta["model"])
        self.precision = meta.get("precision", "float32")
        self.sessions = {}
        for name in ("encoder", "seg", "det"):
            graph = paths[name].parent / meta["graphs"][name]
            if not graph.is_file():
                raise FileNotFoundError(f"{graph}: graph {name!r} of the export is missing")
            self.sessions[name] = self._session(graph, threads)
        # Box decoding needs the detector's anchors and stride only; its weights are never used here.
        self.detector = CheXDet(tuple(meta["encoder_channels"]), len(self.config.box_classes),
                                [tuple(a) for a in self.config.anchors], self.config.image_size, self.config.det_stride)

    def _session(self, graph: Path, threads: int | None) -> Any:
        """An ONNX Runtime session on the CPU (``run(None, feeds)``, ``get_inputs()``)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # ORT's worker threads otherwise spin-wait after each run, taking the cores from the PyTorch code
        # (decoding, NMS) that runs next: on 2 cores that made whole predictions 3× slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def eval(self) -> "OnnxModel":
        return self

    def encode_and_classify(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
        """One encoder-graph run: classifier/gate logits (torch) and the cached features (numpy)."""
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        cls, gate, *features = self.sessions["encoder"].run(None, {"images": array})
        return {"cls": torch.from_numpy(cls), "gate": torch.from_numpy(gate)}, features

    def run_head(self, head: str, features: list[np.ndarray], index: torch.Tensor) -> torch.Tensor:
        rows = index.numpy()
        every = len(rows) == len(features[0]) and bool((rows == np.arange(len(rows))).all())
        feeds = {name: f if every else np.ascontiguousarray(f[rows]) for name, f in zip(FEATURES, features)}
        session = self.sessions[head]
        wanted = {i.name for i in session.get_inputs()}
        return torch.from_numpy(session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0])

    def predict(self, images: torch.Tensor, use_gate: bool = True, score_threshold: float = 0.25, iou_threshold: float = 0.45) -> GatedPrediction:
        """Gated inference with the encoder graph run once and the head graphs only on the images that need them."""
        first, features = self.encode_and_classify(images)
        return assemble_prediction(self.config, first, gate_probability(self.config, first),
                                   lambda head, index: self.run_head(head, features, index), self.detector,
                                   use_gate, score_threshold, iou_threshold)
