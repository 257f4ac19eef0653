"""`evaluate --part` scores exactly the part the run was trained with (its saved split), never a recomputed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from multichex.cli import app
from multichex.training.checkpoint import load_model, save_checkpoint


def invoke(args: list, expected_code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == expected_code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory, covid_root) -> Path:
    """A tiny plain `train` run on the first 30 of the folder's 48 images."""
    folder = tmp_path_factory.mktemp("limited-run")
    config = folder / "tiny.yaml"
    config.write_text(
        "seed: 3\nepochs: 1\nsteps_per_epoch: 1\nbatch_size: 4\nwarmup_steps: 1\n"
        "split: {train: 0.5, val: 0.25, test: 0.25}\n"
        f"sources:\n  - {{name: covid-chestxray, root: '{covid_root}', tasks: [cls, gate, seg], limit: 30}}\n"
        "model:\n  encoder: lite-small\n  image_size: 32\n  class_names: [COVID-19, No Finding]\n  box_classes: [Mass]\n"
        "augment: {enabled: false}\n"
    )
    run = folder / "run"
    invoke(["train", config, "--out", run, "--no-progress"])
    return run


@pytest.fixture
def scored(monkeypatch) -> list[set[str]]:
    """The image paths each `evaluate` call scores (the metrics themselves are not the point here)."""
    import multichex.evaluation.evaluate as evaluation

    calls: list[set[str]] = []

    def record(model, datasets, **kwargs):
        calls.append({str(Path(r.image_path).resolve()) for d in datasets.values() for r in d.refs})
        return {}

    monkeypatch.setattr(evaluation, "evaluate_datasets", record)
    return calls


def test_evaluate_part_uses_the_runs_saved_split(limited_run, covid_root, scored, tmp_path):
    saved = json.loads((limited_run / "split.json").read_text())["parts"]
    # The whole folder (no limit, 48 images; the run split its first 30): the test part is still exactly
    # the run's test images, none of the images it trained on and none it never split.
    invoke(["evaluate", f"covid-chestxray={covid_root}", "--checkpoint", limited_run / "best.safetensors",
            "--out", tmp_path / "eval", "--part", "test", "--bootstrap", 0])
    assert scored[-1] == {str(Path(p).resolve()) for p in saved["test"]}
    assert not scored[-1] & {str(Path(p).resolve()) for p in saved["train"]}


def test_evaluate_part_refuses_a_checkpoint_without_a_split(limited_run, covid_root, scored, tmp_path):
    model, header = load_model(limited_run / "best.safetensors")
    old = {k: v for k, v in header["train_config"].items() if k != "split_file"}
    checkpoint = save_checkpoint(tmp_path / "old.safetensors", model, {"train_config": old})
    result = invoke(["evaluate", f"covid-chestxray={covid_root}", "--checkpoint", checkpoint, "--out", tmp_path / "x",
                     "--part", "test", "--bootstrap", 0], expected_code=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "records no split" in lines[0] and "--split" in lines[0], result.output
    assert not scored
    # Given explicitly, the split is used.
    invoke(["evaluate", f"covid-chestxray={covid_root}", "--checkpoint", checkpoint, "--out", tmp_path / "y",
            "--part", "test", "--split", limited_run / "split.json", "--bootstrap", 0])
    saved = json.loads((limited_run / "split.json").read_text())["parts"]
    assert scored[-1] == {str(Path(p).resolve()) for p in saved["test"]}
