"""The few-label additions to a training step: FixMatch / consistency / adversarial terms join the step's
loss before backward, and the adversary's discriminator takes its own step after the model's."""

from __future__ import annotations

import torch

from multichex.data.record import CXRBatch
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.semi_supervised import FewLabelObjectives


class FewLabelHooks:
    """Calls a :class:`FewLabelObjectives` at its two points in a step and carries what the second needs
    (the step's outputs and the rows its segmentation output covers) from the first."""

    def __init__(self, objectives: FewLabelObjectives) -> None:
        self.objectives = objectives
        self._outputs: dict[str, torch.Tensor] = {}
        self._seg_rows: torch.Tensor | None = None  # the rows the last forward's segmentation output covers (None: all)

    def wants(self, batch: CXRBatch) -> bool:
        """Whether the objectives have work on a batch without any label."""
        return self.objectives.wants(batch)

    def add_terms(self, losses: dict[str, torch.Tensor], model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch,
                  outputs: dict[str, torch.Tensor], trained_tasks: set[str], global_step: int,
                  seg_rows: torch.Tensor | None) -> None:
        """Add the objectives' terms to ``losses`` (and to its ``total``). A teacher-forced segmentation head
        ran on ``seg_rows`` only: its few-label terms use those rows."""
        extra = self.objectives.terms(model, images, batch, outputs, trained_tasks, global_step, seg_rows)
        if extra:
            losses.update(extra)
            losses["total"] = losses.get("total", 0.0) + sum(extra.values())
        self._outputs, self._seg_rows = outputs, seg_rows

    def after_step(self, model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch) -> None:
        """The discriminator's update on the pairs of the step just taken."""
        self.objectives.discriminator_step(model, images, batch, self._outputs, self._seg_rows)
