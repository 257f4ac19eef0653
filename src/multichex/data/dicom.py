"""DICOM decoding with pydicom: LUTs, windowing, MONOCHROME1, compressed transfer syntaxes, pixel spacing.

Every pydicom call of the package goes through :func:`dcmread`, which first sends pydicom's own
log records to DEBUG (see :mod:`multichex.data.library_logs`); every failure is an
:class:`~multichex.data.pixels.ImageReadError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from multichex.data.library_logs import quiet_library_logs
from multichex.data.pixels import (
    ImageReadError,
    LoadedImage,
    check_finite,
    check_size,
    finish,
    luminance,
    minmax,
)

__all__ = ["dcmread", "describes_image", "pixel_spacing", "read_dicom", "read_dicom_spacing"]


def dcmread(path: str | os.PathLike[str], **options: Any) -> Any:
    """``pydicom.dcmread(path, **options)`` with pydicom's log output demoted to DEBUG (errors propagate)."""
    import pydicom

    quiet_library_logs()
    return pydicom.dcmread(path, **options)


def read_dicom(path: Path, *, force: bool) -> LoadedImage:
    """Decode a DICOM file: modality LUT, VOI LUT / window, MONOCHROME1 inversion, min–max.

    ``force``: parse a stream without preamble (then "no pixel data" means "not a DICOM image").
    """
    ds = _parse(path, force=force)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        reason = "no pixel data" if not force else "not a DICOM image (no 'DICM' marker, no pixel data)"
        raise ImageReadError(str(path), reason)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_size(cols, rows, path)
    _check_decoder(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    raw = _decode_first_frame(ds, path)
    if photometric.startswith("MONOCHROME"):
        array, voi_applied = _apply_grayscale_luts(raw, ds, path)
        if photometric == "MONOCHROME1":
            array = -array.astype(np.float64, copy=False)  # bone bright (no unsigned wrap-around)
    else:
        array, voi_applied = _colour_to_gray(raw, ds, photometric), False
    check_finite(array, path)
    bits = int(ds.get("BitsStored", 0) or raw.dtype.itemsize * 8)
    return finish(
        minmax(array),
        path,
        fmt="dicom",
        bits=bits,
        photometric=photometric,
        spacing=pixel_spacing(ds),
        extra={"voi_applied": voi_applied, "transfer_syntax": str(_transfer_syntax(ds) or "")},
    )


def read_dicom_spacing(path: str | os.PathLike[str]) -> tuple[float, float] | None:
    """Row/column pixel spacing (mm) from a DICOM header; None when absent or unreadable (never raises)."""
    try:
        return pixel_spacing(dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - spacing is optional provenance, never a reason to fail
        return None


def describes_image(path: str | os.PathLike[str]) -> bool:
    """Whether pydicom parses ``path`` as a dataset that describes an image (has rows and columns)."""
    try:
        dataset = dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is simply not DICOM
        return False
    return "Rows" in dataset and "Columns" in dataset


def pixel_spacing(ds: Any) -> tuple[float, float] | None:
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


def _parse(path: Path, *, force: bool) -> Any:
    """:func:`dcmread` with every parse failure mapped to ImageReadError."""
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(path, force=force)
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
        check_finite(np.asarray(array), path)
        if "VOILUTSequence" not in ds and "WindowCenter" not in ds:
            return np.asarray(array), False
        try:
            return np.asarray(apply_voi_lut(array, ds, index=0)), True
        except Exception:  # noqa: BLE001 - malformed window: fall back to the full range
            return np.asarray(array), False


def _colour_to_gray(raw: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Luminance of a colour DICOM image (palette colour is expanded first)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        raw = apply_color_lut(raw, ds)
    if raw.ndim == 3 and raw.shape[-1] >= 3:
        return luminance(raw)
    return raw.astype(np.float64)
