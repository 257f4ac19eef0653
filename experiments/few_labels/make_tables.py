"""Tables and plots for the few-label experiments, from ``results/seed-*/<run>/`` (written by run.py).

    python experiments/few_labels/make_tables.py      # writes tables.md and dice_vs_budget.png

Cells are mean ± SD over the seeds run (n in the header); where a 95% patient-bootstrap CI is shown it is
the one of each seed's own test set. ``paired.json`` (from paired_dice.py) adds the paired comparison of
MultiMix and the U-Net at the smallest budget.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import dig  # noqa: E402  (experiments/common.py, beside this folder)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LEVELS = {"small": ("50", "10"), "medium": ("200", "50"), "all": ("all", "all")}
MODELS = [("enc", "Encoder only"), ("unet", "U-Net"), ("umtl", "U-MTL"), ("ssl", "U-MTL + SSL"), ("multimix", "MultiMix (+ saliency bridge)")]


def load() -> dict[int, dict[str, dict[str, Any]]]:
    """seed → run → {"metrics", "cross_cls", "cross_seg", "seconds"} for finished runs."""
    seeds: dict[int, dict[str, dict[str, Any]]] = {}
    for folder in sorted(RESULTS.glob("seed-*")):
        runs = {}
        for run in sorted(p for p in folder.iterdir() if (p / "metrics.json").exists()):
            runs[run.name] = {path.stem: json.loads(path.read_text()) for path in run.glob("*.json")}
        seeds[int(folder.name.split("-")[1])] = runs
    return seeds


def values(seeds: dict, run: str, *path: str) -> list[float]:
    found = [dig(runs.get(run), *path) for runs in seeds.values()]
    found = [v["value"] if isinstance(v, dict) else v for v in found]
    return [float(v) for v in found if v is not None]


def fmt(numbers: list[float], digits: int = 3) -> str:
    if not numbers:
        return "–"
    if len(numbers) == 1:
        return f"{numbers[0]:.{digits}f}"
    return f"{statistics.mean(numbers):.{digits}f} ± {statistics.stdev(numbers):.{digits}f}"


CLS_COLUMNS = [("Acc", ("classification", "macro_accuracy")), ("F1-N", ("classification", "macro_f1_negative")),
               ("F1-P", ("classification", "macro_f1")), ("AUROC", ("classification", "macro_auroc"))]
SEG_COLUMNS = [("Dice", ("segmentation", "dice")), ("Jaccard", ("segmentation", "jaccard")),
               ("avg HD (px)", ("segmentation", "avg_hausdorff")), ("SSIM", ("segmentation", "ssim"))]


def budget_table(seeds: dict) -> list[str]:
    n = len(seeds)
    header = ["Model", "labelled cls", "labelled masks"]
    header += [f"in-domain {c}" for c, _ in CLS_COLUMNS + SEG_COLUMNS] + [f"cross-domain {c}" for c, _ in CLS_COLUMNS + SEG_COLUMNS]
    lines = [f"### Label budgets (MultiMix Table 2 layout; mean ± SD over {n} seeds)", "",
             "In-domain: Kermany test patients (classification, Pneumonia vs normal) and the non-commercial COVID-19-collection "
             "test patients (lung masks). Cross-domain: NIH ChestX-ray14 images with boxes (Pneumonia vs other findings) and "
             "the permissively licensed COVID-19-collection masks. avg HD = symmetric average surface distance in 128-px pixels.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in MODELS:
        for level, (n_cls, n_seg) in LEVELS.items():
            run = f"{key}-{level}"
            if not any(run in runs for runs in seeds.values()):
                continue
            row = [label, n_cls if key != "unet" else "–", n_seg if key != "enc" else "–"]
            row += [fmt(values(seeds, run, "metrics", *path)) if key != "unet" else "–" for _, path in CLS_COLUMNS]
            row += [fmt(values(seeds, run, "metrics", *path), 2 if "HD" in name else 3) if key != "enc" else "–" for name, path in SEG_COLUMNS]
            row += [fmt(values(seeds, run, "cross_cls", *path)) if key != "unet" else "–" for _, path in CLS_COLUMNS]
            row += [fmt(values(seeds, run, "cross_seg", *path), 2 if "HD" in name else 3) if key != "enc" else "–" for name, path in SEG_COLUMNS]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def smallest_budget(seeds: dict) -> list[str]:
    lines = ["### Smallest budget: MultiMix vs the supervised U-Net (10 labelled masks)", "",
             "| seed | U-Net Dice [95% CI] | MultiMix Dice [95% CI] | U-Net cross-domain Dice | MultiMix cross-domain Dice |", "|---|---|---|---|---|"]
    for seed, runs in seeds.items():
        cells = []
        for source in ("metrics", "cross_seg"):
            for run in ("unet-small", "multimix-small"):
                dice = dig(runs.get(run), source, "segmentation", "dice")
                cells.append(f"{dice['value']:.3f} [{dice['low']:.3f}, {dice['high']:.3f}]" if dice else "–")
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    paired = HERE / "paired.json"
    if paired.exists():
        lines += ["", "Paired patient bootstrap of the per-image Dice difference (MultiMix − U-Net), same test images:", "",
                  "| seed | test set | mean difference [95% CI] | images |", "|---|---|---|---|"]
        for row in json.loads(paired.read_text()):
            lines.append(f"| {row['seed']} | {row['test']} | {row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] | {row['n_images']} |")
    return lines


def loss_table(seeds: dict) -> list[str]:
    n = len(seeds)
    lines = [f"### APPAU-Net segmentation losses (10 labelled masks, the rest unlabelled; mean ± SD over {n} seeds)", "",
             "| Loss | " + " | ".join(f"in-domain {c}" for c, _ in SEG_COLUMNS) + " | " + " | ".join(f"cross-domain {c}" for c, _ in SEG_COLUMNS) + " |",
             "|" + "---|" * (1 + 2 * len(SEG_COLUMNS))]
    for key, label in (("tv", "TV (Tversky)"), ("xetv", "XETV (cross-entropy + Tversky)"), ("kltv", "KLTV (|KL| + Tversky)")):
        run = f"appau-{key}"
        row = [label] + [fmt(values(seeds, run, "metrics", *p), 2 if "HD" in c else 3) for c, p in SEG_COLUMNS]
        row += [fmt(values(seeds, run, "cross_seg", *p), 2 if "HD" in c else 3) for c, p in SEG_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def cross_table(seeds: dict) -> list[str]:
    n = len(seeds)
    rows = [("single-pneumonia", "single-task (Pneumonia)"), ("single-covid", "single-task (COVID-19)"),
            ("multiclass", "one multi-class model (k + 1 = 3 classes)"), ("multitask", "multi-task, own labels only"),
            ("multitask-negatives", "multi-task + cross-data-set negatives")]
    lines = [f"### Cross-data-set negatives (pneumonia + TB study layout; mean ± SD over {n} seeds)", "",
             "Each disease is scored on its own data set's test patients only (Kermany for Pneumonia, the COVID-19 collection for "
             "COVID-19). Precision and recall at 0.5.", "",
             "| Model | Pneumonia precision | Pneumonia recall | Pneumonia AUROC | COVID-19 precision | COVID-19 recall | COVID-19 AUROC |",
             "|---|---|---|---|---|---|---|"]
    for run, label in rows:
        row = [label]
        for disease in ("Pneumonia", "COVID-19"):
            for measure in ("precision", "recall", "auroc"):
                row.append(fmt(values(seeds, run, "metrics", "classification", "per_class", disease, measure)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def time_table(seeds: dict) -> list[str]:
    names = sorted({run for runs in seeds.values() for run in runs})
    lines = ["### Run times (training incl. validation, 2 CPU cores; median over seeds)", "", "| run | train s | cross-domain evaluation s |", "|---|---|---|"]
    for run in names:
        train = [runs[run]["seconds"]["train"] for runs in seeds.values() if run in runs]
        cross = [sum(v for k, v in runs[run]["seconds"].items() if k != "train") for runs in seeds.values() if run in runs]
        lines.append(f"| {run} | {statistics.median(train):.0f} | {statistics.median(cross):.0f} |")
    return lines


def plot(seeds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, source, title in zip(axes, ("metrics", "cross_seg"), ("in-domain", "cross-domain")):
        for key, label in MODELS[1:]:
            means, sds, xs = [], [], []
            for x, level in enumerate(LEVELS):
                found = values(seeds, f"{key}-{level}", source, "segmentation", "dice")
                if found:
                    xs.append(x)
                    means.append(statistics.mean(found))
                    sds.append(statistics.stdev(found) if len(found) > 1 else 0.0)
            if xs:
                axis.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=label)
        axis.set_xticks(range(len(LEVELS)), [f"{LEVELS[level][1]} masks" for level in LEVELS])
        axis.set_title(f"lung Dice, {title}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± SD over seeds)")
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    seeds = load()
    if not seeds:
        raise SystemExit(f"no results in {RESULTS}")
    lines = ["# Few-label experiments — results", "", "Made by `python experiments/few_labels/make_tables.py` from `results/`; see README.md for the setup.", ""]
    for part in (budget_table, smallest_budget, loss_table, cross_table, time_table):
        lines += part(seeds) + [""]
    (HERE / "tables.md").write_text("\n".join(lines))
    plot(seeds, HERE / "dice_vs_budget.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
