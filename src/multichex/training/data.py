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


def read_refs(source: SourceConfig) -> list[SampleRef]:
    """Every image of a source with all the labels it gives: read from its folder (with the reader
    ``options``), or from its prepared cache (index order).

    A cache's pixels and reader options were fixed when it was prepared, so ``resample_to`` and reader
    ``options`` other than the recorded ones are refused rather than silently ignored.
    """
    if not source.prepared:
        return read_source(source.name, source.root, source.options)
    from multichex.data.cache import cache_reader_options, cache_refs

    if source.resample_to:
        raise ValueError(f"source {source.key}: resample_to cannot apply to the prepared cache {source.prepared} "
                         "(its images were letterboxed when it was prepared); use the raw folder")
    recorded = cache_reader_options(source.prepared)
    if dict(source.options) != recorded:
        raise ValueError(f"source {source.key}: reader options {dict(source.options)} differ from those the cache {source.prepared} "
                         f"was prepared with ({recorded or 'the reader defaults'}); a cache's reader options are fixed "
                         "when it is prepared: drop `options` or use the raw folder")
    return cache_refs(source.prepared)


def load_refs(source: SourceConfig) -> list[SampleRef]:
    """Read a source (raw folder or prepared cache, see :func:`read_refs`), hide the labels of tasks (and
    classes) it should not train, and apply its options: boxes fitted to masks, gate-negatives as
    box-negatives, resolution bottleneck, image limit (a cache's first images by id)."""
    refs = [replace(restrict_tasks(r, source.tasks), extra={**r.extra, "source_key": source.key})
            for r in read_refs(source)]
    if source.classes is not None and "cls" in source.tasks:
        refs = [own_classes(r, source.classes, source.none_class) for r in refs]
    if source.boxes_from_masks:
        refs = [replace(r, mask_box_label=source.boxes_from_masks) for r in refs]
    if source.empty_boxes_for_negatives and "det" in source.tasks:
        refs = [replace(r, boxes_xywh=[], box_names=[]) if r.positive == 0 and r.boxes_xywh is None else r for r in refs]
    if source.resample_to:
        refs = [replace(r, resample_to=source.resample_to) for r in refs]
    return refs[: source.limit] if source.limit else refs


def split_sources(config: TrainConfig, out_dir: Path | None = None, unlisted: str = "error") -> dict[str, dict[str, list[SampleRef]]]:
    """Split all sources, raw folders and prepared caches alike, jointly by patient id with the run's
    seed (sources that share patients stay on one side); a cache's own ``split.json`` is not used.

    With ``config.split_file`` the parts come from that saved split; an image it does not list is an
    error, or (``unlisted="skip"``, for evaluating a part) left out of every part.
    """
    if unlisted not in {"error", "skip"}:
        raise ValueError(f"unlisted must be 'error' or 'skip', got {unlisted!r}")
    per_source = {s.key: load_refs(s) for s in config.sources}
    flat = [(name, ref) for name, refs in per_source.items() for ref in refs]
    if config.split_file:
        parts = saved_split_indices(Path(config.split_file), [str(ref.image_path) for _, ref in flat], skip_unlisted=unlisted == "skip")
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


def saved_split_indices(path: Path, image_paths: list[str], skip_unlisted: bool = False) -> dict[str, list[int]]:
    """Part → indices of ``image_paths`` from a saved ``split.json``; every image must be listed in it
    (``skip_unlisted``: images it does not list are in no part)."""
    try:
        saved = json.loads(path.read_text())["parts"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a readable split.json ({error})") from error
    part_of = {_same_file_key(image): part for part, images in saved.items() for image in images}
    image_paths = [_same_file_key(p) for p in image_paths]
    missing = [p for p in image_paths if p not in part_of]
    if missing and skip_unlisted:
        log.info("%s: %d of %d images are not in this split and are left out", path, len(missing), len(image_paths))
    elif missing:
        raise ValueError(f"{path}: {len(missing)} of the sources' images are not in this split (e.g. {missing[0]}); "
                         "a saved split only applies to the sources (and roots) it was made from")
    parts: dict[str, list[int]] = {part: [] for part in saved}
    for index, image in enumerate(image_paths):
        if image in part_of:
            parts[part_of[image]].append(index)
    return parts


def build_datasets(config: TrainConfig, out_dir: Path | None = None, unlisted: str = "error") -> dict[str, dict[str, CXRDataset]]:
    """Part → source key → data set, from the joint split of :func:`split_sources` (raw folders and
    prepared caches alike)."""
    return {part: make_datasets(config, refs, train=part == "train") for part, refs in split_sources(config, out_dir, unlisted).items()}


def make_datasets(config: TrainConfig, refs: dict[str, list[SampleRef]], train: bool) -> dict[str, CXRDataset]:
    """One data set per non-empty list of refs (augmented only for training): a :class:`CXRDataset`, or a
    :class:`PreparedDataset` for refs read from a prepared cache (:class:`CachedRef`)."""
    return {name: _dataset(config, source_refs, train) for name, source_refs in refs.items() if source_refs}


def _dataset(config: TrainConfig, refs: list[SampleRef], train: bool) -> CXRDataset:
    from multichex.data.cache import CachedRef, PreparedDataset

    model = config.model
    augment = config.augment if train else None
    origins = {r.cache_dir if isinstance(r, CachedRef) else None for r in refs}
    if origins == {None}:
        return CXRDataset(refs, model.class_names, model.box_classes, model.image_size, augment=augment, seed=config.seed)
    cache_dir = origins.pop()
    if cache_dir is not None and not origins:
        return PreparedDataset(cache_dir, model.class_names, model.box_classes, model.image_size, augment=augment, seed=config.seed, refs=refs)
    raise ValueError("one data set would mix images of several prepared caches (or of a cache and raw folders): "
                     f"{sorted(str(o) for o in origins | {cache_dir})}; use one cache or only raw folders here")
