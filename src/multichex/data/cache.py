"""Prepared cache: any source known to :func:`read_source`, letterboxed once into a folder of PNGs.

Layout of a cache folder ``DIR`` (written by :func:`prepare_cache`, read by :class:`PreparedDataset`):

``images/<id>.png``
    8-bit grayscale, ``size×size``: the source image after :func:`normalize_intensity` and
    :class:`Letterbox` — exactly the uint8 image :class:`CXRDataset` would build in memory.
``masks/<id>.png``
    0/255, ``size×size``, only for items whose source has a mask (an all-black mask is a known empty mask).
``index.csv``
    one row per item, sorted by ``id``; columns :data:`INDEX_COLUMNS`. List/dict cells hold JSON;
    an empty cell means "not known" (no mask, boxes not annotated, gate label unknown, no pixel spacing)
    while ``[]`` in ``boxes`` means "annotated, no lesion". ``findings`` holds only the labels the
    source gives (canonical name → 0/1); an absent key is NaN (unknown).
``split.json``
    patient-wise parts (ids per part), stratified as described in :func:`make_split`: for ``data info``
    and ``PreparedDataset(part=...)``. A training run does not use it: it splits a cache together with
    its other sources, with its own seed (``multichex.training.data.split_sources``).
``errors.csv``
    ``path,reason`` of every source item that could not be prepared (sorted by path).
``manifest.json``
    source, root, size, multichex version, creation time, counts, reader and preparation options.
``journal.jsonl``
    one JSON record per finished item, appended (and fsynced) after the item's files were
    written atomically; a rerun skips the items it lists, and ``index.csv`` is always rebuilt from
    it, so an interrupted and resumed run gives the same cache as an uninterrupted one.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import multichex
from multichex.data.io import ImageReadError
from multichex.data.labels import canonical_name
from multichex.data.registry import all_readers, read_source
from multichex.data.sources import READERS, CXRDataset, SampleRef, bundled_sample_root
from multichex.data.splits import patient_split
from multichex.data.transforms import AugmentConfig, Letterbox
from multichex.fileio import TEMP_SUFFIX, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the cache layout; bumped when the files or their meaning change."""

INDEX_COLUMNS: tuple[str, ...] = (
    "id", "image", "mask", "boxes", "box_names", "findings", "positive", "patient_id", "dataset",
    "path", "rel_path", "orig_height", "orig_width", "size", "scale", "pad_x", "pad_y",
    "pixel_spacing", "extra",
)
_JSON_COLUMNS = frozenset({"boxes", "box_names", "findings", "pixel_spacing", "extra"})
_INT_COLUMNS = frozenset({"orig_height", "orig_width", "size", "pad_x", "pad_y"})
_FLOAT_COLUMNS = frozenset({"positive", "scale"})

JOURNAL_NAME = "journal.jsonl"
INDEX_NAME = "index.csv"
SPLIT_NAME = "split.json"
ERRORS_NAME = "errors.csv"
MANIFEST_NAME = "manifest.json"
DELAY_ENV = "MULTICHEX_PREPARE_DELAY"
"""Seconds to sleep per item in the workers (tests only: makes an interruption easy to hit)."""
PNG_COMPRESS_LEVEL = 1
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
STRATIFY_RULE = "dataset/gate of the patient's first image by id (gate: positive | negative | unknown)"


# --------------------------------------------------------------------------- ids and small file helpers


def item_id(rel_path: str) -> str:
    """Stable id of a source image: its (sanitised, shortened) stem plus a short sha1 of its relative path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rel_path).stem).strip("._-")[:48] or "img"
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{digest}"


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX form), or the full path when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def png_bytes(array: np.ndarray) -> bytes:
    """A 2-D uint8 array as grayscale PNG bytes (deterministic: no timestamps)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_png_u8(path: Path, size: int) -> torch.Tensor:
    """A cached ``size×size`` 8-bit PNG as a ``1×size×size`` uint8 tensor (ImageReadError on any failure)."""
    try:
        with Image.open(path) as image:
            array = np.array(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(path, f"cannot read cached PNG: {type(error).__name__}: {error}") from error
    if array.dtype != np.uint8 or array.shape != (size, size):
        raise ImageReadError(path, f"cached PNG is {array.dtype} {array.shape}, expected uint8 {(size, size)}")
    return torch.from_numpy(array)[None]


def remove_stale_temps(out: Path) -> int:
    """Delete temporary files left by a killed run; returns how many were removed."""
    removed = 0
    for folder in (out, out / "images", out / "masks"):
        if folder.is_dir():
            for temp in folder.glob(f".*{TEMP_SUFFIX}"):
                temp.unlink(missing_ok=True)
                removed += 1
    return removed


# --------------------------------------------------------------------------- one item


def _pixel_spacing(path: Path) -> list[float] | None:
    """Row/column pixel spacing (mm) from a DICOM header; None for other formats or when absent."""
    try:
        with path.open("rb") as handle:
            header = handle.read(132)
    except OSError:
        return None
    if header[128:132] != b"DICM" and path.suffix.lower() not in {".dcm", ".dicom"}:
        return None
    try:
        import pydicom

        from multichex.data.io import _pixel_spacing as dicom_spacing

        spacing = dicom_spacing(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - spacing is optional provenance, never a reason to fail
        return None
    return [float(v) for v in spacing] if spacing is not None else None


def letterbox_ref(ref: SampleRef, size: int) -> tuple[np.ndarray, np.ndarray | None, list[list[float]] | None, list[str] | None, Letterbox, tuple[int, int]]:
    """Read and letterbox one ref exactly as :class:`CXRDataset` does (it runs ``CXRDataset._load``).

    Returns the uint8 image, the 0/1 uint8 mask (or None), every box in letterbox pixels with its
    canonical name (None = not annotated), the letterbox and the original ``(height, width)``.
    Boxes fitted to masks are not stored: :class:`PreparedDataset` fits them at load time.
    """
    names = list(dict.fromkeys(canonical_name(n) for n in ref.box_names or []))
    loader = CXRDataset([replace(ref, mask_box_label=None)], [], names, size, cache=False)
    image, mask, boxes, labels, letterbox, original = loader._load(0)
    box_list = box_names = None
    if boxes is not None:
        box_list = [[float(v) for v in row] for row in boxes.tolist()]
        box_names = [names[i] for i in labels.tolist()]
    mask_array = mask[0].numpy() if mask is not None else None
    return image[0].numpy(), mask_array, box_list, box_names, letterbox, original


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def prepare_item(ref: SampleRef, item: str, root: Path, size: int, out: Path) -> dict[str, Any]:
    """Letterbox one ref, write its PNGs atomically and return its index record (JSON-native values)."""
    image, mask, boxes, box_names, letterbox, (height, width) = letterbox_ref(ref, size)
    image_rel = f"images/{item}.png"
    atomic_write_bytes(out / image_rel, png_bytes(image))
    mask_rel = ""
    if mask is not None:
        mask_rel = f"masks/{item}.png"
        atomic_write_bytes(out / mask_rel, png_bytes(mask * 255))
    findings = {canonical_name(k): float(v) for k, v in ref.findings.items() if v is not None and not math.isnan(float(v))}
    return {
        "id": item,
        "image": image_rel,
        "mask": mask_rel,
        "boxes": boxes,
        "box_names": box_names,
        "findings": findings,
        "positive": _finite_or_none(ref.positive),
        "patient_id": ref.patient_id,
        "dataset": ref.dataset,
        "path": str(ref.image_path),
        "rel_path": relative_path(ref.image_path, root),
        "orig_height": int(height),
        "orig_width": int(width),
        "size": int(size),
        "scale": float(letterbox.scale),
        "pad_x": int(letterbox.pad_x),
        "pad_y": int(letterbox.pad_y),
        "pixel_spacing": _pixel_spacing(Path(ref.image_path)),
        "extra": json.loads(json.dumps(ref.extra, default=str)),
    }


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one item in a worker: its record, or the reason it failed."""

    item: str
    path: str
    record: dict[str, Any] | None = None
    error: str | None = None


def _prepare_chunk(chunk: list[tuple[str, SampleRef]], root: Path, size: int, out: Path) -> list[ItemResult]:
    """Worker entry point: prepare a chunk of items; a failure is reported, never raised."""
    delay = float(os.environ.get(DELAY_ENV) or 0.0)
    results = []
    for item, ref in chunk:
        if delay:
            time.sleep(delay)
        try:
            results.append(ItemResult(item, str(ref.image_path), record=prepare_item(ref, item, root, size, out)))
        except Exception as error:  # noqa: BLE001 - one bad file must never stop a preparation
            reason = error.reason if isinstance(error, ImageReadError) else f"{type(error).__name__}: {error}"
            results.append(ItemResult(item, str(ref.image_path), error=str(reason)))
    return results


def _init_worker() -> None:
    """One torch thread per worker process: the parallelism is across processes."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSON-lines record of finished items; every append is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """Complete records in order; a torn last line (killed mid-write) is dropped and the file repaired."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        records, valid_bytes = [], 0
        for line in raw.split(b"\n")[:-1]:  # the part after the last newline is incomplete
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            valid_bytes += len(line) + 1
        if valid_bytes != len(raw):
            log.warning("%s: dropping %d bytes of an interrupted write", self.path, len(raw) - valid_bytes)
            atomic_write_bytes(self.path, raw[:valid_bytes])
        return records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (one line each) and make them durable before returning."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def _done_records(journal: Journal, out: Path) -> dict[str, dict[str, Any]]:
    """The last journal record per id whose files are still on disk."""
    done: dict[str, dict[str, Any]] = {}
    for record in journal.load():
        files = [record["image"]] + ([record["mask"]] if record["mask"] else [])
        if all((out / f).is_file() for f in files):
            done[record["id"]] = record
        else:
            done.pop(record["id"], None)
    return done


# --------------------------------------------------------------------------- index.csv


def _encode_cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in _JSON_COLUMNS:
        return json.dumps(value, ensure_ascii=False)
    if column in _FLOAT_COLUMNS:
        return repr(float(value))
    return str(value)


def _decode_cell(column: str, text: str) -> Any:
    if text == "":
        return None if column not in {"mask"} else ""
    if column in _JSON_COLUMNS:
        return json.loads(text)
    if column in _INT_COLUMNS:
        return int(text)
    if column in _FLOAT_COLUMNS:
        return float(text)
    return text


def index_text(records: Iterable[dict[str, Any]]) -> str:
    """CSV text of the index (header + one row per record, sorted by id)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for record in sorted(records, key=lambda r: r["id"]):
        writer.writerow([_encode_cell(c, record.get(c)) for c in INDEX_COLUMNS])
    return buffer.getvalue()


def read_index(cache_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``index.csv`` (empty cells → None, except ``mask`` → "")."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a prepared cache (run `multichex data prepare` first)")
    with path.open(newline="", encoding="utf-8") as handle:
        return [{c: _decode_cell(c, row.get(c) or "") for c in INDEX_COLUMNS} for row in csv.DictReader(handle)]


def read_errors(cache_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``errors.csv`` (``path``, ``reason``); empty when there is none."""
    path = Path(cache_dir) / ERRORS_NAME
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _errors_text(errors: Iterable[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(sorted(set(errors)))
    return buffer.getvalue()


# --------------------------------------------------------------------------- split


def gate_state(positive: float | None) -> str:
    """``positive`` / ``negative`` / ``unknown`` for a gate label (None or NaN = unknown)."""
    if positive is None or math.isnan(positive):
        return "unknown"
    return "positive" if positive >= 0.5 else "negative"


def make_split(records: Sequence[dict[str, Any]], fractions: dict[str, float] | None = None, seed: int = 0) -> dict[str, Any]:
    """Patient-wise parts of the cache, stratified by data set and gate label.

    Stratum of an image = ``"<dataset>/<positive|negative|unknown>"``: every source and both gate
    classes get their share of every part. A patient whose images disagree belongs to the stratum
    of its first image by id (see :func:`patient_split`). Returns the ``split.json`` content.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    ordered = sorted(records, key=lambda r: r["id"])
    strata = [f"{r['dataset']}/{gate_state(r['positive'])}" for r in ordered]
    parts = patient_split([r["patient_id"] for r in ordered], fractions, seed=seed, strata=strata)
    return {
        "seed": seed,
        "fractions": fractions,
        "stratify": STRATIFY_RULE,
        "parts": {name: sorted(ordered[i]["id"] for i in indices) for name, indices in parts.items()},
    }


def read_split(cache_dir: str | Path) -> dict[str, Any]:
    """Content of ``split.json``."""
    path = Path(cache_dir) / SPLIT_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: the cache has no split")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- prepare


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
        return f"multichex.data.native.{module}.{function}"
    if source not in READERS:
        raise ValueError(f"unknown source {source!r}; known: {sorted(all_readers())}")
    reader = READERS[source]
    return f"{reader.__module__}.{reader.__qualname__}"


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
            on_done(_prepare_chunk(part, root, size, out))
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        pending: set[Future] = {pool.submit(_prepare_chunk, part, root, size, out) for part in _chunks(todo, chunk)}
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
    atomic_write_text(out / ERRORS_NAME, _errors_text(errors))
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
    """Prepare (or resume preparing) the cache of one source; see the module docstring for the layout."""
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
    done = _done_records(journal, out)
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


# --------------------------------------------------------------------------- summary (for `data info`)


def cache_summary(cache_dir: str | Path) -> dict[str, Any]:
    """Counts of a cache: images, patients, per label, per task, per split part, errors."""
    cache_dir = Path(cache_dir)
    records = read_index(cache_dir)
    manifest_path = cache_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    labels = sorted({name for r in records for name in r["findings"] or {}})
    per_label = {name: _label_counts([(r["findings"] or {}).get(name) for r in records]) for name in labels}
    per_label["gate (positive)"] = _label_counts([r["positive"] for r in records])
    split = read_split(cache_dir) if (cache_dir / SPLIT_NAME).exists() else {"parts": {}}
    by_id = {r["id"]: r for r in records}
    parts = {name: _part_counts([by_id[i] for i in ids if i in by_id]) for name, ids in split.get("parts", {}).items()}
    errors = read_errors(cache_dir)
    return {
        "source": manifest.get("source"),
        "size": manifest.get("size"),
        "complete": manifest.get("complete"),
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "datasets": dict(sorted(Counter(r["dataset"] for r in records).items())),
        "labels": per_label,
        "tasks": _task_counts(records),
        "parts": parts,
        "errors": len(errors),
        "error_rows": errors,
    }


def _label_counts(values: Sequence[float | None]) -> dict[str, int]:
    known = [v for v in values if v is not None and not math.isnan(v)]
    positives = sum(v >= 0.5 for v in known)
    return {"positive": positives, "negative": len(known) - positives, "unknown": len(values) - len(known)}


def _task_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {
        "class labels": sum(bool(r["findings"]) for r in records),
        "gate label": sum(r["positive"] is not None for r in records),
        "mask": sum(bool(r["mask"]) for r in records),
        "boxes": sum(r["boxes"] is not None and len(r["boxes"]) > 0 for r in records),
        "known-empty boxes": sum(r["boxes"] == [] for r in records),
    }


def _part_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    gates = Counter(gate_state(r["positive"]) for r in records)
    return {
        "images": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "gate positive": gates["positive"],
        "gate negative": gates["negative"],
        "gate unknown": gates["unknown"],
        **{k: v for k, v in _task_counts(records).items() if k in {"mask", "boxes"}},
    }


# --------------------------------------------------------------------------- training-side reader


@dataclass(frozen=True)
class PreparedItem:
    """The geometry part of one index record (the labels live in the matching :class:`SampleRef`)."""

    image: Path
    mask: Path | None
    boxes: list[list[float]] | None
    box_names: list[str] | None
    letterbox: Letterbox
    original_size: tuple[int, int]


ALL_TASKS = ("cls", "gate", "seg", "det")


@dataclass
class CachedRef(SampleRef):
    """A :class:`SampleRef` read from a prepared cache (``cache_dir``): its pixels, mask and boxes are
    loaded from there, by :class:`PreparedDataset`. ``dataclasses.replace`` keeps the type, so the
    option functions that relabel refs keep this mark too."""

    cache_dir: Path | None = None


def _record_letterbox(record: dict[str, Any]) -> Letterbox:
    return Letterbox(record["orig_height"], record["orig_width"], record["size"], record["scale"], record["pad_x"], record["pad_y"])


def _record_to_ref(record: dict[str, Any], cache_dir: Path, tasks: Sequence[str] = ALL_TASKS,
                   mask_box_label: str | None = None) -> CachedRef:
    """Labels, provenance and meta of a record as a :class:`SampleRef` (tasks not in ``tasks`` hidden).

    ``mask_path`` is the cached (letterboxed) mask and ``boxes_xywh`` the cached boxes mapped back to
    original pixels: they say which annotations the image has, so the option functions that read or
    hide them (``restrict_tasks``, label budgets, ...) treat cached and raw refs alike. Only
    :class:`PreparedDataset` can load such a ref (a :class:`CachedRef`): it reads the pixels and boxes
    from the cache.
    """
    positive = record["positive"]
    boxes = names = None
    if "det" in tasks and record["boxes"] is not None:
        xyxy = torch.tensor(record["boxes"], dtype=torch.float64).reshape(-1, 4)
        original = _record_letterbox(record).invert_boxes(xyxy)
        boxes = [(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in original.tolist()]
        names = list(record["box_names"] or [])
    return CachedRef(
        image_path=Path(record["path"]),
        dataset=record["dataset"],
        patient_id=record["patient_id"],
        findings=dict(record["findings"] or {}) if "cls" in tasks else {},
        positive=float(positive) if positive is not None and "gate" in tasks else math.nan,
        cache_dir=cache_dir,
        mask_path=cache_dir / record["mask"] if record["mask"] and "seg" in tasks else None,
        boxes_xywh=boxes,
        box_names=names,
        mask_box_label=mask_box_label,
        extra=dict(record["extra"] or {}),
    )


def _record_to_item(record: dict[str, Any], cache_dir: Path, ref: SampleRef) -> PreparedItem:
    """Files, boxes and letterbox of a record, keeping the annotations ``ref`` still has: no mask when
    its ``mask_path`` is None, no boxes when its ``boxes_xywh`` is None, known-empty boxes when the ref
    says ``[]`` (e.g. ``empty_boxes_for_negatives``) but the record has none."""
    height, width = record["orig_height"], record["orig_width"]
    boxes = box_names = None
    if ref.boxes_xywh is not None:
        boxes, box_names = (record["boxes"], record["box_names"]) if record["boxes"] is not None else ([], [])
    return PreparedItem(
        image=cache_dir / record["image"],
        mask=cache_dir / record["mask"] if record["mask"] and ref.mask_path is not None else None,
        boxes=boxes,
        box_names=box_names,
        letterbox=_record_letterbox(record),
        original_size=(height, width),
    )


def cache_refs(cache_dir: str | Path) -> list[SampleRef]:
    """Every cached image as a :class:`SampleRef` with all its labels, in index (id) order: the list a
    run filters and splits like a raw source's, then loads with ``PreparedDataset(..., refs=...)``."""
    cache_dir = Path(cache_dir)
    return [_record_to_ref(r, cache_dir) for r in read_index(cache_dir)]


def cache_reader_options(cache_dir: str | Path) -> dict[str, Any]:
    """The reader options the cache was prepared with (``{}``: the reader's defaults)."""
    manifest = Path(cache_dir) / MANIFEST_NAME
    if not manifest.exists():
        return {}
    return dict(json.loads(manifest.read_text(encoding="utf-8")).get("options", {}).get("reader_options") or {})


def cache_size(cache_dir: str | Path) -> int:
    """Image size of a cache, from its manifest (else from the index)."""
    manifest = Path(cache_dir) / MANIFEST_NAME
    if manifest.exists():
        return int(json.loads(manifest.read_text(encoding="utf-8"))["size"])
    records = read_index(cache_dir)
    if not records:
        raise ValueError(f"{cache_dir}: empty cache without a manifest")
    return int(records[0]["size"])


class PreparedDataset(CXRDataset):
    """:class:`CXRDataset` over a prepared cache: same samples, but read from the letterboxed PNGs.

    Only loading differs (``_load`` reads the PNGs, no resize); augmentation, relabelling, the
    :class:`CXRSample` and its meta (``path`` = original image path) come from :class:`CXRDataset`,
    so with the same ``seed``/epoch/index the samples equal those of ``CXRDataset`` over the same refs
    in the same order. ``part`` keeps one part of ``split.json``; ``tasks`` hides other tasks' labels
    (like ``SourceConfig.tasks``); ``boxes_from_masks`` fits boxes of that class to the masks of items
    without boxes (like ``SourceConfig.boxes_from_masks``). ``cache`` is off by default: PNG decoding
    is cheap and in-memory copies would be duplicated per DataLoader worker.

    ``refs`` (from :func:`cache_refs`, then filtered and relabelled like a raw source's refs, e.g. by a
    run's source options and split) replaces ``part``/``tasks``/``boxes_from_masks``: the data set holds
    those images, in that order, with those refs' labels; a mask or boxes the ref no longer has are not
    loaded.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        class_names: Sequence[str],
        box_classes: Sequence[str],
        image_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: bool = False,
        part: str | None = None,
        tasks: Sequence[str] = ("cls", "gate", "seg", "det"),
        boxes_from_masks: str | None = None,
        refs: Sequence[SampleRef] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        size = cache_size(self.cache_dir)
        if image_size != size:
            raise ValueError(f"{self.cache_dir} was prepared at {size} px but image_size is {image_size}; prepare it again at {image_size}")
        if refs is None:
            records = self._select(read_index(self.cache_dir), part)
            refs = [_record_to_ref(r, self.cache_dir, list(tasks), boxes_from_masks) for r in records]
        else:
            if part is not None:
                raise ValueError("PreparedDataset: give either `part` or `refs`, not both")
            records = self._records_of(refs)
        refs = list(refs)
        self.items = [_record_to_item(r, self.cache_dir, ref) for r, ref in zip(records, refs)]  # before super(): its checks read the boxes
        super().__init__(refs, class_names, box_classes, image_size, augment, seed, cache)
        self.part = part
        self.ids = [r["id"] for r in records]

    def _annotated_box_names(self) -> list[list[str] | None]:
        """Box class names of each item as :meth:`_load` reads them: the cached boxes it keeps (see ``_record_to_item``)."""
        return [(item.box_names or []) if item.boxes is not None else None for item in self.items]

    def _records_of(self, refs: Sequence[SampleRef]) -> list[dict[str, Any]]:
        """The index record of each ref (matched by original image path)."""
        by_path = {str(Path(r["path"])): r for r in read_index(self.cache_dir)}
        missing = [str(ref.image_path) for ref in refs if str(Path(ref.image_path)) not in by_path]
        if missing:
            raise ValueError(f"{self.cache_dir}: {len(missing)} refs are not images of this cache (e.g. {missing[0]})")
        return [by_path[str(Path(ref.image_path))] for ref in refs]

    def _select(self, records: list[dict[str, Any]], part: str | None) -> list[dict[str, Any]]:
        """The records of one split part (all when ``part`` is None)."""
        if part is None:
            return records
        parts = read_split(self.cache_dir).get("parts", {})
        if part not in parts:
            raise ValueError(f"{self.cache_dir}: unknown split part {part!r}; known: {sorted(parts)}")
        wanted = set(parts[part])
        return [r for r in records if r["id"] in wanted]

    def _load(self, index: int) -> tuple:
        """Same tuple as :meth:`CXRDataset._load`, read from the cache."""
        item, ref = self.items[index], self.refs[index]
        image = read_png_u8(item.image, self.image_size)
        mask = (read_png_u8(item.mask, self.image_size) > 127).to(torch.uint8) if item.mask is not None else None
        boxes = names = None
        if item.boxes is not None:
            names = [canonical_name(n) for n in item.box_names or []]
            boxes = torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4)
        boxes, labels = self._box_targets(boxes, names, mask, ref)
        return image, mask, boxes, labels, item.letterbox, item.original_size
