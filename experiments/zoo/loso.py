"""Leave-one-source-out runs of the shipped model's recipe: train without one institution, test on it.

    python experiments/zoo/loso.py hannover      # train without Hannover (covid-chestxray + hannover-covid19)
    python experiments/zoo/loso.py nih           # train without the NIH folders
    python experiments/zoo/loso.py kermany       # train without the Guangzhou paediatric set
    python experiments/zoo/loso.py --table       # experiments/zoo/results/loso.md from the finished runs

Each run is the shipped model's two-step recipe (``configs/zoo/multichex-lite-256.yaml``, then
``multichex-lite-256-polish.yaml``) with that institution's sources removed (same steps, augmentation, seed),
scored on every image of the left-out sources (``multichex evaluate --part all``).
The Hannover images hold the only permissively licensed lung masks, so the run that leaves them out
learns lungs from covid-chestxray-nc's masks instead (Radiopaedia, Eurorad and journal cases, CC BY-NC:
experiments only — such a model is never shipped). The opposite direction, lungs learnt on Hannover and
tested on covid-chestxray-nc, is the shipped model itself (``experiments/zoo/evaluate_shipped.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, ci_cell, dig, run  # noqa: E402

RECIPE = REPO / "configs" / "zoo" / "multichex-lite-256.yaml"
POLISH = REPO / "configs" / "zoo" / "multichex-lite-256-polish.yaml"
RESULTS = REPO / "experiments" / "zoo" / "results"
DATA = "../shared/data"
NON_COMMERCIAL_MASKS = {"id": "covid-nc", "name": "covid-chestxray", "root": f"{DATA}/covid-chestxray-nc", "tasks": ["cls", "gate", "seg"]}

# institution → (source keys of the recipe it owns, folders to test on, labels scored there)
HELD_OUT = {
    "hannover": (["covid-chestxray", "hannover-covid19"], ["covid-chestxray", "hannover-covid19"], "cls,gate,seg"),
    "nih": (["nih-det", "nih-det-lowres", "nih-cxr14-sample"], ["nih-cxr14-bbox", "nih-cxr14-sample"], "cls,gate,det"),
    "kermany": (["kermany-pediatric"], ["kermany-pediatric"], "cls,gate"),
}


def loso_config(institution: str) -> dict:
    """The recipe without ``institution``'s sources (Hannover: lungs from the non-commercial masks)."""
    config = yaml.safe_load(RECIPE.read_text())
    removed, _, _ = HELD_OUT[institution]
    config["sources"] = [s for s in config["sources"] if s.get("id", s["name"]) not in removed]
    if institution == "hannover":
        config["sources"].insert(0, NON_COMMERCIAL_MASKS)
    config["out_dir"] = f"runs/zoo/loso-{institution}"
    return config


def loso_polish(institution: str, config: dict) -> dict:
    """Step 2 of the recipe for the same run: its lung decoder from its final weights, then thresholds."""
    polish = yaml.safe_load(POLISH.read_text())
    keys = [s.get("id", s["name"]) for s in config["sources"]]
    polish["sources"] = config["sources"]
    polish["out_dir"] = f"{config['out_dir']}-polish"
    seg_sources = [k for k, s in zip(keys, config["sources"]) if "seg" in s.get("tasks", [])]
    polish["phases"][0].update(sources=seg_sources, init=f"{config['out_dir']}/last.safetensors", evaluate=seg_sources)
    polish["phases"][1]["sources"] = keys
    return polish


def run_one(institution: str) -> dict:
    """Train without ``institution``, evaluate on all of its images, save the metrics."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = loso_config(institution)
    out = REPO / config["out_dir"]
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "loso.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "multichex.cli"]
    train_seconds = run(cli + ["train", str(config_path), "--no-progress"], out / "train.log")
    polish = loso_polish(institution, config)
    polish_path = out / "loso-polish.yaml"
    polish_path.write_text(yaml.safe_dump(polish, sort_keys=False))
    train_seconds += run(cli + ["train", str(polish_path), "--no-progress"], out / "polish.log")
    _, folders, tasks = HELD_OUT[institution]
    sources = [f"{name}={DATA}/{name}" for name in folders]
    # Both steps of the shipped model's recipe: step 1's final weights, the lung decoder polished, thresholds.
    final = REPO / polish["out_dir"] / "final.safetensors"
    run(cli + ["evaluate", *sources, "--checkpoint", str(final), "--part", "all", "--tasks", tasks,
               "--out", str(out / "held_out")], out / "evaluate.log")
    metrics = json.loads((out / "held_out" / "metrics.json").read_text())
    record = {"held_out": institution, "trained_on": [s.get("id", s["name"]) for s in config["sources"]],
              "train_seconds": train_seconds, "metrics": metrics, "command": f"python experiments/zoo/loso.py {institution}"}
    (RESULTS / f"loso-{institution}.json").write_text(json.dumps(record, indent=2))
    return record


def table() -> str:
    """Markdown rows: held-out institution, lung Dice, HD95, Pneumonia / COVID-19 / macro AUROC, gate AUROC, mAP."""
    lines = ["| left out (tested on) | trained on | lung Dice | HD95 px | macro AUROC | Pneumonia AUROC | gate AUROC | mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for institution in HELD_OUT:
        path = RESULTS / f"loso-{institution}.json"
        if not path.is_file():
            lines.append(f"| {institution} | not run yet | | | | | | |")
            continue
        record = json.loads(path.read_text())
        m = record["metrics"]
        lines.append("| " + " | ".join([
            f"{institution} ({', '.join(HELD_OUT[institution][1])})", ", ".join(record["trained_on"]),
            ci_cell(dig(m, "segmentation", "dice")), ci_cell(dig(m, "segmentation", "hd95")),
            ci_cell(dig(m, "classification", "macro_auroc")),
            ci_cell(dig(m, "classification", "auroc_intervals", "Pneumonia") or dig(m, "classification", "per_class", "Pneumonia", "auroc")),
            ci_cell(dig(m, "gate", "auroc")), ci_cell(dig(m, "detection", "map")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("institution", nargs="?", choices=sorted(HELD_OUT))
    parser.add_argument("--table", action="store_true", help="Only write results/loso.md from finished runs.")
    args = parser.parse_args()
    if args.institution:
        run_one(args.institution)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loso.md").write_text(table())
    print(table())


if __name__ == "__main__":
    main()
