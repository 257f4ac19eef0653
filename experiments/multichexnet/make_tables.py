"""Tables 1–4 of the MultiCheXNet paper, re-made from ``results/seed-*/`` (written by run.py), plus a plot.

    python experiments/multichexnet/make_tables.py     # writes tables.md and few_shot_auroc.png

Each cell: seed-0 value with its 95% patient-bootstrap CI, then mean ± SD over all seeds run.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import dig  # noqa: E402  (experiments/common.py, beside this folder)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
Getter = Callable[[dict[str, Any]], dict[str, Any] | None]


def load_seeds() -> dict[int, dict[str, Any]]:
    seeds = {}
    for folder in sorted(RESULTS.glob("seed-*")):
        runs = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
        if {"multichexnet", "tf100", "bigbang"} <= set(runs):
            seeds[int(folder.name.split("-")[1])] = runs
    return seeds


def cell(seeds: dict[int, dict[str, Any]], get: Getter) -> str:
    """'v (lo–hi) · mean ± sd (n)' from the first seed's interval and every seed's value."""
    intervals = {seed: get(runs) for seed, runs in seeds.items()}
    values = [i["value"] for i in intervals.values() if i and i.get("value") is not None]
    if not values:
        return "n/a"
    first = intervals[min(seeds)]
    text = "n/a"
    if first and first.get("value") is not None:
        text = f"{first['value']:.3f}"
        if first.get("low") is not None:
            text += f" ({first['low']:.2f}–{first['high']:.2f})"
    if len(values) > 1:
        text += f" · {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"
    return text


def phase(run: str, name: str, *path: str) -> Getter:
    return lambda runs: dig(runs.get(run, {}), name, *path)


def transfer_at(origin: str, shots: Any, metric: str) -> Getter:
    def get(runs: dict[str, Any]) -> dict[str, Any] | None:
        for row in dig(runs, f"transfer-from-{origin}", "results") or []:
            if row["shots"] == shots:
                return row[metric]
        return None
    return get


def table(title: str, header: list[str], rows: list[list[str]], note: str = "") -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def seconds_table(seeds: dict[int, dict[str, Any]]) -> str:
    names = ["multichexnet", "tf100", "bigbang", "transfer-from-mtl", "transfer-from-cls", "transfer-from-scratch"]
    rows = [[name] + [f"{dig(seeds[s], 'seconds', name) or 'n/a'}" for s in sorted(seeds)] for name in names]
    return table("Run times (wall seconds, 2 CPU cores)", ["run"] + [f"seed {s}" for s in sorted(seeds)], rows)


def build(seeds: dict[int, dict[str, Any]]) -> str:
    mcx, cls_of, det_of = "multichexnet", ("per_source", "nih-det", "classification"), ("per_source", "nih-det", "detection")
    seg_of = ("per_source", "covid-seg", "segmentation", "dice")
    t1 = table(
        "Table 1 — MTL vs individually trained heads (test patients)",
        ["experiment", "data set", "Acc", "F1", "AUROC", "Dice", "mAP@0.5", "paper (Acc / F1 / Dice / mAP)"],
        [
            ["Baseline classification (phase cls-pretrain)", "NIH sample (D_cls)",
             cell(seeds, phase(mcx, "cls-pretrain", "classification", "macro_accuracy")), cell(seeds, phase(mcx, "cls-pretrain", "classification", "macro_f1")),
             cell(seeds, phase(mcx, "cls-pretrain", "classification", "macro_auroc")), "–", "–", "0.87 / 0.31 / – / –"],
            ["Baseline segmentation (phase seg-head)", "COVID collection lungs (D_seg)", "–", "–", "–",
             cell(seeds, phase(mcx, "seg-head", "segmentation", "dice")), "–", "– / – / 0.68 / –"],
            ["Baseline detection (phase det-head)", "NIH boxes (D_det)", "–", "–", "–", "–",
             cell(seeds, phase(mcx, "det-head", "detection", "map")), "– / – / – / 0.16"],
            ["MTL w/o pre-training (BigBang)", "D_det + D_seg",
             cell(seeds, phase("bigbang", "bigbang-mtl", *cls_of, "macro_accuracy")), cell(seeds, phase("bigbang", "bigbang-mtl", *cls_of, "macro_f1")),
             cell(seeds, phase("bigbang", "bigbang-mtl", *cls_of, "macro_auroc")), cell(seeds, phase("bigbang", "bigbang-mtl", *seg_of)),
             cell(seeds, phase("bigbang", "bigbang-mtl", *det_of, "map")), "0.52 / 0.53 / 0.29 / 0.21"],
            ["MTL w/ pre-training (MultiCheXNet)", "D_det + D_seg",
             cell(seeds, phase(mcx, "mtl", *cls_of, "macro_accuracy")), cell(seeds, phase(mcx, "mtl", *cls_of, "macro_f1")),
             cell(seeds, phase(mcx, "mtl", *cls_of, "macro_auroc")), cell(seeds, phase(mcx, "mtl", *seg_of)),
             cell(seeds, phase(mcx, "mtl", *det_of, "map")), "0.73 / 0.73 / 0.75 / 0.16"],
        ],
        "Classification of the MTL rows is scored on the D_det test images (the only MTL set with finding labels), "
        "macro over the 15 classes, each at the threshold that maximised its F1 on the validation patients (classes without "
        "positives there keep 0.5); mAP on D_det's boxed test images, ungated.",
    )
    t2 = table(
        "Table 2 — teacher forcing and the positive-case gate",
        ["experiment", "Acc", "F1", "Dice", "mAP@0.5 (boxed images)", "mAP@0.5 ungated, + negatives", "mAP@0.5 gated, + negatives", "gate threshold", "paper (Acc / F1 / Dice / mAP)"],
        [
            [name,
             cell(seeds, phase(run, "mtl", *cls_of, "macro_accuracy")), cell(seeds, phase(run, "mtl", *cls_of, "macro_f1")),
             cell(seeds, phase(run, "mtl", *seg_of)), cell(seeds, phase(run, "mtl", *det_of, "map")),
             cell(seeds, phase(run, "mtl", "detection", "map")), cell(seeds, phase(run, "mtl", "detection", "map_gated")),
             cell(seeds, lambda runs, run=run: {"value": dig(runs.get(run, {}), "mtl", "gate_threshold")}), paper]
            for name, run, paper in (("MTL w/ 100% teacher forcing", "tf100", "0.77 / 0.77 / 0.78 / 0.19"),
                                     ("MTL w/ p = 0.9, gate in the loop (MultiCheXNet)", mcx, "0.73 / 0.73 / 0.75 / 0.16"))
        ],
        "'+ negatives' adds the NIH 'No Finding' test images (no boxes) to the detection test set; 'gated' removes the boxes "
        "of every image the gate rejects, so it scores what a user of the gated pipeline gets.",
    )
    origins = (("Baseline COVID (from scratch)", "scratch", "– / 0.59 / 0.72"), ("TL from the classification-only model (phase cls-pretrain)", "cls", "n/a"),
               ("MTL-TL: MultiCheXNet (CheXCls after MTL)", "mtl", "– / 0.70 / 0.80"))
    t3 = table(
        "Table 3 — transfer to COVID-19 vs other findings (all labelled training images)",
        ["model", "AUROC", "Acc", "F1", "paper (AUROC / Acc / F1)"],
        [[name, cell(seeds, transfer_at(key, "all", "auroc")), cell(seeds, transfer_at(key, "all", "accuracy")), cell(seeds, transfer_at(key, "all", "f1")), paper]
         for name, key, paper in origins],
        "Target: the COVID-19 image data collection (permissive + non-commercial folders, frontal X-rays), split by patient "
        "60/20/20 per seed (about 50 test images, of which roughly a fifth are not COVID-19, so the AUROC intervals are wide); "
        "θ_enc and θ_feats frozen for the two transfer rows, everything trained for the scratch row; accuracy and F1 at 0.5.",
    )
    shots = [5, 10, 20, "all"]
    t3b = table(
        "Table 3b — few-shot curve (AUROC; k labelled images per class)",
        ["model"] + [f"k = {k}" for k in shots],
        [[name] + [cell(seeds, transfer_at(key, k, "auroc")) for k in shots] for name, key, _ in origins],
    )
    t4 = table(
        "Table 4 — multi-label F1 on the NIH test patients (comparison to CheXNet-multilabel)",
        ["model", "macro F1", "macro AUROC", "paper F1"],
        [["CheXNet-multilabel analogue: classifier after phase cls-pretrain", cell(seeds, phase(mcx, "cls-pretrain", "classification", "macro_f1")),
          cell(seeds, phase(mcx, "cls-pretrain", "classification", "macro_auroc")), "0.31"],
         ["MultiCheXNet (CheXCls after MTL)", cell(seeds, phase(mcx, "mtl", "per_source", "nih-cls", "classification", "macro_f1")),
          cell(seeds, phase(mcx, "mtl", "per_source", "nih-cls", "classification", "macro_auroc")), "0.36"]],
    )
    return "\n".join([t1, t2, t3, t3b, t4, seconds_table(seeds)])


def plot(seeds: dict[int, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [5, 10, 20, "all"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, key in (("from scratch", "scratch"), ("from classifier pre-training", "cls"), ("from MTL (MultiCheXNet)", "mtl")):
        means, sds = [], []
        for k in shots:
            values = [v["value"] for runs in seeds.values() if (v := transfer_at(key, k, "auroc")(runs)) and v.get("value") is not None]
            means.append(statistics.mean(values) if values else float("nan"))
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        axis.errorbar(range(len(shots)), means, yerr=sds, marker="o", capsize=3, label=label)
    axis.set_xticks(range(len(shots)), [str(k) for k in shots])
    axis.set_xlabel("labelled images per class")
    axis.set_ylabel("test AUROC (COVID-19 vs other)")
    axis.set_title(f"Transfer to COVID-19, mean ± SD over {len(seeds)} seeds", fontsize=9)
    axis.axhline(0.5, color="grey", lw=0.5, ls="--")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    seeds = load_seeds()
    if not seeds:
        raise SystemExit(f"no complete results under {RESULTS}; run run.py first")
    body = build(seeds)
    (HERE / "tables.md").write_text(f"# MultiCheXNet experiments — seeds {sorted(seeds)}\n\n"
                                    "Cell format: seed-0 value (95% patient-bootstrap CI) · mean ± SD over seeds (n).\n\n" + body)
    try:
        plot(seeds, HERE / "few_shot_auroc.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[experiments]'); skipped the plot")
    print(body)


if __name__ == "__main__":
    main()
