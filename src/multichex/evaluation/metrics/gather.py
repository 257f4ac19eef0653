"""Gathering per-image metric buffers from every ``torch.distributed`` rank (identity in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["Gather", "all_gather_objects", "is_distributed", "rank_and_world"]

Gather = Callable[[Any], list[Any]]  # local object → every rank's object, in rank order


def is_distributed() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``torch.distributed.all_gather_object``); ``[obj]`` in one process.

    A collective: under torchrun every rank must call it, in the same order. Tensors travel pickled, so
    they should be on the CPU (gloo) or on each rank's current device (NCCL).
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
