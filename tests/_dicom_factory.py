"""Write small synthetic DICOM files for tests (Digital X-Ray / CR, with file meta and preamble)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["make_dicom"]


def make_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = (0.2, 0.2),
    spacing_tag: str = "PixelSpacing",
    with_pixels: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
    computed_radiography: bool = False,
) -> Path:
    """Write ``pixels`` (uint8 / uint16, ``H×W`` or ``frames×H×W``) as a DICOM file.

    A compressed ``transfer_syntax`` stores encapsulated junk bytes instead of real compressed
    pixels, so decoding it always fails. Returns the written path.
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"pixels must be uint8 or uint16, got {pixels.dtype}")
    ts = UID(transfer_syntax)
    sop_class = (
        ComputedRadiographyImageStorage if computed_radiography else DigitalXRayImageStorageForPresentation
    )

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, ts)
    ds.preamble = b"\x00" * 128
    _add_identity(ds, sop_class, computed_radiography)
    _add_image_pixel_module(ds, pixels, monochrome1)
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = repr(float(slope))
        ds.RescaleIntercept = repr(float(intercept))
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = repr(float(window[0]))
        ds.WindowWidth = repr(float(window[1]))
    if pixel_spacing is not None:
        setattr(ds, spacing_tag, [repr(float(v)) for v in pixel_spacing])
    if with_pixels:
        _add_pixel_data(ds, pixels, ts)
    ds.save_as(path, enforce_file_format=True)
    return path


def _file_meta(sop_class: UID, ts: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    return meta


def _add_identity(ds: Dataset, sop_class: UID, computed_radiography: bool) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR" if computed_radiography else "DX"
    ds.PatientID = "TEST0001"
    ds.PatientName = "Test^Phantom"
    ds.BodyPartExamined = "CHEST"


def _add_image_pixel_module(ds: Dataset, pixels: np.ndarray, monochrome1: bool) -> None:
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    rows, cols = pixels.shape[-2:]
    bits_allocated = pixels.dtype.itemsize * 8
    bits_stored = 12 if bits_allocated == 16 and int(pixels.max(initial=0)) < 4096 else bits_allocated
    ds.Rows, ds.Columns = int(rows), int(cols)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _add_pixel_data(ds: Dataset, pixels: np.ndarray, ts: UID) -> None:
    if ts.is_compressed:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        junk = b"\xde\xad\xbe\xef not really compressed pixels"
        junk += b"\x00" * (len(junk) % 2)  # fragments must have even length
        ds.PixelData = encapsulate([junk] * frames)
        ds["PixelData"].VR = "OB"
        return
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if pixels.dtype.itemsize == 2 else "OB"
