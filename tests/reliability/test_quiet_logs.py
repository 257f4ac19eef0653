"""Third-party decoder output stays out of the default log: an undecodable JPEG 2000 DICOM gives our one-line
error in ``predict`` and in the ``serve`` log, while pydicom's own tracebacks appear only at DEBUG (``-v``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydicom.uid import JPEG2000Lossless

from multichex.data.io import ImageReadError, read_image
from multichex.inference.predictor import Predictor, predict_files
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.serve import create_app

REASON = "cannot decode DICOM pixel data (JPEG 2000"


@pytest.fixture
def j2k_junk(tmp_path, dicom_factory) -> Path:
    """A DICOM declaring JPEG 2000 Lossless whose encapsulated pixel data is junk (every decoder plugin fails)."""
    pixels = np.zeros((16, 16), dtype=np.uint16)
    return dicom_factory.make_dicom(tmp_path / "j2k_junk.dcm", pixels, transfer_syntax=JPEG2000Lossless)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(MultiCheXNet(ModelConfig(encoder="lite-small", image_size=32)).eval())


def test_read_image_logs_nothing_at_info(j2k_junk, console_log, caplog, capfd):
    caplog.set_level(logging.INFO)
    with console_log(logging.INFO) as console, pytest.raises(ImageReadError) as info:
        read_image(j2k_junk)
    assert REASON in info.value.reason and "\n" not in info.value.reason
    assert console.getvalue() == ""
    assert not caplog.records
    assert "Traceback" not in capfd.readouterr().err


def test_predict_shows_one_line_and_no_traceback(j2k_junk, console_log, predictor, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    with console_log(logging.INFO) as console:
        records, errors = predict_files(predictor, [j2k_junk], tmp_path / "out", progress=False)
    assert records == [] and len(errors) == 1
    lines = console.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING multichex.inference.predictor: skipping ") and REASON in lines[0]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_serve_log_has_no_traceback(j2k_junk, console_log, predictor, caplog, capfd):
    caplog.set_level(logging.INFO)
    with console_log(logging.INFO) as console, TestClient(create_app(predictor)) as client:
        response = client.post("/predict", files={"file": ("scan.dcm", j2k_junk.read_bytes(), "application/dicom")})
        server_root = str(client.app.state.serve.root)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("could not read the image: ") and REASON in detail and server_root not in detail
    shown = console.getvalue()
    assert "Traceback" not in shown and shown.count(REASON) == 1, shown
    assert "Traceback" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err


def test_debug_level_still_shows_the_decoder_details(j2k_junk, console_log):
    """With ``-v`` (DEBUG) pydicom's records come through, demoted to DEBUG, traceback included."""
    with console_log(logging.DEBUG) as console, pytest.raises(ImageReadError):
        read_image(j2k_junk)
    shown = console.getvalue()
    assert "DEBUG pydicom." in shown and "Traceback (most recent call last)" in shown, shown
    assert "ERROR pydicom" not in shown
