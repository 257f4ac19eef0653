"""Crash safety of training: SIGKILL mid-run, resume, and end bit-identical to an uninterrupted run.

Also: a batch whose loss is NaN is skipped and never reaches the weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from multichex.data.transforms import AugmentConfig
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.config import ModelConfig
from multichex.training.checkpoint import read_checkpoint
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import make_datasets, split_sources
from multichex.training.loop import Trainer

EPOCHS = 4
RUN_TIMEOUT = 120  # seconds; a hung subprocess fails the test instead of blocking CI
CLASSES = ["Mass", "COVID-19", "No Finding"]


def _config_dict(covid_root: Path, nih_root: Path) -> dict:
    return {
        "model": {
            "encoder": "lite-small",
            "image_size": 64,
            "class_names": CLASSES,
            "box_classes": ["Mass"],
            "anchors": [[0.2, 0.2]],
            "cls_hidden": 64,
        },
        "sources": [
            {"name": "covid-chestxray", "root": str(covid_root), "tasks": ["cls", "gate", "seg"]},
            {"name": "nih-cxr14-bbox", "root": str(nih_root), "tasks": ["cls", "gate", "det"]},
        ],
        "seed": 0,
        # No "test" part: the CLI then skips the 1000-resample bootstrap evaluation, keeping runs short.
        "split": {"train": 0.75, "val": 0.25},
        "epochs": EPOCHS,
        "steps_per_epoch": 40,  # ~1 s an epoch on 2 cores: a wide enough window to kill mid-epoch
        "batch_size": 8,
        "lr": 2e-3,
        "augment": {"enabled": True},
        # One intra-op thread: with several torch processes on 2 cores, OpenMP spin-waiting makes
        # multi-threaded runs crawl; results are also independent of the machine's core count.
        "threads": 1,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["COLUMNS"] = "400"  # rich wraps log lines at the terminal width; keep "resumed ... at epoch N" on one line
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(config: Path, out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "multichex.cli", "train", str(config), "--out", str(out), "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_env())
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _sidecar_epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "last.json").read_text())["trainer"]["epoch"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _log_rows(out: Path) -> list[dict[str, str]]:
    with (out / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def test_cli_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "multichex.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, covid_root, nih_root):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_config_dict(covid_root, nih_root)))
    run_a, run_b = tmp_path / "A", tmp_path / "B"

    # Reference: uninterrupted.
    _run(_train_cmd(config, run_a))
    rows_a = _log_rows(run_a)
    assert [r["epoch"] for r in rows_a] == [str(e) for e in range(1, EPOCHS + 1)]
    # How long one epoch (train + validation) takes here, from the reference run's own log.
    epoch_seconds = float(rows_a[1]["seconds"]) - float(rows_a[0]["seconds"])

    # Interrupted: wait for the first completed epoch, let epoch 2 start, then SIGKILL.
    process = subprocess.Popen(_train_cmd(config, run_b), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((run_b / "last.safetensors").is_file() and _sidecar_epoch(run_b) >= 1):
            assert process.poll() is None, f"training exited early ({process.returncode}): {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.02)
        time.sleep(min(1.0, max(0.05, 0.4 * epoch_seconds)))  # about 40% into epoch 2
        assert process.poll() is None, "training finished before it could be killed; make the epochs longer"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()

    # The last checkpoint survived the kill intact (atomic rename); it is mid-run, not the final one.
    header, _ = read_checkpoint(run_b / "last.safetensors")
    saved_epoch = int(header["trainer"]["epoch"])
    print(f"SIGKILL during epoch {saved_epoch + 1} (epoch ≈ {epoch_seconds:.2f} s); stale temp files: {_temp_files(run_b)}")
    assert 1 <= saved_epoch < EPOCHS
    # The JSON sidecar is written right after the weights, so it is the same epoch or (killed in between) one behind.
    assert _sidecar_epoch(run_b) in (saved_epoch, saved_epoch - 1)
    # A kill during a write can leave at most that write's temp file (named after the killed pid),
    # which a later run neither reads nor needs; nothing else may be lying around.
    stale = _temp_files(run_b)
    assert all(f".{process.pid}.tmp" in p.name for p in stale), stale
    assert len(stale) <= 1, stale

    resumed = _run(_train_cmd(config, run_b, resume=True))
    match = re.search(r"resumed .*? at epoch (\d+)", resumed.stderr.replace("\n", " "))
    assert match, resumed.stderr[-3000:]
    # At most one (partial) epoch was lost: the run restarted right after the last saved epoch.
    assert int(match.group(1)) == saved_epoch

    # Same final weights as the uninterrupted run.
    weights_a, weights_b = _model_tensors(run_a / "last.safetensors"), _model_tensors(run_b / "last.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.allclose(weights_a[key].double(), weights_b[key].double(), rtol=0, atol=1e-6), key
    assert int(read_checkpoint(run_b / "last.safetensors")[0]["trainer"]["epoch"]) == EPOCHS

    # Same per-epoch log (train losses and validation metrics), ignoring wall-clock seconds.
    rows_b = _log_rows(run_b)
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    assert set(rows_a[0]) == set(rows_b[0])
    for row_a, row_b in zip(rows_a, rows_b):
        for key in row_a:
            if key in ("seconds", "data_wait"):  # timings
                continue
            assert _same_value(row_a[key], row_b[key]), (row_a["epoch"], key, row_a[key], row_b[key])
    assert any(k.startswith("val_") and rows_a[-1][k] for k in rows_a[-1]), "validation ran"
    assert set(_temp_files(run_b)) <= set(stale)
    assert not _temp_files(run_a)


def test_nan_loss_batch_is_skipped_and_weights_stay_finite(tmp_path, covid_root, nih_root, monkeypatch):
    config = TrainConfig(
        model=ModelConfig(encoder="lite-small", image_size=64, class_names=list(CLASSES), box_classes=["Mass"],
                          anchors=[[0.2, 0.2]], cls_hidden=64),
        sources=[
            SourceConfig("covid-chestxray", str(covid_root), ["cls", "gate", "seg"]),
            SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "gate", "det"]),
        ],
        seed=0, out_dir=str(tmp_path), split={"train": 1.0}, epochs=2, steps_per_epoch=4, batch_size=8, lr=2e-3,
        augment=AugmentConfig(enabled=False), threads=1,
    )
    original = MultiTaskLoss.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and "total" in losses:
            # NaN that is part of the graph: backpropagating it would put NaN into every gradient.
            losses = {**losses, "total": losses["total"] * float("nan")}
        return losses

    monkeypatch.setattr(MultiTaskLoss, "__call__", poisoned)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(config, make_datasets(config, split_sources(config)["train"], True), progress=False)
        history = trainer.fit()
    finally:
        torch.set_num_threads(threads)  # Trainer sets it process-wide; leave other tests as they were
    assert calls["n"] >= 3
    assert trainer.skipped_batches == 1
    for name, parameter in trainer.model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    for state in trainer.optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), key
    _, tensors = read_checkpoint(tmp_path / "last.safetensors")
    for key, value in tensors.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    assert all(math.isfinite(v) for record in history for k, v in record.items() if k.startswith("train_"))


def test_nan_loss_can_stop_the_run_instead(tmp_path, covid_root, nih_root, monkeypatch):
    """With on_nonfinite_loss: stop, the first NaN loss ends training with an error naming the batch."""
    config = TrainConfig(
        model=ModelConfig(encoder="lite-small", image_size=64, class_names=list(CLASSES), box_classes=["Mass"],
                          anchors=[[0.2, 0.2]], cls_hidden=64),
        sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls", "gate", "seg"])],
        seed=0, out_dir=str(tmp_path), split={"train": 1.0}, epochs=1, steps_per_epoch=3, batch_size=8,
        augment=AugmentConfig(enabled=False), threads=1, on_nonfinite_loss="stop",
    )
    original = MultiTaskLoss.__call__
    monkeypatch.setattr(MultiTaskLoss, "__call__", lambda self, *a, **k: {**original(self, *a, **k), "total": torch.tensor(float("inf"))})
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(config, make_datasets(config, split_sources(config)["train"], True), progress=False)
        with pytest.raises(FloatingPointError, match="non-finite loss"):
            trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "last.safetensors").exists()
    with pytest.raises(ValueError, match="on_nonfinite_loss"):
        TrainConfig(on_nonfinite_loss="ignore")


def test_sigkill_during_a_protocol_then_resume_matches_uninterrupted_run(tmp_path, covid_root, nih_root):
    """Kill a 3-phase protocol inside phase 2 (phase 1 finished); --resume skips phase 1, continues phase 2
    from its last checkpoint, and ends with the weights of an uninterrupted run."""
    data = _config_dict(covid_root, nih_root)
    data.update(epochs=3, steps_per_epoch=25)
    data["phases"] = [
        {"name": "classifier", "sources": ["covid-chestxray", "nih-cxr14-bbox"], "trainable": ["encoder", "cls", "gate"], "schedule": "joint"},
        {"name": "det-head", "sources": ["nih-cxr14-bbox"], "trainable": ["encoder", "det"], "teacher_forcing": {"p": 0.9}},
        {"name": "mtl", "sources": ["covid-chestxray", "nih-cxr14-bbox"], "trainable": ["encoder", "cls", "seg", "det"], "epochs": 1},
    ]
    config = tmp_path / "protocol.yaml"
    config.write_text(yaml.safe_dump(data))
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    _run(_train_cmd(config, run_a))

    process = subprocess.Popen(_train_cmd(config, run_b), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    phase_two = run_b / "phases" / "02-det-head"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((run_b / "protocol_state.json").is_file() and _sidecar_epoch(phase_two) >= 1):
            assert process.poll() is None, f"protocol exited early ({process.returncode}): {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "phase 2 saved no checkpoint within the timeout"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()
    state = json.loads((run_b / "protocol_state.json").read_text())
    assert state["completed"] == ["classifier"]
    finished_phase = (run_b / "phases" / "01-classifier" / "best.safetensors").stat().st_mtime_ns

    resumed = _run(_train_cmd(config, run_b, resume=True))
    log = resumed.stderr.replace("\n", " ")
    assert "already finished; skipped" in log and re.search(r"resumed .*? at epoch [12]", log), log[-3000:]
    assert (run_b / "phases" / "01-classifier" / "best.safetensors").stat().st_mtime_ns == finished_phase
    weights_a, weights_b = _model_tensors(run_a / "final.safetensors"), _model_tensors(run_b / "final.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.allclose(weights_a[key].double(), weights_b[key].double(), rtol=0, atol=1e-6), key
