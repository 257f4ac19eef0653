"""Pseudo lung masks for the training patients' unmasked adult X-rays (self-training, an experiment).

    python experiments/zoo/lungs/pseudo_lungs.py                 # writes runs/zoo/pseudo-lungs/
    multichex train experiments/zoo/lungs/pseudo-polish.yaml     # then polishes the lung decoder with them

The shipped model (the teacher) segments every *training-part* image (the shipped split) of hannover-covid19,
nih-cxr14-bbox (512 px) and the unmasked covid-chestxray images; validation and test patients are never
touched. Each mask is cleaned (two largest parts, holes filled) and kept only when it looks like a pair of
lungs (two parts of comparable size, 12–60 % of the image) and the teacher is sure of it (few pixels with a
probability between 0.1 and 0.9, relative to the mask's area); the surest ``--keep`` fraction is written in the
covid-chestxray layout (labels.csv, images/ as links, masks/ as 0/255 PNG in the original image's pixels),
with the shipped split extended by these images as training images (``split.json``). Only permissively
licensed folders are used, so weights trained on them stay redistributable.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO  # noqa: E402
from lung_errors import clean_lungs  # noqa: E402  (two largest parts, holes filled)

from multichex.inference.predictor import prepare_image
from multichex.models.pretrained import load_model

SPLIT = REPO / "experiments" / "zoo" / "multichex-lite-256" / "split.json"
DATA = REPO.parent / "shared" / "data"
FOLDERS = ("hannover-covid19", "nih-cxr14-bbox", "covid-chestxray")


def masked_images() -> set[str]:
    """covid-chestxray images that already have a reference mask (they need no pseudo mask)."""
    with (DATA / "covid-chestxray" / "labels.csv").open(newline="") as handle:
        return {row["image"] for row in csv.DictReader(handle) if (row.get("has_lung_mask") or "0").strip() == "1"}


def hannover_patients() -> dict[str, str]:
    """hannover-covid19 image → its patient id (so the pseudo copies keep the patient grouping)."""
    with (DATA / "hannover-covid19" / "labels.csv").open(newline="") as handle:
        return {row["image"]: row["patient_id"] for row in csv.DictReader(handle)}


def candidates(train: list[str], have_mask: set[str]) -> list[tuple[str, Path]]:
    """(folder, image path) of every training-part image of the chosen folders without a reference mask
    (``have_mask``: the covid-chestxray image names that have one)."""
    chosen = []
    for entry in train:
        path = (REPO / entry).resolve()
        folder = path.parent.parent.name
        if folder in FOLDERS and not (folder == "covid-chestxray" and path.name in have_mask):
            chosen.append((folder, path))
    return sorted(set(chosen))  # the NIH box images are listed twice (full and 64-px copies)


def judge(prob: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The cleaned mask and its uncertainty (pixels with 0.1 < p < 0.9 per mask pixel), None when it is no lung pair."""
    mask = clean_lungs(prob >= 0.5)
    labels, count = ndimage.label(mask)
    sizes = sorted((int(size) for size in ndimage.sum(mask, labels, range(1, count + 1))), reverse=True)
    area = mask.mean()
    if len(sizes) < 2 or sizes[1] < 0.4 * sizes[0] or not 0.12 <= area <= 0.60:
        return mask, None
    unsure = ((prob > 0.1) & (prob < 0.9)).sum()
    return mask, float(unsure / max(mask.sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "zoo" / "pseudo-lungs")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of the plausible masks kept, surest first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    split = json.loads(SPLIT.read_text())
    model = load_model(None).eval()
    patients = hannover_patients()
    judged = []
    with torch.inference_mode():
        for folder, path in candidates(split["parts"]["train"], masked_images()):
            item = prepare_image(path, model.config.image_size)
            logits = model(item.tensor[None], ["seg"])["seg"]
            prob = item.letterbox.invert_map(torch.sigmoid(logits)[0])[0].numpy()
            mask, unsure = judge(prob)
            judged.append((folder, path, mask, unsure))
    plausible = sorted((j for j in judged if j[3] is not None), key=lambda j: j[3])
    kept = plausible[: round(args.keep * len(plausible))]
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    rows, added = [], []
    for folder, path, mask, unsure in kept:
        name = f"{folder}__{path.name}"
        link = args.out / "images" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(path, link)
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / "masks" / name)
        patient = patients.get(path.name, "") if folder == "hannover-covid19" else ""
        rows.append({"image": name, "patientid": f"{folder}:{path.stem}", "hannover_patient_id": patient, "has_lung_mask": "1",
                     "unsure_per_mask_pixel": f"{unsure:.4f}"})
        added.append(str(link))
    with (args.out / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    extended = {**split, "parts": {**split["parts"], "train": split["parts"]["train"] + added}}
    (args.out / "split.json").write_text(json.dumps(extended, indent=1))
    by_folder = {f: [sum(1 for j in judged if j[0] == f), sum(1 for j in plausible if j[0] == f), sum(1 for j in kept if j[0] == f)]
                 for f in FOLDERS}
    summary = {"teacher": "multichex-lite-256", "candidates_plausible_kept_by_folder": by_folder,
               "unsure_per_mask_pixel_of_the_last_kept": round(kept[-1][3], 4) if kept else None,
               "command": "python experiments/zoo/lungs/pseudo_lungs.py"}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
