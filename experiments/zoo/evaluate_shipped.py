"""Score the shipped default model (its package copy, as users get it) for its model card.

    python experiments/zoo/evaluate_shipped.py

1. Held-out test patients of every permissive training folder (the run's saved split), per source and pooled.
2. External lungs: every image of covid-chestxray-nc (Radiopaedia, Eurorad and journal cases; non-commercial,
   never trained on) — the "trained on Hannover, tested elsewhere" direction of the leave-one-source-out table.
Writes experiments/zoo/results/shipped.json and fills the marked tables of the model card.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, ci_cell, dig, run  # noqa: E402

NAME = "multichex-lite-256"
SPLIT = REPO / "experiments" / "zoo" / NAME / "split.json"
CARD = REPO / "src" / "multichex" / "models" / "zoo" / f"{NAME}.md"
README = REPO / "README.md"
RESULTS = REPO / "experiments" / "zoo" / "results"
DATA = "../shared/data"
SOURCES = {  # folder → labels it has
    "covid-chestxray": "cls,gate,seg",
    "hannover-covid19": "cls,gate",
    "nih-cxr14-bbox": "cls,gate,det",
    "nih-cxr14-sample": "cls,gate,det",
    "kermany-pediatric": "cls,gate",
}


def evaluate(sources: list[str], tasks: str, part: str, out: Path, checkpoint: str = NAME) -> dict:
    """``multichex evaluate`` of ``checkpoint`` (default: the shipped model) on ``sources``; its metrics.json."""
    command = [sys.executable, "-m", "multichex.cli", "evaluate", *[s if "=" in s else f"{s}={DATA}/{s}" for s in sources], "--checkpoint", checkpoint,
               "--tasks", tasks, "--part", part, "--out", str(out)]
    if part != "all":
        command += ["--split", str(SPLIT)]
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = run(command, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["seconds"] = seconds
    return metrics


def head_table(results: dict) -> str:
    """Rows per evaluation: lung Dice, HD95, macro AUROC, gate AUROC, mAP@0.5 (95% CI), images."""
    lines = ["| test set | images | lung Dice | lung HD95 (px at 256) | macro AUROC | gate AUROC | mAP@0.5 |", "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        n = max(dig(m, "classification", "n_images") or 0, dig(m, "segmentation", "n_images") or 0, dig(m, "detection", "n_images") or 0)
        lines.append(f"| {name} | {n} | {ci_cell(dig(m, 'segmentation', 'dice'))} | {ci_cell(dig(m, 'segmentation', 'hd95'))} | "
                     f"{ci_cell(dig(m, 'classification', 'macro_auroc'))} | {ci_cell(dig(m, 'gate', 'auroc'))} | {ci_cell(dig(m, 'detection', 'map'))} |")
    return "\n".join(lines)


def class_table(metrics: dict) -> str:
    """Per-class AUROC (95% CI) and the numbers of positives on the pooled held-out test patients."""
    lines = ["| class | AUROC (95% CI) | positives / known | F1 at the validation threshold |", "|---|---|---|---|"]
    per_class = dig(metrics, "classification", "per_class") or {}
    intervals = dig(metrics, "classification", "auroc_intervals") or {}
    for name, row in per_class.items():
        lines.append(f"| {name} | {ci_cell(intervals.get(name) or row.get('auroc'))} | {row.get('n_positive')} / {row.get('n_known')} | "
                     f"{ci_cell(row.get('f1'))} |")
    return "\n".join(lines)


def box_table(metrics: dict) -> str:
    """AP@0.5 per box class on the pooled held-out NIH test patients."""
    per_class = dig(metrics, "detection", "per_class") or {}
    n_gt = dig(metrics, "detection", "n_gt") or {}
    lines = ["| box class | AP@0.5 | boxes |", "|---|---|---|"]
    lines += [f"| {name} | {ci_cell(value)} | {n_gt.get(name, 0)} |" for name, value in per_class.items()]
    return "\n".join(lines)


def fill(card: str, marker: str, text: str) -> str:
    """Replace what lies between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(\n<!-- /{marker} -->)", re.S)
    if not pattern.search(card):
        raise SystemExit(f"marker {marker!r} missing")
    return pattern.sub(lambda m: m.group(1) + text + m.group(2), card)


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = REPO / "runs" / "zoo" / "card"
    results = {f"{s} (test patients)": evaluate([s], tasks, "test", work / s) for s, tasks in SOURCES.items()}
    pooled = evaluate(list(SOURCES), "cls,gate,seg,det", "test", work / "pooled")
    results["all permissive folders (test patients)"] = pooled
    # The external folder has covid-chestxray's layout, so the same reader reads it from its own root.
    results["covid-chestxray-nc (external, all)"] = evaluate([f"covid-chestxray={DATA}/covid-chestxray-nc"], "seg,cls,gate", "all",
                                                             work / "external-nc")
    (RESULTS / "shipped.json").write_text(json.dumps(results, indent=2))
    card = CARD.read_text()
    card = fill(card, "heads", head_table(results))
    card = fill(card, "classes", class_table(pooled))
    card = fill(card, "boxes", box_table(pooled))
    CARD.write_text(card)
    note = ("\n\nHeld-out test patients of the saved split (95 % patient-bootstrap CIs) and, for the lungs, an external "
            "set from other hospitals never trained on; `python experiments/zoo/evaluate_shipped.py`.")
    README.write_text(fill(README.read_text(), "zoo-table", head_table(results) + note))
    print(head_table(results))


if __name__ == "__main__":
    main()
