"""Robust reading of chest X-ray image files (PNG, JPEG, TIFF, BMP, DICOM, ...).

Every reader returns a :class:`LoadedImage` holding a float32 ``H×W`` array scaled to
``[0, 1]``. Every failure, whatever its cause, surfaces as :class:`ImageReadError`, which
names the file and the reason. The format is detected from the file content, never from the
extension alone.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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

MAX_PIXELS = 50_000_000
"""Largest width × height accepted; larger declared sizes are refused before decoding."""

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
)

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

JSRT_SHAPE: tuple[int, int] = (2048, 2048)
"""Rows × columns of every JSRT ``.IMG`` file (headerless 16-bit big-endian words)."""
JSRT_PIXEL_SPACING: tuple[float, float] = (0.175, 0.175)
"""JSRT pixel size in mm (row, column)."""
_JSRT_BYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
_JSRT_MAX = 4095  # 12 bits stored
_PREAMBLE_LEN = 128
_SNIFF_LEN = 132
# Raster formats Pillow may try; plugins that shell out (EPS) or are exotic are excluded.
_PIL_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "GIF", "WEBP", "PPM")
_PIL_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PIL_BITS = {"1": 1, "I": 32, "F": 32}
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageReadError(ValueError):
    """An image file could not be read; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class LoadedImage:
    """A decoded image: float32 ``H×W`` array in ``[0, 1]`` plus where it came from."""

    array: np.ndarray
    original_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- public helpers


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a float array in ``[0, 1]`` to uint8 (NaN → 0, clipped, rounded)."""
    scaled = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


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
    kind = _sniff(header, path)
    if path.suffix.lower() == ".img" and kind != "dicom" and not _looks_like_raster(header):
        return read_jsrt_raw(path)
    try:
        if kind == "dicom":
            return _read_dicom(path, force=False)
        if kind == "dicom-raw":
            return _read_dicom(path, force=True)
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
    return _finish(
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
        return _has_dicom_preamble(path)
    return False


def _has_dicom_preamble(path: Path) -> bool:
    """True when bytes 128..131 of the file are ``DICM``."""
    try:
        with path.open("rb") as fh:
            header = fh.read(_SNIFF_LEN)
    except OSError:
        return False
    return header[_PREAMBLE_LEN:_SNIFF_LEN] == b"DICM"


def _read_header(path: Path) -> bytes:
    """First bytes of the file; raises ImageReadError when it cannot be read or is empty."""
    try:
        with path.open("rb") as fh:
            header = fh.read(_SNIFF_LEN)
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


def _sniff(header: bytes, path: Path) -> str:
    """Classify content as ``dicom`` (has preamble), ``dicom-raw`` (no preamble) or ``raster``."""
    if header[_PREAMBLE_LEN:_SNIFF_LEN] == b"DICM":
        return "dicom"
    if _looks_like_raster(header):
        return "raster"
    if path.suffix.lower() in _DICOM_SUFFIXES or _looks_like_raw_dicom(header):
        return "dicom-raw"
    return "raster"


def _looks_like_raster(header: bytes) -> bool:
    """Magic bytes of the common raster formats."""
    magics = (
        b"\x89PNG\r\n\x1a\n",  # PNG
        b"\xff\xd8\xff",  # JPEG
        b"II*\x00",  # TIFF little endian
        b"MM\x00*",  # TIFF big endian
        b"BM",  # BMP
        b"GIF8",  # GIF
        b"\x00\x00\x00\x0cjP  ",  # JPEG 2000 (JP2)
        b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
    )
    return header.startswith(magics) or (header[:4] == b"RIFF" and header[8:12] == b"WEBP")


def _looks_like_raw_dicom(header: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0x0002 or 0x0008 tag."""
    return len(header) >= 8 and header[:2] in (b"\x02\x00", b"\x08\x00")


# --------------------------------------------------------------------------- scaling


def _minmax(array: np.ndarray) -> np.ndarray:
    """Min–max scale to float32 ``[0, 1]``; a constant image becomes all zeros."""
    small_int = array.dtype.kind in "uib" and array.dtype.itemsize <= 2
    work = array.astype(np.float32 if small_int else np.float64, copy=False)
    lo, hi = float(work.min()), float(work.max())
    if hi <= lo:
        return np.zeros(work.shape, dtype=np.float32)
    scaled = (work - lo) / (hi - lo)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN / inf pixel values."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ImageReadError(str(path), "non-finite pixel values")


def _check_size(width: int, height: int, path: Path) -> None:
    """Refuse empty images and images larger than :data:`MAX_PIXELS`."""
    if width <= 0 or height <= 0:
        raise ImageReadError(str(path), f"empty image ({width}×{height} pixels)")
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            str(path),
            f"image too large: {width}×{height} = {width * height} pixels exceeds "
            f"MAX_PIXELS={MAX_PIXELS} (possible decompression bomb)",
        )


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``H×W×3`` (or more channels; extras dropped) array."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


# --------------------------------------------------------------------------- raster (Pillow)


def _read_raster(path: Path, header: bytes) -> LoadedImage:
    """Decode a raster image with Pillow, refusing oversized images before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with path.open("rb") as fh:
                with Image.open(fh, formats=_PIL_FORMATS) as im:
                    _check_size(im.width, im.height, path)
                    fmt = (im.format or "unknown").lower()
                    im.load()
                    im = ImageOps.exif_transpose(im)
                    array, bits = _pil_to_array(im)
        except ImageReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(str(path), f"image too large (decompression bomb): {exc}") from None
        except UnidentifiedImageError:
            what = "corrupt or unsupported image header" if _looks_like_raster(header) else (
                "not a recognised image format"
            )
            raise ImageReadError(str(path), f"{what} (starts with {header[:8]!r})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise ImageReadError(
                str(path), f"cannot decode image (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc
    _check_finite(array, path)
    return _finish(array, path, fmt=fmt, bits=bits, photometric=None, spacing=None)


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, int]:
    """Pixels of a loaded Pillow image as a scaled float32 array, and its bit depth."""
    mode = im.mode
    if mode in _PIL_16BIT_MODES:
        return _minmax(np.asarray(im)), 16
    if mode in ("I", "F"):
        array = np.asarray(im)
        if mode == "F" and not np.isfinite(array).all():
            return array, 32  # caller refuses it
        return _minmax(array), _PIL_BITS[mode]
    bits = _PIL_BITS.get(mode, 8)
    gray = im if mode == "L" else _to_luminance_image(im)
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0), bits


def _to_luminance_image(im: Image.Image) -> Image.Image:
    """Convert any colour / palette / alpha mode to 8-bit luminance ("L"), dropping alpha."""
    try:
        return im.convert("L")
    except ValueError:
        return im.convert("RGB").convert("L")


def _finish(
    array: np.ndarray,
    path: Path,
    *,
    fmt: str,
    bits: int,
    photometric: str | None,
    spacing: tuple[float, float] | None,
    extra: dict[str, Any] | None = None,
) -> LoadedImage:
    """Wrap a scaled array into a :class:`LoadedImage`."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    meta: dict[str, Any] = {
        "format": fmt,
        "bits_stored": int(bits),
        "photometric": photometric,
        "pixel_spacing": spacing,
        "path": str(path),
    }
    meta.update(extra or {})
    return LoadedImage(array=array, original_size=(array.shape[0], array.shape[1]), meta=meta)


# --------------------------------------------------------------------------- DICOM (pydicom)


def _read_dicom(path: Path, *, force: bool) -> LoadedImage:
    """Decode a DICOM file: modality LUT, VOI LUT / window, MONOCHROME1 inversion, min–max."""
    ds = _dcmread(path, force=force)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        reason = "no pixel data" if not force else "not a DICOM image (no 'DICM' marker, no pixel data)"
        raise ImageReadError(str(path), reason)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(cols, rows, path)
    _check_decoder(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    raw = _decode_first_frame(ds, path)
    if photometric.startswith("MONOCHROME"):
        array, voi_applied = _apply_grayscale_luts(raw, ds, path)
        if photometric == "MONOCHROME1":
            array = -array.astype(np.float64, copy=False)  # bone bright (no unsigned wrap-around)
    else:
        array, voi_applied = _dicom_colour_to_gray(raw, ds, photometric), False
    _check_finite(array, path)
    bits = int(ds.get("BitsStored", 0) or raw.dtype.itemsize * 8)
    return _finish(
        _minmax(array),
        path,
        fmt="dicom",
        bits=bits,
        photometric=photometric,
        spacing=_pixel_spacing(ds),
        extra={"voi_applied": voi_applied, "transfer_syntax": str(_transfer_syntax(ds) or "")},
    )


def _dcmread(path: Path, *, force: bool) -> Any:
    """``pydicom.dcmread`` with every parse failure mapped to ImageReadError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=force)
    except InvalidDicomError as exc:
        raise ImageReadError(str(path), f"not a valid DICOM file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise ImageReadError(
            str(path), f"cannot parse DICOM (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc


def _transfer_syntax(ds: Any) -> Any:
    """The dataset's transfer syntax UID, or None when the file meta lacks it."""
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


def _describe_syntax(uid: Any) -> str:
    """``"<name> (<uid>)"`` for a transfer syntax."""
    name = getattr(uid, "name", "") or "unknown transfer syntax"
    return f"{name} ({uid})" if str(uid) != name else str(uid)


def _check_decoder(ds: Any, path: Path) -> None:
    """Refuse a compressed transfer syntax for which no pixel decoder is installed."""
    from pydicom.pixels import get_decoder

    uid = _transfer_syntax(ds)
    if uid is None or not getattr(uid, "is_compressed", False):
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageReadError(
            str(path), f"compressed transfer syntax {_describe_syntax(uid)} is not supported by pydicom"
        ) from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "a pydicom pixel decoder plugin"
        raise ImageReadError(
            str(path),
            f"compressed transfer syntax {_describe_syntax(uid)} but no decoder is installed; "
            f"install one of: {options}",
        )


def _decode_first_frame(ds: Any, path: Path) -> np.ndarray:
    """Decode only the first frame of the pixel data."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        if frames > 1:
            ds.pixel_array_options(index=0)
        array = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        uid = _transfer_syntax(ds)
        syntax = f" ({_describe_syntax(uid)})" if uid is not None else ""
        detail = " ".join(str(exc).split())  # plugin errors span several lines
        raise ImageReadError(
            str(path), f"cannot decode DICOM pixel data{syntax}: {type(exc).__name__}: {detail}"
        ) from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and array.ndim == (4 if samples > 1 else 3):
        array = array[0]  # decoder ignored the index option
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(str(path), f"unexpected pixel array shape {array.shape}")
    return array


def _apply_grayscale_luts(raw: np.ndarray, ds: Any, path: Path) -> tuple[np.ndarray, bool]:
    """Modality LUT (rescale slope/intercept) then VOI LUT / window when present."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if raw.ndim != 2:
        raise ImageReadError(str(path), f"monochrome image with shape {raw.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            array = apply_modality_lut(raw, ds)
        except Exception as exc:  # noqa: BLE001 - malformed rescale / LUT elements
            raise ImageReadError(
                str(path), f"invalid modality LUT / rescale: {type(exc).__name__}: {exc}"
            ) from exc
        _check_finite(np.asarray(array), path)
        if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
            return np.asarray(array), False
        try:
            return np.asarray(apply_voi_lut(array, ds, index=0)), True
        except Exception:  # noqa: BLE001 - malformed window: fall back to the full range
            return np.asarray(array), False


def _dicom_colour_to_gray(raw: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Luminance of a colour DICOM image (palette colour is expanded first)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        raw = apply_color_lut(raw, ds)
    if raw.ndim == 3 and raw.shape[-1] >= 3:
        return _luminance(raw)
    return raw.astype(np.float64)


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """Row/column spacing in mm from PixelSpacing or ImagerPixelSpacing, else None."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                spacing = (float(value[0]), float(value[1]))
                if all(np.isfinite(spacing)) and min(spacing) > 0:
                    return spacing
        except (TypeError, ValueError):
            continue
    return None
