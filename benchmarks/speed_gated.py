"""``bench_speed.py`` section 2: gated 3-task inference (``model.predict``) at batch 1 and batch 32."""

from __future__ import annotations

import statistics
from functools import partial

import torch
from bench_common import log, md_table, percentile, summary, timed
from speed_data import DEFAULT_ENCODER, build_model, synthetic_images

from multichex.models.config import GateConfig
from multichex.models.multichexnet import MultiCheXNet

BIG_BATCH = 32


def _batch1(model: MultiCheXNet, pool: torch.Tensor, threshold: float, count: int, warmup: int) -> dict:
    """Per-image latency over the first ``count`` images of ``pool``, one image per call."""
    model.config.gate.threshold = threshold
    positives = 0
    latencies = []
    with torch.inference_mode():
        for i in range(warmup):
            model.predict(pool[i : i + 1])
        for i in range(count):
            image = pool[i : i + 1]
            prediction, seconds = timed(partial(model.predict, image))
            latencies.append(seconds)
            positives += int(prediction.gate_positive.sum())
    return {
        "threshold": threshold,
        "images": count,
        "positive_fraction": positives / count,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
        # throughput from the median per-image latency (batch 1 → 1 image per call)
        "images_per_s": 1.0 / statistics.median(latencies),
        "images_per_s_mean": count / sum(latencies),
    }


def _batch32(model: MultiCheXNet, pool: torch.Tensor, threshold: float, warmup: int, repeats: int) -> dict:
    """Per-batch times; each warm-up / timed repeat is one pass over all of ``pool``'s batches."""
    model.config.gate.threshold = threshold
    positive = images = 0
    batch_times = []
    with torch.inference_mode():
        for _ in range(warmup):
            for i in range(0, len(pool), BIG_BATCH):
                model.predict(pool[i : i + BIG_BATCH])
        for _ in range(repeats):
            for i in range(0, len(pool), BIG_BATCH):
                chunk = pool[i : i + BIG_BATCH]
                prediction, seconds = timed(partial(model.predict, chunk))
                batch_times.append(seconds)
                positive += int(prediction.gate_positive.sum())
                images += BIG_BATCH
    return {"threshold": threshold, "positive_fraction": positive / images, **summary(batch_times, BIG_BATCH)}


def bench_gated(image_size: int, quick: bool, gen: torch.Generator) -> dict:
    """Gated prediction with every image gate-positive and with half of them gate-negative."""
    model = build_model(DEFAULT_ENCODER, image_size, gated_heads=["seg", "det"])
    model.eval()
    num_batches = 1 if quick else 4
    pool = synthetic_images(BIG_BATCH * num_batches, image_size, gen)  # the image set fed to every setting
    single_count = 16 if quick else 64  # batch-1 images timed per setting (the first of the pool)
    single_warmup = 3 if quick else 8
    big_warmup, big_repeats = (1, 1) if quick else (1, 2)  # passes over the pool's batches

    with torch.inference_mode():
        gate_probs = torch.cat([model.predict(pool[i : i + BIG_BATCH], use_gate=True).gate_probs for i in range(0, len(pool), BIG_BATCH)])
        median_threshold = float(torch.quantile(gate_probs.double(), 0.5))
        single_threshold = float(torch.quantile(gate_probs[:single_count].double(), 0.5))

    settings = {
        "all_positive": {"threshold_b32": 0.0, "threshold_b1": 0.0},
        "half_negative": {"threshold_b32": median_threshold, "threshold_b1": single_threshold},
    }
    out: dict = {
        "encoder": DEFAULT_ENCODER,
        "gated_heads": list(model.config.gate.gated_heads),
        "image_size": image_size,
        "gate_prob_range": [float(gate_probs.min()), float(gate_probs.max())],
        "settings": {},
    }
    for name, thresholds in settings.items():
        b1 = _batch1(model, pool, thresholds["threshold_b1"], single_count, single_warmup)
        log(f"gated {name} batch 1: {b1['images_per_s']:.1f} images/s, p50 {b1['p50_ms']:.2f} ms, "
            f"p95 {b1['p95_ms']:.2f} ms, positive {b1['positive_fraction']:.2f}")
        b32 = _batch32(model, pool, thresholds["threshold_b32"], big_warmup, big_repeats)
        log(f"gated {name} batch 32: {b32['images_per_s']:.1f} images/s, positive {b32['positive_fraction']:.2f}")
        out["settings"][name] = {"batch1": b1, "batch32": b32}
    model.config.gate.threshold = GateConfig().threshold
    return out


def gated_markdown(g: dict) -> list[str]:
    """Section 2 of ``speed.md``."""
    lines = [
        "",
        f"## 2. Gated 3-task inference ({g['encoder']}, {g['image_size']} px, gated heads {g['gated_heads']})",
        "",
        ("`torch.inference_mode()` + `model.predict(images)` (encoder once, cls + gate, then seg/det on gate-positive images only; "
        "det includes box decoding + NMS). \"all positive\" uses threshold 0.0 (every head runs, worst case); \"50% negative\" "
        "uses the median gate probability of the fed image set as threshold. Batch-1 images/s = 1 / median per-image latency."),
        f"Untrained (randomly initialised) weights; gate probabilities span {g['gate_prob_range'][0]:.4f}–{g['gate_prob_range'][1]:.4f}.",
        "",
    ]
    rows = []
    for name, label in (("all_positive", "all positive"), ("half_negative", "50% negative")):
        b1, b32 = g["settings"][name]["batch1"], g["settings"][name]["batch32"]
        rows.append([label, 1, f"{b1['threshold']:.6f}", f"{b1['positive_fraction']:.2f}", f"{b1['images_per_s']:.1f}",
                     f"{b1['p50_ms']:.2f}", f"{b1['p95_ms']:.2f}"])
        rows.append([label, 32, f"{b32['threshold']:.6f}", f"{b32['positive_fraction']:.2f}", f"{b32['images_per_s']:.1f}",
                     f"{b32['median_s'] / 32 * 1e3:.2f} (batch median / 32)", "–"])
    header = ["gate setting", "batch", "threshold", "positive fraction measured", "images/s", "p50 latency / image (ms)",
              "p95 latency / image (ms)"]
    return lines + md_table(header, rows)

