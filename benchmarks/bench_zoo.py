"""The shipped default model on 512-px X-rays: whole 3-task predictions per second in each CPU runtime.

Run from the repository root on an otherwise idle machine::

    python benchmarks/bench_zoo.py                # writes benchmarks/results/zoo.{md,json}
    python benchmarks/bench_zoo.py --quick        # smoke run (few calls), writes zoo_quick.{md,json}

One process, one run, the runtimes side by side: PyTorch eager, ONNX Runtime float32 and ONNX Runtime int8
(calibrated on the bundled sample). (OpenVINO's float32 runtime was measured the same way at commit 6ddb0c7 and
lost to ONNX Runtime on this CPU, so it is not part of multichex: results/zoo.md keeps that row.) Two numbers
per runtime:

* ``model``: the gated 3-task pass (encoder, classifier, gate, then segmentation for every image and boxes
  for the gate-positive ones, decoding and NMS) on already prepared 256-px tensors, batch 1 and batch 8;
* ``end to end``: what `multichex predict` does per file minus writing outputs — decode a 512-px PNG,
  normalise, letterbox to 256, the gated pass, masks back to 512 px and boxes to original pixels — batch 8.

Agreement with PyTorch (max |Δ class probability|, mask Dice) is measured on the same real images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_common import check_fingerprint, latency, least_loaded, log, machine_info, md_table, results_stem, time_calls, write_results
from PIL import Image

from multichex.data.io import list_images
from multichex.data.sources import bundled_sample_root
from multichex.inference.onnx_runtime import OnnxModel, export_onnx
from multichex.inference.predictor import Predictor, prepare_image
from multichex.inference.quantize import agreement, calibration_images, quantize_onnx
from multichex.models.pretrained import default_model_name, load_model

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 512


def real_images_at(folder: Path, count: int) -> list[Path]:
    """``count`` bundled X-rays resized to 512 × 512 PNGs (the size the issue's target names)."""
    sources = list_images(bundled_sample_root())
    paths = []
    for index in range(count):
        source = sources[(index * 7) % len(sources)]
        image = Image.open(source).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
        path = folder / f"xray_{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def runtimes(model: torch.nn.Module, work: Path, threads: int, calibration: torch.Tensor) -> dict[str, object]:
    """Every available runtime of the same weights."""
    export_onnx(model, work / "fp32" / "model.onnx")
    quantize_onnx(model, work / "int8" / "model.onnx", calibration, "minmax")
    return {"PyTorch eager": model, "ONNX Runtime fp32": OnnxModel(work / "fp32" / "model.onnx", threads),
            "ONNX Runtime int8": OnnxModel(work / "int8" / "model.onnx", threads)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check-fingerprint", action="store_true")
    args = parser.parse_args(argv)
    stem = results_stem("zoo", args.quick)
    checked = check_fingerprint(args.out / f"{stem}.json", args.check_fingerprint)
    if checked is not None:
        return checked
    torch.set_num_threads(args.threads)
    repeats, warmup, files = (3, 1, 8) if args.quick else (30, 3, 32)
    name = default_model_name()
    model = load_model(name)
    rows, report = [], {"model": name, "input_px": SIZE, "machine": machine_info(args.threads), "runtimes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = real_images_at(work, files)
        prepared = [prepare_image(p, model.config.image_size) for p in paths]
        batch8 = torch.stack([p.tensor for p in prepared[:8]])
        calibration, _ = calibration_images(list_images(bundled_sample_root()), model.config.image_size, 64)
        for label, runtime in runtimes(model, work, args.threads, calibration).items():
            log(f"timing {label}")
            predictor = Predictor(runtime)

            def model_pass(batch: torch.Tensor, runtime=runtime) -> None:
                with torch.inference_mode():
                    runtime.predict(batch)

            def end_to_end(predictor=predictor) -> None:
                for start in range(0, len(paths), 8):
                    with torch.inference_mode():
                        predictor.predict_prepared([prepare_image(p, model.config.image_size) for p in paths[start:start + 8]])

            one = least_loaded(lambda: time_calls(lambda: model_pass(batch8[:1]), warmup, repeats), 2, name=label)[0]
            eight = least_loaded(lambda: time_calls(lambda: model_pass(batch8), warmup, repeats), 2, name=label)[0]
            e2e = least_loaded(lambda: time_calls(end_to_end, 1, max(2, repeats // 6)), 2, name=label)[0]
            result = {
                "model_b1": latency(one.result, 1), "model_b8": latency(eight.result, 8), "end_to_end_b8": latency(e2e.result, len(paths)),
                "foreign_cores": max(m.foreign_cores or 0.0 for m in (one, eight, e2e)),
                "agreement": None if runtime is model else agreement(model, runtime, batch8),  # gate off: every head
            }
            report["runtimes"][label] = result
            agree = result["agreement"]
            rows.append([label, f"{result['model_b1']['images_per_s']:.1f}", f"{result['model_b8']['images_per_s']:.1f}",
                         f"{result['end_to_end_b8']['images_per_s']:.1f}",
                         "–" if agree is None else f"{agree['max_abs_class_probability']:.4f} / {agree['mask_dice']:.4f}",
                         f"{result['foreign_cores']:.2f}"])
    header = ["runtime", "model pass b1 (img/s)", "model pass b8 (img/s)", "end to end 512-px PNG b8 (img/s)",
              "vs PyTorch: max |Δp| / mask Dice", "other processes (cores)"]
    machine = report["machine"]
    markdown = "\n".join([
        f"# {name} on {SIZE}-px X-rays ({args.threads} threads, {machine['cpu_model']})", "",
        f"{machine['date']}, torch {machine['torch']}, {repeats} timed calls after {warmup} warm-up; p50-based images/s.", "",
        *md_table(header, rows), "",
        "Model pass: the gated 3-task prediction on prepared 256-px tensors (decoding and NMS included). End to end: "
        "decode the 512-px PNG, normalise, letterbox, predict, masks back to 512 px (no output files written).", "",
    ])
    write_results(args.out, stem, report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
