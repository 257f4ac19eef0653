"""Run configuration, loaded from YAML and recorded with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multichex.data.transforms import AugmentConfig
from multichex.models.config import ModelConfig, strict_from_dict

MODULES = ("encoder", "cls", "seg", "det", "gate")


@dataclass
class SourceConfig:
    """One data source: a known folder layout, its root (None = the bundled sample) and which labels to use."""

    name: str
    root: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["cls", "gate", "seg", "det"])
    limit: int | None = None
    boxes_from_masks: str | None = None  # box class given to boxes fitted to mask components
    options: dict[str, Any] = field(default_factory=dict)  # passed to the reader, e.g. {uncertain: ones}
    prepared: str | None = None  # a `multichex data prepare` folder: read from it, with its own split.json


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    seed: int = 0
    out_dir: str = "runs/train"
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    schedule: str = "alternating"
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay over all steps) or "constant"
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    max_minutes: float | None = None
    trainable: list[str] = field(default_factory=lambda: list(MODULES))
    loss_weights: dict[str, float] = field(default_factory=dict)
    dice_weight: float = 1.0
    giou_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 0
    channels_last: bool = True
    deterministic: bool = True
    threads: int | None = None
    on_nonfinite_loss: str = "skip"  # "skip" the batch (logged, counted) or "stop" the run
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the `tensorboard` package)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.sources = [strict_from_dict(SourceConfig, s) if isinstance(s, dict) else s for s in self.sources]
        if self.on_nonfinite_loss not in {"skip", "stop"}:
            raise ValueError(f"on_nonfinite_loss must be 'skip' or 'stop', got {self.on_nonfinite_loss!r}")
        if self.lr_schedule not in {"cosine", "constant"}:
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.schedule not in {"alternating", "joint"}:
            raise ValueError(f"schedule must be 'alternating' or 'joint', got {self.schedule!r}")
        unknown = set(self.trainable) - set(MODULES)
        if unknown:
            raise ValueError(f"trainable modules must be among {MODULES}, got {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return strict_from_dict(cls, data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML run config; ``overrides`` replace top-level keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {error}") from error
    data.update(overrides or {})
    return TrainConfig.from_dict(data)
