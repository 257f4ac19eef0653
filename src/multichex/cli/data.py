"""``multichex data``: prepare a letterboxed cache of a source and inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prepare and inspect letterboxed data caches.")
_console = Console()


def parse_fractions(text: str) -> dict[str, float]:
    """``"0.7,0.15,0.15"`` or ``"train=0.7,val=0.15,test=0.15"`` → fractions per part."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if all("=" in t for t in items):
            fractions = {k.strip(): float(v) for k, v in (t.split("=", 1) for t in items)}
        elif len(items) == 3:
            fractions = dict(zip(("train", "val", "test"), (float(t) for t in items)))
        else:
            raise ValueError("give three numbers or name=fraction pairs")
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}") from error
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or any(v < 0 for v in fractions.values()):
        raise typer.BadParameter(f"{text!r}: fractions must be non-negative and sum to 1")
    return fractions


@data_app.command()
def prepare(
    source: str = typer.Argument(..., help="Source name (see multichex.data.registry.all_readers(): shared-data layouts and native data sets)."),
    root: Path = typer.Argument(..., help="The source's data folder."),
    out: Path = typer.Option(..., "--out", help="Cache folder (created; rerun to resume)."),
    size: int = typer.Option(256, "--size", help="Letterboxed image size in pixels."),
    workers: int = typer.Option(2, "--workers", help="Worker processes (1 = in this process)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first K items of the source listing."),
    fractions: str = typer.Option("0.7,0.15,0.15", "--fractions", help="Patient split: train,val,test fractions (or name=fraction pairs)."),
    seed: int = typer.Option(0, "--seed", help="Patient split seed."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Letterbox every image of SOURCE at ROOT into --out (resumable; bad files go to errors.csv)."""
    from multichex.data.cache import prepare_cache

    try:
        result = prepare_cache(source, root, out, size, workers=workers, limit=limit,
                               fractions=parse_fractions(fractions), seed=seed, progress=progress)
    except (ValueError, FileNotFoundError) as error:
        _console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from error
    rate = f"{result.images_per_second:.1f} images/s" if result.prepared else "nothing to do"
    _console.print(
        f"{result.out}: {result.total} items, {result.prepared} prepared now, {result.skipped} already done, "
        f"{len(result.errors)} errors ({result.seconds:.1f} s, {rate})"
    )


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


@data_app.command()
def info(directory: Path = typer.Argument(..., help="A prepared cache folder.")) -> None:
    """Counts of a prepared cache: images, patients, labels, tasks, split parts, errors."""
    from multichex.data.cache import cache_summary

    try:
        summary = cache_summary(directory)
    except (ValueError, FileNotFoundError) as error:
        _console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from error
    state = "complete" if summary["complete"] else "incomplete"
    overview = [["source", summary["source"]], ["size", summary["size"]], ["state", state], ["images", summary["images"]],
                ["patients", summary["patients"]], ["errors", summary["errors"]]]
    overview += [[f"dataset {name}", n] for name, n in summary["datasets"].items()]
    _console.print(_table(f"cache {directory}", ["item", "value"], overview))
    labels = [[name, c["positive"], c["negative"], c["unknown"]] for name, c in summary["labels"].items()]
    _console.print(_table("labels", ["label", "positive", "negative", "unknown"], labels))
    _console.print(_table("tasks (images with ...)", ["task label", "images"], [[k, v] for k, v in summary["tasks"].items()]))
    if summary["parts"]:
        columns = list(next(iter(summary["parts"].values())))
        rows = [[part, *counts.values()] for part, counts in summary["parts"].items()]
        _console.print(_table("split parts", ["part", *columns], rows))
    if summary["error_rows"]:
        shown = summary["error_rows"][:20]
        rows = [[e.get("path", ""), e.get("reason", "")] for e in shown]
        _console.print(_table(f"errors (first {len(shown)} of {summary['errors']})", ["path", "reason"], rows))


if __name__ == "__main__":
    data_app()
