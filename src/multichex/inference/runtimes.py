"""Choosing the runtime of a trained model: PyTorch for a checkpoint, ONNX Runtime or OpenVINO for an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multichex.inference.onnx_runtime import OnnxModel
from multichex.models.checkpoint import load_model

RUNTIMES = ("torch", "onnx", "openvino")


def load_inference_model(path: str | Path, runtime: str = "torch", threads: int | None = None) -> Any:
    """A checkpoint (``.safetensors``) for PyTorch, or an export (``.onnx``) for ONNX Runtime or OpenVINO."""
    if runtime in {"onnx", "openvino"}:
        if Path(path).suffix != ".onnx":
            raise ValueError(f"{path}: --runtime {runtime} needs an exported model.onnx (run `multichex export` first)")
        if runtime == "openvino":
            from multichex.inference.openvino_runtime import OpenVinoModel  # optional package: imported on use

            return OpenVinoModel(path, threads)
        return OnnxModel(path, threads)
    if runtime != "torch":
        raise ValueError(f"runtime must be 'torch', 'onnx' or 'openvino', got {runtime!r}")
    model, _ = load_model(path)
    return model
