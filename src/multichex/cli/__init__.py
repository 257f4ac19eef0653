"""The ``multichex`` command line: one module per command group, mounted on one Typer app.

``train`` (demo, train, transfer), ``evaluate``, ``use`` (predict, serve, export), ``data`` (prepare, info),
``models`` (list, info).
"""

from __future__ import annotations

import typer

from multichex import CLINICAL_DISCLAIMER
from multichex.cli import evaluate as _evaluate
from multichex.cli import models as _models
from multichex.cli import train as _train
from multichex.cli import use as _use
from multichex.cli.common import VERBOSE
from multichex.cli.data import data_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=f"Multi-task chest X-ray network. {CLINICAL_DISCLAIMER}")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, including the details (tracebacks) of third-party decoders.")) -> None:
    """Multi-task chest X-ray network (research software, not for clinical use)."""
    VERBOSE["on"] = verbose


for group in (_train, _evaluate, _use):
    group.register(app)
app.add_typer(data_app, name="data")
app.add_typer(_models.models_app, name="models")

__all__ = ["app"]
