"""Extra training objectives for few labels: FixMatch pseudo-labels and KL mask consistency (MultiMix), and
APPAU-Net's adversarial game. Each is switched on in the run config; the trainer adds their terms to the
step's loss and lets the adversary update its discriminator after the step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from multichex.data.record import CXRBatch
from multichex.data.strong_augment import StrongAugment, StrongAugmentConfig
from multichex.losses.adversarial import discriminator_loss, segmentor_adversarial_loss
from multichex.losses.multitask import float32_outputs
from multichex.losses.segmentation import consistency_kl
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.config import AdversarialConfig, SemiSupervisedConfig


@dataclass
class PseudoLabels:
    """Pseudo-label targets for a batch (NaN = no pseudo-label) and how many entries were candidates."""

    targets: torch.Tensor  # B×C (sigmoid) or B (softmax, -1 = none)
    candidates: int
    kept: int


def pseudo_labels(probs: torch.Tensor, labels: torch.Tensor, threshold: float, softmax: bool,
                  allowed: torch.Tensor | None = None) -> PseudoLabels:
    """Confident predictions on the weak view where the true label is unknown.

    Sigmoid outputs: per class, 1 where p ≥ t, 0 where p ≤ 1 − t, for unknown labels of ``allowed`` rows ×
    classes (``B×C`` bool); the candidates are those unknown entries. Softmax outputs: for images with no
    known label at all (in rows where any class is allowed), the top class among the allowed ones where its
    probability ≥ t; the candidates are those images. Predictions below the threshold give no target.
    """
    unknown = torch.isnan(labels)
    if softmax:
        rows = unknown.all(dim=1)
        allowed_probs = probs
        if allowed is not None:
            rows = rows & allowed.any(dim=1)
            allowed_probs = torch.where(allowed, probs, torch.full_like(probs, -1.0))  # the top class is an allowed one
        confidence, index = allowed_probs.max(dim=1)
        keep = rows & (confidence >= threshold)
        targets = torch.where(keep, index, torch.full_like(index, -1))
        return PseudoLabels(targets, int(rows.sum()), int(keep.sum()))
    if allowed is not None:
        unknown = unknown & allowed
    confident = (probs >= threshold) | (probs <= 1 - threshold)
    keep = unknown & confident
    targets = torch.where(keep, (probs >= 0.5).float(), torch.full_like(probs, float("nan")))
    return PseudoLabels(targets, int(unknown.sum()), int(keep.sum()))


@dataclass
class ObjectiveCounts:
    """Per-epoch counts for the log: pseudo-label candidates and kept ones, discriminator steps."""

    values: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, value: int) -> None:
        self.values[key] = self.values.get(key, 0) + value


class FewLabelObjectives:
    """The switched-on extra terms for one run (built by the trainer from its config)."""

    def __init__(self, model: MultiCheXNet, semi: SemiSupervisedConfig | None, adversarial: AdversarialConfig | None,
                 lr: float, seed: int) -> None:
        self.semi, self.adversarial = semi, adversarial
        self.counts = ObjectiveCounts()
        self.seed = seed
        self.strong = StrongAugment(StrongAugmentConfig(**semi.strong)) if semi else None
        names = model.config.class_names
        self.class_mask = None
        if semi and semi.classes:
            unknown = set(semi.classes) - set(names)
            if unknown:
                raise ValueError(f"semi_supervised.classes {sorted(unknown)} are not in the model's class_names")
            self.class_mask = torch.tensor([n in semi.classes for n in names])
        self.disc_optimizer = None
        if adversarial is not None:
            if model.disc is None:
                raise ValueError("adversarial training needs model.discriminator_classes")
            self.disc_classes = [names.index(c) for c in model.config.discriminator_classes]
            self.disc_optimizer = torch.optim.Adam(model.disc.parameters(), lr=lr * adversarial.lr_factor, betas=(0.5, 0.999))

    def wants(self, batch: CXRBatch) -> bool:
        """Whether a batch without any task label still gives a term (an unlabelled batch under FixMatch)."""
        return self.semi is not None and self.semi.weight > 0 and bool(self._allowed(batch).any())

    def _allowed(self, batch: CXRBatch) -> torch.Tensor:
        device = batch.labels.device
        rows = torch.ones(len(batch), dtype=torch.bool, device=device)
        if self.semi and self.semi.sources is not None:
            rows = torch.tensor([m.get("source_key", m.get("dataset")) in self.semi.sources for m in batch.meta], device=device)
        allowed = rows[:, None].expand_as(batch.labels)
        return allowed & self.class_mask.to(device) if self.class_mask is not None else allowed

    def terms(self, model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch, outputs: dict[str, torch.Tensor],
              trained: set[str], step: int = 0, seg_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weighted extra loss terms for global step ``step`` (keys ``ssl_cls``, ``seg_consistency``,
        ``seg_adversarial``). The strong views are drawn from (seed, step), so a resumed run redraws them.

        ``seg_rows`` (B bool): the rows ``outputs["seg"]`` covers when the segmentation head ran on a
        sub-batch (teacher forcing); ``None``: every row. The segmentation terms use those rows only."""
        terms: dict[str, torch.Tensor] = {}
        outputs = float32_outputs(outputs)
        if self.semi and self.semi.weight > 0 and "cls" in trained:
            term = self._fixmatch(model, images, batch, outputs, np.random.default_rng([self.seed, step]))
            if term is not None:
                terms["ssl_cls"] = self.semi.weight * term
        if "seg" not in outputs:
            return terms
        seg_images, seg_batch = seg_view(images, batch, seg_rows)
        if self.semi and self.semi.consistency_weight > 0:
            has = seg_batch.has_mask.to(outputs["seg"].device)
            if has.any() and (~has).any():
                terms["seg_consistency"] = self.semi.consistency_weight * consistency_kl(outputs["seg"][has], outputs["seg"][~has])
        if self.adversarial and self.adversarial.weight > 0:
            model.disc.requires_grad_(False)  # the segmentor's term moves the segmentor only
            fake = model.disc(seg_images, torch.sigmoid(outputs["seg"]))
            terms["seg_adversarial"] = self.adversarial.weight * segmentor_adversarial_loss(fake)
        return terms

    def _fixmatch(self, model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch, outputs: dict[str, torch.Tensor],
                  rng: np.random.Generator) -> torch.Tensor | None:
        allowed = self._allowed(batch)
        if not (torch.isnan(batch.labels) & allowed).any():
            return None
        with torch.no_grad():
            weak = outputs["cls"].detach() if "cls" in outputs else model.cls(model.encode(images)).float()
        softmax = model.config.cls_activation == "softmax"
        pseudo = pseudo_labels(model.class_probabilities(weak), batch.labels, self.semi.threshold, softmax, allowed)
        self.counts.add("ssl_candidates", pseudo.candidates)
        self.counts.add("ssl_pseudo_labels", pseudo.kept)
        rows = pseudo.targets >= 0 if softmax else ~torch.isnan(pseudo.targets).all(dim=1)
        if not rows.any():
            return None
        strong, _, _, _ = self.strong.batch(images[rows].contiguous(), None, None, None, rng)
        channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
        logits = model.cls(model.encode(strong.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))).float()
        # FixMatch: the confidence mask multiplies the per-entry loss; the sum is divided by every unlabelled
        # entry (candidate) with "all", by the confident ones only with "confident".
        if softmax:
            summed = F.cross_entropy(logits, pseudo.targets[rows], reduction="sum")
        else:
            targets = pseudo.targets[rows]
            kept = ~torch.isnan(targets)
            per_entry = F.binary_cross_entropy_with_logits(logits, torch.where(kept, targets, torch.zeros_like(targets)), reduction="none")
            summed = (per_entry * kept).sum()
        return summed / (pseudo.candidates if self.semi.normalise == "all" else pseudo.kept)

    def discriminator_step(self, model: MultiCheXNet, images: torch.Tensor, batch: CXRBatch, outputs: dict[str, torch.Tensor],
                           seg_rows: torch.Tensor | None = None) -> float | None:
        """One discriminator update on this step's (image, true mask) and (image, predicted mask) pairs, both
        from the rows the segmentation head ran on (``seg_rows``, as in :meth:`terms`)."""
        if self.disc_optimizer is None or "seg" not in outputs:
            return None
        images, batch = seg_view(images, batch, seg_rows)
        model.disc.requires_grad_(True)
        has = batch.has_mask
        real_logits = model.disc(images[has], batch.masks[has].to(images.dtype)) if has.any() else images.new_zeros(0, len(self.disc_classes) + 1)
        labels = batch.labels[has][:, self.disc_classes]
        single = (labels == 1).sum(dim=1) == 1
        real_classes = torch.where(single, (labels == 1).float().argmax(dim=1),
                                   torch.full((len(labels),), -1, dtype=torch.long, device=labels.device))
        fake_logits = model.disc(images, torch.sigmoid(outputs["seg"].detach().float()))  # the adversary steps in fp32
        loss = discriminator_loss(real_logits, real_classes, fake_logits)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        model.disc.requires_grad_(False)
        self.counts.add("disc_steps", 1)
        return float(loss.detach())


def seg_view(images: torch.Tensor, batch: CXRBatch, seg_rows: torch.Tensor | None) -> tuple[torch.Tensor, CXRBatch]:
    """The images and batch rows a segmentation output covers (``seg_rows`` B bool; ``None``: all of them)."""
    if seg_rows is None:
        return images, batch
    return images[seg_rows.to(images.device)], batch.select(seg_rows)
