"""Tests for multichex.data.native.cohen on a generated metadata.csv in the published layout."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.native.cohen import finding_labels, read_cohen
from multichex.data.sources import CXRDataset

COLUMNS = [
    "patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated", "view",
    "modality", "date", "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
]
NAN = math.nan
LABELS = ("Pneumonia", "Viral Pneumonia", "Bacterial Pneumonia", "Fungal Pneumonia", "COVID-19", "Tuberculosis", "No Finding")


def expect(pneumonia, viral, bacterial, fungal, covid, tb, no_finding) -> dict[str, float]:
    return dict(zip(LABELS, (pneumonia, viral, bacterial, fungal, covid, tb, no_finding)))


def assert_labels(actual: dict[str, float], expected: dict[str, float], what: str = "") -> None:
    assert set(actual) == set(expected), what
    for key, value in expected.items():
        got = actual[key]
        assert (math.isnan(got) and math.isnan(value)) or got == value, f"{what} {key}: {got} != {value}"


# (patientid, finding, view, modality, folder, filename)
ROWS = [
    ("1", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "covid.png"),
    ("2", "Pneumonia/Bacterial/Streptococcus", "AP Supine", "X-ray", "images", "strep.jpg"),
    ("3", "Pneumocystis", "AP", "X-ray", "images", "pcp.png"),
    ("4", "COVID-19, ARDS", "AP semi erect", "X-ray", "images", "covid_ards.png"),
    ("5", "No Finding", "PA", "X-ray", "images", "normal.png"),
    ("6", "Tuberculosis", "PA", "X-ray", "images", "tb.png"),
    ("7", "ARDS", "AP erect", "X-ray", "images", "ards.png"),
    ("8", "Pneumonia", "PA", "X-ray", "images", "pneumonia.png"),
    ("9", "SARS", "PA", "X-ray", "images", "sars.png"),
    ("10", "Pneumonia/Lipoid", "PA", "X-ray", "images", "lipoid.png"),
    ("11", "Unknown", "PA", "X-ray", "images", "unknown.png"),
    ("1", "Pneumonia/Viral/COVID-19", "Axial", "CT", "images", "covid_ct.jpg"),
    ("1", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "covid_lateral.png"),
    ("12", "Pneumonia/Viral/COVID-19", "Axial", "CT", "volumes", "scan.nii.gz"),
]
EXPECTED = {
    "covid.png": expect(1, 1, 0, 0, 1, 0, 0),
    "strep.jpg": expect(1, 0, 1, 0, 0, 0, 0),
    "pcp.png": expect(1, 0, 0, 1, 0, 0, 0),
    "covid_ards.png": expect(1, 1, 0, 0, 1, 0, 0),
    "normal.png": expect(0, 0, 0, 0, 0, 0, 1),
    "tb.png": expect(NAN, 0, NAN, 0, 0, 1, 0),
    "ards.png": expect(NAN, NAN, NAN, NAN, 0, 0, 0),
    "pneumonia.png": expect(1, NAN, NAN, NAN, NAN, 0, 0),
    "sars.png": expect(1, 1, 0, 0, 0, 0, 0),
    "lipoid.png": expect(1, 0, 0, 0, 0, 0, 0),
    "unknown.png": {},
}
SIZE = 16


def mask_array() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:9, 2:7] = 255
    mask[4:12, 10:14] = 255
    return mask


def write_collection(root: Path, rows=ROWS) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "volumes").mkdir(exist_ok=True)
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for patient, finding, view, modality, folder, filename in rows:
            writer.writerow({
                "patientid": patient, "offset": "0", "sex": "M", "age": "50", "finding": finding, "view": view,
                "modality": modality, "folder": folder, "filename": filename, "license": "CC BY",
                "clinical_notes": "cough, fever\nsecond line of notes",
            })
            target = root / folder / filename
            if filename.endswith(".nii.gz"):
                target.write_bytes(b"\x00" * 10)
            else:
                Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8)).save(target)
    masks = root / "masks"
    masks.mkdir()
    Image.fromarray(mask_array()).save(masks / "covid.png")
    return root


def test_default_reads_frontal_xrays_with_hierarchy_labels(tmp_path):
    root = write_collection(tmp_path / "covid-chestxray-dataset")
    refs = read_cohen(root, masks_dir=root / "masks")
    assert [r.image_path.name for r in refs] == list(EXPECTED)
    for ref in refs:
        assert_labels(ref.findings, EXPECTED[ref.image_path.name], ref.image_path.name)
        assert ref.image_path == root / "images" / ref.image_path.name
        assert ref.dataset == "covid-chestxray"
    by_name = {r.image_path.name: r for r in refs}
    assert by_name["covid.png"].patient_id == "cohen:1"
    assert by_name["normal.png"].positive == 0.0
    assert by_name["ards.png"].positive == 1.0 and by_name["tb.png"].positive == 1.0
    assert math.isnan(by_name["unknown.png"].positive)
    assert by_name["covid.png"].mask_path == root / "masks" / "covid.png"
    assert all(r.mask_path is None for r in refs if r.image_path.name != "covid.png")
    assert by_name["strep.jpg"].extra["view"] == "AP Supine"
    assert by_name["strep.jpg"].extra["finding"] == "Pneumonia/Bacterial/Streptococcus"


def test_lines_follow_multiline_quoted_notes(tmp_path):
    refs = read_cohen(write_collection(tmp_path))
    # header on line 1, each record spans two physical lines (quoted newline in clinical_notes)
    assert [r.extra["csv_line"] for r in refs[:3]] == [3, 5, 7]


def test_all_views_and_modalities_skip_only_volumes(tmp_path):
    refs = read_cohen(write_collection(tmp_path), views=None, modality=None)
    names = [r.image_path.name for r in refs]
    assert "covid_ct.jpg" in names and "covid_lateral.png" in names
    assert "scan.nii.gz" not in names
    assert len(refs) == len(ROWS) - 1


def test_mask_reaches_the_sample_pixel_exact(tmp_path):
    root = write_collection(tmp_path)
    refs = [r for r in read_cohen(root, masks_dir=root / "masks") if r.mask_path is not None]
    sample = CXRDataset(refs, ["COVID-19", "Pneumonia"], [], SIZE, augment=None)[0]
    assert sample is not None
    np.testing.assert_array_equal(sample.mask[0].numpy(), mask_array() > 0)
    assert sample.labels.tolist() == [1.0, 1.0]


def test_finding_labels_flat_names_and_unknowns():
    assert_labels(finding_labels("Streptococcus"), expect(1, 0, 1, 0, 0, 0, 0))
    assert_labels(finding_labels("Aspergillosis"), expect(1, 0, 0, 1, 0, 0, 0))
    assert_labels(finding_labels("Pneumonia/Viral"), expect(1, 1, 0, 0, NAN, 0, 0))
    assert_labels(finding_labels("MERS"), expect(1, 1, 0, 0, 0, 0, 0))
    assert finding_labels("") is None and finding_labels("todo") is None


def test_unrecognised_finding_is_only_some_finding(caplog):
    with caplog.at_level(logging.WARNING):
        labels = finding_labels("Sarcoidosis")
    assert_labels(labels, expect(NAN, NAN, NAN, NAN, NAN, NAN, 0))
    assert "Sarcoidosis" in caplog.text


def test_missing_metadata_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="metadata.csv: file not found"):
        read_cohen(tmp_path)


def test_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,view,modality,folder,filename\n1,PA,X-ray,images,a.png\n")
    with pytest.raises(ValueError) as info:
        read_cohen(tmp_path)
    assert str(tmp_path / "metadata.csv") in str(info.value) and "'finding'" in str(info.value)


def test_missing_image_names_line_or_is_skipped(tmp_path):
    root = write_collection(tmp_path)
    (root / "images" / "strep.jpg").unlink()
    with pytest.raises(ValueError, match=r"metadata.csv: line 5: image file not found: .*strep.jpg"):
        read_cohen(root)
    assert "strep.jpg" not in [r.image_path.name for r in read_cohen(root, skip_missing=True)]


def test_row_with_extra_cells_is_malformed(tmp_path):
    header = ",".join(COLUMNS)
    row = "1,0,M,50,No Finding,,,,PA,X-ray,,,images,a.png,,,,,,surplus"
    (tmp_path / "metadata.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match="metadata.csv: line 2: 20 cells but the header has 19 columns"):
        read_cohen(tmp_path)
