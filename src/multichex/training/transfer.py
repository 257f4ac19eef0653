"""Transfer to an unseen disease (MultiCheXNet §3.9/§4.3): keep θ_enc and θ_feats, train a fresh θ_dec."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multichex.data.sources import SampleRef
from multichex.fileio import atomic_write_text
from multichex.models.multichexnet import MultiCheXNet

if TYPE_CHECKING:
    from multichex.training.config import TrainConfig


def transfer_model(model: MultiCheXNet, classes: Sequence[str]) -> MultiCheXNet:
    """Give ``model`` a new randomly initialised classifier decoder θ_dec for ``classes`` (in place).

    Encoder, θ_feats and the other heads keep their weights. A gate that reads the classifier's old
    classes cannot survive the change of label set: it must be the separate gate module.
    """
    classes = list(classes)
    if not classes:
        raise ValueError("transfer needs at least one class")
    gate = model.config.gate
    if gate.source == "classifier" and set(gate.classes) - set(classes):
        raise ValueError(
            f"the gate reads classifier classes {gate.classes}, which the new label set {classes} lacks; "
            "use a model whose gate is the separate module (gate.source: module)"
        )
    model.cls.replace_decoder(len(classes))
    model.config = replace(model.config, class_names=classes, class_thresholds=None)
    return model


def few_shot_refs(refs: Sequence[SampleRef], classes: Sequence[str], shots: int | None, seed: int) -> list[SampleRef]:
    """``shots`` labelled images per class value: for each class, up to ``shots`` images where it is 1, plus up
    to ``shots`` images negative for every class (the "other" images). ``None`` keeps every labelled image.

    Images whose labels for ``classes`` are all unknown are never used. The draw is a seeded shuffle, so the
    k = 5 set is a subset of the k = 10 set for the same seed (a nested learning curve).
    """
    labelled = [r for r in refs if any(not math.isnan(r.findings.get(c, math.nan)) for c in classes)]
    if shots is None:
        return labelled
    order = np.random.default_rng(seed).permutation(len(labelled))
    chosen: list[int] = []
    for c in classes:
        positives = [i for i in order if labelled[i].findings.get(c) == 1.0 and i not in chosen]
        chosen += positives[:shots]
    negatives = [i for i in order if i not in chosen and all(labelled[i].findings.get(c) == 0.0 for c in classes)]
    chosen += negatives[:shots]
    return [labelled[i] for i in sorted(chosen)]


def parse_shots(text: str) -> list[int | None]:
    """``"5,10,20,all"`` → ``[5, 10, 20, None]``."""
    shots: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            shots.append(None)
        elif part.isdigit() and int(part) > 0:
            shots.append(int(part))
        else:
            raise ValueError(f"shots must be positive integers or 'all', got {part!r}")
    return shots


def run_transfer(
    config: "TrainConfig",
    checkpoint: str | Path | None,
    shots: Sequence[int | None],
    fine_tune: bool = False,
    bootstrap: int = 1000,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Few-shot transfer curve: for each k in ``shots``, train a fresh θ_dec (and, with ``fine_tune``, the
    encoder and θ_feats) on k labelled images per class from the train patients, then score the test patients.

    ``checkpoint=None`` trains the whole classifier path from random weights (the from-scratch baseline).
    No validation images are used: a k-shot run sees k labels per class and nothing else, so each run trains
    its configured steps and is scored as it ends. Writes ``OUT/transfer.json`` and ``OUT/transfer.md``.
    """
    from multichex.training.checkpoint import load_model
    from multichex.training.data import make_datasets, split_sources
    from multichex.training.run import train_and_evaluate
    from multichex.training.trainer import seed_everything

    classes = config.model.class_names
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_sources(config, out_dir)
    train_refs = [ref for refs in split.get("train", {}).values() for ref in refs]
    test_sets = make_datasets(config, split.get("test", {}), train=False)
    if not test_sets:
        raise ValueError("no test images: the sources are too small for a patient-wise split")
    results = []
    for k in shots:
        seed_everything(config.seed, config.deterministic)
        if checkpoint is None:
            model = MultiCheXNet(config.model)
            trainable = ["encoder", "cls"]
        else:
            model, _ = load_model(checkpoint)
            transfer_model(model, classes)
            trainable = ["encoder", "cls"] if fine_tune else ["cls.dec"]
        refs = few_shot_refs(train_refs, classes, k, config.seed)
        run_dir = out_dir / f"shots-{k or 'all'}"
        run_config = replace(config, trainable=trainable, out_dir=str(run_dir), model=model.config, schedule="joint")
        started = time.monotonic()
        parts = {"train": make_datasets(run_config, {"train": refs}, train=True), "test": test_sets}
        _, metrics = train_and_evaluate(run_config, parts, model=model, bootstrap=bootstrap, progress=progress, metrics_file=None)
        cls = metrics.get("classification", {})
        results.append({
            "shots": k or "all", "n_train": len(refs), "n_test": cls.get("n_images"),
            "auroc": cls.get("macro_auroc"), "accuracy": cls.get("macro_accuracy"), "f1": cls.get("macro_f1"),
            "seconds": round(time.monotonic() - started, 1),
        })
    origin = str(checkpoint) if checkpoint else "random initialisation"
    atomic_write_text(out_dir / "transfer.json", json.dumps({"from": origin, "classes": classes, "fine_tune": fine_tune, "results": results}, indent=2))
    atomic_write_text(out_dir / "transfer.md", transfer_table(results, origin, classes, fine_tune))
    return results


def transfer_table(results: list[dict[str, Any]], origin: str, classes: Sequence[str], fine_tune: bool) -> str:
    """Markdown learning-curve table with 95% CIs."""
    def cell(interval: dict[str, Any] | None) -> str:
        if not interval or interval.get("value") is None:
            return "n/a"
        if interval.get("low") is None:
            return f"{interval['value']:.3f}"
        return f"{interval['value']:.3f} ({interval['low']:.3f}–{interval['high']:.3f})"

    mode = "encoder and θ_feats fine-tuned" if fine_tune else "θ_enc, θ_feats frozen; new θ_dec trained"
    lines = [f"# Transfer to {', '.join(classes)} from {origin}", "", f"Mode: {mode}. Test: held-out patients, 95% patient-bootstrap CIs.", "",
             "| labelled images per class | train images | test images | AUROC | accuracy | F1 | seconds |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shots']} | {r['n_train']} | {r['n_test']} | {cell(r['auroc'])} | {cell(r['accuracy'])} | {cell(r['f1'])} | {r['seconds']} |")
    return "\n".join(lines) + "\n"
