"""Leave-one-source-out runs of the shipped model's recipe: train without one institution, test on it.

    python experiments/zoo/loso.py hannover      # train without Hannover (covid-chestxray + hannover-covid19)
    python experiments/zoo/loso.py nih           # train without the NIH folders
    python experiments/zoo/loso.py kermany       # train without the Guangzhou paediatric set
    python experiments/zoo/loso.py --table       # experiments/zoo/results/loso.md from the finished runs

Each run is the shipped model's recipe (``--recipe staged``: ``configs/zoo/multichex-lite-256-staged.yaml``, lungs
first, then the other heads on the frozen encoder; ``--recipe two-step``: ``multichex-lite-256.yaml`` then
``multichex-lite-256-polish.yaml``, the recipe of the first shipped weights) with that institution's sources removed
(same steps, augmentation, seed; the split drawn over the remaining sources), scored on every image of the
left-out sources (``multichex evaluate --part all``).
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
STAGED = REPO / "configs" / "zoo" / "multichex-lite-256-staged.yaml"
POLISH = REPO / "configs" / "zoo" / "multichex-lite-256-polish.yaml"
RESULTS = REPO / "experiments" / "zoo" / "results"
DATA = "../shared/data"
NON_COMMERCIAL_MASKS = {"id": "covid-nc", "name": "covid-chestxray", "root": f"{DATA}/covid-chestxray-nc", "tasks": ["cls", "gate", "seg"]}
# The staged recipe keeps a folder's lung masks and its other labels as two entries (covid-lungs / covid-chestxray).
STAGED_SWAP = {"covid-lungs": {"id": "covid-nc-lungs", "name": "covid-chestxray", "root": f"{DATA}/covid-chestxray-nc", "tasks": ["seg"]},
               "covid-chestxray": {"id": "covid-nc", "name": "covid-chestxray", "root": f"{DATA}/covid-chestxray-nc", "tasks": ["cls", "gate"]}}

RECIPES = ("staged", "two-step")
# institution → (source keys of the recipe it owns, folders to test on, labels scored there)
HELD_OUT = {
    "hannover": (["covid-chestxray", "covid-lungs", "hannover-covid19"], ["covid-chestxray", "hannover-covid19"], "cls,gate,seg"),
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


def staged_loso_config(institution: str) -> dict:
    """The staged protocol without ``institution``'s sources, in every phase (Hannover: lungs and the other
    covid-chestxray labels from the non-commercial folder), with a split drawn over the remaining sources."""
    config = yaml.safe_load(STAGED.read_text())
    removed, _, _ = HELD_OUT[institution]
    swap = STAGED_SWAP if institution == "hannover" else {}

    def keep(keys: list[str]) -> list[str]:
        return [swap[k]["id"] if k in swap else k for k in keys if k in swap or k not in removed]

    key_of = {s.get("id", s["name"]): s for s in config["sources"]}
    config["sources"] = [swap.get(k, key_of[k]) for k in key_of if k in swap or k not in removed]
    for phase in config["phases"]:
        for field in ("sources", "evaluate"):
            if field in phase:
                phase[field] = keep(phase[field])
    config.pop("split_file", None)
    config["out_dir"] = f"runs/zoo/loso-staged-{institution}"
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


def run_one(institution: str, recipe: str) -> dict:
    """Train without ``institution`` (``recipe``: "staged" or "two-step"), evaluate on all of its images, save the metrics."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = staged_loso_config(institution) if recipe == "staged" else loso_config(institution)
    out = REPO / config["out_dir"]
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "loso.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "multichex.cli"]
    train_seconds = run(cli + ["train", str(config_path), "--no-progress"], out / "train.log")
    final = out / "final.safetensors"  # the staged protocol's last phase: its weights with the thresholds
    if recipe == "two-step":  # step 1's final weights, the lung decoder polished, thresholds
        polish = loso_polish(institution, config)
        polish_path = out / "loso-polish.yaml"
        polish_path.write_text(yaml.safe_dump(polish, sort_keys=False))
        train_seconds += run(cli + ["train", str(polish_path), "--no-progress"], out / "polish.log")
        final = REPO / polish["out_dir"] / "final.safetensors"
    _, folders, tasks = HELD_OUT[institution]
    sources = [f"{name}={DATA}/{name}" for name in folders]
    run(cli + ["evaluate", *sources, "--checkpoint", str(final), "--part", "all", "--tasks", tasks,
               "--out", str(out / "held_out")], out / "evaluate.log")
    metrics = json.loads((out / "held_out" / "metrics.json").read_text())
    record = {"held_out": institution, "recipe": recipe, "trained_on": [s.get("id", s["name"]) for s in config["sources"]],
              "train_seconds": train_seconds, "metrics": metrics,
              "command": f"python experiments/zoo/loso.py {institution} --recipe {recipe}"}
    (RESULTS / result_name(institution, recipe)).write_text(json.dumps(record, indent=2))
    return record


def result_name(institution: str, recipe: str) -> str:
    """The results file of one run (the two-step recipe's files keep their first names)."""
    return f"loso-{institution}.json" if recipe == "two-step" else f"loso-{recipe}-{institution}.json"


def table() -> str:
    """Markdown rows: held-out institution, lung Dice, HD95, Pneumonia / COVID-19 / macro AUROC, gate AUROC, mAP."""
    lines = ["| recipe | left out (tested on) | trained on | lung Dice | HD95 px | macro AUROC | Pneumonia AUROC | gate AUROC | mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        for institution in HELD_OUT:
            path = RESULTS / result_name(institution, recipe)
            if path.is_file():
                lines.append(row(recipe, institution, json.loads(path.read_text())))
    return "\n".join(lines) + "\n"


def row(recipe: str, institution: str, record: dict) -> str:
    """One markdown row of :func:`table`."""
    m = record["metrics"]
    return "| " + " | ".join([
            recipe, f"{institution} ({', '.join(HELD_OUT[institution][1])})", ", ".join(record["trained_on"]),
            ci_cell(dig(m, "segmentation", "dice")), ci_cell(dig(m, "segmentation", "hd95")),
            ci_cell(dig(m, "classification", "macro_auroc")),
            ci_cell(dig(m, "classification", "auroc_intervals", "Pneumonia") or dig(m, "classification", "per_class", "Pneumonia", "auroc")),
            ci_cell(dig(m, "gate", "auroc")), ci_cell(dig(m, "detection", "map")),
        ]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("institution", nargs="?", choices=sorted(HELD_OUT))
    parser.add_argument("--recipe", choices=RECIPES, default="staged", help="Which recipe of the shipped model to rerun.")
    parser.add_argument("--table", action="store_true", help="Only write results/loso.md from finished runs.")
    args = parser.parse_args()
    if args.institution:
        run_one(args.institution, args.recipe)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loso.md").write_text(table())
    print(table())


if __name__ == "__main__":
    main()
