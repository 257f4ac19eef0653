"""Paired comparison at the smallest label budget: per-image Dice of MultiMix minus the U-Net's, on the same images.

    python experiments/few_labels/paired_dice.py      # after run.py; writes paired.json (read by make_tables.py)

For each seed: the test images both runs held out (their patient-wise splits of the mask source) and, cross-domain,
every mask of the permissively licensed COVID-19-collection folder; 95% CI of the mean difference from a patient
bootstrap (resampling patients, 2,000 times).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from multichex.evaluation.bootstrap import bootstrap_ci
from multichex.evaluation.evaluate import collect
from multichex.training.checkpoint import load_model
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import load_refs, make_datasets

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "runs" / "experiments" / "few_labels"
DATA = (REPO / ".." / "shared" / "data").resolve()
PAIR = ("unet-small", "multimix-small")


def per_image_dice(run: Path, refs: list) -> dict[str, tuple[float, str]]:
    """image path → (Dice, patient) of the run's best checkpoint."""
    model, _ = load_model(run / "best.safetensors")
    config = TrainConfig(model=model.config, sources=[])
    datasets = make_datasets(config, {"masks": refs}, train=False)
    out = collect(model, datasets)
    paths = [str(r.image_path) for r in refs if r.mask_path is not None]
    return {path: (dice, patient) for path, dice, patient in zip(paths, out.dice, out.dice_patients)}


def compare(seed: int, test: str, refs: list) -> dict:
    first, second = (per_image_dice(RUNS / f"seed-{seed}" / name, refs) for name in PAIR)
    shared = sorted(set(first) & set(second))
    differences = np.array([second[p][0] - first[p][0] for p in shared])
    interval = bootstrap_ci(differences, [first[p][1] for p in shared], n_resamples=2000, seed=seed)
    return {"seed": seed, "test": test, "n_images": len(shared), **{k: float(interval[k]) for k in ("value", "low", "high")}}


def held_out(seed: int, name: str) -> set[str]:
    split = json.loads((RUNS / f"seed-{seed}" / name / "split.json").read_text())["parts"]
    return set(split.get("test", []))


def main() -> int:
    rows = []
    nc = load_refs(SourceConfig("covid-chestxray-nc", str(DATA / "covid-chestxray-nc"), ["seg"]))
    cross = load_refs(SourceConfig("covid-chestxray", str(DATA / "covid-chestxray"), ["seg"]))
    for folder in sorted(RUNS.glob("seed-*")):
        seed = int(folder.name.split("-")[1])
        if not all((folder / name / "best.safetensors").exists() for name in PAIR):
            continue
        test = held_out(seed, PAIR[0]) & held_out(seed, PAIR[1])
        rows.append(compare(seed, "in-domain", [r for r in nc if str(r.image_path) in test and r.mask_path is not None]))
        rows.append(compare(seed, "cross-domain", [r for r in cross if r.mask_path is not None]))
        print(rows[-2], rows[-1], flush=True)
    (HERE / "paired.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
