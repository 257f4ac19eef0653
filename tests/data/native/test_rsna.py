"""Tests for multichex.data.native.rsna: RSNA Pneumonia Detection Challenge in its published layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from multichex.data.native.rsna import read_rsna
from multichex.data.sources import CXRDataset

OPACITY = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # MONOCHROME1, two boxes
NORMAL = "00313ee0-9eaa-42f4-b0ab-c148ed3241cd"  # rescale slope/intercept, Target 0, class Normal
NOT_NORMAL = "00322d4d-1c29-4943-afc9-b6754be640eb"  # Target 0, "No Lung Opacity / Not Normal"
NO_IMAGE = "003d8fa0-6bf1-40ed-b54c-ac657f8495c5"  # listed, but its DICOM is absent

LABELS = [
    "patientId,x,y,width,height,Target",
    f"{OPACITY},4.0,8.0,10.0,12.0,1",
    f"{NORMAL},,,,,0",
    f"{OPACITY},16.0,20.0,8.0,16.0,1",
    f"{NOT_NORMAL},,,,,0",
    f"{NO_IMAGE},,,,,0",
]
CLASSES = [
    "patientId,class",
    f"{OPACITY},Lung Opacity",
    f"{NORMAL},Normal",
    f"{OPACITY},Lung Opacity",
    f"{NOT_NORMAL},No Lung Opacity / Not Normal",
    f"{NO_IMAGE},Normal",
]


def _halves(rows: int = 40, cols: int = 32) -> np.ndarray:
    """Left half 100, right half 3000 (12-bit values)."""
    pixels = np.full((rows, cols), 100, dtype=np.uint16)
    pixels[:, cols // 2 :] = 3000
    return pixels


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def rsna_native(tmp_path: Path, dicom_factory) -> Path:
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    dicom_factory.make_dicom(images / f"{OPACITY}.dcm", _halves(), monochrome1=True)
    dicom_factory.make_dicom(images / f"{NORMAL}.dcm", _halves(), slope=2.0, intercept=-1024.0)
    dicom_factory.make_dicom(images / f"{NOT_NORMAL}.dcm", _halves())
    _write(tmp_path / "stage_2_train_labels.csv", LABELS)
    _write(tmp_path / "stage_2_detailed_class_info.csv", CLASSES)
    return tmp_path


def test_labels_and_boxes(rsna_native: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multichex.data.native.rsna"):
        refs = read_rsna(rsna_native)
    assert [r.patient_id for r in refs] == [f"rsna:{OPACITY}", f"rsna:{NORMAL}", f"rsna:{NOT_NORMAL}"]
    assert [r.image_path for r in refs] == [rsna_native / "stage_2_train_images" / f"{p}.dcm" for p in (OPACITY, NORMAL, NOT_NORMAL)]
    assert any("1 patients have no DICOM" in r.message for r in caplog.records)
    opacity, normal, not_normal = refs
    assert opacity.findings == {"Lung Opacity": 1.0, "Pneumonia": 1.0, "No Finding": 0.0}
    assert normal.findings == {"Lung Opacity": 0.0, "Pneumonia": 0.0, "No Finding": 1.0}
    assert not_normal.findings == {"Lung Opacity": 0.0, "Pneumonia": 0.0, "No Finding": 0.0}
    assert [r.positive for r in refs] == [1.0, 0.0, 0.0]
    assert opacity.boxes_xywh == [(4.0, 8.0, 10.0, 12.0), (16.0, 20.0, 8.0, 16.0)]
    assert opacity.box_names == ["Lung Opacity", "Lung Opacity"]
    assert normal.boxes_xywh == [] and normal.box_names == []  # exhaustive annotation: known "no box"
    assert not_normal.boxes_xywh == [] and not_normal.extra == {"class": "No Lung Opacity / Not Normal"}
    assert {r.dataset for r in refs} == {"rsna-pneumonia"}
    kept = read_rsna(rsna_native, require_images=False)
    assert len(kept) == 4 and kept[-1].findings["No Finding"] == 1.0


def test_dataset_letterboxes_boxes_and_inverts_monochrome1(rsna_native: Path) -> None:
    refs = read_rsna(rsna_native)
    data = CXRDataset(refs, class_names=["Pneumonia", "Lung Opacity", "No Finding"], box_classes=["Lung Opacity"], image_size=64, augment=None)
    opacity, normal, not_normal = (data[i] for i in range(3))
    assert not data.failures
    # 40×32 → scale 64/40 = 1.6, inner 64×51, pad_x = (64 - 51) // 2 = 6, pad_y = 0.
    # (4, 8, 10, 12) → xyxy (4, 8, 14, 20) → (4·1.6+6, 8·1.6, 14·1.6+6, 20·1.6)
    # (16, 20, 8, 16) → xyxy (16, 20, 24, 36) → (16·1.6+6, 20·1.6, 24·1.6+6, 36·1.6)
    expected = torch.tensor([[12.4, 12.8, 28.4, 32.0], [31.6, 32.0, 44.4, 57.6]])
    assert torch.allclose(opacity.boxes, expected, atol=1e-4)
    assert opacity.box_labels.tolist() == [0, 0]
    assert opacity.labels.tolist() == [1.0, 1.0, 0.0]
    assert normal.labels.tolist() == [0.0, 0.0, 1.0] and not_normal.labels.tolist() == [0.0, 0.0, 0.0]
    assert normal.boxes.shape == (0, 4) and not_normal.boxes.shape == (0, 4)
    assert opacity.meta["letterbox"]["pad_x"] == 6 and opacity.meta["original_size"] == (40, 32)

    # Stored values: left 100 (low), right 3000 (high). MONOCHROME1 shows low values bright.
    left, right = (slice(8, 28), slice(36, 56))
    assert opacity.image[0, :, left].min() > 0.95 and opacity.image[0, :, right].max() < 0.05
    for sample in (normal, not_normal):  # MONOCHROME2 (with or without rescale): low values dark
        assert sample.image[0, :, left].max() < 0.05 and sample.image[0, :, right].min() > 0.95
    assert opacity.image[0, :, :6].max() == 0 and opacity.image[0, :, 57:].max() == 0  # letterbox padding


def test_stage_1_names(tmp_path: Path, dicom_factory) -> None:
    (tmp_path / "stage_1_train_images").mkdir()
    dicom_factory.make_dicom(tmp_path / "stage_1_train_images" / f"{OPACITY}.dcm", _halves())
    _write(tmp_path / "stage_1_train_labels.csv", [LABELS[0], LABELS[1]])
    _write(tmp_path / "stage_1_detailed_class_info.csv", [CLASSES[0], CLASSES[1]])
    (ref,) = read_rsna(tmp_path)
    assert ref.boxes_xywh == [(4.0, 8.0, 10.0, 12.0)] and ref.positive == 1.0
    with pytest.raises(ValueError, match="stage_2_train_labels.csv"):
        read_rsna(tmp_path, stage="stage_2")


def test_errors_name_file_and_row(rsna_native: Path) -> None:
    labels = rsna_native / "stage_2_train_labels.csv"
    classes = rsna_native / "stage_2_detailed_class_info.csv"
    cases = [
        (labels, [*LABELS[:2], f"{NORMAL},1.0,,,,1"], r"stage_2_train_labels\.csv: row 3: Target 1 without complete box coordinates"),
        (labels, [*LABELS[:2], f"{NORMAL},1,2,3,4,0"], r"stage_2_train_labels\.csv: row 3: Target 0 with box coordinates"),
        (labels, [*LABELS[:2], f"{NORMAL},,,,,yes"], r"stage_2_train_labels\.csv: row 3: Target must be 0 or 1"),
        (labels, [*LABELS[:2], f"{OPACITY},,,,,0"], rf"row 3: patient {OPACITY} has both Target 0 and Target 1"),
        (labels, [*LABELS[:2], f"{NORMAL},a,b,c,d,1"], r"row 3: box coordinates are not numbers"),
        (labels, ["patientId,x,y,width,height", LABELS[2][:-2]], r"row 1: missing required column\(s\) \['Target'\]"),
        (classes, [*CLASSES[:3], f"{OPACITY},Normal"], rf"detailed_class_info\.csv: row 4: patient {OPACITY} has classes"),
        (classes, [*CLASSES[:2], f"{NORMAL},Healthy"], r"detailed_class_info\.csv: row 3: unknown class 'Healthy'"),
        (classes, [CLASSES[0], f"{OPACITY},Normal"], r"detailed_class_info\.csv: row 2: .* class 'Normal' but Target 1"),
        (classes, CLASSES[:2], rf"detailed_class_info\.csv: no row for patient {NORMAL} \(row 3 of"),
    ]
    for path, lines, message in cases:
        original = path.read_text()
        _write(path, lines)
        with pytest.raises(ValueError, match=message):
            read_rsna(rsna_native)
        path.write_text(original)
    classes.unlink()
    with pytest.raises(ValueError, match=r"detailed_class_info\.csv: file not found"):
        read_rsna(rsna_native)


def test_lung_opacity_boxes_outside_default_box_classes_are_not_negatives(rsna_native: Path) -> None:
    """RSNA boxes are "Lung Opacity", not a default box class: the positive image is unannotated, not "no lesion"."""
    from multichex.models.config import DEFAULT_BOX_CLASSES

    assert "Lung Opacity" not in DEFAULT_BOX_CLASSES
    data = CXRDataset(read_rsna(rsna_native), class_names=["Pneumonia"], box_classes=DEFAULT_BOX_CLASSES, image_size=64, augment=None)
    opacity, normal, not_normal = (data[i] for i in range(3))
    assert opacity.boxes is None and opacity.positive == 1.0
    assert normal.boxes.shape == (0, 4) and not_normal.boxes.shape == (0, 4)
