"""Robust reading of chest X-ray image files (PNG, JPEG, TIFF, BMP, JSRT raw; DICOM via :mod:`.dicom`).

Every reader returns a :class:`LoadedImage` holding a float32 ``H×W`` array scaled to
``[0, 1]``. Every failure, whatever its cause, surfaces as :class:`ImageReadError`, which
names the file and the reason. The format is detected from the file content
(:mod:`multichex.data.sniff`), never from the extension alone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multichex.data import sniff
from multichex.data.dicom import read_dicom
from multichex.data.pixels import (
    MAX_PIXELS,
    ImageReadError,
    LoadedImage,
    check_finite,
    check_size,
    finish,
    minmax,
    to_uint8,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageReadError",
    "LoadedImage",
    "JSRT_PIXEL_SPACING",
    "JSRT_SHAPE",
    "list_images",
    "read_image",
    "read_jsrt_raw",
    "to_uint8",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
)

JSRT_SHAPE: tuple[int, int] = (2048, 2048)
"""Rows × columns of every JSRT ``.IMG`` file (headerless 16-bit big-endian words)."""
JSRT_PIXEL_SPACING: tuple[float, float] = (0.175, 0.175)
"""JSRT pixel size in mm (row, column)."""
_JSRT_BYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
_JSRT_MAX = 4095  # 12 bits stored
# Raster formats Pillow may try; plugins that shell out (EPS) or are exotic are excluded.
_PIL_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "GIF", "WEBP", "PPM")
_PIL_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PIL_BITS = {"1": 1, "I": 32, "F": 32}


# --------------------------------------------------------------------------- public helpers


def list_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted).

    A file counts when its suffix is in :data:`IMAGE_SUFFIXES` (any case), or when it has no
    suffix (or a purely numeric one, as in UID-named DICOM files) and starts with a DICOM
    preamble. macOS ``._*`` resource-fork files are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    found = [p for p in root.rglob("*") if _is_image_candidate(p)]
    return sorted(found)


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read one image file into a float32 ``H×W`` array in ``[0, 1]``.

    Headerless JSRT raw files carry no magic bytes, so they are the one case recognised by name
    and size: a ``.img`` / ``.IMG`` file that is neither DICOM nor a known raster format is read
    with :func:`read_jsrt_raw` (inverted so lungs are dark), and must be exactly 2048·2048·2 bytes.

    Raises:
        ImageReadError: for any failure (missing, empty, truncated, unsupported, too large,
            compressed DICOM without a decoder, non-finite values, ...).
    """
    path = Path(path)
    header = _read_header(path)
    kind = _kind(header, path)
    if path.suffix.lower() == ".img" and kind != sniff.DICOM and not sniff.looks_like_raster(header):
        return read_jsrt_raw(path)
    try:
        if kind == sniff.DICOM:
            return read_dicom(path, force=False)
        if kind == sniff.DICOM_RAW:
            return read_dicom(path, force=True)
        return _read_raster(path, header)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(str(path), "out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 - every failure must become ImageReadError
        raise ImageReadError(str(path), f"unexpected {type(exc).__name__}: {exc}") from exc


def read_jsrt_raw(path: str | os.PathLike[str], *, invert: bool = True) -> LoadedImage:
    """Read a JSRT ``.IMG`` file: headerless 2048×2048 big-endian uint16, 12 bits stored, 0.175 mm pixels.

    JSRT raw values grow with film darkness (the stored number is like an optical density:
    air-filled lung is a HIGH value, bone a LOW one). With ``invert=True`` (what
    :func:`read_image` uses) the result is ``(4095 - raw) / 4095`` so lungs are dark and bone
    bright, like every other image this package reads; ``invert=False`` gives ``raw / 4095``.
    Source of the convention: the widely used JSRT conversion ``img = 1.0 - raw / 4096`` in the
    README of github.com/imlab-uiip/lung-segmentation-2d (and its many forks), which yields the
    usual radiograph appearance. Values above 4095 (not expected) are clipped and counted in
    ``meta["clipped_pixels"]``.

    Raises:
        ImageReadError: when the file is missing or is not exactly 2048·2048·2 bytes.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(str(path), "file not found") from None
    except OSError as exc:
        raise ImageReadError(str(path), f"cannot open file: {exc}") from exc
    if size != _JSRT_BYTES:
        raise ImageReadError(
            str(path),
            f"not a JSRT raw image: .IMG files must be exactly {_JSRT_BYTES} bytes "
            f"({JSRT_SHAPE[0]}×{JSRT_SHAPE[1]} big-endian uint16), this one has {size} bytes",
        )
    try:
        raw = np.fromfile(path, dtype=">u2").reshape(JSRT_SHAPE)
    except (OSError, ValueError) as exc:
        raise ImageReadError(str(path), f"cannot read JSRT raw data: {exc}") from exc
    clipped = int(np.count_nonzero(raw > _JSRT_MAX))
    values = np.minimum(raw, _JSRT_MAX).astype(np.float32)
    if invert:
        values = _JSRT_MAX - values
    return finish(
        values / np.float32(_JSRT_MAX),
        path,
        fmt="jsrt-raw",
        bits=12,
        photometric="MONOCHROME2" if invert else "MONOCHROME1",
        spacing=JSRT_PIXEL_SPACING,
        extra={"inverted": invert, "clipped_pixels": clipped},
    )


# --------------------------------------------------------------------------- detection


def _is_image_candidate(path: Path) -> bool:
    """Whether ``list_images`` should return ``path``."""
    if path.name.startswith("._") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix == "" or suffix[1:].isdigit():
        try:
            return sniff.has_dicom_preamble(sniff.read_head(path))
        except OSError:
            return False
    return False


def _read_header(path: Path) -> bytes:
    """First bytes of the file; raises ImageReadError when it cannot be read or is empty."""
    try:
        header = sniff.read_head(path)
    except FileNotFoundError:
        raise ImageReadError(str(path), "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(str(path), "is a directory, not a file") from None
    except PermissionError:
        raise ImageReadError(str(path), "permission denied") from None
    except OSError as exc:
        raise ImageReadError(str(path), f"cannot open file: {exc}") from exc
    if not header:
        raise ImageReadError(str(path), "empty file (0 bytes)")
    return header


def _kind(header: bytes, path: Path) -> str:
    """:data:`~.sniff.DICOM`, :data:`~.sniff.DICOM_RAW` or ``raster`` (unknown content is left to Pillow)."""
    kind = sniff.sniff(header)
    if kind in (sniff.DICOM, sniff.DICOM_RAW):
        return kind
    if kind is None and path.suffix.lower() in sniff.DICOM_SUFFIXES:
        return sniff.DICOM_RAW
    return "raster"


# --------------------------------------------------------------------------- raster (Pillow)


def _read_raster(path: Path, header: bytes) -> LoadedImage:
    """Decode a raster image with Pillow, refusing oversized images before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with path.open("rb") as fh:
                with Image.open(fh, formats=_PIL_FORMATS) as im:
                    check_size(im.width, im.height, path)
                    fmt = (im.format or "unknown").lower()
                    im.load()
                    im = ImageOps.exif_transpose(im)
                    array, bits = _pil_to_array(im)
        except ImageReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(str(path), f"image too large (decompression bomb): {exc}") from None
        except UnidentifiedImageError:
            what = "corrupt or unsupported image header" if sniff.looks_like_raster(header) else (
                "not a recognised image format"
            )
            raise ImageReadError(str(path), f"{what} (starts with {header[:8]!r})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise ImageReadError(
                str(path), f"cannot decode image (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc
    check_finite(array, path)
    return finish(array, path, fmt=fmt, bits=bits, photometric=None, spacing=None)


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, int]:
    """Pixels of a loaded Pillow image as a scaled float32 array, and its bit depth."""
    mode = im.mode
    if mode in _PIL_16BIT_MODES:
        return minmax(np.asarray(im)), 16
    if mode in ("I", "F"):
        array = np.asarray(im)
        if mode == "F" and not np.isfinite(array).all():
            return array, 32  # caller refuses it
        return minmax(array), _PIL_BITS[mode]
    bits = _PIL_BITS.get(mode, 8)
    gray = im if mode == "L" else _to_luminance_image(im)
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0), bits


def _to_luminance_image(im: Image.Image) -> Image.Image:
    """Convert any colour / palette / alpha mode to 8-bit luminance ("L"), dropping alpha."""
    try:
        return im.convert("L")
    except ValueError:
        return im.convert("RGB").convert("L")
