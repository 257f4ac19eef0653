"""The shipped split extended by every image of the non-commercial covid-chestxray-nc folder as a training image.

    python experiments/zoo/lungs-nc/nc_split.py        # writes runs/zoo/nc-lungs/split.json

For the experiment ``nc-polish.yaml`` only: it asks whether more lung masks raise the validation Dice. The folder's
SOURCE.md states that none of its patients is in covid-chestxray, so no validation or test patient of the shipped
split gains training images. Weights trained on it are never shipped (CC BY-NC).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import REPO  # noqa: E402

from multichex.data.registry import read_source

SPLIT = REPO / "experiments" / "zoo" / "multichex-lite-256" / "split.json"
NC_ROOT = "../shared/data/covid-chestxray-nc"


def main() -> None:
    split = json.loads(SPLIT.read_text())
    refs = read_source("covid-chestxray-nc", REPO / NC_ROOT)
    held_out = {image for part in ("val", "test") for image in split["parts"][part]}
    added = [f"{NC_ROOT}/images/{ref.image_path.name}" for ref in refs]
    if held_out & set(added):
        sys.exit("covid-chestxray-nc images are already in the shipped split's held-out parts")
    out = REPO / "runs" / "zoo" / "nc-lungs"
    out.mkdir(parents=True, exist_ok=True)
    extended = {**split, "parts": {**split["parts"], "train": split["parts"]["train"] + added}}
    (out / "split.json").write_text(json.dumps(extended, indent=1))
    masks = sum(ref.mask_path is not None for ref in refs)
    print(f"{out / 'split.json'}: {len(added)} covid-chestxray-nc images ({masks} with lung masks) added to train")


if __name__ == "__main__":
    main()
