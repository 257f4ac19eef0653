"""Tests for multichex.data.native.siim: SIIM-ACR Pneumothorax in its published layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from multichex.data.native.siim import read_siim, read_siim_rle
from multichex.data.rle import encode_rle
from multichex.data.sources import CXRDataset

PREFIX = "1.2.276.0.7230010.3.1.4.8323329"
TWO_REGIONS, EMPTY, OVERRUN, NARROW, NO_IMAGE = (f"{PREFIX}.{n}.1517875165.878027" for n in (1000, 1001, 1002, 1003, 1004))


def _rect(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


REGION_A = _rect((32, 32), slice(2, 7), slice(3, 9))
REGION_B = _rect((32, 32), slice(20, 26), slice(18, 29))
NARROW_REGION = _rect((32, 16), slice(5, 30), slice(2, 11))


def _dicom(factory, root: Path, image_id: str, shape: tuple[int, int], study: int) -> Path:
    """Write ``dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm`` with PatientID ``pat-<study>``."""
    folder = root / "dicom-images-train" / f"{PREFIX}.{study}.2" / f"{PREFIX}.{study}.3"
    folder.mkdir(parents=True)
    pixels = (np.arange(shape[0] * shape[1]) % 251).astype(np.uint8).reshape(shape)
    path = factory.make_dicom(folder / f"{image_id}.dcm", pixels)
    ds = pydicom.dcmread(path)
    ds.PatientID = f"pat-{study}"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def siim_native(tmp_path: Path, dicom_factory) -> Path:
    for study, image_id in enumerate((TWO_REGIONS, EMPTY, OVERRUN)):
        _dicom(dicom_factory, tmp_path, image_id, (32, 32), study)
    _dicom(dicom_factory, tmp_path, NARROW, (32, 16), 3)
    rows = [
        "ImageId, EncodedPixels",  # leading space, as published
        f"{TWO_REGIONS}, {encode_rle(REGION_A)}",
        f"{EMPTY}, -1",
        f"{TWO_REGIONS}, {encode_rle(REGION_B)}",
        f"{OVERRUN}, 1000 50",  # runs past the 32×32 = 1024 pixels
        f"{NARROW}, {encode_rle(NARROW_REGION)}",
        f"{NO_IMAGE}, -1",
    ]
    (tmp_path / "train-rle.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


def test_labels_codes_and_patients(siim_native: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multichex.data.native.siim"):
        refs = read_siim(siim_native)
    assert [r.extra["image_id"] for r in refs] == [TWO_REGIONS, EMPTY, OVERRUN, NARROW]
    assert any("1 ImageIds have no DICOM" in r.message for r in caplog.records)
    assert all(r.image_path.name == f"{r.extra['image_id']}.dcm" and r.image_path.is_file() for r in refs)
    assert refs[0].image_path.parent.parent.parent == siim_native / "dicom-images-train"
    assert [r.patient_id for r in refs] == ["siim:pat-0", "siim:pat-1", "siim:pat-2", "siim:pat-3"]
    assert [r.findings for r in refs] == [{"Pneumothorax": v} for v in (1.0, 0.0, 1.0, 1.0)]
    assert [r.positive for r in refs] == [1.0, 0.0, 1.0, 1.0]
    assert refs[0].mask_rle == [encode_rle(REGION_A), encode_rle(REGION_B)]
    assert refs[1].mask_rle == ["-1"] and refs[2].mask_rle == ["1000 50"]
    assert all(r.boxes_xywh is None and r.dataset == "siim-acr-pneumothorax" for r in refs)
    by_id = read_siim(siim_native, patient_from_dicom=False)
    assert [r.patient_id for r in by_id] == [f"siim:{i}" for i in (TWO_REGIONS, EMPTY, OVERRUN, NARROW)]
    kept = read_siim(siim_native, require_images=False, patient_from_dicom=True)
    assert kept[-1].patient_id == f"siim:{NO_IMAGE}" and kept[-1].mask_rle == ["-1"]


def test_dataset_masks(siim_native: Path) -> None:
    data = CXRDataset(read_siim(siim_native), class_names=["Pneumothorax"], box_classes=[], image_size=32, augment=None)
    merged, empty, overrun, narrow = (data[i] for i in range(4))
    assert torch.equal(merged.mask[0], torch.from_numpy(REGION_A | REGION_B).float())
    assert merged.labels.tolist() == [1.0] and merged.boxes is None
    assert empty.mask is not None and empty.mask.shape == (1, 32, 32) and empty.mask.sum() == 0
    # 32×16 at size 32: scale 1, pad_x = (32 - 16) // 2 = 8.
    expected = np.zeros((32, 32), dtype=bool)
    expected[:, 8:24] = NARROW_REGION
    assert torch.equal(narrow.mask[0], torch.from_numpy(expected).float())
    assert overrun is None
    path = str(read_siim(siim_native)[2].image_path)
    assert list(data.failures) == [path]
    assert path in data.failures[path] and "overruns" in data.failures[path]


def test_errors(siim_native: Path, tmp_path: Path) -> None:
    labels = siim_native / "train-rle.csv"
    for code, problem in (("12 x", "not a list of integers"), ("3 4 5", "odd number"), ("3 -4", "negative"), ("", "empty")):
        labels.write_text(f"ImageId, EncodedPixels\n{EMPTY}, -1\n{TWO_REGIONS}, {code}\n")
        with pytest.raises(ValueError, match=rf"train-rle\.csv: row 3: ImageId {TWO_REGIONS}: bad EncodedPixels \({problem}"):
            read_siim(siim_native)
    labels.write_text(f"ImageId,Pixels\n{EMPTY},-1\n")
    with pytest.raises(ValueError, match=r"train-rle\.csv: row 1: missing required column\(s\) \['EncodedPixels'\]"):
        read_siim_rle(labels)
    with pytest.raises(ValueError, match=r"train-rle\.csv: file not found"):
        read_siim(tmp_path / "nowhere")
