"""Int8 ONNX export: calibration, agreement with PyTorch, the gate still skipping heads, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from multichex.cli import app
from multichex.data.io import list_images
from multichex.inference.onnx_runtime import OnnxModel, onnx_paths
from multichex.inference.quantize import agreement, calibration_images, quantize_onnx
from multichex.training.checkpoint import save_checkpoint

from .test_onnx_explain_batch import SIZE, tiny_model


@pytest.fixture(scope="module")
def xrays(tmp_path_factory, cxr_factory):
    folder = cxr_factory.nih(tmp_path_factory.mktemp("calibration"), n_patients=6, per_patient=2, size=96, seed=3)
    images, errors = calibration_images(list_images(folder), SIZE, limit=12)
    assert not errors
    return folder, images


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, xrays):
    folder = tmp_path_factory.mktemp("int8")
    model = tiny_model(gated_heads=["seg", "det"], threshold=0.5)
    quantize_onnx(model, folder / "model.onnx", xrays[1][:8])
    return model, folder


def test_int8_graphs_hold_integer_convolutions_and_the_sidecar_says_so(quantized):
    _, folder = quantized
    paths = onnx_paths(folder / "model.onnx")
    meta = json.loads(paths["meta"].read_text())
    assert meta["precision"] == "int8" and meta["calibration"] == {"images": 8, "method": "minmax"}
    for name in ("encoder", "seg", "det"):
        graph = onnx.load(str(paths[name]))
        ops = {node.op_type for node in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert int8_weights, f"{name}: no int8 convolution weights"
    assert OnnxModel(paths["encoder"]).precision == "int8"


def test_int8_agrees_with_pytorch_on_held_out_xrays(quantized, xrays):
    model, folder = quantized
    held_out = xrays[1][8:]
    with torch.inference_mode():
        measured = agreement(model, OnnxModel(folder / "model.onnx"), held_out)
    assert measured["images"] == len(held_out)
    assert 0 < measured["max_abs_class_probability"] < 0.05  # not bit-identical (it is int8), but close
    assert measured["mask_dice"] > 0.9
    assert measured["same_gate_decisions"] >= 0.75


def test_agreement_of_a_model_with_itself_is_perfect_and_sees_differences(xrays):
    model = tiny_model()
    images = xrays[1][:4]
    with torch.inference_mode():
        same = agreement(model, model, images)
        assert same["max_abs_class_probability"] == 0 and same["same_class_decisions"] == 1 and same["mask_dice"] == 1
        other = tiny_model()
        other.cls.load_state_dict({k: v + 0.5 * torch.randn_like(v) for k, v in other.cls.state_dict().items()})
        assert agreement(model, other, images)["max_abs_class_probability"] > 1e-3


def test_int8_gate_still_skips_the_head_graphs(quantized, xrays, monkeypatch):
    _, folder = quantized
    onnx_model = OnnxModel(folder / "model.onnx")
    ran: list[tuple[str, int]] = []
    original = onnx_model.run_head
    monkeypatch.setattr(onnx_model, "run_head", lambda head, f, index: ran.append((head, len(index))) or original(head, f, index))
    out = onnx_model.predict(xrays[1][:6], use_gate=True)
    passed = int(out.gate_positive.sum())
    assert ran == ([("seg", passed), ("det", passed)] if passed else [])


def test_calibration_images_spread_over_the_files_and_report_unreadable_ones(tmp_path, xrays):
    folder, _ = xrays
    files = list_images(folder)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images, errors = calibration_images([*files, tmp_path / "broken.png"], SIZE, limit=len(files) + 1)
    assert images.shape == (len(files), 1, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert errors and errors[0][0].endswith("broken.png")
    few, _ = calibration_images(files, SIZE, limit=3)
    assert len(few) == 3
    with pytest.raises(ValueError, match="no readable calibration image"):
        calibration_images([tmp_path / "broken.png"], SIZE)


def test_quantize_refuses_wrong_calibration_shapes_and_methods(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="N×1×64×64"):
        quantize_onnx(model, tmp_path / "m.onnx", np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="calibration method"):
        quantize_onnx(model, tmp_path / "m.onnx", np.zeros((2, 1, SIZE, SIZE), np.float32), method="guess")


def test_export_cli_int8_records_agreement_and_rejects_unknown_precisions(tmp_path, xrays):
    folder, _ = xrays
    save_checkpoint(tmp_path / "m.safetensors", tiny_model())
    runner = CliRunner()
    common = ["export", "--checkpoint", str(tmp_path / "m.safetensors")]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "q" / "model.onnx"), "--quantize", "int8",
                                 "--calibration", str(folder), "--calibration-images", "6"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "q" / "model.json").read_text())
    assert meta["agreement"]["images"] == 6 and meta["agreement"]["mask_dice"] > 0.9
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "x.onnx"), "--quantize", "fp16"])
    assert bad.exit_code != 0 and "int8" in bad.output
