"""Checks on the sample data bundled inside the package (built by scripts/build_sample.py)."""

from __future__ import annotations

import csv
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FOLDERS = ("covid-chestxray", "nih-cxr14-bbox", "kermany-pediatric")
PATIENT_COLUMN = {
    "covid-chestxray": "patientid",
    "nih-cxr14-bbox": "patient_id",
    "kermany-pediatric": "patient_id",
}
MAX_BYTES = 15 * 1024 * 1024


@pytest.fixture(scope="module")
def root():
    resource = files("multichex") / "sample_data"
    with as_file(resource) as path:
        path = Path(path)
        if not path.is_dir():
            pytest.fail(f"sample data not found at {path}; run scripts/build_sample.py")
        yield path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_total_size(root):
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert 0 < total <= MAX_BYTES, f"sample data is {total} bytes"


@pytest.mark.parametrize("folder", FOLDERS)
def test_labels_match_files(root, folder):
    rows = read_rows(root / folder / "labels.csv")
    assert rows, f"{folder}/labels.csv is empty"
    names = [r["image"] for r in rows]
    assert len(names) == len(set(names)), f"{folder}: duplicate rows"
    on_disk = {p.name for p in (root / folder / "images").glob("*.png")}
    assert set(names) == on_disk
    for r in rows:
        with Image.open(root / folder / "images" / r["image"]) as im:
            assert im.mode == "L"
            assert im.size == (int(r["width"]), int(r["height"]))


@pytest.mark.parametrize("folder", FOLDERS)
def test_patient_ids_non_empty(root, folder):
    rows = read_rows(root / folder / "labels.csv")
    assert all(r[PATIENT_COLUMN[folder]].strip() for r in rows)


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_non_commercial_license(root, folder):
    for r in read_rows(root / folder / "labels.csv"):
        assert "NC" not in r.get("license", "").upper(), r


def test_no_nc_folder(root):
    assert not (root / "covid-chestxray-nc").exists()


def test_covid_masks(root):
    rows = read_rows(root / "covid-chestxray" / "labels.csv")
    masks = {p.name for p in (root / "covid-chestxray" / "masks").glob("*.png")}
    with_mask = {r["image"] for r in rows if r["has_lung_mask"] == "1"}
    assert masks == with_mask
    for r in rows:
        assert r["license"] == "CC BY 3.0"
        assert r["hannover_patient_id"].strip()
        assert max(int(r["width"]), int(r["height"])) <= 256
    for name in sorted(masks):
        with Image.open(root / "covid-chestxray" / "images" / name) as im:
            size = im.size
        with Image.open(root / "covid-chestxray" / "masks" / name) as mk:
            assert mk.mode == "L"
            assert mk.size == size, name
            values = set(np.unique(np.asarray(mk)).tolist())
        assert values <= {0, 255}, (name, values)
        assert 255 in values, f"{name}: empty mask"


def test_nih_boxes_inside_images(root):
    folder = root / "nih-cxr14-bbox"
    rows = {r["image"]: r for r in read_rows(folder / "labels.csv")}
    boxes = read_rows(folder / "boxes.csv")
    assert boxes
    per_image: dict[str, int] = {}
    for b in boxes:
        assert b["image"] in rows, b
        r = rows[b["image"]]
        width, height = int(r["width"]), int(r["height"])
        assert (width, height) == (256, 256)
        x, y, w, h = (float(b[k]) for k in ("x", "y", "w", "h"))
        assert w > 0 and h > 0, b
        assert x >= 0 and y >= 0, b
        assert x + w <= width + 1e-6 and y + h <= height + 1e-6, b
        per_image[b["image"]] = per_image.get(b["image"], 0) + 1
    for name, r in rows.items():
        assert per_image.get(name, 0) == int(r["n_boxes"]), name


def test_attribution_mentions_folders(root):
    text = (root / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for folder in FOLDERS:
        assert folder in text
    assert "not for clinical use" in text.lower()
    assert (root / "README.md").is_file()
