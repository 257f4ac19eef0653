"""The package's one decision rule for turning a score into a yes/no (findings, gate, masks)."""

from __future__ import annotations

from typing import Any, TypeVar

Scores = TypeVar("Scores")


def at_or_above(scores: Scores, threshold: Any) -> Scores:
    """A score is positive when ``score >= threshold``.

    Used for class findings, the gate's decision and mask binarisation, in evaluation and in inference
    (PyTorch and ONNX Runtime share :func:`multichex.models.multichexnet.assemble_prediction`), so a
    probability exactly at its threshold is decided the same way everywhere. It lives with the model
    because the model's own gate uses it and a model never imports evaluation code. ``scores`` is a
    tensor, an array or a number; ``threshold`` a number or anything that broadcasts against ``scores``
    (e.g. one threshold per class). Returns booleans of the same kind as ``scores``.
    """
    return scores >= threshold
