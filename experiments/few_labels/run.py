"""Learning from few labels on ../shared/data: MultiMix label budgets, APPAU-Net losses, cross-data-set negatives.

    python experiments/few_labels/run.py --seeds 0 1 2 [--only budgets|losses|cross]
    python experiments/few_labels/make_tables.py          # tables.md + plots from results/

Every run is a YAML config written to runs/experiments/few_labels/seed-N/<run>/config.yaml and trained with
``multichex train`` (patient-wise 70/15/15 split of all its sources, test metrics with patient-bootstrap CIs in
metrics.json); cross-domain scores come from ``multichex evaluate --part all`` on a source the run never saw.
Metrics, the config and the wall time of each run are copied to results/seed-N/<run>/.

Data (128 px):
* classification — Kermany pediatric pneumonia (NORMAL / PNEUMONIA, 763 images, 562 patients);
  cross-domain: NIH ChestX-ray14 images with boxes, Pneumonia vs the other findings (665 adults);
* segmentation — lung masks of the non-commercial part of the COVID-19 image collection (97 masks, experiments
  only); cross-domain: the masks of its permissively licensed part (90, other publications).
* cross-data-set negatives — Kermany (pneumonia) and the COVID-19 collection's non-commercial part (COVID-19 vs other).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run  # noqa: E402  (experiments/common.py, beside this folder)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
SIZE = 128
CLS_SOURCE = {"name": "kermany-pediatric", "root": str(DATA / "kermany-pediatric"), "tasks": ["cls"], "classes": ["Pneumonia"]}
SEG_SOURCE = {"name": "covid-chestxray-nc", "root": str(DATA / "covid-chestxray-nc"), "tasks": ["seg"]}
CLS_CROSS = f"nih-cxr14-bbox={DATA / 'nih-cxr14-bbox'}"
SEG_CROSS = f"covid-chestxray={DATA / 'covid-chestxray'}"
STEPS = 50  # per epoch and task: single-task runs take EPOCHS × STEPS steps, two-task runs twice as many
EPOCHS = 6

# Label budgets in the layout of MultiMix Table 2 (labelled classification images, labelled masks).
BUDGETS = {"small": (50, 10), "medium": (200, 50), "all": (None, None)}
MULTIMIX = {"threshold": 0.7, "weight": 0.25, "consistency_weight": 0.01, "sources": ["kermany-pediatric"]}


def base(seed: int, out: Path, classes: list[str], sources: list[dict], trainable: list[str], **extra) -> dict:
    """A run config: lite encoder at 128 px, AdamW, cosine schedule, patient-wise split, seed."""
    config = {
        "model": {"encoder": "lite", "image_size": SIZE, "class_names": classes, "box_classes": ["Pneumonia"],
                  "gate": {"gated_heads": []}, **extra.pop("model", {})},
        "sources": sources, "seed": seed, "out_dir": str(out), "split": {"train": 0.7, "val": 0.15, "test": 0.15},
        "epochs": EPOCHS, "steps_per_epoch": STEPS, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20,
        "trainable": trainable, "schedule": "single" if len(sources) == 1 else "alternating",
    }
    config.update(extra)
    return config


def budget_runs(seed: int, out: Path) -> dict[str, tuple[dict, list[tuple[str, str]]]]:
    """Encoder-only, U-Net, U-MTL, +SSL, MultiMix (+ saliency bridge) at three label budgets."""
    runs = {}
    for level, (n_cls, n_seg) in BUDGETS.items():
        cls = dict(CLS_SOURCE, label_budget={"cls": n_cls} if n_cls else {})
        seg = dict(SEG_SOURCE, label_budget={"seg": n_seg} if n_seg else {})
        two = {"steps_per_epoch": 2 * STEPS}
        cross = [("cls", CLS_CROSS), ("seg", SEG_CROSS)]
        runs[f"enc-{level}"] = (base(seed, out / f"enc-{level}", ["Pneumonia"], [cls], ["encoder", "cls"]), cross[:1])
        runs[f"unet-{level}"] = (base(seed, out / f"unet-{level}", ["Pneumonia"], [seg], ["encoder", "seg"]), cross[1:])
        runs[f"umtl-{level}"] = (base(seed, out / f"umtl-{level}", ["Pneumonia"], [cls, seg], ["encoder", "cls", "seg"], **two), cross)
        runs[f"ssl-{level}"] = (base(seed, out / f"ssl-{level}", ["Pneumonia"], [cls, seg], ["encoder", "cls", "seg"],
                                     semi_supervised=MULTIMIX, **two), cross)
        runs[f"multimix-{level}"] = (base(seed, out / f"multimix-{level}", ["Pneumonia"], [cls, seg], ["encoder", "cls", "seg"],
                                          semi_supervised=MULTIMIX, model={"saliency_bridge": True}, **two), cross)
    return runs


def loss_runs(seed: int, out: Path) -> dict[str, tuple[dict, list[tuple[str, str]]]]:
    """APPAU-Net (pyramid input, attention gates, deep supervision, discriminator) with TV, XETV and KLTV,
    10 labelled masks and the other training images unlabelled (as the paper's semi-supervised setting)."""
    runs = {}
    seg = dict(SEG_SOURCE, tasks=["seg", "cls"], classes=["COVID-19"], label_budget={"seg": 10})
    model = {"pyramid_input": True, "seg_attention": True, "seg_deep_supervision": True, "discriminator_classes": ["COVID-19"]}
    for name, loss in {"tv": {"name": "tversky"}, "xetv": {"name": "xe_tversky"}, "kltv": {"name": "kl_tversky"}}.items():
        runs[f"appau-{name}"] = (base(seed, out / f"appau-{name}", ["COVID-19"], [seg], ["encoder", "seg"], model=model,
                                      seg_loss=loss, seg_side_weights=[0.25, 0.5, 1.0], adversarial={"weight": 0.01}),
                                 [("seg", SEG_CROSS)])
    return runs


def cross_runs(seed: int, out: Path) -> dict[str, tuple[dict, list[tuple[str, str]]]]:
    """Pneumonia + TB study layout: single-task models, one softmax model with a "nothing" class, and the
    two-head model with and without cross-data-set negatives (Kermany images are COVID-19 negatives)."""
    pneu = dict(CLS_SOURCE)
    covid = {"name": "covid-chestxray-nc", "root": str(DATA / "covid-chestxray-nc"), "tasks": ["cls"], "classes": ["COVID-19"]}
    two = {"steps_per_epoch": 2 * STEPS}
    nothing = "No Finding"
    return {
        "single-pneumonia": (base(seed, out / "single-pneumonia", ["Pneumonia"], [pneu], ["encoder", "cls"]), []),
        "single-covid": (base(seed, out / "single-covid", ["COVID-19"], [covid], ["encoder", "cls"]), []),
        "multiclass": (base(seed, out / "multiclass", ["Pneumonia", "COVID-19", nothing],
                            [dict(pneu, none_class=nothing), dict(covid, none_class=nothing)], ["encoder", "cls"],
                            model={"cls_activation": "softmax"}, **two), []),
        "multitask": (base(seed, out / "multitask", ["Pneumonia", "COVID-19"], [pneu, covid], ["encoder", "cls"], **two), []),
        "multitask-negatives": (base(seed, out / "multitask-negatives", ["Pneumonia", "COVID-19"],
                                     [dict(pneu, negative_for=["COVID-19"]), covid], ["encoder", "cls"], **two), []),
    }


FAMILIES = {"budgets": budget_runs, "losses": loss_runs, "cross": cross_runs}


def run_one(name: str, config: dict, cross: list[tuple[str, str]], keep: Path) -> None:
    out = Path(config["out_dir"])
    target = keep / name
    if (target / "metrics.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "multichex.cli"]
    seconds = {"train": run([*cli, "train", str(path), "--no-progress"], out / "train.log")}
    for task, source in cross:
        folder = out / f"cross-{task}"
        seconds[f"cross_{task}"] = run([*cli, "evaluate", source, "--checkpoint", str(out / "best.safetensors"), "--part", "all",
                                        "--tasks", task, "--out", str(folder), "--seed", str(config["seed"])], out / f"cross-{task}.log")
        shutil.copyfile(folder / "metrics.json", target / f"cross_{task}.json")
    shutil.copyfile(path, target / "config.yaml")
    shutil.copyfile(out / "log.csv", target / "log.csv")
    (target / "seconds.json").write_text(json.dumps(seconds, indent=2))
    shutil.copyfile(out / "metrics.json", target / "metrics.json")  # last: marks the run as done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=sorted(FAMILIES), nargs="+", default=["budgets", "losses", "cross"])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "experiments" / "few_labels")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--filter", default="", help="Only runs whose name contains this text.")
    args = parser.parse_args(argv)
    for seed in args.seeds:
        for family in args.only:
            for name, (config, cross) in FAMILIES[family](seed, args.runs / f"seed-{seed}").items():
                if args.filter in name:
                    run_one(name, config, cross, args.results / f"seed-{seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
