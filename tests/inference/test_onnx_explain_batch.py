"""ONNX export parity with PyTorch, Grad-CAM++ heat maps, and resumable batch prediction over folders."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from multichex.cli import app
from multichex.inference.onnx_runtime import OnnxModel, export_onnx, onnx_paths
from multichex.inference.predictor import Predictor, predict_files
from multichex.models.config import GateConfig, ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import save_checkpoint

SIZE = 64


def tiny_model(**gate) -> MultiCheXNet:
    torch.manual_seed(0)
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=SIZE, anchors=[[0.2, 0.2], [0.4, 0.4]],
                                     gate=GateConfig(**gate) if gate else GateConfig()))
    # Give the randomly initialised heads some spread, so boxes pass the score threshold and masks are not constant.
    with torch.no_grad():
        model.det.out.bias.view(2, -1)[:, 4] = 1.0
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = tiny_model(gated_heads=["seg", "det"], threshold=0.5)
    save_checkpoint(folder / "m.safetensors", model)
    export_onnx(model, folder / "model.onnx")
    return model, folder


def test_export_writes_three_graphs_and_a_sidecar(exported):
    _, folder = exported
    paths = onnx_paths(folder / "model.onnx")
    assert all(p.is_file() for p in paths.values())
    meta = json.loads(paths["meta"].read_text())
    assert meta["model"]["image_size"] == SIZE and set(meta["graphs"]) == {"encoder", "seg", "det"}


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch(exported, batch):
    model, folder = exported
    onnx = OnnxModel(folder / "model.onnx")
    images = torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    for use_gate in (False, True):
        expected = model.predict(images, use_gate=use_gate, score_threshold=0.05)
        got = onnx.predict(images, use_gate=use_gate, score_threshold=0.05)
        torch.testing.assert_close(got.class_probs, expected.class_probs, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.gate_probs, expected.gate_probs, atol=1e-4, rtol=0)
        assert torch.equal(got.gate_positive, expected.gate_positive)
        for a, b in zip(expected.seg_probs, got.seg_probs):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a >= 0.5, b >= 0.5) and float((a - b).abs().max()) < 1e-4
        for a, b in zip(expected.detections, got.detections):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.labels, b.labels)
                torch.testing.assert_close(b.boxes, a.boxes, atol=1e-3, rtol=0)
    assert sum(d is not None and len(d.boxes) > 0 for d in expected.detections) > 0, "the check must compare some boxes"


def test_onnx_gate_skips_the_head_graphs(exported, monkeypatch):
    _, folder = exported
    onnx = OnnxModel(folder / "model.onnx")
    ran: list[tuple[str, int]] = []
    original = onnx.run_head
    monkeypatch.setattr(onnx, "run_head", lambda head, features, index: ran.append((head, len(index))) or original(head, features, index))
    images = torch.rand(4, 1, SIZE, SIZE)
    out = onnx.predict(images, use_gate=True)
    passed = int(out.gate_positive.sum())
    assert ran == ([("seg", passed), ("det", passed)] if passed else [])


def test_predict_cli_with_onnx_runtime_writes_the_same_records(exported, tmp_path, cxr_factory):
    _, folder = exported
    images = cxr_factory.covid(tmp_path / "data", n_patients=2, per_patient=2, size=80) / "images"
    runner = CliRunner()
    common = ["predict", str(images), "--no-progress", "--no-gate", "--score-threshold", "0.05"]
    assert runner.invoke(app, [*common, "--checkpoint", str(folder / "m.safetensors"), "--out", str(tmp_path / "torch")]).exit_code == 0
    result = runner.invoke(app, [*common, "--checkpoint", str(folder / "model.onnx"), "--runtime", "onnx", "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    for torch_json in sorted((tmp_path / "torch").glob("*.json")):
        a, b = json.loads(torch_json.read_text()), json.loads((tmp_path / "onnx" / torch_json.name).read_text())
        assert a["findings"] == b["findings"] and len(a["boxes"]) == len(b["boxes"])
        assert max(abs(a["classes"][k] - b["classes"][k]) for k in a["classes"]) <= 1e-4
        mask_a = np.asarray(Image.open(tmp_path / "torch" / a["mask"]))
        mask_b = np.asarray(Image.open(tmp_path / "onnx" / b["mask"]))
        assert (mask_a != mask_b).mean() < 1e-3  # identical up to pixels sitting exactly on the 0.5 boundary


def test_onnx_runtime_refuses_a_checkpoint_and_missing_graphs(exported, tmp_path):
    _, folder = exported
    with pytest.raises(ValueError, match="multichex export"):
        Predictor.from_checkpoint(folder / "m.safetensors", runtime="onnx")
    (tmp_path / "lonely.onnx").write_bytes((folder / "model.onnx").read_bytes())
    with pytest.raises(FileNotFoundError, match="sidecar"):
        OnnxModel(tmp_path / "lonely.onnx")


def test_grad_cam_heat_maps_are_written_per_finding(tmp_path, cxr_factory):
    model = tiny_model()
    images = sorted((cxr_factory.covid(tmp_path / "data", n_patients=1, per_patient=2, size=(70, 90)) / "images").glob("*.png"))
    predictor = Predictor(model, explain=True)
    prepared = predictor.prepare(images[0])
    maps = predictor.explainer.maps(prepared.tensor, [0, 1])
    assert set(maps) == {0, 1} and all(m.shape == (SIZE, SIZE) and 0 <= m.min() <= m.max() <= 1 for m in maps.values())
    assert not np.allclose(maps[0], maps[1]), "different classes give different maps"
    records, _ = predict_files(predictor, images, tmp_path / "out", progress=False)
    for record in records:
        expected = record["findings"] or [max(record["classes"], key=record["classes"].get)]
        assert list(record["heatmaps"]) == expected
        for filename in record["heatmaps"].values():
            with Image.open(tmp_path / "out" / filename) as heat:
                assert heat.size == (90, 70) and heat.mode == "RGB"  # the original image's size
    assert all(p.grad is None for p in model.parameters()), "explaining must not leave gradients on the model"


def test_explain_needs_the_pytorch_runtime(exported):
    _, folder = exported
    with pytest.raises(TypeError, match="ONNX"):
        Predictor(OnnxModel(folder / "model.onnx"), explain=True)


def write_folder(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = root / f"site{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:04d}.png"
        Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    (root / "site0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return paths


def test_batch_prediction_resumes_without_losing_or_duplicating(exported, tmp_path):
    _, folder = exported
    paths = write_folder(tmp_path / "scans", 24)
    predictor = Predictor.from_checkpoint(folder / "m.safetensors")
    walked = [(p, tmp_path / "scans") for p in sorted(tmp_path.glob("scans/*/*.png"))]
    first, errors = predict_files(predictor, walked[:10], tmp_path / "out", batch_size=4, progress=False)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.json")}
    records, errors = predict_files(predictor, walked, tmp_path / "out", batch_size=4, progress=False)
    assert len(records) == 24 and [e[0] for e in errors] == [str(tmp_path / "scans" / "site0" / "broken.png")]
    assert all(p.stat().st_mtime_ns == t for p, t in written.items()), "finished images were predicted again"
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in paths)
    assert len(list((tmp_path / "out").glob("*.json"))) == 24
    assert {"gate_probability", "findings", "n_boxes", "Cardiomegaly"} <= set(rows[0])


def test_sigkilled_batch_prediction_restarts_with_every_image_once(exported, tmp_path):
    """A folder predicted by the CLI, killed part-way, then restarted: each image has exactly one complete output."""
    _, folder = exported
    paths = write_folder(tmp_path / "scans", 150)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "multichex.cli", "predict", str(tmp_path / "scans"), "--checkpoint", str(folder / "m.safetensors"),
               "--out", str(out), "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.json"))) < 20:
            assert process.poll() is None, "prediction finished before it could be killed"
            assert time.monotonic() < deadline, "no outputs within the timeout"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    done_before = len(list(out.glob("*.json")))
    assert 20 <= done_before < 150
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    jsons = sorted(out.glob("*.json"))
    assert len(jsons) == 150
    records = [json.loads(p.read_text()) for p in jsons]
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in paths)
    for record in records:
        assert (out / record["overlay"]).is_file()
    with (out / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 150
    assert not list(out.glob(".*.tmp")) or all(".tmp" in p.name for p in out.glob(".*.tmp"))
