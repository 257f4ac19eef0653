"""The cache's tables: ``index.csv`` (one row per item, typed cells) and ``errors.csv`` (what could not be prepared)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multichex.data.cache.layout import ERRORS_NAME, INDEX_NAME

__all__ = ["INDEX_COLUMNS", "errors_text", "index_text", "read_errors", "read_index"]

INDEX_COLUMNS: tuple[str, ...] = (
    "id", "image", "mask", "boxes", "box_names", "findings", "positive", "patient_id", "dataset",
    "path", "rel_path", "orig_height", "orig_width", "size", "scale", "pad_x", "pad_y",
    "pixel_spacing", "extra",
)
_JSON_COLUMNS = frozenset({"boxes", "box_names", "findings", "pixel_spacing", "extra"})
_INT_COLUMNS = frozenset({"orig_height", "orig_width", "size", "pad_x", "pad_y"})
_FLOAT_COLUMNS = frozenset({"positive", "scale"})


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


def errors_text(errors: Iterable[tuple[str, str]]) -> str:
    """CSV text of ``errors.csv``: ``path,reason`` rows, sorted and without duplicates."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(sorted(set(errors)))
    return buffer.getvalue()


def read_errors(cache_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``errors.csv`` (``path``, ``reason``); empty when there is none."""
    path = Path(cache_dir) / ERRORS_NAME
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
