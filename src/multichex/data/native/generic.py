"""Any "CSV + image folder" data set, and the small CSV helpers the native readers share.

:func:`read_generic` turns one CSV (one or more rows per image) into :class:`SampleRef` objects:
0/1/blank label columns become canonical findings, optional mask paths are merged, optional box
rows are collected per image. :func:`read_table` and :func:`parse_flag` are reused by the other
native readers so every CSV problem is reported the same way: a ``ValueError`` naming the file,
the line and the problem.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multichex.data.labels import canonical_name
from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["Row", "parse_flag", "read_generic", "read_table"]

_MASK_SEPARATOR = ";"


@dataclass(frozen=True)
class Row:
    """One CSV record: its cells by column name and the (last) physical line it ended on."""

    line: int
    cells: dict[str, str]

    def get(self, column: str) -> str:
        """The stripped cell, ``""`` when the column is absent or the cell blank."""
        return (self.cells.get(column) or "").strip()


def read_table(path: Path, required: Iterable[str] = ()) -> tuple[list[str], list[Row]]:
    """Read a CSV file (UTF-8, optional BOM) into its header and rows.

    Raises:
        ValueError: when the file is missing or empty, a ``required`` column is absent, or a row
            has more cells than the header (misaligned columns would silently corrupt labels).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            if not header:
                raise ValueError(f"{path}: empty file (no header row)")
            reader.fieldnames = header
            missing = [name for name in required if name not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; columns present: {header}")
            rows = []
            for record in reader:
                if None in record:
                    raise ValueError(
                        f"{path}: line {reader.line_num}: {len(header) + len(record[None])} cells "
                        f"but the header has {len(header)} columns"
                    )
                rows.append(Row(reader.line_num, {k: v or "" for k, v in record.items()}))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text: {error}") from error
    except csv.Error as error:
        raise ValueError(f"{path}: malformed CSV: {error}") from error
    return header, rows


def parse_flag(value: str, path: Path, line: int, column: str) -> float:
    """A 0/1 cell as float (``"1"``, ``"1.0"``, ``"0"``, ...), NaN when blank.

    Raises:
        ValueError: naming file, line and column for anything else.
    """
    text = value.strip()
    if text == "":
        return math.nan
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise ValueError(f"{path}: line {line}: column {column!r} must be 0, 1 or blank, got {value!r}")
    return number


def _is_flag_column(rows: Sequence[Row], column: str) -> bool:
    """True when every non-blank cell of ``column`` is 0/1 and at least one is not blank."""
    seen = False
    for row in rows:
        text = row.get(column)
        if text == "":
            continue
        try:
            if float(text) not in (0.0, 1.0):
                return False
        except ValueError:
            return False
        seen = True
    return seen


def _resolve(base: Path, cell: str) -> Path:
    """``cell`` as a path: absolute as is, else relative to ``base``."""
    candidate = Path(cell)
    return candidate if candidate.is_absolute() else base / candidate


@dataclass
class _Group:
    """Everything collected for one image over its CSV rows."""

    first_line: int
    patient: str
    findings: dict[str, float]
    positive: float = math.nan
    masks: list[Path] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    box_names: list[str] = field(default_factory=list)


def _merge_value(old: float, new: float, what: str, path: Path, line: int) -> float:
    """Combine one label seen on two rows of the same image: blanks defer, conflicts fail."""
    if math.isnan(old):
        return new
    if math.isnan(new) or new == old:
        return old
    raise ValueError(f"{path}: line {line}: {what} = {new:g} contradicts {old:g} on an earlier row for the same image")


def _derive_positive(findings: dict[str, float]) -> float:
    """Gate label: ``1 - No Finding`` when known, else 1 if any finding is 1, 0 if all are known 0."""
    no_finding = findings.get("No Finding", math.nan)
    if not math.isnan(no_finding):
        return 1.0 - no_finding
    values = [v for k, v in findings.items() if k != "No Finding"]
    if any(v == 1.0 for v in values):
        return 1.0
    if values and all(v == 0.0 for v in values):
        return 0.0
    return math.nan


def _parse_box(row: Row, columns: Sequence[str], path: Path) -> tuple[float, float, float, float] | None:
    """``(x, y, w, h)`` from the row, None when all four cells are blank."""
    cells = [row.get(c) for c in columns]
    if all(c == "" for c in cells):
        return None
    try:
        x, y, w, h = (float(c) for c in cells)
    except ValueError:
        raise ValueError(f"{path}: line {row.line}: box columns {list(columns)} must all be numbers, got {cells}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(
            f"{path}: line {row.line}: invalid box (x={x}, y={y}, w={w}, h={h}); need finite values and w, h > 0"
        )
    return (x, y, w, h)


def read_generic(
    csv_path: Path,
    image_dir: Path,
    image_column: str = "image",
    label_columns: Sequence[str] | None = None,
    patient_column: str | None = None,
    mask_column: str | None = None,
    box_columns: Sequence[str] | None = None,
    box_label_column: str | None = None,
    *,
    box_label: str | None = None,
    boxes_exhaustive: bool = True,
    mask_dir: Path | None = None,
    positive_column: str | None = None,
    dataset: str = "generic",
    skip_missing: bool = False,
) -> list[SampleRef]:
    """Read a CSV describing images in ``image_dir``.

    Args:
        csv_path: the CSV; one row per image, or several rows per image (e.g. one per box).
        image_dir: folder the ``image_column`` paths are relative to (absolute paths kept).
        image_column: column with the image path.
        label_columns: 0/1/blank finding columns (blank → NaN); default: every column not used
            otherwise whose non-blank values are all 0/1. Names go through ``canonical_name``.
        patient_column: column with the patient id; default: the image file stem.
        mask_column: column with mask path(s) relative to ``mask_dir`` (default: the CSV's folder);
            several paths in one cell separated by ``;``; all masks of an image are merged.
        box_columns: four columns ``x, y, w, h`` in original image pixels; all blank = no box.
        box_label_column: column naming each box's finding; else every box gets ``box_label``.
        box_label: finding name for boxes when there is no ``box_label_column``.
        boxes_exhaustive: with ``box_columns``, an image without any box gets ``[]`` (annotated,
            nothing found) when True, ``None`` (unknown) when False.
        positive_column: 0/1 gate label column; default: ``1 - No Finding`` if that label exists,
            else 1 when any finding is 1, 0 when all are known 0, NaN otherwise.
        dataset: data set name; patient ids are namespaced ``"<dataset>:<id>"``.
        skip_missing: skip (with a warning) rows whose image / mask file does not exist instead
            of raising.

    Raises:
        ValueError: missing file or column, bad cell, contradicting rows — naming file and line.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    base_mask_dir = Path(mask_dir) if mask_dir is not None else csv_path.parent
    box_columns = tuple(box_columns) if box_columns is not None else None
    if box_columns is not None and len(box_columns) != 4:
        raise ValueError(f"box_columns must name 4 columns (x, y, w, h), got {box_columns}")
    if box_columns is not None and box_label_column is None and not box_label:
        raise ValueError("box_columns needs box_label_column or box_label to name the boxes")
    used = [image_column, patient_column, mask_column, box_label_column, positive_column, *(box_columns or ())]
    used_columns = [c for c in used if c]
    header, rows = read_table(csv_path, required=used_columns + list(label_columns or []))
    if label_columns is None:
        label_columns = [c for c in header if c not in used_columns and _is_flag_column(rows, c)]
    names = [canonical_name(c) for c in label_columns]
    if len(set(names)) != len(names):
        raise ValueError(f"{csv_path}: label columns {list(label_columns)} map to duplicate canonical names {names}")

    groups: dict[str, _Group] = {}
    for row in rows:
        image_cell = row.get(image_column)
        if not image_cell:
            raise ValueError(f"{csv_path}: line {row.line}: empty {image_column!r} cell")
        patient = row.get(patient_column) if patient_column else Path(image_cell).stem
        if not patient:
            raise ValueError(f"{csv_path}: line {row.line}: empty {patient_column!r} cell")
        findings = {n: parse_flag(row.get(c), csv_path, row.line, c) for n, c in zip(names, label_columns)}
        group = groups.get(image_cell)
        if group is None:
            group = groups[image_cell] = _Group(row.line, patient, findings)
        else:
            if patient != group.patient:
                raise ValueError(
                    f"{csv_path}: line {row.line}: patient {patient!r} differs from {group.patient!r} "
                    f"on line {group.first_line} for image {image_cell!r}"
                )
            for name, value in findings.items():
                group.findings[name] = _merge_value(group.findings[name], value, name, csv_path, row.line)
        if positive_column:
            value = parse_flag(row.get(positive_column), csv_path, row.line, positive_column)
            group.positive = _merge_value(group.positive, value, positive_column, csv_path, row.line)
        if mask_column and row.get(mask_column):
            for cell in row.get(mask_column).split(_MASK_SEPARATOR):
                mask = _resolve(base_mask_dir, cell.strip())
                if mask not in group.masks:
                    group.masks.append(mask)
        if box_columns is not None:
            box = _parse_box(row, box_columns, csv_path)
            if box is not None:
                name = row.get(box_label_column) if box_label_column else str(box_label)
                if not name:
                    raise ValueError(f"{csv_path}: line {row.line}: box without a {box_label_column!r} label")
                group.boxes.append(box)
                group.box_names.append(canonical_name(name))
    refs = []
    for image_cell, group in groups.items():
        ref = _to_ref(
            image_cell, group, image_dir, box_columns, boxes_exhaustive, positive_column, dataset, skip_missing, csv_path
        )
        if ref is not None:
            refs.append(ref)
    return refs


def _to_ref(
    image_cell: str,
    group: _Group,
    image_dir: Path,
    box_columns: Sequence[str] | None,
    boxes_exhaustive: bool,
    positive_column: str | None,
    dataset: str,
    skip_missing: bool,
    csv_path: Path,
) -> SampleRef | None:
    """Turn one image's collected rows into a :class:`SampleRef` (None when skipped as missing)."""
    image_path = _resolve(image_dir, image_cell)
    missing = [p for p in [image_path, *group.masks] if not p.is_file()]
    if missing:
        message = f"{csv_path}: line {group.first_line}: file not found: {missing[0]}"
        if not skip_missing:
            raise ValueError(message)
        log.warning("skipping %s", message)
        return None
    boxes: list[tuple[float, float, float, float]] | None = None
    box_names: list[str] | None = None
    if box_columns is not None and (group.boxes or boxes_exhaustive):
        boxes, box_names = list(group.boxes), list(group.box_names)
    mask_path: Path | list[Path] | None = None
    if group.masks:
        mask_path = group.masks[0] if len(group.masks) == 1 else list(group.masks)
    positive = group.positive if positive_column else _derive_positive(group.findings)
    return SampleRef(
        image_path=image_path,
        dataset=dataset,
        patient_id=f"{dataset}:{group.patient}",
        findings=dict(group.findings),
        positive=positive,
        mask_path=mask_path,
        boxes_xywh=boxes,
        box_names=box_names,
        extra={"csv_line": group.first_line},
    )
