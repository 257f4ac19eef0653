"""Does horizontal-flip test-time augmentation help the shipped model's lung masks? Measured on validation patients.

    python experiments/zoo/tta.py        # writes experiments/zoo/results/tta.json

The masks of the validation patients of covid-chestxray (the run's saved split) are predicted as shipped and
as the mean of the image's and its mirror image's mask probabilities (mirrored back), then thresholded at 0.5.
Only the segmentation head is averaged: findings such as cardiomegaly depend on laterality. The test patients
are not looked at here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO  # noqa: E402

from multichex.data.record import collate_samples
from multichex.models.pretrained import load_model
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import build_datasets

SPLIT = REPO / "experiments" / "zoo" / "multichex-lite-256" / "split.json"


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * (pred * target).sum() / total)


def main() -> None:
    model = load_model(None).eval()
    config = TrainConfig(model=model.config, sources=[SourceConfig("covid-chestxray", "../shared/data/covid-chestxray", ["seg"])],
                         split_file=str(SPLIT))
    val = build_datasets(config, unlisted="skip")["val"]["covid-chestxray"]
    plain, flipped = [], []
    with torch.inference_mode():
        for start in range(0, len(val), 8):
            batch = collate_samples([val[i] for i in range(start, min(start + 8, len(val)))])
            has = batch.has_mask
            images, masks = batch.images[has], batch.masks[has]
            if not len(images):
                continue
            probs = torch.sigmoid(model(images, ["seg"])["seg"])
            mirrored = torch.sigmoid(model(images.flip(-1), ["seg"])["seg"]).flip(-1)
            for p, m, t in zip(probs, (probs + mirrored) / 2, masks):
                plain.append(dice((p >= 0.5).float(), t))
                flipped.append(dice((m >= 0.5).float(), t))
    result = {"images": len(plain), "dice_plain": float(np.mean(plain)), "dice_hflip_tta": float(np.mean(flipped)),
              "images_improved": int(sum(f > p for f, p in zip(flipped, plain))), "part": "validation patients of covid-chestxray",
              "command": "python experiments/zoo/tta.py"}
    (REPO / "experiments" / "zoo" / "results" / "tta.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
