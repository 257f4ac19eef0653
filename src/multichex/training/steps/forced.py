"""The teacher-forced forward (MultiCheXNet §3.8): one encoder pass, then each forced head runs only on
the images teacher forcing selects (ground-truth positives, or what the frozen gate passes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from multichex.data.record import CXRBatch
from multichex.models.decision import at_or_above
from multichex.models.multichexnet import MultiCheXNet
from multichex.training import distributed
from multichex.training.config import TeacherForcingConfig
from multichex.training.teacher_forcing import ForcingCounts, select_for_head


def forced_forward(
    model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch, tasks: list[str], forced: TeacherForcingConfig,
    rng: np.random.Generator, counts: ForcingCounts,
) -> tuple[dict[str, torch.Tensor], dict[str, CXRBatch], dict[str, torch.Tensor]]:
    """The step's outputs, each forced head's sub-batch and the rows (B bool) it ran on.

    The unforced heads run on the whole batch; ``rng`` draws teacher forcing's coins and ``counts`` records
    what each forced head saw. Under torchrun a head runs on every rank, perhaps on no image, when it runs
    on any.
    """
    size = images.shape[-2:]
    features = model.encode(images)
    guide = model.guide(images) if "seg" in tasks else None
    outputs = model.run_heads(features, [t for t in tasks if t not in forced.heads], size, guide)
    gate_passed = gate_decision(model, features, size)
    chosen = {head: select_for_head(batch, head, gate_passed, forced, rng, counts) for head in tasks if head in forced.heads}
    runs = distributed.any_rank([bool(c.any()) for c in chosen.values()])
    head_batches: dict[str, Any] = {}
    head_rows: dict[str, torch.Tensor] = {}
    for (head, rows_chosen), run in zip(chosen.items(), runs):
        if run:
            rows = torch.nonzero(rows_chosen).flatten()
            outputs.update(model.run_heads([f[rows] for f in features], [head], size, guide[rows] if guide is not None else None))
            head_batches[head] = batch.select(rows_chosen)
            head_rows[head] = rows_chosen
    return outputs, head_batches, head_rows


def gate_decision(model: MultiCheXNet, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """B bool: what the positive-case gate passes, decided as at inference: the heads it reads (the gate
    module, or the classifier with ``gate.source: classifier``) run in eval mode (no dropout; BatchNorm
    uses its running statistics and leaves them unchanged), without gradient, and get their modes back."""
    tasks = model.gate_tasks()
    modes = [(module, module.training) for task in tasks for module in getattr(model, task).modules()]
    try:
        for task in tasks:
            getattr(model, task).eval()
        with torch.no_grad():
            outputs = model.run_heads([f.detach() for f in features], tasks, size)
            return at_or_above(model.gate_probability(outputs), model.config.gate.threshold)
    finally:
        for module, mode in modes:
            module.training = mode
