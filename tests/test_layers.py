"""The package's layering: using a model (inference, serving) never loads the training package."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["multichex.inference", "multichex.inference.predictor", "multichex.serve",
                                    "multichex.models.checkpoint", "multichex.evaluation.evaluate"])
def test_using_a_model_does_not_import_training(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('multichex.training')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"{module} pulled in {result.stdout.strip()}"


def test_loading_and_predicting_does_not_import_training(tmp_path) -> None:
    code = f"""
import sys, torch
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.models.checkpoint import write_checkpoint
from multichex.inference.predictor import Predictor
model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=["A"], box_classes=["A"]))
write_checkpoint({str(tmp_path / 'm.safetensors')!r}, model)
predictor = Predictor.from_checkpoint({str(tmp_path / 'm.safetensors')!r})
predictor.model.predict(torch.zeros(1, 1, 64, 64))
print(sorted(m for m in sys.modules if m.startswith('multichex.training')))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
