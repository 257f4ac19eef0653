"""A checkpoint used with --runtime onnx is exported once, kept under MULTICHEX_HOME, and reused."""

from __future__ import annotations

import torch

from multichex.inference.export_cache import cached_export
from multichex.inference.onnx_runtime import OnnxModel
from multichex.models.checkpoint import write_checkpoint
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet


def test_export_is_made_once_and_matches_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTICHEX_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=["A"], box_classes=["A"])).eval()
    checkpoint = write_checkpoint(tmp_path / "m.safetensors", model)
    first = cached_export(checkpoint)
    assert first.is_relative_to(tmp_path / "home" / "exports") and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cached_export(checkpoint) == first and first.stat().st_mtime_ns == stamp  # reused, not redone
    images = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        expected = model.predict(images, use_gate=False)
    got = OnnxModel(first).predict(images, use_gate=False)
    assert float((expected.class_probs - got.class_probs).abs().max()) < 1e-4
    write_checkpoint(checkpoint, MultiCheXNet(model.config))  # other weights: another export
    assert cached_export(checkpoint) != first
