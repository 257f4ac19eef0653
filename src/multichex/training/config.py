"""Run configuration, loaded from YAML and recorded with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multichex.data.transforms import AugmentConfig
from multichex.models.config import ModelConfig, strict_from_dict

MODULES = ("encoder", "cls", "seg", "det", "gate")
SCHEDULES = ("single", "alternating", "joint")
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class TeacherForcingConfig:
    """Teacher forcing for the gated heads (MultiCheXNet §3.8).

    A coin with probability ``p`` (tossed per ``"batch"`` or per ``"sample"``) feeds the head the
    ground-truth positives; otherwise it gets what the frozen positive-case gate passed, false positives
    included (their targets are empty masks / no boxes).
    """

    p: float = 1.0
    per: str = "batch"
    heads: list[str] = field(default_factory=lambda: ["seg", "det"])

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"teacher_forcing.p must be in [0, 1], got {self.p}")
        if self.per not in {"batch", "sample"}:
            raise ValueError(f"teacher_forcing.per must be 'batch' or 'sample', got {self.per!r}")
        if set(self.heads) - {"seg", "det"}:
            raise ValueError(f"teacher_forcing.heads may only name 'seg' and 'det', got {self.heads}")


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
    empty_boxes_for_negatives: bool = False  # gate-negative images without boxes count as "annotated, no lesion"
    id: str | None = None  # key of this source in a run (default: name); lets one reader appear twice
    resample_to: int | None = None  # degrade images to this longest side first (pool sources of mixed resolution
    #                                 without the resolution itself becoming a label)

    @property
    def key(self) -> str:
        return self.id or self.name


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    seed: int = 0
    out_dir: str = "runs/train"
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_file: str | None = None  # reuse a saved split.json (image path → part) instead of drawing one
    schedule: str = "alternating"
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 16
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay over all steps) or "constant"
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    max_minutes: float | None = None
    trainable: list[str] = field(default_factory=lambda: list(MODULES))  # modules or sub-modules, e.g. "cls.dec"
    teacher_forcing: TeacherForcingConfig | None = None  # None: gated heads train on every labelled image
    select_gate_threshold: str | None = None  # after training: "youden", "f1" or "sensitivity" (on validation)
    min_sensitivity: float = 0.95  # for select_gate_threshold="sensitivity"
    select_class_thresholds: str | None = None  # after training: per-class "f1" or "youden" thresholds (on validation)
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
        if isinstance(self.teacher_forcing, dict):
            self.teacher_forcing = strict_from_dict(TeacherForcingConfig, self.teacher_forcing)
        self.sources = [strict_from_dict(SourceConfig, s) if isinstance(s, dict) else s for s in self.sources]
        keys = [s.key for s in self.sources]
        if len(set(keys)) != len(keys):
            raise ValueError(f"source keys must be unique (give repeated readers an `id`), got {keys}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.select_class_thresholds not in {None, "youden", "f1"}:
            raise ValueError(f"select_class_thresholds must be f1 or youden, got {self.select_class_thresholds!r}")
        if self.select_gate_threshold not in {None, "youden", "f1", "sensitivity"}:
            raise ValueError(f"select_gate_threshold must be youden, f1 or sensitivity, got {self.select_gate_threshold!r}")
        if self.on_nonfinite_loss not in {"skip", "stop"}:
            raise ValueError(f"on_nonfinite_loss must be 'skip' or 'stop', got {self.on_nonfinite_loss!r}")
        if self.lr_schedule not in {"cosine", "constant"}:
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        unknown = {t for t in self.trainable if t.split(".")[0] not in MODULES}
        if unknown:
            raise ValueError(f"trainable modules must be among {MODULES} (or their sub-modules, e.g. cls.dec), got {sorted(unknown)}")

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
