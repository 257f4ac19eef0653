"""Preparing a cache: read a source, run the items over worker processes, journal them, write the tables and manifest."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multichex
from multichex.data.cache.index import errors_text, index_text
from multichex.data.cache.items import ItemResult, init_worker, prepare_chunk
from multichex.data.cache.journal import Journal, done_records
from multichex.data.cache.layout import (
    CACHE_FORMAT,
    ERRORS_NAME,
    INDEX_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    PNG_COMPRESS_LEVEL,
    SPLIT_NAME,
    item_id,
    relative_path,
    remove_stale_temps,
)
from multichex.data.cache.splits import STRATIFY_RULE, make_split
from multichex.data.ref import SampleRef
from multichex.data.registry import all_readers, read_source
from multichex.data.sources import READERS, bundled_sample_root
from multichex.fileio import atomic_write_text

__all__ = ["PrepareResult", "prepare_cache"]

# The manifest's "reader" is part of the cache format: a function rename must not change what a
# preparation writes, so these readers keep the names format-1 manifests have always recorded.
_RECORDED_READER_NAMES = {
    "multichex.data.native.nih.read_native_nih": "multichex.data.native.nih.read_nih",
    "multichex.data.native.kermany.read_native_kermany": "multichex.data.native.kermany.read_kermany",
    "multichex.data.sources.read_shared_kermany": "multichex.data.sources.read_kermany",
}


@dataclass
class PrepareResult:
    """What one :func:`prepare_cache` call did."""

    out: Path
    total: int
    prepared: int  # items processed by this call
    skipped: int  # items already finished by an earlier (interrupted) call
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.prepared / self.seconds if self.seconds > 0 else math.nan


def _reader_name(source: str) -> str:
    """Dotted name of the function that reads ``source`` (recorded in the manifest)."""
    from multichex.data.native import NATIVE_SOURCES

    if source in NATIVE_SOURCES:
        module, function = NATIVE_SOURCES[source]
        name = f"multichex.data.native.{module}.{function}"
    elif source in READERS:
        reader = READERS[source]
        name = f"{reader.__module__}.{reader.__qualname__}"
    else:
        raise ValueError(f"unknown source {source!r}; known: {sorted(all_readers())}")
    return _RECORDED_READER_NAMES.get(name, name)


def _options(source: str, root: Path, size: int, limit: int | None) -> dict[str, Any]:
    """Everything the cache content depends on (a rerun must match these)."""
    return {
        "format": CACHE_FORMAT,
        "source": source,
        "root": str(root),
        "size": size,
        "limit": limit,
        "reader": _reader_name(source),
        "reader_options": {},  # prepare reads with the reader's defaults (see cache_reader_options)
        "png_compress_level": PNG_COMPRESS_LEVEL,
        "intensity": "normalize_intensity(low_pct=0.5, high_pct=99.5)",
        "letterbox": "Letterbox.fit + bilinear antialiased resize, zero padding; masks thresholded at 0.5",
    }


def _check_manifest(out: Path, options: dict[str, Any]) -> None:
    """Refuse to mix two different preparations in one folder."""
    path = out / MANIFEST_NAME
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8")).get("options", {})
    keys = ("format", "source", "root", "size")
    differing = [k for k in keys if previous.get(k) != options[k]]
    if differing:
        details = ", ".join(f"{k}: {previous.get(k)!r} ≠ {options[k]!r}" for k in differing)
        raise ValueError(f"{out} holds a different preparation ({details}); use another --out or delete it")


def _select_refs(refs: Sequence[SampleRef], root: Path) -> tuple[list[tuple[str, SampleRef]], list[tuple[str, str]]]:
    """``(id, ref)`` per unique image path; duplicates are reported as errors."""
    chosen: dict[str, SampleRef] = {}
    errors = []
    for ref in refs:
        item = item_id(relative_path(Path(ref.image_path), root))
        if item in chosen:
            errors.append((str(ref.image_path), "duplicate image in the source listing; the first entry was kept"))
            continue
        chosen[item] = ref
    return list(chosen.items()), errors


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _run_items(
    todo: list[tuple[str, SampleRef]], root: Path, size: int, out: Path, workers: int,
    on_done: Callable[[list[ItemResult]], None],
) -> None:
    """Prepare ``todo`` (inline for one worker, else over a process pool), calling ``on_done(results)`` per chunk."""
    if not todo:
        return
    chunk = max(1, min(16, math.ceil(len(todo) / max(1, workers * 8))))
    if workers <= 1:
        for part in _chunks(todo, chunk):
            on_done(prepare_chunk(part, root, size, out))
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=init_worker) as pool:
        pending: set[Future] = {pool.submit(prepare_chunk, part, root, size, out) for part in _chunks(todo, chunk)}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_done(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _counts(records: Sequence[dict[str, Any]], errors: Sequence[tuple[str, str]]) -> dict[str, int]:
    return {
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "with_mask": sum(bool(r["mask"]) for r in records),
        "with_boxes": sum(r["boxes"] is not None for r in records),
        "known_empty_boxes": sum(r["boxes"] == [] for r in records),
        "errors": len(errors),
    }


def _write_outputs(out: Path, records: list[dict[str, Any]], errors: list[tuple[str, str]], options: dict[str, Any],
                   fractions: dict[str, float] | None, seed: int, complete: bool) -> dict[str, Any]:
    """index.csv, errors.csv, split.json and manifest.json (all atomic); returns the manifest."""
    atomic_write_text(out / INDEX_NAME, index_text(records))
    atomic_write_text(out / ERRORS_NAME, errors_text(errors))
    split = make_split(records, fractions, seed) if records else {"seed": seed, "parts": {}}
    atomic_write_text(out / SPLIT_NAME, json.dumps(split, indent=1) + "\n")
    manifest = {
        "source": options["source"],
        "root": options["root"],
        "size": options["size"],
        "multichex_version": multichex.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "counts": _counts(records, errors),
        "split": {"seed": seed, "fractions": split.get("fractions"), "stratify": STRATIFY_RULE},
        "options": options,
    }
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def prepare_cache(
    source: str,
    root: str | Path | None,
    out: str | Path,
    size: int,
    workers: int = 2,
    limit: int | None = None,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Prepare (or resume preparing) the cache of one source; see :mod:`multichex.data.cache` for the layout."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    started = time.perf_counter()
    root_path = Path(root).absolute() if root is not None else bundled_sample_root() / source
    refs = read_source(source, root_path)
    refs = refs[:limit] if limit else refs
    out = Path(out)
    options = _options(source, root_path, size, limit)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, options)
    for folder in ("images", "masks"):
        (out / folder).mkdir(exist_ok=True)
    remove_stale_temps(out)
    selected, errors = _select_refs(refs, root_path)
    journal = Journal(out / JOURNAL_NAME)
    done = done_records(journal, out)
    todo = [(item, ref) for item, ref in selected if item not in done]
    if not (out / MANIFEST_NAME).exists():
        _write_outputs(out, [], [], options, fractions, seed, complete=False)
    bar = _progress_bar(len(selected), len(selected) - len(todo), progress)

    def on_done(results: list[ItemResult]) -> None:
        journal.append(r.record for r in results if r.record is not None)
        for result in results:
            if result.record is not None:
                done[result.item] = result.record
            else:
                errors.append((result.path, result.error or "unknown error"))
        bar.update(len(results))

    try:
        _run_items(todo, root_path, size, out, workers, on_done)
    finally:
        bar.close()
    wanted = {item for item, _ in selected}
    records = [r for item, r in done.items() if item in wanted]
    _write_outputs(out, records, errors, options, fractions, seed, complete=True)
    return PrepareResult(out, len(selected), len(todo), len(selected) - len(todo), sorted(set(errors)), time.perf_counter() - started)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="img", desc="prepare", dynamic_ncols=True)
