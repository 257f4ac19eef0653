"""``multichex evaluate``: per-head metrics with patient-bootstrap CIs on given data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from multichex.cli.common import (
    CHECKPOINT_HELP,
    checked_device,
    checkpoint_path,
    device_option,
    parse_source,
    precision_option,
    print_metrics,
    refuse,
    setup_logging,
)
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP


def _recorded_split(checkpoint: Path, header: dict) -> Path:
    """The split.json a checkpoint's run recorded; refuses when there is none (or it is gone)."""
    recorded = (header.get("train_config") or {}).get("split_file")
    if not recorded:
        refuse(f"{checkpoint} records no split (its run predates saving one); pass --split with the split.json "
                "of the run that trained it, or use --part all")
    if not Path(recorded).is_file():
        refuse(f"{checkpoint} records its split as {recorded}, which is not there; pass --split with that run's "
                "split.json, or use --part all")
    return Path(recorded)


def evaluate(
    data: list[str] = typer.Argument(..., metavar="SOURCE[=ROOT]...", help="Data sources, e.g. covid-chestxray=../shared/data/covid-chestxray (no ROOT: the bundled copy)."),
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
    out: Path = typer.Option(Path("runs/evaluate"), help="Output folder."),
    part: str = typer.Option("all", help="'all' images, or a part (train/val/test) of the split the checkpoint's run saved (its split.json)."),
    split: Path | None = typer.Option(None, exists=True, dir_okay=False, help="With --part: take the part from this split.json instead of the one the checkpoint records."),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, help="Bootstrap resamples (patients) for the 95% CIs of every head; 0 disables."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    tasks: str = typer.Option("cls,gate,seg,det", help="Comma-separated labels to score (others are ignored), e.g. seg."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Per-head metrics with patient-bootstrap 95% CIs on the given data; writes metrics.json and report.md.

    ``--part`` keeps the given sources' images that the training run's saved split puts in that part (images
    it never split are left out); the split is never recomputed, since other sources or limits would move
    patients between parts.
    """
    from multichex.device import resolve_precision
    from multichex.evaluation.evaluate import evaluate_datasets
    from multichex.evaluation.report import write_markdown_report
    from multichex.models.checkpoint import load_model
    from multichex.training.config import TrainConfig
    from multichex.training.data import build_datasets

    setup_logging()
    where = checked_device(device)
    try:
        arithmetic = resolve_precision(precision, where)
    except ValueError as error:
        refuse(str(error))
    checkpoint_file = checkpoint_path(checkpoint)
    model, header = load_model(checkpoint_file, map_location=where)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    if not chosen or set(chosen) - {"cls", "gate", "seg", "det"}:
        raise typer.BadParameter(f"--tasks takes cls, gate, seg, det; got {tasks!r}")
    sources = [replace(parse_source(s), tasks=chosen) for s in data]
    if part == "all":
        config = TrainConfig(model=model.config, sources=sources, split={"all": 1.0})
    else:
        split_path = split if split is not None else _recorded_split(checkpoint_file, header)
        base = header.get("train_config") or {"model": header["model"]}
        config = TrainConfig.from_dict({**base, "sources": [s.__dict__ for s in sources], "split_file": str(split_path)})
    try:
        datasets = build_datasets(config, unlisted="skip").get(part, {})
    except (ValueError, FileNotFoundError) as error:
        refuse(str(error))
    if not datasets:
        raise typer.BadParameter(f"no images in part {part!r} of the given sources")
    metrics = evaluate_datasets(model, datasets, bootstrap=bootstrap, seed=seed, precision=arithmetic)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown_report(out / "report.md", metrics, [], f"multichex evaluate: {checkpoint_file.name}")
    print_metrics(metrics)


def register(app: typer.Typer) -> None:
    """Mount this group's commands."""
    app.command()(evaluate)
