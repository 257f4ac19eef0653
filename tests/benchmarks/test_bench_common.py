"""The benchmark scripts share one helper module and still render their committed results unchanged."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"
SCRIPTS = ["bench_speed.py", "bench_inference.py", "bench_cache.py", "bench_folder_predict.py", "int8_agreement.py"]
SECTIONS = ["speed_data.py", "speed_training.py", "speed_gated.py", "speed_shared.py", "speed_report.py"]


def load(name: str) -> ModuleType:
    """Import a benchmark module the way the scripts see each other (their folder on ``sys.path``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def common() -> ModuleType:
    return load("bench_common")


def committed(stem: str) -> tuple[dict, str]:
    return json.loads((RESULTS / f"{stem}.json").read_text()), (RESULTS / f"{stem}.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS + SECTIONS)
def test_no_private_copies_of_the_shared_helpers(script: str) -> None:
    text = (BENCHMARKS / script).read_text()
    if script != "speed_data.py":
        assert "from bench_common import" in text
    for private in ("def percentile", "def time_calls", "def summary", "def latency", "Path(\"/proc/stat\")", "def wait_for_idle", "CpuMonitor(",
                    "def source_fingerprint", "def warn_if_stale", "def machine_info", "json.dumps", "def log("):
        assert private not in text, f"{script} defines its own {private!r}"


def test_speed_md_renders_unchanged_from_speed_json() -> None:
    report, markdown = committed("speed")
    speed_report = load("speed_report")
    assert speed_report.render_markdown(report) == markdown
    assert speed_report.evaluate_targets(report["training"], report["gated"], report["shared"]) == report["targets"]


@pytest.mark.parametrize(("stem", "module", "render"), [
    ("inference", "bench_inference", lambda m, r: m.render(r)),
    ("cache", "bench_cache", lambda m, r: m.render(r)),
    ("int8_agreement", "int8_agreement", lambda m, r: m.render(r)),
    ("folder_predict", "bench_folder_predict", lambda m, r: m.render(r, ok=r["checks"]["every_image_once"])),
])
def test_other_reports_render_unchanged(stem: str, module: str, render) -> None:
    report, markdown = committed(stem)
    assert render(load(module), report) == markdown


def test_timing_statistics(common: ModuleType) -> None:
    assert common.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert common.percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert common.percentile([4.0], 95) == 4.0
    row = common.summary([0.5, 0.25, 1.0], images_per_call=4)
    assert row == {"repeats": 3, "median_s": 0.5, "min_s": 0.25, "max_s": 1.0, "images_per_s": 8.0}
    assert common.latency([0.01, 0.02, 0.03], 1)["images_per_s"] == pytest.approx(50.0)
    calls = []
    assert len(common.time_calls(lambda: calls.append(1), warmup=2, repeats=3)) == 3 and len(calls) == 5
    assert common.timed(lambda: 7)[0] == 7


def test_least_loaded_redoes_loaded_measurements(common: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = iter([0.9, 0.6, 0.1])
    monkeypatch.setattr(common, "measured", lambda fn, include_children=False: common.Measurement(fn(), 1.0, next(loads)))
    monkeypatch.setattr(common, "wait_for_idle", lambda *args, **kwargs: {})
    row = common.guarded("x", lambda: {"value": 1}, retries=2, deadline=float("inf"))
    assert list(row) == ["value", "foreign_cores", "attempts", "foreign_cores_per_attempt"]
    assert row["foreign_cores"] == 0.1 and row["attempts"] == 3 and row["foreign_cores_per_attempt"] == [0.9, 0.6, 0.1]
    loads = iter([0.9, 0.95])  # both loaded and within 0.1 core: the earlier attempt is kept
    best, attempts = common.least_loaded(lambda: None, 1)
    assert best is attempts[0] and len(attempts) == 2
    loads = iter([0.9])  # past the deadline: no retry
    best, attempts = common.least_loaded(lambda: None, 2, deadline=0.0)
    assert len(attempts) == 1


def test_markdown_tables_and_result_files(common: ModuleType, tmp_path: Path) -> None:
    assert common.md_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert common.results_stem("speed", quick=True) == "speed_quick" and common.results_stem("speed") == "speed"
    json_path, md_path = common.write_results(tmp_path / "out", "speed_quick", {"a": 1}, "# t\n")
    assert json_path.read_text() == '{\n  "a": 1\n}\n' and md_path.read_text() == "# t\n"


def test_bench_speed_check_fingerprint_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench_speed = load("bench_speed")
    assert bench_speed.main(["--check-fingerprint", "--out", str(tmp_path)]) == 0  # nothing committed there yet
    (tmp_path / "speed.json").write_text(json.dumps({"machine": {"model_source_sha256_12": "0123456789ab"}}))
    assert bench_speed.main(["--check-fingerprint", "--out", str(tmp_path)]) == 1
    assert "WARNING" in capsys.readouterr().err
