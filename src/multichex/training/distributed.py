"""Data-parallel training under ``torchrun``: the process group, rank helpers and a CPU-capable SyncBatchNorm.

Every helper is a no-op (or the identity) in a single process, so the training code calls them
unconditionally. ``torchrun`` describes the job through ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins that group once (a world of one is
treated as no job at all). See ``docs/distributed.md``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_owned = False  # True when init_from_env created the process group (then cleanup destroys it)


def init_from_env() -> bool:
    """Join the process group torchrun set up; returns :func:`is_distributed`.

    Backend: ``gloo`` on CPU machines; with CUDA, ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo
    for the CPU tensors this package's training loop uses). ``MULTICHEX_DIST_BACKEND`` overrides it and
    ``MULTICHEX_DIST_TIMEOUT_MINUTES`` (default 120) bounds how long a rank waits for the others, e.g.
    while rank 0 alone validates or evaluates.
    """
    global _owned
    if not dist.is_available() or dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    backend = os.environ.get("MULTICHEX_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = timedelta(minutes=float(os.environ.get("MULTICHEX_DIST_TIMEOUT_MINUTES", "120")))
    dist.init_process_group(backend=backend, timeout=timeout)
    _owned = True
    return is_distributed()


def is_distributed() -> bool:
    """Inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, logs and evaluates."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank. An all-reduce of a CPU tensor rather than ``dist.barrier()``, which with a
    mixed ``cpu:gloo,cuda:nccl`` group may pick the NCCL backend and a CUDA device."""
    if is_distributed():
        dist.all_reduce(torch.zeros(1))


def cleanup() -> None:
    """Leave the process group (only if :func:`init_from_env` created it), once every rank is done.

    The barrier matters: a rank that tore down its gloo connections while rank 0 was still evaluating was
    seen to abort at exit ("terminate called without an active exception").
    """
    global _owned
    if _owned and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _owned = False


def share_rng_state() -> None:
    """Give every rank rank 0's torch RNG state (and wait for rank 0 to get here)."""
    if is_distributed():
        state = torch.get_rng_state()
        dist.broadcast(state, src=0)
        torch.set_rng_state(state)


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Element-wise ``sum`` or ``max`` of a CPU tensor over ranks (a copy; the input in one process)."""
    if not is_distributed():
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values


def any_rank(flags: list[bool]) -> list[bool]:
    """For each flag: true on at least one rank."""
    if not is_distributed() or not flags:
        return list(flags)
    return [bool(v) for v in all_reduce(torch.tensor(flags, dtype=torch.float64), "max")]


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (all ranks' images).

    ``torch.nn.SyncBatchNorm`` cannot be used here: in torch 2.13 its forward raises ``ValueError:
    SyncBatchNorm expected input tensor to be on GPU ...`` for CPU tensors. This one exchanges per-channel
    sums with (differentiable) all-reduces, which gloo does on CPU: the mean, then the centred sum of
    squares (two passes, like ``F.batch_norm``). Running statistics are updated with the global mean
    and unbiased variance, so they equal one process's on the concatenated batch (and stay identical
    on every rank). Eval mode, or a single process, is plain ``F.batch_norm``. A rank may pass an empty
    batch (teacher forcing can send no image of a rank to a head) as long as the global batch is not.
    Parameters and buffers are those of the BatchNorm it replaces, so checkpoints do not change.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // max(1, input.shape[1])], dtype=input.dtype, device=input.device)
        totals = _SumOverRanks.apply(torch.cat([input.sum(dims), count]))
        n = totals[-1].detach()
        if float(n) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all ranks")
        mean = totals[:-1] / n
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
        return output


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` in place by :class:`SyncBatchNorm` (same parameters,
    buffers and training mode); returns ``module`` (or its replacement if it is itself a BatchNorm)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var, sync.num_batches_tracked = module.running_mean, module.running_var, module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
