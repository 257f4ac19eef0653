"""Training checkpoints: the model file of ``multichex.models.checkpoint`` plus optimiser and RNG state.

``read_checkpoint``, ``load_model`` and ``load_weights`` are re-exported from the model layer, where
predicting and serving read them without importing this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multichex.models.checkpoint import (
    FORMAT,
    load_model,
    load_weights,
    read_checkpoint,
    write_checkpoint,
)
from multichex.models.multichexnet import MultiCheXNet

__all__ = ["FORMAT", "load_model", "load_weights", "read_checkpoint", "restore_other_optimizer",
           "restore_training_state", "save_checkpoint"]


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(
    path: str | Path,
    model: MultiCheXNet,
    extra: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    other_optimizers: dict[str, torch.optim.Optimizer] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` config atomically, with the training state if given.

    ``other_optimizers``: further optimisers by name (e.g. the discriminator's), saved next to ``optimizer``;
    ``extra_tensors``: more training state (e.g. the weight average's ``ema.*``). Everything is stored from
    CPU copies, so a checkpoint written on a GPU loads anywhere.
    """
    header = dict(extra or {})
    tensors: dict[str, torch.Tensor] = {k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()}
    if optimizer is not None:
        optim_tensors, optim_info = _optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        header["optimizer"] = optim_info
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()  # the current device's (the run's: build_engine selects it)
    for name, other in (other_optimizers or {}).items():
        other_tensors, other_info = _optimizer_tensors(other, f"optim_{name}")
        tensors.update(other_tensors)
        header[f"optimizer_{name}"] = other_info
    return write_checkpoint(path, model, header, tensors, private_keys=("optimizer",))


def restore_other_optimizer(optimizer: torch.optim.Optimizer, name: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """Restore an optimiser saved with ``other_optimizers={name: ...}``; False when the checkpoint has none."""
    if f"optimizer_{name}" not in header:
        return False
    prefix = f"optim_{name}."
    _restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith(prefix)}, header[f"optimizer_{name}"])
    return True


def restore_training_state(optimizer: torch.optim.Optimizer, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Optimizer and torch RNG state from a ``last`` checkpoint."""
    if "optimizer" not in header:
        raise ValueError("checkpoint has no optimizer state; resume needs a 'last' checkpoint")
    _restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")}, header["optimizer"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
