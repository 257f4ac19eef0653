"""The benchmark scripts warn when committed results were measured on other model/loss code."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_speed():
    """``benchmarks/bench_common.py``, where the fingerprint helpers of every benchmark script live."""
    spec = importlib.util.spec_from_file_location("bench_common_under_test", BENCHMARKS / "bench_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _results(path: Path, **report) -> Path:
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize("layout", ["speed", "inference"])
def test_matching_fingerprint_gives_no_warning(bench_speed, tmp_path: Path, layout: str) -> None:
    report = {"machine": {"model_source_sha256_12": "abc123abc123"}}
    if layout == "inference":
        report["code"] = "abc123abc123"
    results = _results(tmp_path / f"{layout}.json", **report)
    assert bench_speed.stale_results_warning(results, current="abc123abc123") is None


@pytest.mark.parametrize("layout", ["speed", "inference"])
def test_differing_fingerprint_gives_a_warning(bench_speed, tmp_path: Path, layout: str) -> None:
    report = {"machine": {"model_source_sha256_12": "0123456789ab"}}
    if layout == "inference":
        report = {"code": "0123456789ab", "machine": {}}
    results = _results(tmp_path / f"{layout}.json", **report)
    message = bench_speed.stale_results_warning(results, current="fedcba987654")
    assert message is not None
    assert "WARNING" in message and "0123456789ab" in message and "fedcba987654" in message and str(results) in message


def test_results_without_a_fingerprint_are_flagged_and_a_missing_file_is_not(bench_speed, tmp_path: Path) -> None:
    assert bench_speed.stale_results_warning(tmp_path / "absent.json", current="x") is None
    message = bench_speed.stale_results_warning(_results(tmp_path / "old.json", machine={}), current="fedcba987654")
    assert message is not None and "no model" in message


def test_the_current_fingerprint_is_the_default(bench_speed, tmp_path: Path) -> None:
    current = bench_speed.source_fingerprint()
    results = _results(tmp_path / "speed.json", machine={"model_source_sha256_12": current})
    assert bench_speed.stale_results_warning(results) is None


def test_warn_if_stale_prints_to_stderr(bench_speed, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _results(tmp_path / "speed.json", machine={"model_source_sha256_12": "0123456789ab"})
    assert bench_speed.warn_if_stale(results, current="0123456789ab") is False
    assert capsys.readouterr().err == ""
    assert bench_speed.warn_if_stale(results, current="fedcba987654") is True
    assert "WARNING" in capsys.readouterr().err


def test_check_fingerprint_warns_and_gives_the_exit_code(bench_speed, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _results(tmp_path / "speed.json", machine={"model_source_sha256_12": "0123456789ab"})
    assert bench_speed.check_fingerprint(results, only_check=False) is None
    assert "WARNING" in capsys.readouterr().err
    assert bench_speed.check_fingerprint(results, only_check=True) == 1
    assert "WARNING" in capsys.readouterr().err
    _results(results, machine={"model_source_sha256_12": bench_speed.source_fingerprint()})
    assert bench_speed.check_fingerprint(results, only_check=True) == 0
    assert capsys.readouterr().err == ""


def test_both_scripts_use_the_shared_helper() -> None:
    for script in ("bench_speed.py", "bench_inference.py"):
        text = (BENCHMARKS / script).read_text()
        assert "check_fingerprint(" in text and "from bench_common import" in text, script
        assert "def source_fingerprint" not in text and "def stale_results_warning" not in text, script
