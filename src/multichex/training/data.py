"""From a run config to patient-wise train/val/test data sets, one per source."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import replace
from pathlib import Path

from multichex.data.labels import canonical_name
from multichex.data.registry import read_source
from multichex.data.sources import CXRDataset, SampleRef
from multichex.data.splits import patient_split, save_split
from multichex.models.config import TASKS
from multichex.training.config import SourceConfig, TrainConfig

log = logging.getLogger(__name__)


def restrict_tasks(ref: SampleRef, tasks: list[str]) -> SampleRef:
    """Hide the labels of tasks a source should not train (masking, not faking: they become unknown)."""
    return replace(
        ref,
        findings=ref.findings if "cls" in tasks else {},
        positive=ref.positive if "gate" in tasks else math.nan,
        mask_path=ref.mask_path if "seg" in tasks else None,
        mask_rle=ref.mask_rle if "seg" in tasks else None,
        boxes_xywh=ref.boxes_xywh if "det" in tasks else None,
        box_names=ref.box_names if "det" in tasks else None,
    )


def own_classes(ref: SampleRef, classes: list[str], none_class: str | None) -> SampleRef:
    """Keep only the labels of the source's own ``classes``; ``none_class`` is 1 when all of them are 0,
    0 when any is 1, unknown otherwise."""
    own = {canonical_name(c) for c in classes}
    findings = {name: value for name, value in ref.findings.items() if canonical_name(name) in own}
    if none_class:
        known = {canonical_name(name): value for name, value in findings.items()}
        values = [known.get(name, math.nan) for name in own]
        if any(v == 1 for v in values):
            findings[none_class] = 0.0
        elif values and all(v == 0 for v in values):
            findings[none_class] = 1.0
    return replace(ref, findings=findings)


def load_refs(source: SourceConfig) -> list[SampleRef]:
    """Read a source, hide the labels of tasks (and classes) it should not train, and apply its options:
    boxes fitted to masks, gate-negatives as box-negatives, resolution bottleneck, image limit."""
    refs = [replace(restrict_tasks(r, source.tasks), extra={**r.extra, "source_key": source.key})
            for r in read_source(source.name, source.root, source.options)]
    if source.classes is not None and "cls" in source.tasks:
        refs = [own_classes(r, source.classes, source.none_class) for r in refs]
    if source.boxes_from_masks:
        refs = [replace(r, mask_box_label=source.boxes_from_masks) for r in refs]
    if source.empty_boxes_for_negatives and "det" in source.tasks:
        refs = [replace(r, boxes_xywh=[], box_names=[]) if r.positive == 0 and r.boxes_xywh is None else r for r in refs]
    if source.resample_to:
        refs = [replace(r, resample_to=source.resample_to) for r in refs]
    return refs[: source.limit] if source.limit else refs


def split_sources(config: TrainConfig, out_dir: Path | None = None) -> dict[str, dict[str, list[SampleRef]]]:
    """Split all raw sources jointly by patient id (sources that share patients stay on one side).

    Prepared caches are not listed here: they carry their own split (see :func:`build_datasets`).
    """
    per_source = {s.key: load_refs(s) for s in config.sources if not s.prepared}
    flat = [(name, ref) for name, refs in per_source.items() for ref in refs]
    if config.split_file:
        parts = saved_split_indices(Path(config.split_file), [str(ref.image_path) for _, ref in flat])
    else:
        parts = patient_split([ref.patient_id for _, ref in flat], config.split, seed=config.seed, strata=[name for name, _ in flat])
    result: dict[str, dict[str, list[SampleRef]]] = {part: {name: [] for name in per_source} for part in parts}
    for part, indices in parts.items():
        for index in indices:
            name, ref = flat[index]
            result[part][name].append(ref)
    for source in config.sources:
        if source.key in result.get("train", {}):
            result["train"][source.key] = training_labels(result["train"][source.key], source, config.seed)
    if out_dir is not None:
        save_split(
            out_dir / "split.json",
            {part: sorted(str(r.image_path) for refs in sources.values() for r in refs) for part, sources in result.items()},
            config.seed,
        )
    return result


def training_labels(refs: list[SampleRef], source: SourceConfig, seed: int) -> list[SampleRef]:
    """Training-only label options: cross-data-set negatives (``negative_for``: unknown labels of those
    classes become 0) and label budgets (``label_budget``: per task, only N images keep their labels, drawn
    with the run's seed; the rest stay as unlabelled images). Evaluation parts never see either."""
    if source.negative_for:
        refs = [replace(r, findings={**{c: 0.0 for c in source.negative_for}, **{k: v for k, v in r.findings.items() if not math.isnan(v)}})
                for r in refs]
    for task, keep in sorted(source.label_budget.items()):
        labelled = [i for i, r in enumerate(refs) if _has_label(r, task)]
        rng = random.Random(f"{seed}:{source.key}:{task}")
        hidden = set(labelled) - set(rng.sample(labelled, min(keep, len(labelled))))
        refs = [_hide_label(r, task) if i in hidden else r for i, r in enumerate(refs)]
        log.info("source %s: %s labels kept on %d of %d training images", source.key, task, len(labelled) - len(hidden), len(labelled))
    return refs


def _has_label(ref: SampleRef, task: str) -> bool:
    if task == "cls":
        return any(not math.isnan(v) for v in ref.findings.values())
    if task == "seg":
        return ref.mask_path is not None or ref.mask_rle is not None
    return ref.boxes_xywh is not None


def _hide_label(ref: SampleRef, task: str) -> SampleRef:
    hidden = {"cls", "gate"} if task == "cls" else {task}  # the gate label is derived from the findings
    return restrict_tasks(ref, [t for t in TASKS if t not in hidden])


def _same_file_key(path: str) -> str:
    """Absolute form, so a split saved with relative roots matches the same files given absolutely."""
    return str(Path(path).resolve())


def saved_split_indices(path: Path, image_paths: list[str]) -> dict[str, list[int]]:
    """Part → indices of ``image_paths`` from a saved ``split.json``; every image must be listed in it."""
    try:
        saved = json.loads(path.read_text())["parts"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a readable split.json ({error})") from error
    part_of = {_same_file_key(image): part for part, images in saved.items() for image in images}
    image_paths = [_same_file_key(p) for p in image_paths]
    missing = [p for p in image_paths if p not in part_of]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the sources' images are not in this split (e.g. {missing[0]}); "
                         "a saved split only applies to the sources (and roots) it was made from")
    parts: dict[str, list[int]] = {part: [] for part in saved}
    for index, image in enumerate(image_paths):
        parts[part_of[image]].append(index)
    return parts


def prepared_datasets(config: TrainConfig, source: SourceConfig, whole: bool = False) -> dict[str, CXRDataset]:
    """One :class:`PreparedDataset` per part of the cache's own ``split.json`` (or one ``"all"`` part)."""
    from multichex.data.cache import PreparedDataset, read_split

    if source.resample_to or source.empty_boxes_for_negatives:
        raise ValueError(f"source {source.key}: resample_to / empty_boxes_for_negatives apply to raw folders, not prepared caches")
    model = config.model
    parts = [None] if whole else list(read_split(Path(source.prepared)).get("parts", {}))
    return {
        part or "all": PreparedDataset(
            source.prepared, model.class_names, model.box_classes, model.image_size,
            augment=config.augment if part == "train" else None, seed=config.seed, part=part,
            tasks=source.tasks, boxes_from_masks=source.boxes_from_masks,
        )
        for part in parts
    }


def build_datasets(config: TrainConfig, out_dir: Path | None = None, whole_caches: bool = False) -> dict[str, dict[str, CXRDataset]]:
    """Part → source name → data set, for raw sources (split here) and prepared caches (their own split,
    or every cached image under ``"all"`` when ``whole_caches``)."""
    parts = {part: make_datasets(config, refs, train=part == "train") for part, refs in split_sources(config, out_dir).items()}
    for source in config.sources:
        if source.prepared:
            for part, dataset in prepared_datasets(config, source, whole_caches).items():
                if len(dataset):
                    parts.setdefault(part, {})[source.key] = dataset
    return parts


def make_datasets(config: TrainConfig, refs: dict[str, list[SampleRef]], train: bool) -> dict[str, CXRDataset]:
    """One :class:`CXRDataset` per non-empty source (augmented only for training)."""
    model = config.model
    return {
        name: CXRDataset(
            source_refs,
            model.class_names,
            model.box_classes,
            model.image_size,
            augment=config.augment if train else None,
            seed=config.seed,
        )
        for name, source_refs in refs.items()
        if source_refs
    }
