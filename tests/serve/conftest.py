"""Fixtures shared by the API and browser tests of ``multichex serve``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multichex.data.sources import bundled_sample_root
from multichex.inference.predictor import Predictor
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.serve import app as serve_app
from multichex.training.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    """Tiny untrained 64 px model, loaded back from a real checkpoint."""
    path = tmp_path_factory.mktemp("serve-model") / "m.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64)))
    return Predictor.from_checkpoint(path)


@pytest.fixture(scope="module")
def xray() -> Path:
    """A real bundled chest X-ray (PNG)."""
    return sorted((bundled_sample_root() / "covid-chestxray" / "images").glob("*.png"))[0]


@pytest.fixture
def fake_heatmaps(monkeypatch) -> None:
    """Make the app's predict_files also write a heat-map-style ``<stem>_cam_0.png`` and list it under ``heatmaps``."""
    real_predict_files = serve_app.predict_files

    def with_heatmap(predictor, paths, out_dir, **kwargs):
        records, errors = real_predict_files(predictor, paths, out_dir, **kwargs)
        for record in records:
            name = record["overlay"].replace("_overlay.png", "_cam_0.png")
            (Path(out_dir) / name).write_bytes((Path(out_dir) / record["overlay"]).read_bytes())
            record["heatmaps"] = {"Mass": name}
        return records, errors

    monkeypatch.setattr(serve_app, "predict_files", with_heatmap)
