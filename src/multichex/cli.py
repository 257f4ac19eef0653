"""The ``multichex`` command line: demo, train, evaluate, predict."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from multichex import CLINICAL_DISCLAIMER
from multichex.data.cache_cli import data_app
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP

app = typer.Typer(add_completion=False, no_args_is_help=True, help=f"Multi-task chest X-ray network. {CLINICAL_DISCLAIMER}")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def _print_metrics(metrics: dict) -> None:
    table = Table(title="held-out metrics (95% CI, patient bootstrap)")
    for column in ("head", "metric", "value", "95% CI", "n images"):
        table.add_column(column)

    def fmt(v):
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


def run_training(config, resume: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Split, train, then evaluate the best checkpoint on the held-out test patients.

    The run's split is written to ``OUT/split.json`` and recorded (``split_file``, an absolute path) in the
    config of every checkpoint, so ``evaluate --part`` scores exactly these parts. Under torchrun every
    rank trains; rank 0 alone writes split.json and metrics.json and evaluates (the other ranks return
    empty metrics)."""
    from multichex.evaluation.evaluate import evaluate_datasets
    from multichex.training import distributed
    from multichex.training.checkpoint import load_model
    from multichex.training.data import build_datasets
    from multichex.training.loop import Trainer

    distributed.init_from_env()
    out_dir = Path(config.out_dir)
    parts = build_datasets(config, out_dir if distributed.is_main() else None)
    config = replace(config, split_file=str((out_dir / "split.json").resolve()))  # what this run used, for `evaluate --part`
    trainer = Trainer(config, parts["train"], parts.get("val"), progress=progress)
    if resume:
        trainer.resume()
    trainer.fit()
    best = out_dir / "best.safetensors"
    if not distributed.is_main():
        return best, {}
    model, _ = load_model(best)
    metrics = {}
    if parts.get("test"):
        metrics = evaluate_datasets(model, parts["test"], bootstrap=DEFAULT_BOOTSTRAP, seed=config.seed)
    metrics["split"] = {part: {name: len(dataset) for name, dataset in sources.items()} for part, sources in parts.items()}
    metrics["epochs_trained"] = trainer.epoch
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return best, metrics


@app.command()
def demo(
    minutes: float = typer.Option(3.0, help="Training time budget in minutes (evaluation and overlays add about half a minute)."),
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    seed: int = typer.Option(0, help="Random seed."),
    image_size: Optional[int] = typer.Option(None, help="Override the training image size (multiple of 32)."),
    epochs: Optional[int] = typer.Option(None, help="Override the number of epochs."),
    steps_per_epoch: Optional[int] = typer.Option(None, help="Override the steps per epoch."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a small 3-task model on the bundled real X-rays, evaluate on held-out patients, write a report."""
    from multichex.evaluation.report import write_markdown_report
    from multichex.inference.predictor import Predictor, predict_files
    from multichex.training.config import load_config

    _setup_logging()
    started = time.monotonic()
    overrides = {"out_dir": str(out), "seed": seed, "max_minutes": minutes}
    if epochs is not None:
        overrides["epochs"] = epochs
    if steps_per_epoch is not None:
        overrides["steps_per_epoch"] = steps_per_epoch
    config = load_config(Path(str(resources.files("multichex") / "configs" / "demo.yaml")), overrides)
    if image_size is not None:
        config.model = replace(config.model, image_size=image_size)  # re-validates the model config
    console.print(f"[bold]multichex demo[/bold] — {CLINICAL_DISCLAIMER}")
    best, metrics = run_training(config, progress=progress)
    split = json.loads((out / "split.json").read_text())["parts"]
    test_images = split.get("test", [])
    picks = [p for p in test_images if "covid" in p][:2] + [p for p in test_images if "nih" in p][:2] + [p for p in test_images if "kermany" in p][:1]
    predictor = Predictor.from_checkpoint(best)
    records, _ = predict_files(predictor, picks, out / "overlays", progress=False)
    overlays = [out / "overlays" / r["overlay"] for r in records]
    metrics["seconds_total"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown_report(out / "report.md", metrics, overlays, "multichex demo", config.to_dict())
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {len(overlays)} overlays, checkpoint {best} "
                  f"({metrics['seconds_total']:.0f} s)")


@app.command()
def train(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", exists=True, dir_okay=False, help="Run config or protocol (YAML with `phases:`)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (overrides out_dir)."),
    seed: Optional[int] = typer.Option(None, help="Seed (overrides the config)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run (a protocol skips its finished phases)."),
    smoke: bool = typer.Option(False, help="Protocols: run every phase at toy size (64 px, 2 steps, 12 images per source) to check the file."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train from a YAML config; writes checkpoints, log.csv, split.json, config.json and test metrics.

    A config with a `phases:` list is a staged protocol (e.g. configs/multichexnet.yaml): each phase
    trains the modules it names on its sources, starting from the previous phase's best weights.
    """
    from multichex.training import distributed
    from multichex.training.config import load_config
    from multichex.training.protocol import ProtocolRunner, is_protocol, load_protocol, smoke_overrides

    _setup_logging()
    distributed.init_from_env()  # under torchrun: join the job; rank 0 alone writes files and prints results
    main = distributed.is_main()
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    overrides = {}
    if out is not None:
        overrides["out_dir"] = str(out)
    if seed is not None:
        overrides["seed"] = seed
    if is_protocol(config_path):
        protocol = load_protocol(config_path, overrides)
        if smoke:
            protocol = smoke_overrides(protocol)
        started = time.monotonic()
        metrics = ProtocolRunner(protocol, progress=progress, bootstrap=200 if smoke else DEFAULT_BOOTSTRAP).run(resume=resume)
        distributed.cleanup()
        if not main:
            return
        for phase, phase_metrics in metrics.items():
            console.print(f"[bold]{phase}[/bold] (held-out: {', '.join(phase_metrics.get('sources', []))})")
            _print_metrics(phase_metrics)
        console.print(f"final checkpoint: {Path(protocol.base.out_dir) / 'final.safetensors'} ({time.monotonic() - started:.0f} s)")
        return
    if smoke:
        raise typer.BadParameter("--smoke applies to protocols (configs with `phases:`)")
    config = load_config(config_path, overrides)
    best, metrics = run_training(config, resume=resume, progress=progress)
    distributed.cleanup()
    if not main:
        return
    _print_metrics(metrics)
    console.print(f"best checkpoint: {best}")


def _parse_source(spec: str):
    """``NAME[=ROOT]``; a ROOT made by ``multichex data prepare`` is read as a prepared cache."""
    from multichex.training.config import SourceConfig

    name, _, root = spec.partition("=")
    if root and (Path(root) / "manifest.json").is_file():
        return SourceConfig(name=name, prepared=root)
    return SourceConfig(name=name, root=root or None)


def _refuse(message: str) -> NoReturn:
    """A one-line usage error (exit 2), not a traceback or a wrapped panel."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _recorded_split(checkpoint: Path, header: dict) -> Path:
    """The split.json a checkpoint's run recorded; refuses when there is none (or it is gone)."""
    recorded = (header.get("train_config") or {}).get("split_file")
    if not recorded:
        _refuse(f"{checkpoint} records no split (its run predates saving one); pass --split with the split.json "
                "of the run that trained it, or use --part all")
    if not Path(recorded).is_file():
        _refuse(f"{checkpoint} records its split as {recorded}, which is not there; pass --split with that run's "
                "split.json, or use --part all")
    return Path(recorded)


@app.command()
def evaluate(
    data: list[str] = typer.Argument(..., metavar="SOURCE[=ROOT]...", help="Data sources, e.g. covid-chestxray=../shared/data/covid-chestxray (no ROOT: the bundled copy)."),
    checkpoint: Path = typer.Option(..., exists=True, dir_okay=False, help="Checkpoint (.safetensors)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Output folder."),
    part: str = typer.Option("all", help="'all' images, or a part (train/val/test) of the split the checkpoint's run saved (its split.json)."),
    split: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="With --part: take the part from this split.json instead of the one the checkpoint records."),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, help="Bootstrap resamples (patients) for the 95% CIs of every head; 0 disables."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    tasks: str = typer.Option("cls,gate,seg,det", help="Comma-separated labels to score (others are ignored), e.g. seg."),
) -> None:
    """Per-head metrics with patient-bootstrap 95% CIs on the given data; writes metrics.json and report.md.

    ``--part`` keeps the given sources' images that the training run's saved split puts in that part (images
    it never split are left out); the split is never recomputed, since other sources or limits would move
    patients between parts.
    """
    from multichex.evaluation.evaluate import evaluate_datasets
    from multichex.evaluation.report import write_markdown_report
    from multichex.training.checkpoint import load_model
    from multichex.training.config import TrainConfig
    from multichex.training.data import build_datasets

    _setup_logging()
    model, header = load_model(checkpoint)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    if not chosen or set(chosen) - {"cls", "gate", "seg", "det"}:
        raise typer.BadParameter(f"--tasks takes cls, gate, seg, det; got {tasks!r}")
    sources = [replace(_parse_source(s), tasks=chosen) for s in data]
    if part == "all":
        config = TrainConfig(model=model.config, sources=sources, split={"all": 1.0})
    else:
        split_path = split if split is not None else _recorded_split(checkpoint, header)
        base = header.get("train_config") or {"model": header["model"]}
        config = TrainConfig.from_dict({**base, "sources": [s.__dict__ for s in sources], "split_file": str(split_path)})
    try:
        datasets = build_datasets(config, unlisted="skip").get(part, {})
    except (ValueError, FileNotFoundError) as error:
        _refuse(str(error))
    if not datasets:
        raise typer.BadParameter(f"no images in part {part!r} of the given sources")
    metrics = evaluate_datasets(model, datasets, bootstrap=bootstrap, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown_report(out / "report.md", metrics, [], f"multichex evaluate: {checkpoint.name}")
    _print_metrics(metrics)


@app.command()
def transfer(
    data: list[str] = typer.Argument(..., metavar="SOURCE[=ROOT]...", help="Target data sources (split by patient into train/val/test)."),
    from_checkpoint: str = typer.Option(..., "--from", help="Checkpoint to transfer from, or 'scratch' for the random-initialisation baseline."),
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
) -> None:
    """Transfer the classifier to new classes (§3.9): keep θ_enc and θ_feats, train a fresh θ_dec; few-shot curve."""
    from multichex.models.config import ModelConfig
    from multichex.training.checkpoint import read_checkpoint
    from multichex.training.config import TrainConfig
    from multichex.training.transfer import parse_shots, run_transfer

    _setup_logging()
    names = [c.strip() for c in classes.split(",") if c.strip()]
    try:
        shot_list = parse_shots(shots)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    checkpoint = None if from_checkpoint == "scratch" else Path(from_checkpoint)
    if checkpoint is None:
        model = ModelConfig(encoder=encoder, image_size=image_size, class_names=names)
    else:
        if not checkpoint.is_file():
            raise typer.BadParameter(f"{checkpoint}: no such checkpoint")
        header, _ = read_checkpoint(checkpoint)
        model = replace(ModelConfig.from_dict(header["model"]), class_names=names, class_thresholds=None)
    config = TrainConfig(
        model=model, sources=[_parse_source(s) for s in data], seed=seed, out_dir=str(out),
        split={"train": 0.6, "val": 0.2, "test": 0.2}, epochs=epochs, steps_per_epoch=steps_per_epoch,
        batch_size=batch_size, lr=lr, warmup_steps=5, augment={"enabled": True, "hflip_p": 0.0, "rotate_deg": 7.0, "translate": 0.05},
    )
    results = run_transfer(config, checkpoint, shot_list, fine_tune=fine_tune, bootstrap=bootstrap, progress=progress)
    console.print((out / "transfer.md").read_text())
    if not results:
        raise typer.Exit(code=1)


@app.command()
def export(
    checkpoint: Path = typer.Option(..., exists=True, dir_okay=False, help="Checkpoint (.safetensors)."),
    out: Path = typer.Option(Path("model.onnx"), help="Encoder graph path; the head graphs and the JSON sidecar go beside it."),
    opset: int = typer.Option(18, help="ONNX opset."),
    check: bool = typer.Option(True, help="Check ONNX Runtime's outputs against PyTorch (float32: within 1e-4, else exit 1)."),
    quantize: str = typer.Option("none", help="'none' (float32, matches PyTorch) or 'int8' (about 2× faster on CPU, small differences)."),
    calibration: list[Path] = typer.Option(None, help="int8: X-ray files or folders to calibrate on (default: the bundled sample)."),
    calibration_images: int = typer.Option(64, min=1, help="int8: at most this many calibration images, spread over the files."),
    calibration_method: str = typer.Option("minmax", help="int8: activation range estimate: minmax, percentile or entropy."),
) -> None:
    """Export to ONNX: an encoder+classifier+gate graph and one graph per gated head (the gate can still skip heads)."""
    from multichex.inference.onnx_runtime import OnnxModel, export_onnx
    from multichex.training.checkpoint import load_model

    _setup_logging()
    model, _ = load_model(checkpoint)
    if quantize == "none":
        paths = export_onnx(model, out, opset)
    elif quantize == "int8":
        paths = _export_int8(model, out, opset, calibration, calibration_images, calibration_method)
    else:
        raise typer.BadParameter(f"--quantize must be 'none' or 'int8', got {quantize!r}")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    if check and quantize == "none":
        import torch

        images = torch.rand(3, 1, model.config.image_size, model.config.image_size)
        expected = model.predict(images, use_gate=False)
        got = OnnxModel(out).predict(images, use_gate=False)
        difference = float((expected.class_probs - got.class_probs).abs().max())
        seg = max(float((a - b).abs().max()) for a, b in zip(expected.seg_probs, got.seg_probs))
        console.print(f"ONNX Runtime vs PyTorch on a random batch: max |Δ class probability| {difference:.2e}, max |Δ mask probability| {seg:.2e}")
        if difference > 1e-4 or seg > 1e-4:
            raise typer.Exit(code=1)


def _export_int8(model: Any, out: Path, opset: int, calibration: list[Path] | None, limit: int, method: str) -> dict[str, Path]:
    """Int8 export calibrated on real X-rays; its agreement with PyTorch on them goes into the sidecar and the console."""
    from multichex.data.io import list_images
    from multichex.data.sources import bundled_sample_root
    from multichex.inference.onnx_runtime import OnnxModel
    from multichex.inference.quantize import agreement, calibration_images, quantize_onnx

    files: list[Path] = []
    for path in calibration or [bundled_sample_root()]:
        files += list_images(path) if path.is_dir() else [path]
    try:
        images, errors = calibration_images(files, model.config.image_size, limit)
        paths = quantize_onnx(model, out, images, method, opset)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    for path, reason in errors:
        console.print(f"[yellow]skipped calibration file[/yellow] {path}: {reason}")
    measured = agreement(model, OnnxModel(out), images)
    meta = json.loads(paths["meta"].read_text())
    meta["agreement"] = {"on": "calibration images", **measured}
    paths["meta"].write_text(json.dumps(meta, indent=2))
    console.print(f"int8 vs PyTorch on the {measured['images']} calibration images: max |Δ class probability| "
                  f"{measured['max_abs_class_probability']:.3f}, same class decisions {measured['same_class_decisions']:.1%}, "
                  f"same gate decisions {measured['same_gate_decisions']:.1%}, mask Dice {measured['mask_dice']:.3f}")
    return paths


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Image files or folders (PNG, JPEG, DICOM), walked recursively."),
    checkpoint: Path = typer.Option(..., exists=True, dir_okay=False, help="Checkpoint (.safetensors), or model.onnx with --runtime onnx."),
    out: Path = typer.Option(Path("runs/predict"), help="Output folder."),
    runtime: str = typer.Option("torch", help="'torch' (PyTorch) or 'onnx' (ONNX Runtime; --checkpoint is a `multichex export` model.onnx)."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Run gated heads only on gate-positive images."),
    score_threshold: float = typer.Option(0.25, help="Minimum box score."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    resume: bool = typer.Option(True, "--resume/--overwrite", help="Skip images whose outputs are already in OUT (restart after an interruption)."),
    explain: bool = typer.Option(False, help="Also write a Grad-CAM heat map per predicted finding (PyTorch runtime only)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Per image: <name>.json, <name>_mask.png (original size) and <name>_overlay.png; predictions.csv for all."""
    from multichex.data.io import list_images
    from multichex.inference.predictor import Predictor, predict_files

    _setup_logging()
    files: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            files += [(found, path) for found in list_images(path)]
        else:
            files.append((path, path.parent))
    if not files:
        raise typer.BadParameter("no image files found in the given paths")
    try:
        predictor = Predictor.from_checkpoint(checkpoint, runtime=runtime, use_gate=gate, score_threshold=score_threshold, explain=explain)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    records, errors = predict_files(predictor, files, out, batch_size=batch_size, progress=progress, resume=resume)
    console.print(f"{len(records)} predictions in {out} (predictions.csv); {len(errors)} unreadable files"
                  + (f" (see {out / 'errors.csv'})" if errors else ""))
    if not records:
        raise typer.Exit(code=1)


@app.command()
def serve(
    checkpoint: Path = typer.Option(..., exists=True, dir_okay=False, help="Checkpoint (.safetensors)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind. No authentication: keep it local."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(2, min=1, help="Predictions running at once (thread pool size)."),
    max_upload_mb: float = typer.Option(20.0, min=0.001, help="Largest accepted upload in MiB."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Run gated heads only on gate-positive images."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM heat maps for the predicted findings."),
) -> None:
    """Local web app: upload a chest X-ray, see overlay, heat map, gate and class probabilities (docs/serve.md)."""
    import uvicorn

    from multichex.inference.predictor import Predictor
    from multichex.serve import create_app

    _setup_logging()
    if host not in {"127.0.0.1", "localhost", "::1"}:
        console.print(f"[bold red]warning:[/bold red] binding {host}: the app has no authentication; do not expose it.")
    predictor = Predictor.from_checkpoint(checkpoint, use_gate=gate, explain=explain)
    web_app = create_app(predictor, max_upload_bytes=int(max_upload_mb * 2**20), workers=workers)
    console.print(f"[bold]multichex serve[/bold] on http://{host}:{port} — {CLINICAL_DISCLAIMER}")
    uvicorn.run(web_app, host=host, port=port)


if __name__ == "__main__":
    app()
