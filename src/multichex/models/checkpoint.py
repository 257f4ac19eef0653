"""Checkpoint files: one safetensors file of weights (+ optional state) with the JSON config in its metadata.

A readable ``.json`` copy of that config is written beside it. Nothing is ever unpickled: loading a
file from an untrusted source reads tensors and JSON only. Writes are atomic (temp file, fsync, rename).
This module belongs to the model layer so that predicting and serving never import the training package;
the trainer's optimiser and RNG state ride along as extra tensors (``multichex.training.checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multichex.fileio import atomic_write, atomic_write_text
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

FORMAT = "multichex-checkpoint-v1"
WEIGHT_PREFIX = "model."


def write_checkpoint(
    path: str | Path,
    model: MultiCheXNet,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    private_keys: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and ``path.with_suffix('.json')`` atomically.

    ``extra``: more header entries; those whose key starts with one of ``private_keys`` stay out of the
    readable ``.json`` copy. ``dtype``: store floating-point weights in this type (e.g. ``torch.float16``
    for a small shipped copy; :func:`load_model` converts them back to float32).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[WEIGHT_PREFIX + key] = value.contiguous()
    tensors.update(extra_tensors or {})
    header: dict[str, Any] = {"format": FORMAT, "model": model.config.to_dict(), **(extra or {})}
    if dtype is not None:
        header["stored_dtype"] = str(dtype).removeprefix("torch.")
    text = json.dumps(header, default=str)

    def write_tensors(temp: str) -> None:
        save_file(tensors, temp, metadata={"multichex": text})

    atomic_write(path, write_tensors)
    readable = {k: v for k, v in header.items() if not k.startswith(private_keys)} if private_keys else header
    atomic_write_text(path.with_suffix(".json"), json.dumps(readable, indent=2, default=str))
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


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiCheXNet, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config and load its weights strictly (on the CPU, then move)."""
    header, tensors = read_checkpoint(path)
    model = MultiCheXNet(ModelConfig.from_dict(header["model"]))
    load_weights(model, tensors, path)
    return model.to(map_location).eval(), header


def load_weights(model: MultiCheXNet, tensors: dict[str, torch.Tensor], path: str | Path = "<checkpoint>") -> None:
    """Strict load that lists missing, unexpected and wrongly shaped keys by name.

    Weights stored in a lower precision (a shipped fp16 copy) are converted to the model's dtype.
    """
    weights = {k[len(WEIGHT_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)}
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
    weights = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
