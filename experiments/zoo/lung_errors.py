"""Where the shipped model's lung masks go wrong, on validation patients only.

    python experiments/zoo/lung_errors.py        # writes experiments/zoo/results/lung_errors.json

For the masked validation images of covid-chestxray (the run's saved split): mean Dice at thresholds 0.4, 0.5,
0.6, with and without a lung clean-up (keep the two largest connected parts, fill holes); how far each wrong
pixel lies from the reference mask's edge; and the Dice that the head's stride-4 logit grid could reach at best
(the reference mask averaged onto that grid and upsampled back). The test patients are not looked at here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO  # noqa: E402

from multichex.data.record import collate_samples
from multichex.models.pretrained import load_model
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import build_datasets

SPLIT = REPO / "experiments" / "zoo" / "multichex-lite-256" / "split.json"
BAND_PX = 3


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * (pred & target).sum() / total)


def clean_lungs(mask: np.ndarray) -> np.ndarray:
    """The two largest connected parts, holes filled."""
    labels, count = ndimage.label(mask)
    if count > 2:
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        mask = np.isin(labels, np.argsort(sizes)[::-1][:2] + 1)
    return ndimage.binary_fill_holes(mask)


def grid_ceiling(target: torch.Tensor, stride: int) -> np.ndarray:
    """The reference mask averaged onto a ``stride`` grid, upsampled bilinearly and thresholded at 0.5."""
    coarse = F.avg_pool2d(target[None, None].float(), stride)
    return (F.interpolate(coarse, size=target.shape, mode="bilinear", align_corners=False)[0, 0] >= 0.5).numpy()


def main() -> None:
    model = load_model(None).eval()
    config = TrainConfig(model=model.config, sources=[SourceConfig("covid-chestxray", "../shared/data/covid-chestxray", ["seg"])],
                         split_file=str(SPLIT))
    val = build_datasets(config, unlisted="skip")["val"]["covid-chestxray"]
    scores: dict[str, list[float]] = {}
    near = far = mask_pixels = 0
    with torch.inference_mode():
        for start in range(0, len(val), 8):
            batch = collate_samples([val[i] for i in range(start, min(start + 8, len(val)))])
            has = batch.has_mask
            if not has.any():
                continue
            probs = torch.sigmoid(model(batch.images[has], ["seg"])["seg"])[:, 0].numpy()
            for prob, target in zip(probs, batch.masks[has][:, 0]):
                reference = target.numpy() > 0.5
                for threshold in (0.4, 0.5, 0.6):
                    mask = prob >= threshold
                    scores.setdefault(f"threshold {threshold}", []).append(dice(mask, reference))
                    scores.setdefault(f"threshold {threshold}, cleaned", []).append(dice(clean_lungs(mask), reference))
                for stride in (4, 2):
                    scores.setdefault(f"reference on a stride-{stride} grid", []).append(dice(grid_ceiling(target, stride), reference))
                wrong = (prob >= 0.5) != reference
                to_edge = np.minimum(ndimage.distance_transform_edt(reference), ndimage.distance_transform_edt(~reference))
                near += int((wrong & (to_edge <= BAND_PX)).sum())
                far += int((wrong & (to_edge > BAND_PX)).sum())
                mask_pixels += int(reference.sum())
    plain = scores["threshold 0.5"]
    result = {
        "part": "validation patients of covid-chestxray", "images": len(plain),
        "mean_dice": {name: round(float(np.mean(values)), 4) for name, values in scores.items()},
        "per_image_dice_at_0.5": [round(v, 3) for v in plain],
        "wrong_pixels_within_3px_of_the_reference_edge": near, "wrong_pixels_farther": far, "reference_mask_pixels": mask_pixels,
        "command": "python experiments/zoo/lung_errors.py",
    }
    (REPO / "experiments" / "zoo" / "results" / "lung_errors.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
