"""Inference benchmark: eager vs channels_last vs ONNX Runtime, shared vs separate models, the gate's saving,
and the web API under concurrent clients.

Run from the repository root on an otherwise idle machine::

    python benchmarks/bench_inference.py            # writes benchmarks/results/inference.{md,json}
    python benchmarks/bench_inference.py --quick    # smoke run, writes inference_quick.{md,json}

One process, ``torch.set_num_threads(--threads)`` and ONNX Runtime with the same number of intra-op threads,
synthetic images (speed does not depend on the weights, except through the gate), warm-up calls excluded,
medians and p50/p95 over the timed calls. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import socket
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded from elsewhere

import torch
from bench_common import (
    check_fingerprint,
    latency,
    log,
    machine_info,
    md_table,
    measured,
    percentile,
    results_stem,
    source_fingerprint,
    time_calls,
    timed,
    wait_for_idle,
    write_results,
)
from speed_data import CL, build_model, synthetic_images
from speed_shared import bench_shared

from multichex.inference.onnx_runtime import OnnxModel, export_onnx
from multichex.inference.quantize import quantize_onnx

TARGET_ONNX_RATIO = 1.8  # ONNX Runtime (int8 export) / eager PyTorch throughput, 256 px
TARGET_SHARED_RATIO = 2.5


def bench_runtimes(size: int, quick: bool, threads: int, gen: torch.Generator) -> dict:
    """Full 3-task prediction (gate off, every head on every image) per runtime, batch 1 and batch 8.

    The int8 export is calibrated on 16 synthetic images (speed does not depend on the calibration).
    """
    model = build_model("lite", size, gated_heads=["seg", "det"]).eval()
    eager = build_model("lite", size, gated_heads=["seg", "det"]).eval().to(memory_format=torch.contiguous_format)
    eager.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, Path(folder) / "model.onnx")
        onnx = OnnxModel(Path(folder) / "model.onnx", threads=threads)
        quantize_onnx(model, Path(folder) / "int8.onnx", synthetic_images(16, size, gen))
        int8 = OnnxModel(Path(folder) / "int8.onnx", threads=threads)
        runners = {
            "eager": (eager, lambda x: x.contiguous()),
            "channels_last": (model, lambda x: x.contiguous(memory_format=CL)),
            "onnxruntime": (onnx, lambda x: x.contiguous()),
            "onnxruntime-int8": (int8, lambda x: x.contiguous()),
        }
        result: dict = {}
        for batch in (1, 8):
            images = synthetic_images(batch, size, gen)
            warmup, repeats = (2, 5) if quick else ((5, 60) if batch == 1 else (2, 12))
            for name, (runner, layout) in runners.items():
                x = layout(images)
                run = measured(partial(time_calls, partial(runner.predict, x, use_gate=False), warmup, repeats))
                result.setdefault(name, {})[f"batch{batch}"] = {**latency(run.result, batch), "foreign_cores": run.foreign_cores}
    for batch in ("batch1", "batch8"):
        base = result["eager"][batch]["images_per_s"]
        for name in result:
            result[name][batch]["vs_eager"] = result[name][batch]["images_per_s"] / base
    return result


def bench_gate_saving(size: int, quick: bool, gen: torch.Generator) -> dict:
    """Gated prediction (channels_last) when a fraction of the batch is gate-negative (forced gate)."""
    model = build_model("lite", size, gated_heads=["seg", "det"]).eval()
    images = synthetic_images(8, size, gen)
    rows = {}
    for negative in (0.0, 0.5, 0.9):
        decided = torch.tensor([0.9 if i >= round(8 * negative) else 0.1 for i in range(8)])
        model.gate_probability = lambda outputs, decided=decided: decided.clone()  # type: ignore[method-assign]
        times = time_calls(lambda: model.predict(images), *((2, 3) if quick else (2, 12)))
        rows[f"{int(negative * 100)}%"] = latency(times, 8)
    full = rows["0%"]["images_per_s"]
    for row in rows.values():
        row["speed_up"] = row["images_per_s"] / full
    return rows


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_web_api(quick: bool, clients: int = 8) -> dict:
    """POST /predict from ``clients`` concurrent clients against a local server (a real PNG, 256 px model)."""
    import httpx
    import uvicorn

    from multichex.data.sources import bundled_sample_root
    from multichex.inference.predictor import Predictor
    from multichex.serve import create_app
    from multichex.training.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.safetensors"
        save_checkpoint(checkpoint, build_model("lite", 256, gated_heads=["det"]).eval())
        app = create_app(Predictor.from_checkpoint(checkpoint), workers=2, max_queue=64)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        image = min((bundled_sample_root() / "covid-chestxray" / "images").glob("*.png")).read_bytes()
        total = 16 if quick else 96
        url = f"http://127.0.0.1:{port}/predict"

        def one(_: int) -> float:
            response, seconds = timed(lambda: httpx.post(url, files={"file": ("x.png", image, "image/png")}, timeout=120))
            response.raise_for_status()
            return seconds

        one(0)  # warm-up
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            times, wall = timed(lambda: list(pool.map(one, range(total))))
        server.should_exit = True
        thread.join(timeout=10)
    return {"clients": clients, "requests": total, "requests_per_s": total / wall, "p50_ms": 1000 * percentile(times, 50),
            "p95_ms": 1000 * percentile(times, 95), "server_workers": 2}


def render(report: dict) -> str:
    """``inference.md`` for an ``inference.json`` report."""
    lines = [f"# Inference benchmark ({report['date']})", "", (f"Machine: {report['machine']['cpu_model']}, {report['threads']} threads; "
             f"code {report['code']}; idle check: {report['idle']}."), "",
             "## 1. Runtimes (full 3-task prediction, gate off)", ""]
    lines += md_table(
        ["size", "runtime", "batch 1 p50 ms", "batch 1 p95 ms", "batch 1 img/s", "batch 8 img/s", "vs eager (b1 / b8)"],
        [[size, name, f"{r['batch1']['p50_ms']:.1f}", f"{r['batch1']['p95_ms']:.1f}", f"{r['batch1']['images_per_s']:.1f}",
          f"{r['batch8']['images_per_s']:.1f}", f"{r['batch1']['vs_eager']:.2f}× / {r['batch8']['vs_eager']:.2f}×"]
         for size, runtimes in report["runtimes"].items() for name, r in runtimes.items()],
    )
    lines += ["", "## 2. One shared 3-task pass vs three single-task models (256 px, channels_last)", ""]
    lines += md_table(["batch", "shared ms", "separate ms", "ratio"], [
        [batch, f"{1000 * row['shared']['median_s']:.1f}", f"{1000 * row['separate']['median_s']:.1f}", f"{row['ratio']:.2f}×"]
        for batch, row in report["shared"]["batches"].items()
    ])
    lines += ["", "## 3. The gate's saving (batch 8, 256 px, seg + det gated)", ""]
    lines += md_table(["gate-negative images", "img/s", "p50 ms", "speed-up"], [
        [share, f"{row['images_per_s']:.1f}", f"{row['p50_ms']:.1f}", f"{row['speed_up']:.2f}×"] for share, row in report["gate"].items()
    ])
    web = report.get("web")
    if web:
        lines += ["", f"## 4. Web API: {web['clients']} concurrent clients, {web['requests']} POST /predict (256 px model, 2 server workers)", "",
                  f"{web['requests_per_s']:.1f} requests/s; latency p50 {web['p50_ms']:.0f} ms, p95 {web['p95_ms']:.0f} ms.", ""]
    lines += ["", "## Targets", ""]
    lines += md_table(["target", "measured", "pass"], [
        [target["name"], f"{target['value']:.2f}", "yes" if target["pass"] else "NO"] for target in report["targets"]
    ])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every section and write inference{,_quick}.{md,json}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--max-wait-idle", type=float, default=120.0)
    parser.add_argument("--check-fingerprint", action="store_true",
                        help="only compare the committed inference.json's model + loss fingerprint with the code's; exit 1 if stale")
    args = parser.parse_args(argv)
    code = check_fingerprint(args.out / "inference.json", args.check_fingerprint)  # the committed full-run numbers
    if code is not None:
        return code
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    idle = wait_for_idle(0 if args.quick else args.max_wait_idle)
    report: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads, "machine": machine_info(args.threads),
                    "code": source_fingerprint(), "idle": idle}
    log("runtimes")
    report["runtimes"] = {str(size): bench_runtimes(size, args.quick, args.threads, gen) for size in args.sizes}
    log("shared vs separate")
    report["shared"] = bench_shared(256, args.quick, gen)
    log("gate saving")
    report["gate"] = bench_gate_saving(256, args.quick, gen)
    log("web API")
    report["web"] = bench_web_api(args.quick)
    at_256 = report["runtimes"].get("256", {})
    onnx_ratio = at_256.get("onnxruntime-int8", {}).get("batch8", {}).get("vs_eager", float("nan"))
    float_ratio = at_256.get("onnxruntime", {}).get("batch8", {}).get("vs_eager", float("nan"))
    shared_ratio = min(row["ratio"] for row in report["shared"]["batches"].values())
    report["targets"] = [
        {"name": f"ONNX Runtime int8 / eager throughput, 256 px, batch 8 (≥ {TARGET_ONNX_RATIO})", "value": onnx_ratio,
         "pass": onnx_ratio >= TARGET_ONNX_RATIO},
        {"name": f"ONNX Runtime float32 / eager throughput, 256 px, batch 8 (≥ {TARGET_ONNX_RATIO}; for reference)", "value": float_ratio,
         "pass": float_ratio >= TARGET_ONNX_RATIO},
        {"name": f"three separate models / shared pass, worst batch (≥ {TARGET_SHARED_RATIO})", "value": shared_ratio, "pass": shared_ratio >= TARGET_SHARED_RATIO},
    ]
    markdown = render(report)
    write_results(args.out, results_stem("inference", args.quick), report, markdown, default=float)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
