"""The measurements of ``device_check.py``: training throughput, gated inference and CPU/device agreement.

Each function runs the package's own code paths (``Trainer`` steps with its loader, ``MultiCheXNet.predict``
through ``Predictor``) on the device it is given, so what is timed is what ``multichex train`` / ``predict`` do.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from multichex.data.record import CXRSample
from multichex.device import autocast
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import build_datasets
from multichex.training.engine import DataWait
from multichex.training.trainer import Trainer

CLASSES = ["Atelectasis", "Effusion", "Mass", "Nodule", "Pneumonia", "COVID-19", "No Finding"]
BOX_CLASSES = ["Mass", "Nodule", "Pneumonia"]


class SyntheticCXR(Dataset):
    """Generated 3-task samples (image, mask, two boxes, labels), made in the loader's processes like decoded files."""

    def __init__(self, size: int, length: int = 4096, seed: int = 0) -> None:
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw: a sample depends on (seed, index) only."""

    def __getitem__(self, index: int) -> CXRSample:
        rng = np.random.default_rng([self.seed, index])
        s = self.size
        image = torch.from_numpy(rng.random((1, s, s), dtype=np.float32))
        mask = torch.zeros(1, s, s)
        mask[:, s // 4 : 3 * s // 4, s // 8 : s // 2] = 1.0
        x, y = rng.uniform(0, s * 0.6, size=2)
        boxes = torch.tensor([[x, y, x + s * 0.2, y + s * 0.2], [s * 0.1, s * 0.1, s * 0.3, s * 0.4]], dtype=torch.float32)
        labels = torch.from_numpy((rng.random(len(CLASSES)) > 0.7).astype(np.float32))
        return CXRSample(image, labels, positive=1.0, mask=mask, boxes=boxes, box_labels=torch.tensor([0, 1]),
                         meta={"path": f"synthetic/{index}", "patient_id": str(index)})


def model_config(encoder: str, size: int) -> ModelConfig:
    return ModelConfig(encoder=encoder, image_size=size, class_names=list(CLASSES), box_classes=list(BOX_CLASSES))


def train_config(encoder: str, size: int, precision: str, batch: int, device: torch.device, out: Path) -> TrainConfig:
    """A 3-task run config as the full-size recipes set it (joint batches, all heads train every step)."""
    return TrainConfig(model=model_config(encoder, size), seed=0, out_dir=str(out), schedule="joint", epochs=1, batch_size=batch,
                       lr=1e-4, warmup_steps=1, device=str(device), precision=precision, deterministic=False,
                       augment={"enabled": False})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure_training(trainer: Trainer, warmup: int, steps: int, seconds: float) -> dict[str, Any]:
    """Images/s, data-wait fraction and peak memory of ``steps`` timed training steps (or ``seconds``, if sooner)
    after ``warmup`` untimed ones, reading batches through the trainer's own loader."""
    device = trainer.engine.device
    trainer._train_mode()
    batches = trainer.batches.epoch(0, warmup + steps)
    for _ in range(warmup):
        _, _, batch = next(batches)
        trainer.train_step(batch)
    _synchronize(device)
    _reset_memory(device)
    wait = DataWait()
    images = taken = 0
    for _, _, batch in wait.timed(batches):
        trainer.train_step(batch)
        images += len(batch)
        taken += 1
        if time.perf_counter() - wait.started > seconds:
            break
    _synchronize(device)
    elapsed = time.perf_counter() - wait.started
    return {"steps": taken, "images": images, "seconds": round(elapsed, 3), "images_per_s": round(images / elapsed, 1),
            "data_wait": round(wait.fraction, 4), "peak_memory_gib": _peak_memory_gib(device),
            "num_workers": trainer.engine.loader.num_workers, "skipped": trainer.skipped_batches}


def synthetic_training(encoder: str, size: int, precision: str, batch: int, device: torch.device, out: Path,
                       warmup: int, steps: int, seconds: float) -> dict[str, Any]:
    config = train_config(encoder, size, precision, batch, device, out)
    trainer = Trainer(config, {"synthetic": SyntheticCXR(size)}, progress=False)
    return {"encoder": encoder, "size": size, "precision": precision, "batch": batch, "data": "synthetic",
            **measure_training(trainer, warmup, steps, seconds)}


def cached_training(cache: Path, encoder: str, size: int, precision: str, batch: int, device: torch.device, out: Path,
                    warmup: int, steps: int, seconds: float) -> dict[str, Any]:
    """The same from a prepared cache of the bundled X-rays (decoding and augmentation in the loader's processes)."""
    config = replace(train_config(encoder, size, precision, batch, device, out),
                     sources=[SourceConfig("covid-chestxray", prepared=str(cache), tasks=["cls", "gate", "seg"])],
                     split={"train": 1.0}, augment={"enabled": True, "rotate_deg": 7.0, "gamma": [0.8, 1.2], "noise_std": 0.02})
    train = build_datasets(config)["train"]
    trainer = Trainer(config, train, progress=False)
    return {"encoder": encoder, "size": size, "precision": precision, "batch": batch, "data": "prepared cache (bundled sample)",
            **measure_training(trainer, warmup, steps, seconds)}


def gated_inference(model: MultiCheXNet, precision: str, batch: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Gated 3-task prediction (classifier and gate, then the gated heads on gate-positive images) in images/s."""
    model = model.to(device).eval()
    size = model.config.image_size
    images = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> None:
        with autocast(device, precision):
            model.predict(images).to_cpu()  # results back on the CPU, as predict writes them

    for _ in range(3):
        once()
    _synchronize(device)
    _reset_memory(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {"encoder": model.config.encoder, "size": size, "precision": precision, "batch": batch,
            "median_ms": round(1000 * median, 2), "images_per_s": round(batch / median, 1), "peak_memory_gib": _peak_memory_gib(device)}


def agreement(checkpoint: Path, files: list[Path], device: torch.device) -> dict[str, Any]:
    """One checkpoint's predictions on the CPU and on ``device`` (both fp32) for ``files``, read as ``predict``
    reads them: :func:`multichex.inference.quantize.agreement` (probability differences, mask Dice, decisions)."""
    from multichex.inference.quantize import agreement as compare
    from multichex.inference.quantize import calibration_images
    from multichex.models.checkpoint import load_model

    on_cpu, _ = load_model(checkpoint)
    on_device, _ = load_model(checkpoint, map_location=device)
    images, _ = calibration_images(files, on_cpu.config.image_size, limit=len(files))
    return {"checkpoint": str(checkpoint), "device": str(device), **compare(on_cpu, on_device, images)}
