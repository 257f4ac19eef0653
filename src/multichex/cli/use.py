"""Using a trained model: ``predict`` on files, ``serve`` a local web app, ``export`` to ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from multichex import CLINICAL_DISCLAIMER
from multichex.cli.common import (
    CHECKPOINT_HELP,
    checked_device,
    checkpoint_path,
    console,
    device_option,
    precision_option,
    refuse,
    setup_logging,
)


def export(
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
    out: Path = typer.Option(Path("model.onnx"), help="Encoder graph path; the head graphs and the JSON sidecar go beside it."),
    opset: int = typer.Option(18, help="ONNX opset."),
    check: bool = typer.Option(True, help="Check ONNX Runtime's outputs against PyTorch (float32: within 1e-4, else exit 1)."),
    quantize: str = typer.Option("none", help="'none' (float32, matches PyTorch) or 'int8' (about 2× faster on CPU, small differences)."),
    calibration: list[Path] = typer.Option(None, help="int8: X-ray files or folders to calibrate on (default: the bundled sample)."),
    calibration_images: int = typer.Option(64, min=1, help="int8: at most this many calibration images, spread over the files."),
    calibration_method: str = typer.Option("minmax", help="int8: activation range estimate: minmax, percentile or entropy."),
    device: str = device_option("auto", "Export always traces on the CPU (ONNX Runtime runs there); this is where the "
                                "PyTorch reference of --check runs."),
) -> None:
    """Export to ONNX: an encoder+classifier+gate graph and one graph per gated head (the gate can still skip heads)."""
    from multichex.inference.onnx_runtime import OnnxModel, export_onnx
    from multichex.models.checkpoint import load_model

    setup_logging()
    model, _ = load_model(checkpoint_path(checkpoint))
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
        reference = checked_device(device)
        expected = model.to(reference).predict(images.to(reference), use_gate=False).to_cpu()  # fp32, like the export
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
    from multichex.inference.quantize import (
        agreement,
        calibration_images,
        quantize_onnx,
    )

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


def predict(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Image files or folders (PNG, JPEG, DICOM), walked recursively."),
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP + " With --runtime onnx also a `multichex export` model.onnx."),
    out: Path = typer.Option(Path("runs/predict"), help="Output folder."),
    runtime: str = typer.Option("torch", help="'torch' (PyTorch) or 'onnx' (ONNX Runtime); with 'onnx' a checkpoint or model name "
                                "is exported once and kept under $MULTICHEX_HOME/exports."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Run gated heads only on gate-positive images."),
    score_threshold: float = typer.Option(0.25, help="Minimum box score."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    resume: bool = typer.Option(True, "--resume/--overwrite", help="Skip images whose outputs are already in OUT (restart after an interruption)."),
    explain: bool = typer.Option(False, help="Also write a Grad-CAM heat map per predicted finding (PyTorch runtime only)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    device: str = device_option("auto", "ONNX Runtime (--runtime onnx) runs on the CPU."),
    precision: str = precision_option("auto", "PyTorch runtime only."),
) -> None:
    """Per image: <name>.json, <name>_mask.png (original size) and <name>_overlay.png; predictions.csv for all."""
    from multichex.data.io import list_images
    from multichex.inference.predictor import Predictor, predict_files

    setup_logging()
    files: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            files += [(found, path) for found in list_images(path)]
        else:
            files.append((path, path.parent))
    if not files:
        raise typer.BadParameter("no image files found in the given paths")
    try:
        model_file = checkpoint_path(checkpoint, (".safetensors", ".onnx") if runtime == "onnx" else (".safetensors",))
        if runtime == "onnx" and model_file.suffix == ".safetensors":
            from multichex.inference.export_cache import cached_export

            model_file = cached_export(model_file)
        predictor = Predictor.from_checkpoint(model_file, runtime=runtime, use_gate=gate, score_threshold=score_threshold, explain=explain,
                                              device=device, precision=precision)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    records, errors = predict_files(predictor, files, out, batch_size=batch_size, progress=progress, resume=resume)
    console.print(f"{len(records)} predictions in {out} (predictions.csv); {len(errors)} unreadable files"
                  + (f" (see {out / 'errors.csv'})" if errors else ""))
    if not records:
        raise typer.Exit(code=1)


def serve(
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
    host: str = typer.Option("127.0.0.1", help="Interface to bind. No authentication: keep it local."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(2, min=1, help="Predictions running at once (thread pool size)."),
    max_upload_mb: float = typer.Option(20.0, min=0.001, help="Largest accepted upload in MiB."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Run gated heads only on gate-positive images."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM heat maps for the predicted findings."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Local web app: upload a chest X-ray, see overlay, heat map, gate and class probabilities (docs/serve.md)."""
    import uvicorn

    from multichex.inference.predictor import Predictor
    from multichex.serve import create_app

    setup_logging()
    if host not in {"127.0.0.1", "localhost", "::1"}:
        console.print(f"[bold red]warning:[/bold red] binding {host}: the app has no authentication; do not expose it.")
    try:
        predictor = Predictor.from_checkpoint(checkpoint_path(checkpoint), use_gate=gate, explain=explain, device=device, precision=precision)
    except ValueError as error:
        refuse(str(error))
    web_app = create_app(predictor, max_upload_bytes=int(max_upload_mb * 2**20), workers=workers)
    console.print(f"[bold]multichex serve[/bold] on http://{host}:{port} — {CLINICAL_DISCLAIMER}")
    uvicorn.run(web_app, host=host, port=port)


def register(app: typer.Typer) -> None:
    """Mount this group's commands."""
    app.command()(export)
    app.command()(predict)
    app.command()(serve)
