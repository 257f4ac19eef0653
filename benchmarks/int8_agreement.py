"""How closely an int8 export reproduces its PyTorch checkpoint on real X-rays it was not calibrated on.

    python benchmarks/int8_agreement.py --checkpoint runs/demo/best.safetensors --images ../shared/data/nih-cxr14-bbox

Calibrates on the even-numbered files (64 at most), measures on the odd-numbered ones (96 at most), and
writes benchmarks/results/int8_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded from elsewhere

import torch
from bench_common import md_table, source_fingerprint, timed, write_results

from multichex.data.io import list_images
from multichex.inference.onnx_runtime import OnnxModel
from multichex.inference.quantize import agreement, calibration_images, quantize_onnx
from multichex.training.checkpoint import load_model


def render(report: dict) -> str:
    """``int8_agreement.md``: one row per measure."""
    rows = [[key, f"{value:.4f}" if isinstance(value, float) else value] for key, value in report.items()]
    return "\n".join(["# Int8 export vs PyTorch on held-out real X-rays", "", *md_table(["measure", "value"], rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Quantize, compare on the held-out images and write int8_agreement.{md,json}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, _ = load_model(args.checkpoint)
    files = list_images(args.images)
    calibration, _ = calibration_images(files[::2], model.config.image_size, 64)
    held_out, _ = calibration_images(files[1::2], model.config.image_size, 96)
    with tempfile.TemporaryDirectory() as folder:
        _, seconds = timed(partial(quantize_onnx, model, Path(folder) / "model.onnx", calibration, method=args.method))
        measured = agreement(model, OnnxModel(Path(folder) / "model.onnx", threads=2), held_out)
    report = {"checkpoint": str(args.checkpoint), "image_folder": str(args.images), "method": args.method,
              "calibration_images": len(calibration), "quantize_seconds": round(seconds, 1), **measured,
              "code": source_fingerprint()}
    markdown = render(report)
    write_results(args.out, "int8_agreement", report, markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
