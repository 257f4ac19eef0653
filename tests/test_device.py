"""The device and precision vocabulary (multichex.device) and the helpers that move data between devices."""

from __future__ import annotations

import pytest
import torch

from multichex.data.record import CXRBatch
from multichex.device import (
    autocast,
    default_num_workers,
    grad_scaler,
    module_device,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    to_cpu_float,
)

CPU = torch.device("cpu")


def _batch() -> CXRBatch:
    return CXRBatch(
        images=torch.rand(2, 1, 8, 8), labels=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), positive=torch.tensor([1.0, 0.0]),
        masks=torch.zeros(2, 1, 8, 8), has_mask=torch.tensor([True, False]), boxes=[torch.tensor([[1.0, 1.0, 4.0, 4.0]]), torch.zeros(0, 4)],
        box_labels=[torch.tensor([0]), torch.zeros(0, dtype=torch.long)], has_boxes=torch.tensor([True, True]),
        meta=[{"path": "a"}, {"path": "b"}],
    )


def test_auto_is_the_cpu_without_cuda_and_cpu_is_always_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device(None) == CPU
    assert resolve_device("CPU") == CPU
    assert resolve_device(torch.device("cpu")) == CPU


def test_unavailable_or_unknown_devices_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA device is available") as error:
            resolve_device(spec)
        assert "\n" not in str(error.value) and "--device cpu" in str(error.value)
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        resolve_device("gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_names_resolve_to_an_indexed_device():
    assert resolve_device("cuda").type == "cuda" and resolve_device("cuda").index is not None
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_precision_defaults_and_checks():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision(None, CPU) == "fp32"
    assert resolve_precision("BF16", CPU) == "bf16"
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("fp8", CPU)
    assert grad_scaler(CPU, "fp32") is None and grad_scaler(CPU, "bf16") is None
    assert isinstance(grad_scaler(CPU, "fp16"), torch.amp.GradScaler)


def test_autocast_computes_in_the_chosen_precision_on_the_cpu():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.rand(1, 1, 8, 8)
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16


def test_batch_moves_every_tensor_and_keeps_meta():
    batch = _batch()
    moved = batch.to(CPU, non_blocking=True)
    assert moved.meta is batch.meta
    assert torch.equal(moved.images, batch.images) and torch.equal(moved.boxes[0], batch.boxes[0])
    assert torch.equal(torch.isnan(moved.labels), torch.isnan(batch.labels))  # NaN = unknown survives the move
    meta = _batch().to("meta")
    tensors = [meta.images, meta.labels, meta.positive, meta.masks, meta.has_mask, meta.has_boxes, *meta.boxes, *meta.box_labels]
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_copy_asynchronously_to_cuda():
    pinned = _batch().pin_memory()
    assert pinned.images.is_pinned() and all(b.is_pinned() for b in pinned.boxes)
    on_gpu = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert on_gpu.images.is_cuda and torch.equal(on_gpu.images.cpu(), pinned.images)


def test_module_device_and_cpu_float_copies():
    assert module_device(torch.nn.Linear(2, 2)) == CPU
    assert module_device(torch.nn.ReLU()) == CPU  # nothing to ask: the CPU
    assert module_device(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    half = torch.ones(3, dtype=torch.bfloat16)
    assert to_cpu_float(half).dtype == torch.float32
    assert to_cpu_float(torch.tensor([True])).dtype == torch.bool  # masks and labels keep their type


def test_worker_counts():
    assert default_num_workers(CPU) == 0  # loader processes would take the cores the model computes on
    assert 0 <= default_num_workers(torch.device("cuda", 0)) <= 16
    assert resolve_num_workers("auto", CPU) == 0
    assert resolve_num_workers(3, CPU) == 3
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1, CPU)
