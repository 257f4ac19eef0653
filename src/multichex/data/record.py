"""The one sample record that flows through data loading, training, evaluation and inference.

Every task label is optional: a missing label is ``None`` (mask, boxes) or NaN (class labels,
gate label) and is masked out of every loss and metric, never replaced by a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CXRSample:
    """One chest X-ray with whatever labels its data set provides.

    Attributes:
        image: float tensor ``1×H×W``.
        labels: float tensor ``C`` over the model's named label set; NaN = unknown.
        positive: gate label (1 = positive case for the gated heads, 0 = negative, NaN = unknown).
        mask: float tensor ``1×H×W`` with values in {0, 1}, or ``None`` when the image has no mask.
        boxes: float tensor ``N×4`` (x1, y1, x2, y2 in pixels of ``image``), or ``None`` when the
            image has no box annotation. An empty ``0×4`` tensor means "annotated, no lesion".
        box_labels: long tensor ``N`` of indices into the model's box class list (same length as boxes).
        meta: data set name, patient id, source path and anything else worth carrying.
    """

    image: torch.Tensor
    labels: torch.Tensor
    positive: float = float("nan")
    mask: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    box_labels: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 1:
            raise ValueError(f"image must be 1×H×W, got {tuple(self.image.shape)} ({self.source})")
        if self.mask is not None and self.mask.shape[-2:] != self.image.shape[-2:]:
            raise ValueError(
                f"mask size {tuple(self.mask.shape[-2:])} differs from image size "
                f"{tuple(self.image.shape[-2:])} ({self.source})"
            )
        if self.boxes is not None:
            if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
                raise ValueError(f"boxes must be N×4, got {tuple(self.boxes.shape)} ({self.source})")
            if self.box_labels is None:
                self.box_labels = torch.zeros(len(self.boxes), dtype=torch.long)
            if len(self.box_labels) != len(self.boxes):
                raise ValueError(f"{len(self.boxes)} boxes but {len(self.box_labels)} box labels ({self.source})")

    @property
    def source(self) -> str:
        """Where the sample came from, for error messages."""
        return str(self.meta.get("path", self.meta.get("dataset", "<unknown source>")))

    @property
    def patient_id(self) -> str:
        return str(self.meta.get("patient_id", self.meta.get("path", "")))


@dataclass
class CXRBatch:
    """A collated batch of :class:`CXRSample` with per-task presence masks."""

    images: torch.Tensor  # B×1×H×W
    labels: torch.Tensor  # B×C, NaN = unknown
    positive: torch.Tensor  # B, NaN = unknown
    masks: torch.Tensor  # B×1×H×W (zeros where has_mask is False)
    has_mask: torch.Tensor  # B bool
    boxes: list[torch.Tensor]  # B tensors N_i×4 (empty where has_boxes is False)
    box_labels: list[torch.Tensor]
    has_boxes: torch.Tensor  # B bool
    meta: list[dict[str, Any]]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> torch.Tensor:
        """B×C bool: which class labels are known."""
        return ~torch.isnan(self.labels)

    def select(self, keep: torch.Tensor) -> "CXRBatch":
        """The sub-batch of the rows where ``keep`` (B bool) is true."""
        rows = torch.nonzero(keep).flatten().tolist()
        return CXRBatch(
            images=self.images[rows],
            labels=self.labels[rows],
            positive=self.positive[rows],
            masks=self.masks[rows],
            has_mask=self.has_mask[rows],
            boxes=[self.boxes[i] for i in rows],
            box_labels=[self.box_labels[i] for i in rows],
            has_boxes=self.has_boxes[rows],
            meta=[self.meta[i] for i in rows],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CXRBatch":
        """The batch's tensors on ``device`` (``non_blocking``: asynchronous copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CXRBatch":
        """The batch in page-locked memory (DataLoader's ``pin_memory=True`` calls this), for fast, asynchronous
        copies to a GPU."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "CXRBatch":
        return CXRBatch(
            images=move(self.images),
            labels=move(self.labels),
            positive=move(self.positive),
            masks=move(self.masks),
            has_mask=move(self.has_mask),
            boxes=[move(b) for b in self.boxes],
            box_labels=[move(b) for b in self.box_labels],
            has_boxes=move(self.has_boxes),
            meta=self.meta,
        )


def collate_samples(samples: list[CXRSample | None]) -> CXRBatch | None:
    """Stack samples of equal image size into a :class:`CXRBatch`.

    ``None`` entries (unreadable files, already logged by the data set) are dropped; a batch with
    nothing left is ``None`` and the caller skips it.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images = torch.stack([s.image for s in samples])
    zeros_mask = torch.zeros_like(samples[0].image)
    empty_boxes = torch.zeros(0, 4)
    empty_labels = torch.zeros(0, dtype=torch.long)
    return CXRBatch(
        images=images,
        labels=torch.stack([s.labels.float() for s in samples]),
        positive=torch.tensor([float(s.positive) for s in samples]),
        masks=torch.stack([s.mask.float() if s.mask is not None else zeros_mask for s in samples]),
        has_mask=torch.tensor([s.mask is not None for s in samples]),
        boxes=[s.boxes.float() if s.boxes is not None else empty_boxes for s in samples],
        box_labels=[s.box_labels if s.box_labels is not None else empty_labels for s in samples],
        has_boxes=torch.tensor([s.boxes is not None for s in samples]),
        meta=[s.meta for s in samples],
    )
