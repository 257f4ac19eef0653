"""MultiCheXNet: one CheXEnc pass feeding CheXCls, CheXSeg, CheXDet and the positive-case gate."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from multichex.device import to_cpu_float
from multichex.models.config import TASKS, ModelConfig
from multichex.models.decision import at_or_above
from multichex.models.discriminator import PairDiscriminator
from multichex.models.encoders import get_encoder
from multichex.models.heads.classification import CheXCls, PositiveCaseGate
from multichex.models.heads.detection import CheXDet, Detections
from multichex.models.heads.segmentation import CheXSeg
from multichex.models.saliency import bridge_guide


@dataclass
class GatedPrediction:
    """Outputs of :meth:`MultiCheXNet.predict` for a batch; gated-out images have ``None`` entries."""

    class_probs: torch.Tensor  # B×C
    gate_probs: torch.Tensor  # B
    gate_positive: torch.Tensor  # B bool
    seg_probs: list[torch.Tensor | None]  # 1×H×W each
    detections: list[Detections | None]

    def to_cpu(self) -> "GatedPrediction":
        """The prediction as float32 CPU tensors (where results are written), from any device or precision."""
        return GatedPrediction(
            to_cpu_float(self.class_probs), to_cpu_float(self.gate_probs), to_cpu_float(self.gate_positive),
            [None if s is None else to_cpu_float(s) for s in self.seg_probs],
            [None if d is None else Detections(to_cpu_float(d.boxes), to_cpu_float(d.scores), to_cpu_float(d.labels))
             for d in self.detections],
        )


class MultiCheXNet(nn.Module):
    """Shared encoder + task heads. ``forward(x, tasks)`` runs the encoder once and only the requested heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = get_encoder(config.encoder, pyramid=config.pyramid_input)
        channels = self.encoder.out_channels
        self.cls = CheXCls(channels[-1], len(config.class_names), hidden=config.cls_hidden)
        self.seg = CheXSeg(channels, attention=config.seg_attention, deep_supervision=config.seg_deep_supervision,
                           saliency_bridge=config.saliency_bridge)
        # Training-only adversary (APPAU-Net); saved with the weights so a resumed run continues its game.
        self.disc = PairDiscriminator(len(config.discriminator_classes)) if config.discriminator_classes else None
        self.det = CheXDet(channels, len(config.box_classes), [tuple(a) for a in config.anchors], config.image_size, config.det_stride)
        self.gate = PositiveCaseGate(channels[-1])
        self.register_buffer("input_mean", torch.tensor(config.input_mean), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.input_std), persistent=False)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] (``B×1×H×W``) → multi-scale features (normalisation happens here, not in user code)."""
        return self.encoder((images - self.input_mean) / self.input_std)

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → CheXCls logits (the path a class saliency map differentiates)."""
        return self.cls(self.encode(images))

    def saliency_modules(self) -> tuple[nn.Module, ...]:
        """The modules :meth:`class_logits` runs (see :class:`~multichex.models.saliency.SaliencySource`)."""
        return (self.encoder, self.cls)

    def run_heads(
        self, features: list[torch.Tensor], tasks: Iterable[str], output_size: tuple[int, int], guide: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw outputs of the requested heads; ``guide`` is the saliency bridge's input (see :meth:`guide`).

        In training mode a deep-supervised segmentation head also returns its side outputs (``seg_sides``).
        """
        outputs: dict[str, torch.Tensor] = {}
        for task in tasks:
            if task == "cls":
                outputs["cls"] = self.cls(features)
            elif task == "seg":
                if self.training and self.config.seg_deep_supervision:
                    outputs["seg"], outputs["seg_sides"] = self.seg(features, output_size, guide, return_sides=True)
                else:
                    outputs["seg"] = self.seg(features, output_size, guide)
            elif task == "det":
                outputs["det"] = self.det(features)
            elif task == "gate":
                outputs["gate"] = self.gate(features)
            else:
                raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
        return outputs

    def forward(self, images: torch.Tensor, tasks: Iterable[str] = TASKS) -> dict[str, torch.Tensor]:
        tasks = list(tasks)
        guide = self.guide(images) if "seg" in tasks else None
        return self.run_heads(self.encode(images), tasks, images.shape[-2:], guide)

    def guide(self, images: torch.Tensor) -> torch.Tensor | None:
        """The saliency bridge's (image, saliency map) input for ``images``; ``None`` without a bridge."""
        return bridge_guide(self, images) if self.config.saliency_bridge else None

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return class_probabilities(self.config, logits)

    def gate_tasks(self) -> list[str]:
        """The heads whose outputs :meth:`gate_probability` needs."""
        return ["gate"] if self.config.gate.source == "module" else ["cls"]

    def gate_probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gate probability from the gate module or from the classifier's chosen classes."""
        return gate_probability(self.config, outputs)

    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        use_gate: bool = True,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.45,
    ) -> GatedPrediction:
        """Gated inference: classifier and gate first, then the gated heads only on positive images.

        The encoder runs once; the gated heads get the cached features of the positive images.
        """
        size = images.shape[-2:]
        features = self.encode(images)
        first = self.run_heads(features, ["cls"] + [t for t in self.gate_tasks() if t != "cls"], size)

        def run_head(head: str, index: torch.Tensor) -> torch.Tensor:
            guide = self.guide(images[index]) if head == "seg" else None
            return self.run_heads([f[index] for f in features], [head], size, guide)[head]

        return assemble_prediction(self.config, first, self.gate_probability(first), run_head, self.det, use_gate, score_threshold, iou_threshold)


def class_probabilities(config: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities: independent sigmoids (multi-label) or a softmax (one class per image)."""
    return torch.softmax(logits, dim=-1) if config.cls_activation == "softmax" else torch.sigmoid(logits)


def gate_probability(config: ModelConfig, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gate probability from the gate logits or the maximum classifier probability over ``gate.classes``."""
    if config.gate.source == "module":
        return torch.sigmoid(outputs["gate"])
    indices = [config.class_names.index(c) for c in config.gate.classes]
    return torch.sigmoid(outputs["cls"][:, indices]).max(dim=1).values


def assemble_prediction(
    config: ModelConfig,
    first: dict[str, torch.Tensor],
    gate_probs: torch.Tensor,
    run_head: Callable[[str, torch.Tensor], torch.Tensor],
    detector: CheXDet,
    use_gate: bool,
    score_threshold: float,
    iou_threshold: float,
) -> GatedPrediction:
    """The gate decision and the gated heads, shared by every runtime (PyTorch, ONNX Runtime).

    ``first`` holds the classifier logits of the whole batch and ``gate_probs`` the gate's probabilities;
    ``run_head(head, index)`` runs a head on the cached features of the images in ``index`` and returns its
    raw output.
    """
    batch = len(gate_probs)
    positive = at_or_above(gate_probs, config.gate.threshold) if use_gate else torch.ones_like(gate_probs, dtype=torch.bool)
    seg_probs: list[torch.Tensor | None] = [None] * batch
    detections: list[Detections | None] = [None] * batch
    for head in ("seg", "det"):
        selected = positive if head in config.gate.gated_heads else torch.ones_like(positive)
        index = torch.nonzero(selected).flatten()
        if len(index) == 0:
            continue
        raw = run_head(head, index)
        if head == "seg":
            for slot, value in zip(index.tolist(), torch.sigmoid(raw)):
                seg_probs[slot] = value
        else:
            for slot, value in zip(index.tolist(), detector.postprocess(raw, config.image_size, score_threshold, iou_threshold)):
                detections[slot] = value
    return GatedPrediction(class_probabilities(config, first["cls"]), gate_probs, positive, seg_probs, detections)
