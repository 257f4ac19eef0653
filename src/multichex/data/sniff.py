"""File-type sniffing: what an image file really is, from its first bytes (never from its name alone).

The one place that knows the magic bytes: :mod:`multichex.data.io` (reading), the prepared cache
(pixel spacing) and ``multichex serve`` (uploads) all ask here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DICOM",
    "DICOM_RAW",
    "DICOM_SUFFIXES",
    "PREAMBLE_BYTES",
    "SNIFF_BYTES",
    "has_dicom_preamble",
    "looks_like_dicom_file",
    "looks_like_raster",
    "looks_like_raw_dicom",
    "raster_format",
    "read_head",
    "sniff",
]

PREAMBLE_BYTES = 128
"""Length of the DICOM file preamble; the ``DICM`` marker follows it."""
SNIFF_BYTES = PREAMBLE_BYTES + 4
"""Bytes needed to classify any supported file (the DICOM preamble plus ``DICM``)."""
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DICOM = "dicom"
"""Sniff result: DICOM file with preamble and ``DICM`` marker."""
DICOM_RAW = "dicom-raw"
"""Sniff result: what looks like a DICOM stream without preamble (a parser must confirm it)."""

# (format name, magic prefix); WebP is checked apart (its magic is split by a length field).
_RASTER_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("png", b"\x89PNG\r\n\x1a\n"),
    ("jpeg", b"\xff\xd8\xff"),
    ("tiff", b"II*\x00"),  # little endian
    ("tiff", b"MM\x00*"),  # big endian
    ("bmp", b"BM"),
    ("gif", b"GIF8"),
    ("jpeg2000", b"\x00\x00\x00\x0cjP  "),  # JP2 container
    ("jpeg2000", b"\xff\x4f\xff\x51"),  # bare codestream
)


def has_dicom_preamble(head: bytes) -> bool:
    """True when bytes 128..131 are ``DICM`` (a DICOM file with its preamble)."""
    return head[PREAMBLE_BYTES:SNIFF_BYTES] == b"DICM"


def looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0x0002 or 0x0008 tag (little endian)."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def raster_format(head: bytes) -> str | None:
    """``png``, ``jpeg``, ``tiff``, ``bmp``, ``gif``, ``jpeg2000`` or ``webp`` from the magic bytes, else None."""
    for name, magic in _RASTER_MAGICS:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def looks_like_raster(head: bytes) -> bool:
    """Whether the bytes start like one of the common raster formats."""
    return raster_format(head) is not None


def sniff(head: bytes) -> str | None:
    """Classify the first :data:`SNIFF_BYTES` of a file.

    Returns :data:`DICOM` (preamble + ``DICM``; checked first), a raster format name (see
    :func:`raster_format`), :data:`DICOM_RAW` (no preamble, starts with a DICOM tag) or None.
    """
    if has_dicom_preamble(head):
        return DICOM
    fmt = raster_format(head)
    if fmt is not None:
        return fmt
    if looks_like_raw_dicom(head):
        return DICOM_RAW
    return None


def read_head(path: str | os.PathLike[str], size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of a file (fewer when it is shorter); OSError when it cannot be read."""
    with open(path, "rb") as handle:
        return handle.read(size)


def looks_like_dicom_file(path: str | os.PathLike[str]) -> bool:
    """DICOM by content (preamble) or by name (``.dcm`` / ``.dicom``); False when the file cannot be read."""
    try:
        head = read_head(path)
    except OSError:
        return False
    return has_dicom_preamble(head) or Path(path).suffix.lower() in DICOM_SUFFIXES
