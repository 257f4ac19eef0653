"""Checkpoints as one safetensors file (weights + trainer state) with the JSON config in its metadata.

A readable ``.json`` copy of that config is written beside it. Nothing is ever unpickled: loading a
file from an untrusted source reads tensors and JSON only. Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multichex.fileio import atomic_write
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

FORMAT = "multichex-checkpoint-v1"


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
) -> Path:
    """Write ``path`` (.safetensors) and ``path.with_suffix('.json')`` atomically.

    ``other_optimizers``: further optimisers by name (e.g. the discriminator's), saved next to ``optimizer``.
    """
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header: dict[str, Any] = {"format": FORMAT, "model": model.config.to_dict(), **(extra or {})}
    if optimizer is not None:
        optim_tensors, optim_info = _optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        header["optimizer"] = optim_info
        tensors["rng.torch"] = torch.get_rng_state()
    for name, other in (other_optimizers or {}).items():
        other_tensors, other_info = _optimizer_tensors(other, f"optim_{name}")
        tensors.update(other_tensors)
        header[f"optimizer_{name}"] = other_info
    text = json.dumps(header, default=str)
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata={"multichex": text}))
    readable = {k: v for k, v in header.items() if not k.startswith("optimizer")}
    atomic_write(path.with_suffix(".json"), lambda temp: Path(temp).write_text(json.dumps(readable, indent=2, default=str)))
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header JSON and tensors of a checkpoint, with clear errors for files that are not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({error})") from error
    if "multichex" not in metadata:
        raise ValueError(f"{path}: safetensors file has no multichex config in its metadata")
    header = json.loads(metadata["multichex"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {header.get('format')!r}")
    return header, tensors


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[MultiCheXNet, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config and load its weights strictly."""
    header, tensors = read_checkpoint(path)
    model = MultiCheXNet(ModelConfig.from_dict(header["model"]))
    load_weights(model, tensors, path)
    return model.to(map_location).eval(), header


def load_weights(model: MultiCheXNet, tensors: dict[str, torch.Tensor], path: str | Path = "<checkpoint>") -> None:
    """Strict load that lists missing, unexpected and wrongly shaped keys by name."""
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
        if shapes:
            detail.append("shape mismatch " + ", ".join(f"{k}: {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:8]))
        raise ValueError(f"{path}: checkpoint does not match the model config: " + "; ".join(detail))
    model.load_state_dict(weights, strict=True)


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
