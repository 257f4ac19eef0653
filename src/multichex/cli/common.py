"""What every command shares: the console, logging set-up, the metrics table, one-line refusals, source and model arguments."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

console = Console(stderr=True)

CHECKPOINT_HELP = ("Checkpoint (.safetensors) or a registered model name (`multichex models list`); "
                   "left out: the default model.")


def device_option(default: str | None = "auto", extra: str = "") -> Any:
    """The ``--device`` option every command that computes takes (one vocabulary: :mod:`multichex.device`)."""
    from multichex.device import DEVICE_HELP

    return typer.Option(default, "--device", help=DEVICE_HELP + (" " + extra if extra else ""))


def precision_option(default: str | None = "auto", extra: str = "") -> Any:
    """The ``--precision`` option (fp32 / bf16 / fp16; ``auto``: bf16 on CUDA that supports it, else fp32)."""
    from multichex.device import PRECISION_HELP

    return typer.Option(default, "--precision", help=PRECISION_HELP + (" " + extra if extra else ""))


def checked_device(spec: str | None) -> Any:
    """The device ``spec`` names, or a one-line refusal (e.g. ``--device cuda`` on a machine without CUDA)."""
    from multichex.device import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as error:
        refuse(str(error))


VERBOSE = {"on": False}  # set by the app's ``-v`` option before any command runs


def setup_logging(verbose: bool | None = None) -> None:
    """INFO (or DEBUG with ``verbose`` / the app's ``-v``: library details such as decoder tracebacks) through rich, on stderr."""
    verbose = VERBOSE["on"] if verbose is None else verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def print_metrics(metrics: dict) -> None:
    """The held-out metrics of every head as one table."""
    table = Table(title="held-out metrics (95% CI, patient bootstrap)")
    for column in ("head", "metric", "value", "95% CI", "n images"):
        table.add_column(column)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = [
        ("segmentation", "Dice", metrics.get("segmentation", {}).get("dice"), metrics.get("segmentation", {}).get("n_images")),
        ("classification", "macro AUROC", metrics.get("classification", {}).get("macro_auroc"), metrics.get("classification", {}).get("n_images")),
        ("classification", "macro accuracy", metrics.get("classification", {}).get("macro_accuracy"), metrics.get("classification", {}).get("n_images")),
        ("classification", "macro F1", metrics.get("classification", {}).get("macro_f1"), metrics.get("classification", {}).get("n_images")),
        ("detection", "mAP@0.5", metrics.get("detection", {}).get("map"), metrics.get("detection", {}).get("n_images")),
        ("gate", "AUROC", metrics.get("gate", {}).get("auroc"), metrics.get("gate", {}).get("n_known")),
    ]
    for head, name, value, n in rows:
        if value is None:
            continue
        ci = f"[{fmt(value.get('low'))}, {fmt(value.get('high'))}]" if value.get("low") is not None else "–"
        table.add_row(head, name, fmt(value.get("value")), ci, str(n))
    Console().print(table)


def refuse(message: str) -> NoReturn:
    """A one-line usage error (exit 2), not a traceback or a wrapped panel."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_source(spec: str) -> Any:
    """``NAME[=ROOT]``; a ROOT made by ``multichex data prepare`` is read as a prepared cache."""
    from multichex.training.config import SourceConfig

    name, _, root = spec.partition("=")
    if root and (Path(root) / "manifest.json").is_file():
        return SourceConfig(name=name, prepared=root)
    return SourceConfig(name=name, root=root or None)


def checkpoint_path(name_or_path: str | None, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """A checkpoint file from a path, a registered model name, or (None) the default model; refuses in one line.

    Says which model it took when the user named none.
    """
    from multichex.models.pretrained import (
        ModelNotFoundError,
        default_model_name,
        resolve_checkpoint,
    )

    try:
        path = resolve_checkpoint(name_or_path, suffixes=suffixes)
    except (ModelNotFoundError, ValueError, FileNotFoundError) as error:
        refuse(str(error))
    if name_or_path is None:
        console.print(f"using the default model {default_model_name()} ({path})")
    return path
