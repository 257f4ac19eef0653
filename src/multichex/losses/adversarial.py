"""APPAU-Net's semi-supervised GAN losses over (image, mask) pairs with n real classes + 1 "predicted" class.

Written out here because they are a handful of log-sum-exps over the discriminator's logits that no
library packages with the "real but class unknown" case (Salimans et al. 2016's semi-supervised GAN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_prob_real(logits: torch.Tensor) -> torch.Tensor:
    """log p(z < n+1 | pair) = log(1 − p(predicted)), per row, from ``B×(n+1)`` logits (last = predicted)."""
    return torch.logsumexp(logits[:, :-1], dim=1) - torch.logsumexp(logits, dim=1)


def discriminator_loss(real_logits: torch.Tensor, real_classes: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's objective (APPAU-Net eqs. 6–7).

    Args:
        real_logits: ``R×(n+1)`` logits of (image, ground-truth mask) pairs.
        real_classes: ``R`` long, the pair's disease class in ``0..n-1``, or ``-1`` when unknown — such a
            pair only has to be recognised as real: ``−log(1 − p(predicted))``.
        fake_logits: ``F×(n+1)`` logits of (image, predicted mask) pairs, whose target is class ``n``.

    Returns the sum of the three mean terms present (supervised, real-unknown, fake).
    """
    terms = []
    known = real_classes >= 0
    if known.any():
        terms.append(F.cross_entropy(real_logits[known], real_classes[known]))
    if (~known).any():
        terms.append(-log_prob_real(real_logits[~known]).mean())
    if len(fake_logits):
        fake_class = torch.full((len(fake_logits),), fake_logits.shape[1] - 1, dtype=torch.long, device=fake_logits.device)
        terms.append(F.cross_entropy(fake_logits, fake_class))
    if not terms:
        raise ValueError("discriminator_loss needs at least one real or fake pair")
    return torch.stack(terms).sum()


def segmentor_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The segmentor's adversarial term (APPAU-Net eq. 5): −log(1 − p(predicted | image, predicted mask))."""
    return -log_prob_real(fake_logits).mean()
