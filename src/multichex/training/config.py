"""Run configuration, loaded from YAML and recorded with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multichex.data.transforms import AugmentConfig
from multichex.device import PRECISIONS
from multichex.losses.segmentation import make_segmentation_loss
from multichex.models.config import ModelConfig, strict_from_dict

MODULES = ("encoder", "cls", "seg", "det", "gate")
SCHEDULES = ("single", "alternating", "joint")
OPTIMIZERS = ("adamw", "adam", "sgd")
BEST_METRICS = {  # best_metric → the epoch log's column that picks `best` (higher is better)
    "score": "val_score",  # mean of the trained heads' primary metrics
    "dice": "val_dice",
    "macro_auroc": "val_macro_auroc",
    "map": "val_map50",
    "gate_auroc": "val_gate_auroc",
}


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
class SemiSupervisedConfig:
    """Learning from unlabelled images (MultiMix §2).

    Classification (FixMatch): every unknown class label of a training image gets a pseudo-label from the
    prediction on its weakly augmented view when that prediction is confident (probability ≥ ``threshold``
    or ≤ 1 − ``threshold``; softmax models: top probability ≥ ``threshold``, images with no known label),
    and the strongly augmented view of the image is trained toward it with weight ``weight`` (λ).
    ``normalise``: the summed loss of the confident entries is divided by every unlabelled entry
    (``"all"``, FixMatch's mean over the unlabelled batch, so the threshold acts as a curriculum) or by the
    confident entries only (``"confident"``, the behaviour before this option existed).
    Segmentation: KL consistency, weight ``consistency_weight`` (β), between the mean mask predictions of
    the batch's images with and without a mask.
    """

    threshold: float = 0.7
    weight: float = 0.25
    classes: list[str] | None = None  # classes that get pseudo-labels (default: all)
    sources: list[str] | None = None  # source keys whose images serve as unlabelled (default: all)
    strong: dict[str, Any] = field(default_factory=dict)  # StrongAugmentConfig fields
    consistency_weight: float = 0.0
    normalise: str = "all"  # "all" unlabelled entries (FixMatch) or the "confident" ones only

    def __post_init__(self) -> None:
        if self.normalise not in {"all", "confident"}:
            raise ValueError(f"semi_supervised.normalise must be 'all' or 'confident', got {self.normalise!r}")
        if not 0.5 <= self.threshold <= 1.0:
            raise ValueError(f"semi_supervised.threshold must be in [0.5, 1], got {self.threshold}")
        if self.weight < 0 or self.consistency_weight < 0:
            raise ValueError("semi_supervised weights must be ≥ 0")


@dataclass
class AdversarialConfig:
    """APPAU-Net's adversarial game: the model's (image, mask) discriminator (``model.discriminator_classes``)
    learns to tell ground-truth pairs (and their class) from predicted ones; the segmentor's loss adds
    ``weight`` (c) × −log(1 − p(predicted | image, predicted mask))."""

    weight: float = 0.01
    lr_factor: float = 10.0  # discriminator learning rate = lr × lr_factor (the paper: 1e-4 vs 1e-5)

    def __post_init__(self) -> None:
        if self.weight < 0 or self.lr_factor <= 0:
            raise ValueError("adversarial.weight must be ≥ 0 and adversarial.lr_factor > 0")


@dataclass
class SourceConfig:
    """One data source: a known folder layout, its root (None = the bundled sample) and which labels to use."""

    name: str
    root: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["cls", "gate", "seg", "det"])
    limit: int | None = None
    boxes_from_masks: str | None = None  # box class given to boxes fitted to mask components
    options: dict[str, Any] = field(default_factory=dict)  # passed to the reader, e.g. {uncertain: ones}
    prepared: str | None = None  # a `multichex data prepare` folder: read from it (split with the run, like a raw folder)
    empty_boxes_for_negatives: bool = False  # gate-negative images without boxes count as "annotated, no lesion"
    id: str | None = None  # key of this source in a run (default: name); lets one reader appear twice
    resample_to: int | None = None  # degrade images to this longest side first (pool sources of mixed resolution
    #                                 without the resolution itself becoming a label)
    classes: list[str] | None = None  # this source's own classes: its labels for any other class are hidden
    none_class: str | None = None  # a class that is 1 when every own class is 0 (the "nothing" of a multi-class model)
    negative_for: list[str] = field(default_factory=list)  # training only: unknown labels of these classes become 0
    label_budget: dict[str, int] = field(default_factory=dict)  # training only: keep labels of N images per task
    #                                 (cls, seg, det); the others stay in as unlabelled images

    def __post_init__(self) -> None:
        if self.none_class and not self.classes:
            raise ValueError(f"source {self.key}: none_class needs the source's own `classes`")
        unknown = set(self.label_budget) - {"cls", "seg", "det"}
        if unknown or any(n < 0 for n in self.label_budget.values()):
            raise ValueError(f"source {self.key}: label_budget takes non-negative counts for cls, seg, det; got {self.label_budget}")

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
    best_metric: str = "score"  # the validation number that keeps `best` (BEST_METRICS); "last": the last validated epoch
    trainable: list[str] = field(default_factory=lambda: list(MODULES))  # modules or sub-modules, e.g. "cls.dec"
    teacher_forcing: TeacherForcingConfig | None = None  # None: gated heads train on every labelled image
    select_gate_threshold: str | None = None  # after training: "youden", "f1" or "sensitivity" (on validation)
    min_sensitivity: float = 0.95  # for select_gate_threshold="sensitivity"
    select_class_thresholds: str | None = None  # after training: per-class "f1" or "youden" thresholds (on validation)
    loss_weights: dict[str, float] = field(default_factory=dict)
    dice_weight: float = 1.0
    giou_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Engine (multichex.device): where and how fast the same run computes.
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps; --device overrides it
    precision: str = "auto"  # auto (bf16 on CUDA that supports it, else fp32) | fp32 | bf16 | fp16 (with a GradScaler)
    num_workers: int | str = "auto"  # loader processes: auto = cores − 1 (at most 16) with a GPU, 0 on the CPU
    pin_memory: bool | str = "auto"  # page-locked batches for asynchronous copies: auto = on CUDA
    persistent_workers: bool = True  # loader processes live for the whole run (not restarted every pass)
    prefetch_factor: int = 2  # batches each loader process prepares ahead
    compile: bool = False  # torch.compile the encoder and heads (falls back to eager, with a warning, where unsupported)
    accumulate_steps: int = 1  # batches whose gradients add up before one optimiser step
    ema_decay: float | None = None  # keep an exponential moving average of the weights (validated, saved as best/final)
    channels_last: bool = True
    deterministic: bool = True
    threads: int | None = None
    on_nonfinite_loss: str = "skip"  # "skip" the batch (logged, counted) or "stop" the run
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the `tensorboard` package)
    seg_loss: dict[str, Any] = field(default_factory=lambda: {"name": "bce_dice"})  # name + parameters (losses.segmentation)
    seg_side_weights: list[float] | None = None  # deep supervision: side outputs coarse → fine, then the final output
    semi_supervised: SemiSupervisedConfig | None = None
    adversarial: AdversarialConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if isinstance(self.teacher_forcing, dict):
            self.teacher_forcing = strict_from_dict(TeacherForcingConfig, self.teacher_forcing)
        if isinstance(self.semi_supervised, dict):
            self.semi_supervised = strict_from_dict(SemiSupervisedConfig, self.semi_supervised)
        if isinstance(self.adversarial, dict):
            self.adversarial = strict_from_dict(AdversarialConfig, self.adversarial)
        if self.adversarial is not None and not self.model.discriminator_classes:
            raise ValueError("adversarial training needs model.discriminator_classes (the discriminator's real classes)")
        if "name" not in self.seg_loss:
            raise ValueError(f"seg_loss needs a name, got {self.seg_loss}")
        try:  # unknown names and parameters, bad values (e.g. kl_eps ≤ 0, kl_reduction not sum/mean) fail here
            make_segmentation_loss(**self.seg_loss)
        except ValueError as error:
            raise ValueError(f"seg_loss: {error}") from error
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
        if self.best_metric not in BEST_METRICS and self.best_metric != "last":
            raise ValueError(f"best_metric must be one of {[*BEST_METRICS, 'last']}, got {self.best_metric!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self._check_engine()
        unknown = {t for t in self.trainable if t.split(".")[0] not in MODULES}
        if unknown:
            raise ValueError(f"trainable modules must be among {MODULES} (or their sub-modules, e.g. cls.dec), got {sorted(unknown)}")

    def _check_engine(self) -> None:
        """The engine options' values (the device itself is checked where the run starts: configs travel)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0)):
            raise ValueError(f"num_workers must be 'auto' or a count ≥ 0, got {self.num_workers!r}")
        if self.pin_memory not in {"auto", True, False}:
            raise ValueError(f"pin_memory must be auto, true or false, got {self.pin_memory!r}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be ≥ 1, got {self.prefetch_factor}")
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be ≥ 1, got {self.accumulate_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return strict_from_dict(cls, data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (``{}`` for an empty file).

    Raises:
        ValueError: one line naming the file and the problem: invalid YAML (with its line and column),
            text that is not UTF-8, or a top level that is not a mapping of keys.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML{_yaml_where(error)}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys (key: value), not {_yaml_kind(data)}")
    return data


def _yaml_where(error: yaml.YAMLError) -> str:
    """`` at line L, column C: problem (context)`` of a YAML error, on one line."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def _yaml_kind(data: Any) -> str:
    kinds = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return kinds.get(type(data), f"a {type(data).__name__}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML run config; ``overrides`` replace top-level keys."""
    data = read_yaml(path)
    data.update(overrides or {})
    return TrainConfig.from_dict(data)
