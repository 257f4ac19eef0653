"""scripts/publish_model.py: a checked copy replaces the shipped files; a refused copy leaves them untouched."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from multichex.models.checkpoint import load_model, read_checkpoint, write_checkpoint
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "publish_model.py"


@pytest.fixture()
def publish(tmp_path, monkeypatch):
    """The script's module with its zoo in a temporary folder and random images instead of the bundled sample."""
    spec = importlib.util.spec_from_file_location("publish_model_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    monkeypatch.setattr(module, "package_zoo", lambda: zoo)
    monkeypatch.setattr(module, "sample_images", lambda size: torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=["A", "B"], box_classes=["A"]))
    checkpoint = write_checkpoint(tmp_path / "trained.safetensors", model.eval(), {"gate_threshold": {"threshold": 0.4}})
    card = tmp_path / "card.md"
    card.write_text("# tiny\n")

    def run(*options: str) -> int:
        monkeypatch.setattr(sys, "argv", ["publish_model.py", str(checkpoint), "--name", "tiny", "--summary", "s",
                                          "--card", str(card), "--default", *options])
        return module.main()

    return run, zoo, model


def test_float32_copy_is_exact_and_indexed(publish):
    run, zoo, model = publish
    assert run("--dtype", "float32") == 0
    entry = json.loads((zoo / "index.json").read_text())["models"][0]
    assert entry["stored_dtype"] == "float32" and entry["default"]
    assert entry["copy_agreement"]["max_abs_class_probability"] == 0.0
    header, _ = read_checkpoint(zoo / "tiny.safetensors")
    assert header["gate_threshold"] == {"threshold": 0.4}
    shipped, _ = load_model(zoo / "tiny.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(shipped.state_dict()[key], value), key
    assert not list(zoo.glob(".*candidate*"))


def test_refused_copy_keeps_the_shipped_model(publish):
    run, zoo, _ = publish
    assert run() == 0  # fp16 within the default tolerances of this tiny model
    before = {p.name: p.read_bytes() for p in zoo.iterdir()}
    assert run("--dtype", "float32", "--tolerance", "-1") == 1  # no copy can pass a negative tolerance
    assert {p.name: p.read_bytes() for p in zoo.iterdir()} == before
