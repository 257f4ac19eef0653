"""``bench_speed.py`` section 1: training throughput of every backbone (one AdamW step on a synthetic batch)."""

from __future__ import annotations

from functools import partial

import torch
from bench_common import guarded, log, md_table, summary, time_calls
from speed_data import CL, LIGHT_ENCODERS, build_model, synthetic_batch

from multichex.losses.multitask import MultiTaskLoss
from multichex.models.multichexnet import MultiCheXNet

TASKS = ["cls", "gate", "seg", "det"]


def feature_strides(model: MultiCheXNet, image_size: int) -> list[int]:
    """Actual strides of the encoder's four feature maps (the contract says 4, 8, 16, 32)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        features = model.encode(torch.zeros(1, 1, image_size, image_size).contiguous(memory_format=CL))
    model.train(was_training)
    return [image_size // f.shape[-1] for f in features]


def train_one(encoder: str, image_size: int, batch: int, quick: bool, gen: torch.Generator) -> dict:
    """Median time of a full training step (all heads, MultiTaskLoss backward, AdamW) for one backbone."""
    light = encoder in LIGHT_ENCODERS
    if quick:
        warmup, steps = 1, 1
    else:
        warmup, steps = (2, 8) if light else (1, 2)
    model = build_model(encoder, image_size)
    strides = feature_strides(model, image_size)
    model.train()
    criterion = MultiTaskLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    batches = [synthetic_batch(model.config, batch, gen) for _ in range(2)]
    state = {"i": 0, "loss": float("nan")}

    def step() -> None:
        data = batches[state["i"] % len(batches)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        outputs = model(data.images, tasks=TASKS)
        losses = criterion(outputs, data)
        losses["total"].backward()
        optimizer.step()
        state["loss"] = float(losses["total"].detach())

    log(f"train {encoder}: {warmup} warm-up + {steps} timed steps at batch {batch} (feature strides {strides})")
    times = time_calls(step, warmup, steps)
    row = {
        "encoder": encoder,
        "batch": batch,
        "image_size": image_size,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "feature_strides": strides,
        "last_loss": state["loss"],
        **summary(times, batch),
    }
    log(f"  {row['images_per_s']:.2f} images/s (median step {row['median_s']:.3f} s)")
    state.clear()
    return row


def bench_training(encoders: list[str], image_size: int, batch: int, quick: bool, gen: torch.Generator, deadline: float) -> list[dict]:
    """One row per backbone, each redone while other processes loaded the CPU (2 retries light, 1 heavy)."""
    results = []
    for encoder in encoders:
        retries = 2 if encoder in LIGHT_ENCODERS else 1
        results.append(guarded(f"train {encoder}", partial(train_one, encoder, image_size, batch, quick, gen), retries, deadline))
    return results


def training_markdown(training: list[dict], image_size: int) -> list[str]:
    """Section 1 of ``speed.md``."""
    lines = [
        "",
        f"## 1. Training throughput ({image_size} px, batch {training[0]['batch'] if training else '-'})",
        "",
        "Forward of all heads (cls, gate, seg, det) + `MultiTaskLoss` total backward + AdamW step, synthetic batch.",
        "",
    ]
    header = ["encoder", "params (M)", "feature strides", "warm-up steps", "timed steps", "median step (s)", "min / max step (s)", "images/s"]
    lines += md_table(header, [
        [r["encoder"], f"{r['params_m']:.2f}", "/".join(map(str, r["feature_strides"])), r["warmup_steps"], r["timed_steps"],
         f"{r['median_s']:.3f}", f"{r['min_s']:.3f} / {r['max_s']:.3f}", f"{r['images_per_s']:.2f}"]
        for r in training
    ])
    odd = [r["encoder"] for r in training if r["feature_strides"] != [4, 8, 16, 32]]
    if odd:
        lines += [
            "",
            (f"**Note: {', '.join(odd)} return features at strides other than the encoder contract's 4/8/16/32** "
            "(see the feature strides column). Their feature maps are larger than intended, which makes them much slower "
            "here, and CheXDet (det_stride=16 picks feature level 2) then runs on a finer grid than its stride assumes."),
        ]
    return lines
