"""NIH ChestX-ray14 exactly as the NIH Clinical Center publishes it.

Files read from ``root``:

* ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` — one row per image. Its header is
  ``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
  OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]`` (the bracketed names contain unquoted
  commas, and rows may end in empty cells), so columns are found by name only for the first seven.
* ``BBox_List_2017.csv`` (optional) — ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: x, y, w, h are
  the 3rd to 6th cells, in pixels of the released 1024×1024 images. :func:`read_native_nih` scales them to each
  image file's own size (x and w by width/1024, y and h by height/1024), so resized copies of the
  data set (the common 512 or 256 px ones) get boxes in their own pixels.
* ``train_val_list.txt`` / ``test_list.txt`` (optional) — the official split, one image name a line.
* images in ``images/`` and/or ``images_001/images/`` … ``images_012/images/``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from multichex.data.io import ImageReadError, read_image
from multichex.data.labels import NIH_FINDINGS, canonical_name
from multichex.data.ref import SampleRef
from multichex.data.sources import nih_ref

log = logging.getLogger(__name__)

DATASET = "nih-cxr14"
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position")
BOX_COLUMNS = ("Image Index", "Finding Label")
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
_AGE = re.compile(r"^(\d+)\s*([YMWD]?)$", re.IGNORECASE)
_AGE_UNIT_PER_YEAR = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
BOX_FRAME = (1024, 1024)
"""Width and height of the released images, the pixel frame of ``BBox_List_2017.csv``."""

Box = tuple[float, float, float, float]


def _read_table(path: Path, required: Sequence[str]) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Header positions of ``required`` columns and ``(line number, stripped cells)`` of each non-blank row."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{path}: row 1: missing required column(s) {missing}; header is {header}")
        rows = []
        for cells in reader:
            cells = [cell.strip() for cell in cells]
            while cells and not cells[-1]:
                cells.pop()  # trailing empty columns
            if cells:
                rows.append((reader.line_num, cells))
    return {name: header.index(name) for name in required}, rows


def _cell(cells: list[str], position: int, path: Path, line: int, name: str) -> str:
    if position >= len(cells) or not cells[position]:
        raise ValueError(f"{path}: row {line}: empty {name!r}")
    return cells[position]


def _findings(text: str, path: Path, line: int) -> dict[str, float]:
    """``A|B`` or ``No Finding`` → all 14 findings and "No Finding" as 0/1 (:func:`nih_ref` adds COVID-19)."""
    names = {canonical_name(token) for token in text.split("|") if token.strip()}
    unknown = sorted(names - set(NIH_FINDINGS) - {"No Finding"})
    if unknown or not names:
        raise ValueError(f"{path}: row {line}: unknown finding label(s) {unknown or [text]}")
    if "No Finding" in names and len(names) > 1:
        raise ValueError(f"{path}: row {line}: 'No Finding' combined with findings: {text!r}")
    findings = {name: float(name in names) for name in NIH_FINDINGS}
    findings["No Finding"] = float("No Finding" in names)
    return findings


def _age(text: str, path: Path, line: int) -> float | None:
    """``57`` (v2020) or ``058Y`` / ``011M`` (2017 release) → age in years; blank → None."""
    if not text:
        return None
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"{path}: row {line}: malformed 'Patient Age' {text!r}")
    unit = match.group(2).upper()
    value = int(match.group(1))
    return value if unit in ("", "Y") else value / _AGE_UNIT_PER_YEAR[unit]


def find_entry_file(root: Path) -> Path:
    """The ``Data_Entry_2017*.csv`` in ``root`` (the v2020 revision, with corrected ages, when both exist)."""
    candidates = sorted(Path(root).glob("Data_Entry_2017*.csv"))
    if not candidates:
        raise ValueError(f"{root}: no Data_Entry_2017*.csv label file found")
    return max(candidates, key=lambda path: ("v2020" in path.name, path.name))


def read_nih_boxes(path: Path) -> dict[str, list[tuple[str, Box]]]:
    """``BBox_List_2017.csv`` → ``{image name: [(canonical label, (x, y, w, h)), ...]}`` in file order."""
    path = Path(path)
    columns, rows = _read_table(path, BOX_COLUMNS)
    grouped: dict[str, list[tuple[str, Box]]] = {}
    for line, cells in rows:
        image = _cell(cells, columns["Image Index"], path, line, "Image Index")
        label = canonical_name(_cell(cells, columns["Finding Label"], path, line, "Finding Label"))
        if label not in NIH_FINDINGS:
            raise ValueError(f"{path}: row {line}: unknown box label {label!r}")
        start = columns["Finding Label"] + 1
        try:
            x, y, w, h = (float(value) for value in cells[start : start + 4])
        except ValueError as error:
            raise ValueError(f"{path}: row {line}: box needs four numbers x, y, w, h, found {cells[start:]}") from error
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise ValueError(f"{path}: row {line}: invalid box {(x, y, w, h)}")
        grouped.setdefault(image, []).append((label, (x, y, w, h)))
    return grouped


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image file — from its header when Pillow knows the format, else by
    decoding it — or None when the file is missing or unreadable."""
    if not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - not a format Pillow reads (e.g. DICOM): the full reader decides
        try:
            height, width = read_image(path).array.shape
        except ImageReadError:
            return None
        return width, height


def scale_boxes(boxes: Sequence[Box], size: tuple[int, int], frame: tuple[int, int] = BOX_FRAME) -> list[Box]:
    """Boxes ``(x, y, w, h)`` drawn on a ``frame`` (width, height) image, in pixels of a ``size`` image."""
    sx, sy = size[0] / frame[0], size[1] / frame[1]
    return [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in boxes]


def index_images(root: Path) -> dict[str, Path]:
    """Image name → path over ``images/`` and ``images_*/images/`` (first found wins), one directory scan each."""
    root = Path(root)
    folders = [root / "images"]
    if root.is_dir():
        with os.scandir(root) as entries:
            folders += sorted(Path(e.path) / "images" for e in entries if e.is_dir() and e.name.startswith("images_"))
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name not in index:
                    index[entry.name] = Path(entry.path)
    return index


def _split_names(root: Path, split: str) -> set[str] | None:
    if split == "all":
        return None
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown NIH split {split!r}; use 'all', 'train_val' or 'test'")
    path = Path(root) / SPLIT_FILES[split]
    if not path.is_file():
        raise ValueError(f"{path}: official split list for split={split!r} not found")
    return {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}


def read_native_nih(
    root: Path,
    *,
    split: str = "all",
    views: Sequence[str] | None = ("PA", "AP"),
    require_images: bool = True,
    boxes: bool = True,
    dataset: str = DATASET,
) -> list[SampleRef]:
    """Read NIH ChestX-ray14 as published: every image has all 14 findings and "No Finding" as 0/1.

    Box annotation is not exhaustive, so images without a box row get ``boxes_xywh=None`` (unknown).
    Boxes are in pixels of the image file (see the module notes); an image whose size cannot be read
    (absent with ``require_images=False``, or unreadable) gets ``boxes_xywh=None`` rather than boxes in
    a frame it may not have (one warning gives the count). ``split`` filters by the official lists,
    ``views`` by View Position (None keeps all); with ``require_images`` rows whose image file is
    absent are dropped (one warning gives the count).
    """
    root = Path(root)
    entry_path = find_entry_file(root)
    columns, rows = _read_table(entry_path, ENTRY_COLUMNS)
    wanted = _split_names(root, split)
    allowed_views = {v.upper() for v in views} if views is not None else None
    box_files = sorted(root.glob("BBox_List_2017*.csv")) if boxes else []
    box_index = read_nih_boxes(box_files[0]) if box_files else {}
    images = index_images(root)
    refs: list[SampleRef] = []
    seen: set[str] = set()
    missing = unsized = 0
    for line, cells in rows:
        get = {name: cells[i] if i < len(cells) else "" for name, i in columns.items()}
        name = _cell(cells, columns["Image Index"], entry_path, line, "Image Index")
        if name in seen:
            raise ValueError(f"{entry_path}: row {line}: duplicate image {name!r}")
        seen.add(name)
        findings = _findings(_cell(cells, columns["Finding Labels"], entry_path, line, "Finding Labels"), entry_path, line)
        patient = _cell(cells, columns["Patient ID"], entry_path, line, "Patient ID")
        try:
            follow_up = int(get["Follow-up #"])
        except ValueError as error:
            raise ValueError(f"{entry_path}: row {line}: malformed 'Follow-up #' {get['Follow-up #']!r}") from error
        age = _age(get["Patient Age"], entry_path, line)
        view = get["View Position"].upper()
        if (wanted is not None and name not in wanted) or (allowed_views is not None and view not in allowed_views):
            continue
        path = images.get(name)
        if path is None:
            if require_images:
                missing += 1
                continue
            path = root / "images" / name
        image_boxes = box_index.get(name)
        if image_boxes:
            size = image_size(path)
            if size is None:
                unsized += 1
                image_boxes = None
            else:
                image_boxes = list(zip([label for label, _ in image_boxes], scale_boxes([box for _, box in image_boxes], size)))
        extra = {"view": view, "age": age, "sex": get["Patient Gender"], "follow_up": follow_up}
        refs.append(nih_ref(path, patient, findings, image_boxes, dataset=dataset, extra=extra))
    if missing:
        log.warning("%s: %d selected rows have no image file under images/ or images_*/images/; dropped", entry_path, missing)
    if unsized:
        log.warning("%s: %d images with boxes: image size could not be read, so their boxes (in the %d×%d frame) "
                    "cannot be scaled; they are marked not box-annotated", box_files[0], unsized, *BOX_FRAME)
    return refs
