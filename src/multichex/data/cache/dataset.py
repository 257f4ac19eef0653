"""The training-side reader: cache records as :class:`CachedRef`, and :class:`PreparedDataset` loading their PNGs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multichex.data.cache.index import read_index
from multichex.data.cache.layout import MANIFEST_NAME, read_png_u8
from multichex.data.cache.splits import read_split
from multichex.data.dataset import CXRDataset
from multichex.data.labels import canonical_name
from multichex.data.ref import SampleRef
from multichex.data.transforms import AugmentConfig, Letterbox

__all__ = [
    "ALL_TASKS",
    "CachedRef",
    "PreparedDataset",
    "PreparedItem",
    "cache_reader_options",
    "cache_refs",
    "cache_size",
]


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
