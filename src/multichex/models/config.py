"""Model configuration: everything needed to rebuild a network (saved as JSON beside its weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_CLASSES = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "COVID-19", "No Finding",
]
DEFAULT_BOX_CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
TASKS = ("cls", "seg", "det", "gate")


def strict_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass, refusing unknown keys (a typo in YAML should fail loudly)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)} (known: {sorted(known)})")
    return cls(**data)


@dataclass
class GateConfig:
    """Positive-case gate (§3.7): which heads it guards and where its probability comes from.

    ``source="module"`` uses the separate :class:`PositiveCaseGate`; ``source="classifier"`` uses the
    maximum CheXCls probability over ``classes`` (the shared classification head as gate).
    """

    source: str = "module"
    classes: list[str] = field(default_factory=list)
    threshold: float = 0.5
    gated_heads: list[str] = field(default_factory=lambda: ["det"])


@dataclass
class ModelConfig:
    """Architecture and preprocessing metadata that travel with the weights."""

    encoder: str = "lite"
    image_size: int = 256
    class_names: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    box_classes: list[str] = field(default_factory=lambda: list(DEFAULT_BOX_CLASSES))
    seg_name: str = "lung"
    anchors: list[list[float]] = field(default_factory=lambda: [[0.08, 0.08], [0.16, 0.2], [0.3, 0.35]])
    det_stride: int = 16
    cls_hidden: int = 256
    input_mean: float = 0.5
    input_std: float = 0.25
    gate: GateConfig = field(default_factory=GateConfig)
    class_thresholds: list[float] | None = None  # per-class decision thresholds chosen on validation (None: 0.5)
    cls_activation: str = "sigmoid"  # "sigmoid": multi-label (one binary output per class); "softmax": one class per image
    pyramid_input: bool = False  # APPAU-Net: the image, downsampled, also enters encoder stages 2-4 (lite encoders)
    seg_attention: bool = False  # APPAU-Net: attention gates on the decoder's skip connections
    seg_deep_supervision: bool = False  # APPAU-Net: progressive side outputs, each with its own loss
    saliency_bridge: bool = False  # MultiMix: class saliency + image fed into the first decoder stage
    discriminator_classes: list[str] | None = None  # APPAU-Net: an (image, mask) discriminator over these + "predicted"

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        unknown = set(self.gate.gated_heads) - {"seg", "det"}
        if unknown:
            raise ValueError(f"gate.gated_heads may only name 'seg' and 'det', got {sorted(unknown)}")
        if self.gate.source not in {"module", "classifier"}:
            raise ValueError(f"gate.source must be 'module' or 'classifier', got {self.gate.source!r}")
        missing = [c for c in self.gate.classes if c not in self.class_names]
        if missing:
            raise ValueError(f"gate.classes {missing} are not in class_names")
        if self.gate.source == "classifier" and not self.gate.classes:
            raise ValueError("gate.source='classifier' needs gate.classes")
        if self.class_thresholds is not None and len(self.class_thresholds) != len(self.class_names):
            raise ValueError(f"{len(self.class_thresholds)} class_thresholds for {len(self.class_names)} class_names")
        if self.cls_activation not in {"sigmoid", "softmax"}:
            raise ValueError(f"cls_activation must be 'sigmoid' or 'softmax', got {self.cls_activation!r}")
        if self.cls_activation == "softmax" and self.gate.source == "classifier":
            raise ValueError("gate.source='classifier' needs cls_activation='sigmoid'")
        if self.discriminator_classes is not None:
            unknown = [c for c in self.discriminator_classes if c not in self.class_names]
            if unknown or not self.discriminator_classes:
                raise ValueError(f"discriminator_classes must be a non-empty subset of class_names, got {self.discriminator_classes}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return strict_from_dict(cls, data)
