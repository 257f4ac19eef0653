"""Compatibility module: the training loop's names, from where they live now.

The trainer (epochs, validation, checkpoints, resume) is :mod:`multichex.training.trainer`; the single
steps (masked multi-task, teacher forced, few-label hooks) are :mod:`multichex.training.steps`; the
best-epoch score and operating points are :mod:`multichex.training.validation`.
"""

from __future__ import annotations

from multichex.training.steps import LOSS_KEYS, TrainingStep
from multichex.training.trainer import Trainer, make_optimizer, seed_everything
from multichex.training.validation import PRIMARY_METRICS, score_of

__all__ = ["LOSS_KEYS", "PRIMARY_METRICS", "Trainer", "TrainingStep", "make_optimizer", "score_of", "seed_everything"]
