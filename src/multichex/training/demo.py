"""The demo run: train a small model on the bundled sample, overlay a few held-out images, write a report."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from multichex.training.config import TrainConfig, load_config
from multichex.training.run import run_training

# Held-out images overlaid in the report: so many of each bundled data set (matched in the image path).
OVERLAY_PICKS = (("covid", 2), ("nih", 2), ("kermany", 1))


def demo_config(out: str | Path, seed: int = 0, minutes: float | None = 3.0, image_size: int | None = None,
                epochs: int | None = None, steps_per_epoch: int | None = None) -> TrainConfig:
    """The packaged ``demo.yaml`` with the command line's overrides."""
    overrides: dict[str, Any] = {"out_dir": str(out), "seed": seed, "max_minutes": minutes}
    if epochs is not None:
        overrides["epochs"] = epochs
    if steps_per_epoch is not None:
        overrides["steps_per_epoch"] = steps_per_epoch
    config = load_config(Path(str(resources.files("multichex") / "configs" / "demo.yaml")), overrides)
    if image_size is not None:
        config.model = replace(config.model, image_size=image_size)  # re-validates the model config
    return config


def run_demo(config: TrainConfig, progress: bool = True, started: float | None = None) -> tuple[Path, dict[str, Any], list[Path]]:
    """Train and evaluate (:func:`run_training`), predict a few held-out test images into ``OUT/overlays``,
    then write ``metrics.json`` (with ``seconds_total`` since ``started``, a ``time.monotonic()`` value)
    and ``report.md``. Returns the best checkpoint, the metrics and the overlay images."""
    from multichex.evaluation.report import write_markdown_report
    from multichex.inference.predictor import Predictor, predict_files

    started = time.monotonic() if started is None else started
    out = Path(config.out_dir)
    best, metrics = run_training(config, progress=progress)
    test_images = json.loads((out / "split.json").read_text())["parts"].get("test", [])
    picks = [path for key, count in OVERLAY_PICKS for path in [p for p in test_images if key in p][:count]]
    predictor = Predictor.from_checkpoint(best)
    records, _ = predict_files(predictor, picks, out / "overlays", progress=False)
    overlays = [out / "overlays" / r["overlay"] for r in records]
    metrics["seconds_total"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown_report(out / "report.md", metrics, overlays, "multichex demo", config.to_dict())
    return best, metrics, overlays
