"""One optimisation step of the masked multi-task loss: the heads the batch has labels for run (all at
once, or teacher forced), the few-label terms join, a non-finite loss skips the batch, else backward and
an optimiser and learning-rate step."""

from __future__ import annotations

import logging

import numpy as np
import torch

from multichex.data.record import CXRBatch
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.multichexnet import MultiCheXNet
from multichex.training import distributed
from multichex.training.config import TrainConfig
from multichex.training.steps.few_labels import FewLabelHooks
from multichex.training.steps.forced import forced_forward
from multichex.training.steps.ranks import StepForward, agreed_tasks, join_unused_outputs, reduce_losses
from multichex.training.teacher_forcing import ForcingCounts

log = logging.getLogger(__name__)


class TrainingStep:
    """Takes one step on a batch: ``step(batch, epoch)`` returns the batch's losses, or ``None`` when the
    batch trains nothing or is skipped (``skipped_batches`` counts non-finite losses).

    ``forcing`` counts what teacher forcing fed the gated heads (reset by the caller each epoch). Under
    torchrun the forward runs inside DistributedDataParallel and every rank takes the same decisions, see
    :mod:`multichex.training.steps.ranks`.
    """

    def __init__(
        self, model: MultiCheXNet, loss: MultiTaskLoss, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, trained_tasks: set[str],
        few_labels: FewLabelHooks | None = None, is_distributed: bool = False,
    ) -> None:
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.trained_tasks = trained_tasks
        self.few_labels = few_labels
        self.distributed = is_distributed
        self.forcing = ForcingCounts()
        self.skipped_batches = 0
        self._placeholder = False  # the last forward's "total" is only the zero term of join_unused_outputs
        self._forward = self.forward_losses
        if is_distributed:
            # find_unused_parameters: a step trains only the heads its batch has labels for (the alternating
            # schedule, teacher forcing), so which parameters get gradients changes from step to step.
            self._forward = torch.nn.parallel.DistributedDataParallel(StepForward(model, self.forward_losses), find_unused_parameters=True)

    @property
    def global_step(self) -> int:
        """Optimisation steps taken so far (the learning-rate schedule's position)."""
        return self.scheduler.last_epoch

    def tasks(self, batch: CXRBatch | None) -> list[str]:
        """The heads this step trains: those the batch has labels for (under torchrun: any rank's batch,
        and none when some rank's batch is ``None``, i.e. had no readable image)."""
        if not self.distributed:
            return self.loss.tasks_for(batch, self.trained_tasks)
        return agreed_tasks(self.loss.tasks_for(batch, self.trained_tasks) if batch is not None else None)

    def __call__(self, batch: CXRBatch | None, epoch: int) -> dict[str, float] | None:
        """One optimisation step in epoch ``epoch`` (0-based); returns the batch's losses (under torchrun:
        averaged over the ranks), which skip a step together (no labels anywhere, an unreadable batch on
        some rank, a non-finite loss on some rank)."""
        tasks = self.tasks(batch)
        if not tasks and not (self.few_labels is not None and self.few_labels.wants(batch)):
            return None
        images = batch.images
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = self._forward(images, batch, tasks)
        placeholder = self._placeholder
        if self.distributed:
            nonfinite, report = reduce_losses(losses, placeholder)
            if "total" not in report:  # no rank has a loss term: nobody runs backward
                return None
        else:
            if "total" not in losses:
                return None
            nonfinite, report = not torch.isfinite(losses["total"]), None
        if nonfinite:
            self._skip(losses, batch, placeholder, epoch)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.few_labels is not None:
            self.few_labels.after_step(self.model, images, batch)
        return report if report is not None else {k: float(v.detach()) for k, v in losses.items()}

    def _skip(self, losses: dict[str, torch.Tensor], batch: CXRBatch, placeholder: bool, epoch: int) -> None:
        """A non-finite loss: stop the run, or count and log the batch and drop its gradients."""
        values = {k: float(v.detach()) for k, v in losses.items()} if not placeholder else {}
        paths = [m["path"] for m in batch.meta][:3]
        where = ""
        if self.distributed:
            local = not placeholder and not bool(torch.isfinite(losses["total"]))
            where = f" (rank {distributed.rank()}{'' if local else ': finite here, non-finite on another rank'}; every rank skips it)"
        if self.config.on_nonfinite_loss == "stop":
            raise FloatingPointError(f"non-finite loss {values} on batch {paths}{where} (epoch {epoch + 1})")
        self.skipped_batches += 1
        log.warning("non-finite loss %s on batch %s%s; batch skipped", values, paths, where)
        self.optimizer.zero_grad(set_to_none=True)

    def forward_losses(self, images: torch.Tensor, batch: CXRBatch, tasks: list[str]) -> dict[str, torch.Tensor]:
        """The forward pass of a step, losses included (under torchrun DDP calls this as its forward)."""
        forced = self.config.teacher_forcing
        head_rows: dict[str, torch.Tensor] = {}
        if forced is None or not set(tasks) & set(forced.heads):
            outputs = self.model(images, tasks)
            losses = self.loss(outputs, batch)
        else:
            rng = np.random.default_rng([self.config.seed, self.global_step])
            outputs, head_batches, head_rows = forced_forward(self.model, images, batch, tasks, forced, rng, self.forcing)
            losses = self.loss(outputs, batch, head_batches)
        if self.few_labels is not None:
            self.few_labels.add_terms(losses, self.model, images, batch, outputs, self.trained_tasks, self.global_step, head_rows.get("seg"))
        self._placeholder = join_unused_outputs(outputs, losses) if self.distributed else False
        return losses
