"""Candidate weights for a shipped model side by side on the *validation* patients of its saved split.

    python experiments/zoo/compare_candidates.py multichex-lite-256 runs/zoo/multichex-lite-256-staged/final.safetensors

Per candidate (a registered name or a checkpoint path): lung Dice and HD95 on covid-chestxray's masked validation
images, macro AUROC and gate AUROC pooled over every permissive folder's validation patients, mAP@0.5 on the
NIH validation boxes. Test patients are not looked at. Writes experiments/zoo/results/candidates_val.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_shipped import REPO, RESULTS, SOURCES, evaluate  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
from common import dig  # noqa: E402


def main() -> None:
    candidates = sys.argv[1:]
    if not candidates:
        sys.exit(__doc__)
    rows = {}
    for index, checkpoint in enumerate(candidates):
        work = REPO / "runs" / "zoo" / "candidates" / f"{index}-{Path(checkpoint).stem}"
        metrics = evaluate(list(SOURCES), "cls,gate,seg,det", "val", work, checkpoint=checkpoint)
        rows[checkpoint] = {
            "lung_dice": dig(metrics, "segmentation", "dice"), "lung_hd95": dig(metrics, "segmentation", "hd95"),
            "macro_auroc": dig(metrics, "classification", "macro_auroc"), "gate_auroc": dig(metrics, "gate", "auroc"),
            "map50": dig(metrics, "detection", "map"),
            "per_class_auroc": {k: v.get("auroc") for k, v in (dig(metrics, "classification", "per_class") or {}).items()},
            "seconds": metrics["seconds"],
        }
    record = {"part": "validation patients (experiments/zoo/multichex-lite-256/split.json)", "candidates": rows,
              "command": "python experiments/zoo/compare_candidates.py " + " ".join(candidates)}
    (RESULTS / "candidates_val.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
