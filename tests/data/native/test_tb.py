"""Tests for multichex.data.native.tb (Montgomery County and Shenzhen TB sets, published layout)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.native.tb import parse_clinical_reading, read_montgomery, read_shenzhen
from multichex.data.sources import CXRDataset

SIZE = 20


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def image() -> np.ndarray:
    return np.full((SIZE, SIZE), 120, np.uint8)


def half_masks() -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((SIZE, SIZE), np.uint8)
    right = np.zeros((SIZE, SIZE), np.uint8)
    left[4:16, 2:8] = 255
    right[5:15, 12:18] = 255
    return left, right


def montgomery(root: Path) -> Path:
    """``<root>/MontgomerySet`` with three images, readings and manual masks."""
    folder = root / "MontgomerySet"
    for name in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"):
        save(folder / "CXR_png" / f"{name}.png", image())
    (folder / "CXR_png" / "Thumbs.db").write_bytes(b"junk")
    (folder / "CXR_png" / ".DS_Store").write_bytes(b"junk")
    readings = folder / "ClinicalReadings"
    readings.mkdir()
    (readings / "MCUCXR_0001_0.txt").write_text("Patient's Sex: F\nPatient's Age: 040Y\n\nnormal\n")
    (readings / "MCUCXR_0002_1.txt").write_text("Patient's Sex: M\nPatient's Age: 067Y\nleft upper lobe cavitary TB\n")
    left, right = half_masks()
    save(folder / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png", left)
    save(folder / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", right)
    save(folder / "ManualMask" / "leftMask" / "MCUCXR_0003_0.png", left)  # right half missing
    return folder


def test_montgomery_labels_readings_masks(tmp_path, caplog):
    folder = montgomery(tmp_path)
    with caplog.at_level(logging.WARNING):
        refs = read_montgomery(tmp_path)  # the set folder is found one level down
    assert [r.image_path for r in refs] == [folder / "CXR_png" / f"MCUCXR_000{i}.png" for i in ("1_0", "2_1", "3_0")]
    assert [r.patient_id for r in refs] == ["montgomery:MCUCXR_0001", "montgomery:MCUCXR_0002", "montgomery:MCUCXR_0003"]
    assert [r.findings for r in refs] == [
        {"Tuberculosis": 0.0, "No Finding": 1.0, "COVID-19": 0.0},
        {"Tuberculosis": 1.0, "No Finding": 0.0, "COVID-19": 0.0},
        {"Tuberculosis": 0.0, "No Finding": 1.0, "COVID-19": 0.0},
    ]
    assert [r.positive for r in refs] == [0.0, 1.0, 0.0]
    assert refs[0].mask_path == [folder / "ManualMask" / name / "MCUCXR_0001_0.png" for name in ("leftMask", "rightMask")]
    assert refs[1].mask_path is None and refs[2].mask_path is None
    assert "only one lung mask half" in caplog.text and "MCUCXR_0003_0" in caplog.text
    assert refs[0].extra["clinical_reading"] == "Patient's Sex: F\nPatient's Age: 040Y\n\nnormal"
    assert (refs[0].extra["sex"], refs[0].extra["age"], refs[0].extra["reading"]) == ("F", 40.0, "normal")
    assert (refs[1].extra["sex"], refs[1].extra["age"]) == ("M", 67.0)
    assert refs[2].extra == {}
    assert all(r.dataset == "montgomery-tb" for r in refs)


def test_montgomery_mask_is_union_pixel_exact(tmp_path):
    montgomery(tmp_path)
    refs = read_montgomery(tmp_path / "MontgomerySet")
    sample = CXRDataset(refs[:1], ["Tuberculosis", "No Finding"], [], SIZE, augment=None)[0]
    left, right = half_masks()
    np.testing.assert_array_equal(sample.mask[0].numpy(), (left > 0) | (right > 0))
    assert sample.labels.tolist() == [0.0, 1.0]
    assert sample.meta["patient_id"] == "montgomery:MCUCXR_0001"


def test_shenzhen_readings_and_optional_masks(tmp_path):
    folder = tmp_path / "ChinaSet_AllFiles"
    save(folder / "CXR_png" / "CHNCXR_0001_0.png", image())
    save(folder / "CXR_png" / "CHNCXR_0002_1.png", image())
    save(folder / "CXR_png" / "CHNCXR_0003_1.png", image())
    readings = folder / "ClinicalReadings"
    readings.mkdir()
    (readings / "CHNCXR_0001_0.txt").write_text("male 35yrs\nnormal\n")
    (readings / "CHNCXR_0002_1.txt").write_text("female 8 month\nSTB,ATB in the right upper field\n")
    left, right = half_masks()
    save(tmp_path / "masks" / "CHNCXR_0002_1_mask.png", left | right)
    save(tmp_path / "masks" / "CHNCXR_0003_1.png", left)
    refs = read_shenzhen(folder, masks_dir=tmp_path / "masks")
    assert [r.patient_id for r in refs] == ["shenzhen:CHNCXR_0001", "shenzhen:CHNCXR_0002", "shenzhen:CHNCXR_0003"]
    assert [r.findings["Tuberculosis"] for r in refs] == [0.0, 1.0, 1.0]
    assert [r.findings["No Finding"] for r in refs] == [1.0, 0.0, 0.0]
    assert [r.mask_path for r in refs] == [None, tmp_path / "masks" / "CHNCXR_0002_1_mask.png", tmp_path / "masks" / "CHNCXR_0003_1.png"]
    assert (refs[0].extra["sex"], refs[0].extra["age"], refs[0].extra["reading"]) == ("M", 35.0, "normal")
    assert refs[1].extra["sex"] == "F" and refs[1].extra["age"] == pytest.approx(8 / 12)
    assert refs[1].extra["reading"] == "STB,ATB in the right upper field"
    assert all(r.mask_path is None for r in read_shenzhen(folder))


@pytest.mark.parametrize(
    "text, sex, age, reading",
    [
        ("Patient's Sex: M\nPatient's Age: 005Y\nnormal", "M", 5.0, "normal"),
        ("Male, 63yrs\nbilateral PTB", "M", 63.0, "bilateral PTB"),
        ("female 30 years  left PTB", "F", 30.0, "left PTB"),
        ("no header here\nnormal", None, None, "no header here normal"),
    ],
)
def test_parse_clinical_reading(text, sex, age, reading):
    assert parse_clinical_reading(text) == {"sex": sex, "age": age, "reading": reading}


def test_bad_file_name_names_the_file(tmp_path):
    save(tmp_path / "CXR_png" / "MCUCXR_0001.png", image())
    with pytest.raises(ValueError, match=r"MCUCXR_0001.png: file name must end in _0 \(normal\) or _1 \(TB\)"):
        read_montgomery(tmp_path)


def test_missing_cxr_folder(tmp_path):
    with pytest.raises(ValueError, match="no CXR_png folder found"):
        read_shenzhen(tmp_path)
