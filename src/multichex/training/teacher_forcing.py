"""Teacher forcing (MultiCheXNet §3.8): which images of a batch reach the gated segmentation/detection heads.

With probability ``p`` the head sees the ground-truth positives (images whose annotation is not empty);
otherwise it sees what the frozen positive-case gate passed, including the gate's false positives, whose
targets are then "empty mask" / "no boxes". Images without an annotation for the head never reach it
(their loss would be undefined). The coin is tossed per batch or per sample, from an RNG seeded by
(run seed, global step) so a resumed run tosses the same coins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from multichex.data.record import CXRBatch
from multichex.training.config import TeacherForcingConfig


def annotated(batch: CXRBatch, head: str) -> torch.Tensor:
    """B bool: the image has an annotation (possibly empty) for ``head``."""
    return batch.has_mask if head == "seg" else batch.has_boxes


def ground_truth_positive(batch: CXRBatch, head: str) -> torch.Tensor:
    """B bool: the image's annotation for ``head`` is not empty (a mask pixel or a box)."""
    if head == "seg":
        return batch.has_mask & (batch.masks.flatten(1).sum(dim=1) > 0)
    return batch.has_boxes & torch.tensor([len(b) > 0 for b in batch.boxes], dtype=torch.bool, device=batch.has_boxes.device)


@dataclass
class ForcingCounts:
    """How many images reached each head from the ground truth and from the gate (per head)."""

    forced: dict[str, int] = field(default_factory=dict)
    gated: dict[str, int] = field(default_factory=dict)
    gated_negative: dict[str, int] = field(default_factory=dict)

    def add(self, head: str, forced: int, gated: int, gated_negative: int) -> None:
        self.forced[head] = self.forced.get(head, 0) + forced
        self.gated[head] = self.gated.get(head, 0) + gated
        self.gated_negative[head] = self.gated_negative.get(head, 0) + gated_negative

    def as_record(self) -> dict[str, int]:
        record = {}
        for name, counts in (("forced", self.forced), ("gated", self.gated), ("gated_negative", self.gated_negative)):
            record.update({f"tf_{head}_{name}": value for head, value in counts.items()})
        return record


def select_for_head(
    batch: CXRBatch,
    head: str,
    gate_passed: torch.Tensor,
    config: TeacherForcingConfig,
    rng: np.random.Generator,
    counts: ForcingCounts | None = None,
) -> torch.Tensor:
    """B bool: the images that train ``head`` in this step."""
    known = annotated(batch, head)
    positive = ground_truth_positive(batch, head)
    size = 1 if config.per == "batch" else len(batch)
    coin = torch.from_numpy(rng.random(size) < config.p).to(positive.device).expand(len(batch))
    chosen = torch.where(coin, positive, gate_passed & known)
    if counts is not None:
        from_gate = chosen & ~coin
        counts.add(head, int((chosen & coin).sum()), int(from_gate.sum()), int((from_gate & ~positive).sum()))
    return chosen
