"""Training commands: ``demo``, ``train`` (run configs and staged protocols) and ``transfer``."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import typer

from multichex import CLINICAL_DISCLAIMER
from multichex.cli.common import (
    checked_device,
    checkpoint_path,
    console,
    device_option,
    parse_source,
    precision_option,
    print_metrics,
    refuse,
    setup_logging,
)
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP


def demo(
    minutes: float = typer.Option(3.0, help="Training time budget in minutes (evaluation and overlays add about half a minute)."),
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    seed: int = typer.Option(0, help="Random seed."),
    image_size: int | None = typer.Option(None, help="Override the training image size (multiple of 32)."),
    epochs: int | None = typer.Option(None, help="Override the number of epochs."),
    steps_per_epoch: int | None = typer.Option(None, help="Override the steps per epoch."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a small 3-task model on the bundled real X-rays, evaluate on held-out patients, write a report."""
    from multichex.training.demo import demo_config, run_demo

    setup_logging()
    started = time.monotonic()
    config = demo_config(out, seed, minutes, image_size, epochs, steps_per_epoch)
    console.print(f"[bold]multichex demo[/bold] — {CLINICAL_DISCLAIMER}")
    best, metrics, overlays = run_demo(config, progress=progress, started=started)
    print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {len(overlays)} overlays, checkpoint {best} "
                  f"({metrics['seconds_total']:.0f} s)")


def train(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", exists=True, dir_okay=False, help="Run config or protocol (YAML with `phases:`)."),
    out: Path | None = typer.Option(None, help="Output folder (overrides out_dir)."),
    seed: int | None = typer.Option(None, help="Seed (overrides the config)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run (a protocol skips its finished phases)."),
    smoke: bool = typer.Option(False, help="Protocols: run every phase at toy size (64 px, 2 steps, 12 images per source) to check the file."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    device: str | None = device_option(None, "Default: the config's `device` (auto)."),
    precision: str | None = precision_option(None, "Default: the config's `precision` (auto)."),
) -> None:
    """Train from a YAML config; writes checkpoints, log.csv, split.json, config.json and test metrics.

    A config with a `phases:` list is a staged protocol (e.g. configs/multichexnet.yaml): each phase
    trains the modules it names on its sources, starting from the previous phase's best weights.
    """
    from multichex.training import distributed
    from multichex.training.config import load_config
    from multichex.training.protocol import (
        ProtocolRunner,
        is_protocol,
        load_protocol,
        smoke_overrides,
    )
    from multichex.training.run import run_training

    setup_logging()
    distributed.init_from_env()  # under torchrun: join the job; rank 0 alone writes files and prints results
    main = distributed.is_main()
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    overrides = {}
    if out is not None:
        overrides["out_dir"] = str(out)
    if seed is not None:
        overrides["seed"] = seed
    if device is not None:
        checked_device(device)
        overrides["device"] = device
    if precision is not None:
        overrides["precision"] = precision
    try:
        protocol = load_protocol(config_path, overrides) if is_protocol(config_path) else None
        config = load_config(config_path, overrides) if protocol is None and not smoke else None
    except ValueError as error:  # one line naming the file and what is wrong in it
        refuse(str(error))
    if protocol is not None:
        if smoke:
            protocol = smoke_overrides(protocol)
        started = time.monotonic()
        metrics = ProtocolRunner(protocol, progress=progress, bootstrap=200 if smoke else DEFAULT_BOOTSTRAP).run(resume=resume)
        distributed.cleanup()
        if not main:
            return
        for phase, phase_metrics in metrics.items():
            console.print(f"[bold]{phase}[/bold] (held-out: {', '.join(phase_metrics.get('sources', []))})")
            print_metrics(phase_metrics)
        console.print(f"final checkpoint: {Path(protocol.base.out_dir) / 'final.safetensors'} ({time.monotonic() - started:.0f} s)")
        return
    if smoke:
        raise typer.BadParameter("--smoke applies to protocols (configs with `phases:`)")
    best, metrics = run_training(config, resume=resume, progress=progress)
    distributed.cleanup()
    if not main:
        return
    print_metrics(metrics)
    console.print(f"best checkpoint: {best}")


def transfer(
    data: list[str] = typer.Argument(..., metavar="SOURCE[=ROOT]...", help="Target data sources (split by patient into train/val/test)."),
    from_checkpoint: str = typer.Option(..., "--from", help="Checkpoint or registered model name to transfer from, or 'scratch' for the random-initialisation baseline."),
    classes: str = typer.Option(..., help="Comma-separated new class names, e.g. COVID-19."),
    shots: str = typer.Option("all", help="Labelled images per class, e.g. 5,10,20,all (a few-shot curve)."),
    fine_tune: bool = typer.Option(False, "--fine-tune/--freeze", help="Also train the encoder and θ_feats (default: frozen)."),
    out: Path = typer.Option(Path("runs/transfer"), help="Output folder."),
    seed: int = typer.Option(0, help="Seed (split, few-shot draw, θ_dec initialisation)."),
    epochs: int = typer.Option(10, help="Epochs per run."),
    steps_per_epoch: int = typer.Option(10, help="Steps per epoch."),
    batch_size: int = typer.Option(16, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    encoder: str = typer.Option("lite", help="Encoder for --from scratch."),
    image_size: int = typer.Option(256, help="Image size for --from scratch (a checkpoint brings its own)."),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, help="Bootstrap resamples (patients) for the 95% CIs of every head."),
    progress: bool = typer.Option(False, help="Show progress bars."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Transfer the classifier to new classes (§3.9): keep θ_enc and θ_feats, train a fresh θ_dec; few-shot curve."""
    from multichex.models.checkpoint import read_checkpoint
    from multichex.models.config import ModelConfig
    from multichex.training.config import TrainConfig
    from multichex.training.transfer import parse_shots, run_transfer

    setup_logging()
    checked_device(device)
    names = [c.strip() for c in classes.split(",") if c.strip()]
    try:
        shot_list = parse_shots(shots)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    checkpoint = None if from_checkpoint == "scratch" else checkpoint_path(from_checkpoint)
    if checkpoint is None:
        model = ModelConfig(encoder=encoder, image_size=image_size, class_names=names)
    else:
        header, _ = read_checkpoint(checkpoint)
        model = replace(ModelConfig.from_dict(header["model"]), class_names=names, class_thresholds=None)
    config = TrainConfig(
        model=model, sources=[parse_source(s) for s in data], seed=seed, out_dir=str(out),
        split={"train": 0.6, "val": 0.2, "test": 0.2}, epochs=epochs, steps_per_epoch=steps_per_epoch,
        batch_size=batch_size, lr=lr, warmup_steps=5, device=device, precision=precision, augment={"enabled": True, "hflip_p": 0.0, "rotate_deg": 7.0, "translate": 0.05},
    )
    results = run_transfer(config, checkpoint, shot_list, fine_tune=fine_tune, bootstrap=bootstrap, progress=progress)
    console.print((out / "transfer.md").read_text())
    if not results:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Mount this group's commands."""
    app.command()(demo)
    app.command()(train)
    app.command()(transfer)
