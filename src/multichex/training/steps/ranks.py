"""Keeping torchrun ranks in step: one agreed set of tasks, a shared skip decision, losses averaged over ranks.

Under torchrun every rank must take part in each forward and backward (they hold collectives:
SyncBatchNorm, DDP's gradient all-reduce), so what a step does is agreed on by all ranks first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from multichex.models.multichexnet import MultiCheXNet
from multichex.training import distributed

LOSS_KEYS = ("cls", "gate", "seg", "det", "total")
TASK_ORDER = ("cls", "gate", "seg", "det")
FORCING_KEYS = tuple(f"tf_{head}_{name}" for head in ("seg", "det") for name in ("forced", "gated", "gated_negative"))


class StepForward(torch.nn.Module):
    """What DistributedDataParallel wraps: its forward is a whole training forward (standard or teacher
    forced, losses included), so DDP sees every pass that needs gradient synchronisation and finds the
    parameters a step leaves unused from the losses it returns. ``model`` is the plain network."""

    def __init__(self, model: MultiCheXNet, forward: Callable[..., dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self._forward(*args)


def agreed_tasks(local: list[str] | None) -> list[str]:
    """The tasks any rank's batch has labels for; none when some rank's batch is ``None`` (``local``: this
    rank's tasks, ``None`` when its batch had no readable image)."""
    present = local or []
    flags = distributed.any_rank([local is None] + [t in present for t in TASK_ORDER])
    if flags[0]:
        return []
    return [t for t, there in zip(TASK_ORDER, flags[1:]) if there]


def join_unused_outputs(outputs: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> bool:
    """Add every output this rank has no loss for to ``losses["total"]``, times zero, so all ranks run the
    same backward graph (SyncBatchNorm's backward all-reduces must pair up) and its parameters get zero
    gradient here (DDP averages in the other ranks' real gradients). Returns whether ``total`` is only that
    zero term (this rank had no labels)."""
    unused = [out for key, out in outputs.items() if key not in losses and out.requires_grad]
    if not unused:
        return False
    zero = sum(0.0 * out.sum() for out in unused)
    placeholder = "total" not in losses
    losses["total"] = zero if placeholder else losses["total"] + zero
    return placeholder


def reduce_losses(losses: dict[str, torch.Tensor], placeholder: bool) -> tuple[bool, dict[str, float]]:
    """Whether any rank's loss is non-finite, and each loss averaged over the ranks that have it."""
    real = {} if placeholder else losses
    stats = torch.zeros(2 * len(LOSS_KEYS) + 1, dtype=torch.float64)
    for i, key in enumerate(LOSS_KEYS):
        if key in real:
            stats[2 * i], stats[2 * i + 1] = float(real[key].detach()), 1.0
    stats[-1] = float("total" in real and not bool(torch.isfinite(real["total"])))
    stats = distributed.all_reduce(stats)
    report = {key: float(stats[2 * i] / stats[2 * i + 1]) for i, key in enumerate(LOSS_KEYS) if stats[2 * i + 1] > 0}
    return bool(stats[-1] > 0), report


def summed_forcing(record: dict[str, int]) -> dict[str, int]:
    """An epoch's teacher-forcing counts summed over the ranks (keys any rank has)."""
    keys = FORCING_KEYS
    totals = distributed.all_reduce(torch.tensor([record.get(k, 0) for k in keys] + [k in record for k in keys], dtype=torch.float64))
    return {key: int(totals[i]) for i, key in enumerate(keys) if totals[len(keys) + i] > 0}
