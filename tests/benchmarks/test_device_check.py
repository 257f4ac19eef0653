"""``benchmarks/device_check.py --quick`` runs the device check's code on the CPU (what a GPU machine runs at full size)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_device_check_runs_on_the_cpu(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import device_check

    assert device_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_quick.json").read_text())
    assert report["device"] == "cpu" and not report["errors"]
    training = report["training"]
    assert {r["precision"] for r in training} == {"fp32", "bf16"}
    assert any(r["data"].startswith("prepared cache") for r in training)
    for row in training:
        assert row["images_per_s"] > 0 and 0.0 <= row["data_wait"] < 1.0 and row["steps"] >= 1 and row["skipped"] == 0
    assert {(r["precision"], r["batch"]) for r in report["inference"]} == {("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)}
    agreement = report["agreement"]
    assert agreement["max_abs_class_probability"] <= 1e-3 and agreement["min_mask_dice"] >= 0.99  # CPU vs CPU: identical
    assert report["targets"]["min_mask_dice"]["met"] is True
    assert "## Targets" in (tmp_path / "device_quick.md").read_text()
