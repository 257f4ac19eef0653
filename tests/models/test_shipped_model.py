"""The model shipped inside the package: registered, intact, and predicting out of the box."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from multichex.cli import app
from multichex.data.io import list_images
from multichex.data.sources import bundled_sample_root
from multichex.inference.predictor import Predictor
from multichex.models.pretrained import default_model_name, get_pretrained, list_models, package_zoo

SHIPPED_LIMIT_MB = 25


def test_a_default_model_ships_with_its_card_under_the_size_limit():
    shipped = [m for m in list_models() if m.origin == "package"]
    assert shipped, "no model in multichex/models/zoo/index.json"
    default = get_pretrained(default_model_name())
    assert default.origin == "package"
    text = default.card_text()
    for section in ("Intended use", "Training data", "leave-one-source-out", "Shortcuts", "Reproduce"):
        assert section.lower() in text.lower(), f"card lacks {section!r}"
    total = sum(p.stat().st_size for p in package_zoo().glob("*.safetensors"))
    assert total < SHIPPED_LIMIT_MB * 2**20


def test_default_model_predicts_a_bundled_image(tmp_path):
    image = next(p for p in list_images(bundled_sample_root()) if "covid" in str(p))
    predictor = Predictor.from_pretrained()
    assert predictor.model.config.image_size == get_pretrained(default_model_name()).extra["image_size"]
    result = predictor.predict_prepared([predictor.prepare(image)])[0]
    assert all(np.isfinite(p) for p in result["classes"].values())
    assert 0.0 <= result["gate"]["probability"] <= 1.0
    mask = result["mask_array"]
    assert mask is not None and mask.any() and mask.mean() < 0.8  # lungs found, not the whole image


def test_predict_and_models_commands_work_without_a_checkpoint(tmp_path):
    image = next(p for p in list_images(bundled_sample_root()) if "nih" in str(p))
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(image), "--out", str(tmp_path / "p"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "default model" in result.output
    record = json.loads((tmp_path / "p" / f"{image.stem}.json").read_text())
    assert {"classes", "gate", "boxes", "mask"} <= set(record)
    assert Image.open(tmp_path / "p" / record["mask"]).size == Image.open(image).size
    listed = runner.invoke(app, ["models", "list"], terminal_width=200)
    assert listed.exit_code == 0 and default_model_name() in listed.output
    info = runner.invoke(app, ["models", "info", default_model_name()])
    assert info.exit_code == 0 and "Intended use" in info.output
    missing = runner.invoke(app, ["models", "info", "no-such-model"])
    assert missing.exit_code == 2 and "registered:" in missing.output
