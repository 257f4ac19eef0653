"""Device check: training and inference speed on a GPU (or the CPU), and CPU/device agreement, in one script.

Run from the repository root::

    python benchmarks/device_check.py            # on a GPU machine: at most ~5 minutes; writes results/device.{md,json}
    python benchmarks/device_check.py --quick    # tiny sizes (what CI runs, on the CPU); writes results/device_quick.*

(a) trains lite, ResNet-18 and DenseNet-121 at 256 and 512 px in fp32 / bf16 / fp16 on synthetic 3-task data,
and lite at 256 / DenseNet-121 at 512 in bf16 from a prepared cache of the bundled X-rays (decoding and
augmentation in the loader's processes): images/s, peak GPU memory, fraction of step time waiting for data;
(b) gated 3-task inference at batch 1 and 32; (c) the default model's predictions on the bundled X-rays on the
CPU and on the device (fp32): probabilities within 1e-3, mask Dice ≥ 0.99. Targets: see ``TARGETS``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_common import log, machine_info, md_table, results_stem, write_results
from device_sections import agreement, cached_training, gated_inference, model_config, synthetic_training

from multichex.device import resolve_device, resolve_precision
from multichex.models.multichexnet import MultiCheXNet

ENCODERS = ["lite", "resnet18", "densenet121"]
SIZES = [256, 512]
PRECISIONS = ["fp32", "bf16", "fp16"]
BATCH = {("lite", 256): 256, ("lite", 512): 64, ("resnet18", 256): 128, ("resnet18", 512): 32,
         ("densenet121", 256): 64, ("densenet121", 512): 32}
# The targets on an H100/H200-class GPU (checked only when the device is CUDA).
TARGETS = {"lite_256_bf16_images_per_s": 2500, "densenet121_512_bf16_images_per_s": 400, "densenet121_bf16_over_fp32": 1.8,
           "cache_data_wait": 0.10, "max_abs_probability": 1e-3, "min_mask_dice": 0.99}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CPU smoke run, as in CI)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per training configuration (default 6; quick 1)")
    return parser.parse_args(argv)


def plan(quick: bool, device: torch.device) -> dict[str, Any]:
    """What to run: the full grid, or (``--quick``) lite-small and lite at 64 px in fp32 and bf16."""
    if quick:
        return {"grid": [(e, 64, p, 4) for e in ("lite-small", "lite") for p in ("fp32", "bf16")],
                "cache": [("lite-small", 64, "bf16", 4)], "inference": [("lite-small", 64)], "warmup": 1, "steps": 3,
                "repeats": 3, "agreement_images": 2}
    precisions = [p for p in PRECISIONS if device.type == "cuda" or p != "fp16"]
    return {"grid": [(e, s, p, BATCH[(e, s)]) for e in ENCODERS for s in SIZES for p in precisions],
            "cache": [("lite", 256, "bf16", 256), ("densenet121", 512, "bf16", 32)],
            "inference": [("lite", 256), ("densenet121", 512)], "warmup": 8, "steps": 400, "repeats": 20, "agreement_images": 16}


def prepare_caches(sizes: set[int], root: Path) -> dict[int, Path]:
    """A prepared cache of the bundled covid-chestxray sample at every size the plan reads."""
    from multichex.data.cache import prepare_cache

    caches = {}
    for size in sorted(sizes):
        caches[size] = root / f"bundled-{size}"
        prepare_cache("covid-chestxray", None, caches[size], size, workers=2, progress=False)
    return caches


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    steps = plan(args.quick, device)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 6.0)
    report: dict[str, Any] = {"device": str(device), "quick": args.quick, "machine": machine_info(torch.get_num_threads()),
                              "training": [], "inference": [], "agreement": None, "errors": []}
    if device.type == "cuda":
        report["gpu"] = {"name": torch.cuda.get_device_name(device), "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
                         "bf16": torch.cuda.is_bf16_supported()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        for encoder, size, precision, batch in steps["grid"]:
            report["training"].append(_guarded(report, f"train {encoder} {size} {precision}", synthetic_training,
                                               encoder, size, resolve_precision(precision, device), batch, device, work / "run",
                                               steps["warmup"], steps["steps"], seconds))
        caches = prepare_caches({size for _, size, _, _ in steps["cache"]}, work)
        for encoder, size, precision, batch in steps["cache"]:
            report["training"].append(_guarded(report, f"train {encoder} {size} {precision} (cache)", cached_training,
                                               caches[size], encoder, size, resolve_precision(precision, device), batch, device,
                                               work / "run", steps["warmup"], steps["steps"], seconds))
        for encoder, size in steps["inference"]:
            model = MultiCheXNet(model_config(encoder, size))
            for precision in ("fp32", "bf16"):
                for batch in (1, 32) if not args.quick else (1, 4):
                    report["inference"].append(_guarded(report, f"predict {encoder} {size} {precision} b{batch}", gated_inference,
                                                        model, resolve_precision(precision, device), batch, device, steps["repeats"]))
        report["agreement"] = _guarded(report, "agreement", _agreement, device, steps["agreement_images"])
    report["training"] = [r for r in report["training"] if r]
    report["inference"] = [r for r in report["inference"] if r]
    report["seconds"] = round(time.monotonic() - started, 1)
    report["targets"] = check_targets(report, device)
    return report


def _guarded(report: dict[str, Any], name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any] | None:
    """``fn(*args)``, one measurement; a failure (e.g. out of memory) is recorded and the check goes on."""
    log(name)
    try:
        result = fn(*args)
    except Exception as error:  # recorded in the report: one configuration must not lose the others
        report["errors"].append({"what": name, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"})
        log(f"  failed: {report['errors'][-1]['error']}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    log(f"  {result.get('images_per_s', '')} img/s" if "images_per_s" in result else "  done")
    return result


def _agreement(device: torch.device, images: int) -> dict[str, Any]:
    from multichex.data.io import list_images
    from multichex.data.sources import bundled_sample_root
    from multichex.models.pretrained import resolve_checkpoint

    files = list_images(bundled_sample_root() / "covid-chestxray" / "images")[:images]
    return agreement(resolve_checkpoint(None), files, device)


def _speed(report: dict[str, Any], encoder: str, size: int, precision: str, data: str = "synthetic") -> float | None:
    for row in report["training"]:
        if (row["encoder"], row["size"], row["precision"]) == (encoder, size, precision) and row["data"].startswith(data):
            return row["images_per_s"]
    return None


def check_targets(report: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Each target: measured value and whether it is met (speed targets only on CUDA)."""
    found: dict[str, Any] = {}
    if device.type == "cuda":
        lite = _speed(report, "lite", 256, "bf16")
        dense_bf16, dense_fp32 = _speed(report, "densenet121", 512, "bf16"), _speed(report, "densenet121", 512, "fp32")
        found["lite_256_bf16_images_per_s"] = lite
        found["densenet121_512_bf16_images_per_s"] = dense_bf16
        found["densenet121_bf16_over_fp32"] = dense_bf16 / dense_fp32 if dense_bf16 and dense_fp32 else None
        waits = [r["data_wait"] for r in report["training"] if r["data"].startswith("prepared")]
        found["cache_data_wait"] = max(waits) if waits else None
    agree = report.get("agreement") or {}
    found["max_abs_probability"] = max(agree.get("max_abs_class_probability", float("nan")), agree.get("max_abs_gate_probability", float("nan")))
    found["min_mask_dice"] = agree.get("min_mask_dice")
    out = {}
    for key, value in found.items():
        target = TARGETS[key]
        if value is None:
            out[key] = {"value": None, "target": target, "met": None}
            continue
        met = value <= target if key in {"cache_data_wait", "max_abs_probability"} else value >= target
        out[key] = {"value": value, "target": target, "met": bool(met)}
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Device check ({'quick, ' if report['quick'] else ''}{report['device']})", "",
             f"`python benchmarks/device_check.py{' --quick' if report['quick'] else ''}`, {report['machine']['date']}, "
             f"torch {report['machine']['torch']}, {report['seconds']:.0f} s in all.", ""]
    if "gpu" in report:
        lines += [f"GPU: {report['gpu']['name']} ({report['gpu']['memory_gib']:.0f} GiB), CPU: {report['machine']['cpu_model']}, "
                  f"{report['machine']['logical_cores']} logical cores.", ""]
    lines += ["## Training (3 tasks, one step = forward + backward + AdamW)", ""]
    lines += md_table(["encoder", "px", "precision", "batch", "data", "images/s", "data wait", "peak GiB", "workers"],
                      [[r["encoder"], r["size"], r["precision"], r["batch"], r["data"], f"{r['images_per_s']:.0f}", f"{100 * r['data_wait']:.1f} %",
                        "–" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}", r["num_workers"]] for r in report["training"]])
    lines += ["", "## Gated 3-task inference", ""]
    lines += md_table(["encoder", "px", "precision", "batch", "median ms", "images/s"],
                      [[r["encoder"], r["size"], r["precision"], r["batch"], f"{r['median_ms']:.1f}", f"{r['images_per_s']:.0f}"]
                       for r in report["inference"]])
    agree = report.get("agreement")
    if agree:
        lines += ["", f"## CPU vs {agree['device']} (fp32, default model, {agree['images']} bundled X-rays)", "",
                  f"max |Δ class probability| {agree['max_abs_class_probability']:.2e}, max |Δ gate probability| "
                  f"{agree['max_abs_gate_probability']:.2e}, min mask Dice {agree['min_mask_dice']:.4f}, "
                  f"same class decisions {100 * agree['same_class_decisions']:.0f} %"]
    lines += ["", "## Targets", ""]
    lines += md_table(["target", "measured", "goal", "met"],
                      [[k, "–" if v["value"] is None else f"{v['value']:.4g}", v["target"], {True: "yes", False: "**no**", None: "–"}[v["met"]]]
                       for k, v in report["targets"].items()])
    if report["errors"]:
        lines += ["", "## Failed configurations", ""] + [f"- {e['what']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    json_path, md_path = write_results(args.out, results_stem("device", args.quick), report, markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
