"""Choosing the runtime of a trained model: PyTorch for a checkpoint, ONNX Runtime for an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multichex.inference.onnx_runtime import OnnxModel
from multichex.models.checkpoint import load_model

RUNTIMES = ("torch", "onnx")


def load_inference_model(path: str | Path, runtime: str = "torch", threads: int | None = None) -> Any:
    """A checkpoint (``.safetensors``) for PyTorch, or an export (``.onnx``) for ONNX Runtime."""
    if runtime == "onnx":
        if Path(path).suffix != ".onnx":
            raise ValueError(f"{path}: --runtime onnx needs an exported model.onnx (run `multichex export` first)")
        return OnnxModel(path, threads)
    if runtime != "torch":
        raise ValueError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
    model, _ = load_model(path)
    return model
