"""``multichex models``: list the registered (shipped and user-placed) models and show a model's card."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from multichex.cli.common import refuse

models_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Registered trained models: the shipped ones and those under $MULTICHEX_HOME/models.")


@models_app.command("list")
def list_command() -> None:
    """One row per registered model: name, default, image size, origin, summary."""
    from multichex.models.pretrained import list_models

    try:
        models = list_models()
    except ValueError as error:
        refuse(str(error))
    table = Table(title="registered models (research use only, not for clinical use)")
    for column in ("name", "default", "size", "origin", "summary"):
        table.add_column(column)
    for model in models:
        size = (model.extra or {}).get("image_size")
        table.add_row(model.name, "yes" if model.default else "", f"{size} px" if size else "?", model.origin, model.summary)
    Console().print(table)
    if not models:
        typer.echo("no models registered")


@models_app.command("info")
def info_command(name: str = typer.Argument(..., help="A registered model name.")) -> None:
    """The model's card (training data, split, metrics with CIs, shortcuts, intended use, reproduce command)."""
    from multichex.models.pretrained import ModelNotFoundError, get_pretrained

    try:
        model = get_pretrained(name)
    except (ModelNotFoundError, ValueError) as error:
        refuse(str(error))
    typer.echo(f"{model.name}: {model.path} (sha256 {model.sha256})\n")
    typer.echo(model.card_text())
