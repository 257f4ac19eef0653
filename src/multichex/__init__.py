"""multichex: one multi-task network for chest X-rays (classification, segmentation, detection).

Research software. Not for clinical use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multichex.models.multichexnet import MultiCheXNet

__version__ = "0.1.0"

CLINICAL_DISCLAIMER = "multichex is research software and is NOT for clinical use."


def load_model(name_or_path: str | None = None, device: str = "cpu") -> MultiCheXNet:
    """A trained model by registered name (``None``: the default shipped model) or checkpoint path, in eval mode.

    Imported on first call, so ``import multichex`` stays light.
    """
    from multichex.models.pretrained import load_model as _load

    return _load(name_or_path, device=device)
