"""Where tensors live and in which precision: the one device and precision choice of every command.

``--device auto|cpu|cuda|cuda:N|mps`` (``auto``: CUDA when available, else the CPU) and ``--precision
auto|fp32|bf16|fp16`` (``auto``: bf16 on a CUDA device that supports it, else fp32) are resolved here, for
training, evaluation and inference alike. The model, the batches, the losses and the gate's cached
features live on the chosen device. What always runs on the CPU, by design:

* checkpoints: saved from CPU copies and loaded on the CPU, then moved (files stay device-free);
* metric aggregation (:mod:`multichex.evaluation.metrics` moves each batch's predictions to the CPU) and
  the patient bootstrap;
* decoding image files, letterboxing and writing PNG/JSON outputs (predictions come back to the CPU once
  per batch: :func:`to_cpu_float`);
* the detection loss's anchor matching (a Python loop over a batch's few boxes) and the cross-rank
  bookkeeping of :mod:`multichex.training.distributed` (gloo CPU tensors; NCCL carries the CUDA ones);
* ONNX export (traced on the CPU) and ONNX Runtime inference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

DEVICE_HELP = "Where to run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."
PRECISION_HELP = "Arithmetic: auto (bf16 on CUDA devices that support it, else fp32), fp32, bf16 or fp16."
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_AUTO_WORKERS = 16


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a spec names, checked to exist. ``auto``/``None``: CUDA when available, else the CPU.

    A bare ``cuda`` under ``torchrun`` is this rank's GPU (``LOCAL_RANK``); ``cuda:N`` is GPU N.

    Raises:
        ValueError: one line naming the spec and why it cannot be used.
    """
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = (spec or "auto").strip().lower()
        if text == "auto":
            return _local_cuda() if torch.cuda.is_available() else torch.device("cpu")
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!s}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is None:
            return _local_cuda()
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!s}: this machine has {torch.cuda.device_count()} CUDA device(s), 0 to "
                             f"{torch.cuda.device_count() - 1}")
        return device
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {spec!s}: Apple's MPS backend is not available here; use --device cpu")
        return torch.device("mps")
    raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _local_cuda() -> torch.device:
    """This process's GPU: number ``LOCAL_RANK`` under torchrun (one GPU per rank), else the current one."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if int(local) >= count:  # NCCL cannot run two ranks on one GPU
        raise ValueError(f"rank {local} of this node has no GPU of its own: the node has {count} CUDA device(s); "
                         f"launch at most {count} processes per node (torchrun --nproc_per_node {count}) or use --device cpu")
    return torch.device("cuda", int(local))


def resolve_precision(spec: str | None, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device`` (``auto``/``None``: bf16 where CUDA supports it, else fp32).

    Raises:
        ValueError: an unknown name, or a precision the device cannot compute in.
    """
    text = (spec or "auto").strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"precision {spec!r} is not one of {', '.join(PRECISIONS)}")
    if text == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if text == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use fp16 or fp32")
    return text


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` in ``precision`` on ``device`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training (fp16 gradients underflow without one); None for fp32 and bf16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module without tensors."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def default_num_workers(device: torch.device) -> int:
    """``num_workers: auto``: with a GPU, every core but one of this rank's share of the node (torchrun's
    ``LOCAL_WORLD_SIZE`` ranks share it) decodes and augments, at most 16; on the CPU none, since loader
    processes would take the cores the model computes on."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(share - 1, MAX_AUTO_WORKERS))


def resolve_num_workers(spec: int | str | None, device: torch.device) -> int:
    """An integer worker count from a config value (``auto``, None or a count)."""
    if spec is None or spec == "auto":
        return default_num_workers(device)
    count = int(spec)
    if count < 0:
        raise ValueError(f"num_workers must be ≥ 0 or 'auto', got {spec!r}")
    return count


def to_cpu_float(tensor: torch.Tensor) -> torch.Tensor:
    """A prediction as a float32 CPU tensor (one copy back from the device, outside autocast's dtypes)."""
    tensor = tensor.detach()
    return tensor.float().cpu() if tensor.is_floating_point() else tensor.cpu()


def describe(device: torch.device, precision: str) -> str:
    """``cuda:0 (NVIDIA H200), bf16`` — the line a run logs about where it computes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return f"{device}{f' ({name})' if name else ''}, {precision}"
