"""Every command that computes documents ``--device`` (and, except export, ``--precision``) in its --help,
and refuses a device the machine does not have in one line."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from multichex.cli import app

RUNNER = CliRunner()
COMMANDS = ["train", "evaluate", "transfer", "predict", "serve", "export"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_device_and_precision(command):
    result = RUNNER.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--device" in text and "auto (CUDA when available, else CPU)" in text
    if command == "export":
        assert "traces on the CPU" in text
    else:
        assert "--precision" in text and "bf16" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_refused_in_one_line(tmp_path):
    result = RUNNER.invoke(app, ["evaluate", "covid-chestxray", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no CUDA device is available" in result.output and "Traceback" not in result.output
