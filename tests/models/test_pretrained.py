"""The registry of named models: lookup, sha256 pinning, name-or-path resolution, MULTICHEX_HOME, fp16 copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multichex.models import pretrained
from multichex.models.checkpoint import load_model, read_checkpoint, write_checkpoint
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.models.pretrained import ModelNotFoundError, get_pretrained, list_models, resolve_checkpoint, sha256_of


def tiny_model(seed: int = 0) -> MultiCheXNet:
    torch.manual_seed(seed)
    return MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=["A", "B"], box_classes=["A"]))


def write_zoo(folder: Path, name: str, default: bool = True, sha: str | None = None) -> Path:
    """A zoo folder holding one tiny model, an index entry and a card."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(folder / f"{name}.safetensors", tiny_model())
    (folder / f"{name}.md").write_text(f"# {name}\n\ncard text\n")
    index = {"models": [{"name": name, "file": path.name, "sha256": sha or sha256_of(path), "summary": "tiny",
                         "card": f"{name}.md", "default": default, "image_size": 64}]}
    (folder / "index.json").write_text(json.dumps(index))
    return path


@pytest.fixture()
def zoo(tmp_path, monkeypatch) -> Path:
    """The package zoo replaced by a temporary one; MULTICHEX_HOME pointed at an empty folder."""
    folder = tmp_path / "zoo"
    write_zoo(folder, "tiny-64")
    monkeypatch.setattr(pretrained, "package_zoo", lambda: folder)
    monkeypatch.setenv("MULTICHEX_HOME", str(tmp_path / "home"))
    return folder


def test_registry_lookup_and_default(zoo):
    assert [m.name for m in list_models()] == ["tiny-64"]
    entry = get_pretrained("tiny-64")
    assert entry.default and entry.origin == "package" and entry.extra == {"image_size": 64}
    assert "card text" in entry.card_text()
    assert pretrained.default_model_name() == "tiny-64"
    assert resolve_checkpoint(None) == zoo / "tiny-64.safetensors"


def test_name_or_path_resolution(zoo, tmp_path):
    assert resolve_checkpoint("tiny-64") == zoo / "tiny-64.safetensors"
    own = write_checkpoint(tmp_path / "own.safetensors", tiny_model(1))
    assert resolve_checkpoint(str(own)) == own  # an existing file is that file, never looked up
    with pytest.raises(ModelNotFoundError, match="registered: tiny-64"):
        resolve_checkpoint("no-such-model")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resolve_checkpoint(str(tmp_path / "missing.safetensors"))
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        resolve_checkpoint(str(onnx))
    assert resolve_checkpoint(str(onnx), suffixes=(".onnx",)) == onnx


def test_sha256_mismatch_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    folder = tmp_path / "zoo"
    write_zoo(folder, "tiny-64", sha="0" * 64)
    monkeypatch.setattr(pretrained, "package_zoo", lambda: folder)
    monkeypatch.setenv("MULTICHEX_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match=r"sha256 .* does not match .* pinned for model 'tiny-64'.*refusing"):
        resolve_checkpoint("tiny-64")


def test_a_file_changed_after_verification_is_checked_again(zoo):
    resolve_checkpoint("tiny-64")
    path = zoo / "tiny-64.safetensors"
    write_checkpoint(path, tiny_model(seed=5))  # same name, other weights: size/mtime change
    with pytest.raises(ValueError, match="does not match"):
        resolve_checkpoint("tiny-64")


def test_models_in_multichex_home_are_registered(zoo, tmp_path):
    home_models = tmp_path / "home" / "models"
    write_zoo(home_models, "my-model", default=False)
    names = [m.name for m in list_models()]
    assert names == ["tiny-64", "my-model"]
    assert get_pretrained("my-model").origin.endswith("index.json")
    model = pretrained.load_model("my-model")
    assert isinstance(model, MultiCheXNet) and not model.training


def test_home_may_not_shadow_a_shipped_name(zoo, tmp_path):
    write_zoo(tmp_path / "home" / "models", "tiny-64", default=False)
    with pytest.raises(ValueError, match="already a shipped model"):
        list_models()


def test_broken_index_is_a_one_line_error(zoo):
    (zoo / "index.json").write_text('{"models": [{"file": "x"}]}')
    with pytest.raises(ValueError, match="not a valid model index"):
        list_models()


def test_fp16_copy_loads_as_float32_and_agrees(tmp_path):
    model = tiny_model().eval()
    path = write_checkpoint(tmp_path / "half.safetensors", model, dtype=torch.float16)
    header, tensors = read_checkpoint(path)
    assert header["stored_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if t.is_floating_point())
    copy, _ = load_model(path)
    assert all(p.dtype == torch.float32 for p in copy.parameters())
    images = torch.rand(3, 1, 64, 64)
    a, b = model.predict(images, use_gate=False), copy.predict(images, use_gate=False)
    assert float((a.class_probs - b.class_probs).abs().max()) < 2e-3
    assert max(float((x - y).abs().max()) for x, y in zip(a.seg_probs, b.seg_probs)) < 2e-3


def test_top_level_load_model_takes_a_path(tmp_path):
    import multichex

    path = write_checkpoint(tmp_path / "m.safetensors", tiny_model())
    assert isinstance(multichex.load_model(str(path)), MultiCheXNet)
