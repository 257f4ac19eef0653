"""The files of a cache folder: their names, the format version, item ids and the cached PNGs.

Layout of a cache folder ``DIR`` (see :mod:`multichex.data.cache` for what each file holds)::

    images/<id>.png  masks/<id>.png  index.csv  split.json  errors.csv  manifest.json  journal.jsonl
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from multichex.data.pixels import ImageReadError
from multichex.fileio import TEMP_SUFFIX

__all__ = [
    "CACHE_FORMAT",
    "ERRORS_NAME",
    "INDEX_NAME",
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "PNG_COMPRESS_LEVEL",
    "SPLIT_NAME",
    "item_id",
    "png_bytes",
    "read_png_u8",
    "relative_path",
    "remove_stale_temps",
]

CACHE_FORMAT = 1
"""Version of the cache layout; bumped when the files or their meaning change."""

JOURNAL_NAME = "journal.jsonl"
INDEX_NAME = "index.csv"
SPLIT_NAME = "split.json"
ERRORS_NAME = "errors.csv"
MANIFEST_NAME = "manifest.json"
PNG_COMPRESS_LEVEL = 1


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
