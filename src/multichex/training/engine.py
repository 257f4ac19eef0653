"""The training engine's settings for one run: device, mixed precision, loader processes, compilation,
the weight average, and the clock that measures how long steps wait for data."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from multichex.data.samplers import LoaderOptions
from multichex.device import autocast, describe, grad_scaler, resolve_device, resolve_num_workers, resolve_precision
from multichex.training.config import TrainConfig

log = logging.getLogger(__name__)

COMPILED_MODULES = ("encoder", "cls", "seg", "det", "gate")
COMPILE_BACKEND: Any = "inductor"  # torch.compile's default; tests swap in others
STARVED_FRACTION = 0.25  # an epoch whose steps waited longer than this for data says so in the log

T = TypeVar("T")


@dataclass
class Engine:
    """Where and in which arithmetic a run computes (resolved from the config and ``--device``)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    scaler: torch.amp.GradScaler | None  # fp16 only
    loader: LoaderOptions
    accumulate_steps: int = 1

    @property
    def non_blocking(self) -> bool:
        """Batches are copied asynchronously (from pinned memory) to a CUDA device."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Forward passes in the run's precision (losses then in fp32: ``losses.multitask.float32_outputs``)."""
        return autocast(self.device, self.precision)

    def record(self) -> dict[str, Any]:
        """What a checkpoint and the log record about the engine (the config keeps what was asked for)."""
        return {"device": describe(self.device, self.precision), "precision": self.precision,
                "num_workers": self.loader.num_workers, "pin_memory": self.loader.pin_memory,
                "accumulate_steps": self.accumulate_steps}


def build_engine(config: TrainConfig, device: str | torch.device | None = None) -> Engine:
    """The engine of ``config`` (``device`` overrides ``config.device``); selects the CUDA device."""
    resolved = resolve_device(device if device is not None else config.device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        # cuDNN's autotuner picks the fastest convolution per shape; deterministic runs keep the reproducible ones.
        torch.backends.cudnn.benchmark = not config.deterministic
    precision = resolve_precision(config.precision, resolved)
    pin = resolved.type == "cuda" if config.pin_memory == "auto" else bool(config.pin_memory)
    loader = LoaderOptions(num_workers=resolve_num_workers(config.num_workers, resolved), pin_memory=pin,
                           persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor)
    return Engine(resolved, precision, grad_scaler(resolved, precision), loader, config.accumulate_steps)


def compile_model(model: nn.Module) -> list[nn.Module]:
    """Compile the encoder and heads in place (``nn.Module.compile``: parameter names, hence checkpoints,
    do not change). Compilation happens at a module's first call; see :func:`is_compile_error`."""
    modules = [getattr(model, name) for name in COMPILED_MODULES if getattr(model, name, None) is not None]
    for module in modules:
        module.compile(backend=COMPILE_BACKEND)
    return modules


def uncompile(modules: Iterable[nn.Module]) -> None:
    """Back to eager execution (torch has no public inverse of ``nn.Module.compile``: this clears what it set)."""
    for module in modules:
        module._compiled_call_impl = None


def is_compile_error(error: BaseException) -> bool:
    """An error raised by torch.compile's tracing or code generation (not by the model's own code)."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


class WeightAverage:
    """An exponential moving average of the weights and BatchNorm statistics (``ema_decay``), updated after
    every optimiser step; validation and the ``best`` checkpoint use it, ``last`` stores it for resuming."""

    PREFIX = "ema."

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class, config and parameter names as the trained one)."""
        return self.average.module

    def update(self, model: nn.Module) -> None:
        self.average.update_parameters(model)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (``ema.<parameter name>``) and the count of averaged steps (``save_checkpoint``
        stores CPU copies)."""
        state = {self.PREFIX + key: value for key, value in self.module.state_dict().items()}
        state[self.PREFIX + "n_averaged"] = self.average.n_averaged
        return state

    def restore(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Load :meth:`tensors` from a checkpoint; False when it has none."""
        state = {k[len(self.PREFIX):]: v for k, v in tensors.items() if k.startswith(self.PREFIX)}
        if not state:
            return False
        self.average.n_averaged.copy_(state.pop("n_averaged"))
        self.module.load_state_dict(state, strict=True)
        return True


class DataWait:
    """Measures, over an epoch, the fraction of step time spent waiting for the next batch."""

    def __init__(self) -> None:
        self.waited = 0.0
        self.started = time.perf_counter()

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, adding the time each ``next`` takes to :attr:`waited`."""
        iterator = iter(batches)
        while True:
            before = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - before
            yield item

    @property
    def fraction(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.waited / elapsed if elapsed > 0 else 0.0

    def report(self, epoch: int, num_workers: int, accelerator: bool) -> float:
        """The epoch's fraction; above :data:`STARVED_FRACTION` a warning when the model runs on an accelerator
        (the loader starves it), a note at INFO on the CPU (reading shares the cores the model computes on)."""
        fraction = self.fraction
        if fraction > STARVED_FRACTION and not accelerator:
            log.info("epoch %d: %.0f %% of the step time went to reading and augmenting batches on the same cores",
                     epoch, 100 * fraction)
        elif fraction > STARVED_FRACTION:
            log.warning("epoch %d: %.0f %% of the step time waited for data (num_workers=%d): the loader starves the "
                        "model; raise num_workers, or read a prepared cache (multichex data prepare)", epoch, 100 * fraction, num_workers)
        return fraction
