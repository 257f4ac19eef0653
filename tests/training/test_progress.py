"""Progress output into a file or pipe (a log, CI): a few plain lines, never carriage-return bar updates."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm.auto import tqdm

from multichex.data.transforms import AugmentConfig
from multichex.inference.predictor import Predictor, predict_files
from multichex.models.checkpoint import write_checkpoint
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.progress import LineProgress, progress_bar
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import make_datasets, split_sources
from multichex.training.trainer import Trainer

EPOCHS = 3
MODEL = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                    anchors=[[0.2, 0.2]], cls_hidden=32)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trainer(tmp_path, covid_root, nih_root, progress: bool) -> Trainer:
    config = TrainConfig(model=MODEL, out_dir=str(tmp_path), split={"train": 0.75, "val": 0.25}, epochs=EPOCHS, steps_per_epoch=4,
                         batch_size=4, augment=AugmentConfig(enabled=False),
                         sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls", "gate", "seg"], limit=12),
                                  SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "gate", "det"], limit=12)])
    parts = split_sources(config)
    return Trainer(config, make_datasets(config, parts["train"], True), make_datasets(config, parts["val"], False), progress=progress)


def test_training_into_a_non_terminal_writes_one_plain_line_per_epoch(tmp_path, covid_root, nih_root, capsys):
    trainer = _trainer(tmp_path, covid_root, nih_root, progress=True)
    capsys.readouterr()
    trainer.fit()
    err = capsys.readouterr().err  # pytest's capture stream is not a terminal, like `multichex demo > log 2>&1`
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert EPOCHS <= len(lines) <= 3 * EPOCHS, lines
    for epoch in range(1, EPOCHS + 1):
        assert sum(line.startswith(f"epoch {epoch}/{EPOCHS}:") for line in lines) == 1, lines
    assert "loss" in lines[0] and "val score" in lines[0]


def test_training_without_progress_logs_the_epoch_lines_instead(tmp_path, covid_root, nih_root, capsys, caplog):
    trainer = _trainer(tmp_path, covid_root, nih_root, progress=False)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="multichex.training.trainer"):
        trainer.fit()
    assert "\r" not in capsys.readouterr().err
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [m.split(":")[0] for m in epochs] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]


def test_line_progress_writes_about_every_tenth_and_once_at_the_end():
    stream = io.StringIO()
    bar = progress_bar(total=250, desc="predict", unit="img", stream=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(0, 250, 8):
        bar.update(8)
        bar.set_postfix(errors=0)
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 10 <= len(lines) <= 11
    assert lines[-1].startswith("predict: 256/250 img") or lines[-1].startswith("predict: 250/250 img")
    assert "errors=0" in lines[-1]


def test_progress_is_a_bar_on_a_terminal_and_nothing_when_off():
    terminal = _Terminal()
    bar = progress_bar(range(3), total=3, stream=terminal)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    quiet = io.StringIO()
    assert list(progress_bar(range(3), total=3, enabled=False, stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""
    silent = io.StringIO()
    assert list(progress_bar(range(3), total=3, every=None, stream=silent)) == [0, 1, 2] and silent.getvalue() == ""


def test_predicting_into_a_non_terminal_writes_a_few_lines(tmp_path, capsys):
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "m.safetensors", MultiCheXNet(MODEL))
    predictor = Predictor.from_checkpoint(tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        files.append(tmp_path / "scans" / f"s{i:02d}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(files[-1])
    capsys.readouterr()
    records, errors = predict_files(predictor, files, tmp_path / "out", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert len(records) == 24 and not errors
    lines = [line for line in err.splitlines() if line.startswith("predict:")]
    assert "\r" not in err and 1 <= len(lines) <= 11 and lines[-1].startswith("predict: 24/24 img (100%)")


@pytest.mark.parametrize("every, expected", [(0.1, 10), (0.5, 2), (None, 0)])
def test_line_progress_counts_lines_over_an_iterable(every, expected):
    stream = io.StringIO()
    assert sum(LineProgress(range(100), every=every, stream=stream)) == sum(range(100))
    assert len(stream.getvalue().splitlines()) == expected
