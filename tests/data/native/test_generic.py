"""Tests for multichex.data.native.generic (any CSV + image folder)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.native.generic import parse_flag, read_generic, read_table
from multichex.data.sources import CXRDataset

SIZE = 32
CSV = """image,patient,Atelectasis,Pleural Effusion,COVID19,notes,age,empty,mask,x,y,w,h,label
a.png,P1,1,0,,first box,34,,,2,3,10,5,Mass
a.png,P1,,0,,second box,34,,,20,21,6,8,Nodule
b.png,P2,0,0,0,,50,,,,,,,
c.png,P2,0,1,1,,61,,masks/c_left.png;masks/c_right.png,,,,,
"""


def gray(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def masks() -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((SIZE, SIZE), np.uint8)
    right = np.zeros((SIZE, SIZE), np.uint8)
    left[5:20, 3:12] = 255
    right[8:25, 18:28] = 255
    return left, right


def write(root: Path, text: str = CSV) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        gray(root / "images" / name, np.full((SIZE, SIZE), 80, np.uint8))
    left, right = masks()
    gray(root / "masks" / "c_left.png", left)
    gray(root / "masks" / "c_right.png", right)
    (root / "labels.csv").write_text(text)
    return root / "labels.csv"


def read(root: Path, **options):
    options = {"patient_column": "patient", "mask_column": "mask", "box_columns": ("x", "y", "w", "h"),
               "box_label_column": "label", **options}
    return read_generic(root / "labels.csv", root / "images", **options)


def test_labels_patients_boxes_and_masks(tmp_path):
    write(tmp_path)
    refs = read(tmp_path)
    assert [r.image_path for r in refs] == [tmp_path / "images" / n for n in ("a.png", "b.png", "c.png")]
    assert [r.patient_id for r in refs] == ["generic:P1", "generic:P2", "generic:P2"]
    assert list(refs[0].findings) == ["Atelectasis", "Effusion", "COVID-19"]
    assert refs[0].findings["Atelectasis"] == 1.0 and refs[0].findings["Effusion"] == 0.0
    assert math.isnan(refs[0].findings["COVID-19"])
    assert refs[1].findings == {"Atelectasis": 0.0, "Effusion": 0.0, "COVID-19": 0.0}
    assert refs[2].findings == {"Atelectasis": 0.0, "Effusion": 1.0, "COVID-19": 1.0}
    assert [r.positive for r in refs] == [1.0, 0.0, 1.0]
    assert refs[0].boxes_xywh == [(2.0, 3.0, 10.0, 5.0), (20.0, 21.0, 6.0, 8.0)]
    assert refs[0].box_names == ["Mass", "Nodule"]
    assert refs[1].boxes_xywh == [] and refs[1].box_names == []
    assert refs[0].mask_path is None
    assert refs[2].mask_path == [tmp_path / "masks" / "c_left.png", tmp_path / "masks" / "c_right.png"]
    assert [r.extra["csv_line"] for r in refs] == [2, 4, 5]


def test_through_the_dataset_masks_and_boxes_are_exact(tmp_path):
    write(tmp_path)
    refs = read(tmp_path)
    dataset = CXRDataset(refs, ["Effusion", "Atelectasis", "Mass"], ["Mass", "Nodule"], SIZE, augment=None)
    a, b, c = dataset[0], dataset[1], dataset[2]
    assert a.boxes.tolist() == [[2.0, 3.0, 12.0, 8.0], [20.0, 21.0, 26.0, 29.0]]
    assert a.box_labels.tolist() == [0, 1]
    assert a.labels[:2].tolist() == [0.0, 1.0] and math.isnan(a.labels[2])
    assert b.boxes.shape == (0, 4) and b.mask is None
    left, right = masks()
    np.testing.assert_array_equal(c.mask[0].numpy(), (left > 0) | (right > 0))


def test_defaults_and_options(tmp_path):
    write(tmp_path)
    refs = read_generic(tmp_path / "labels.csv", tmp_path / "images", label_columns=["COVID19"], dataset="site-x")
    assert [r.patient_id for r in refs] == ["site-x:a", "site-x:b", "site-x:c"]
    assert [r.findings for r in refs][1:] == [{"COVID-19": 0.0}, {"COVID-19": 1.0}]
    assert all(r.boxes_xywh is None and r.mask_path is None for r in refs)
    assert read(tmp_path, boxes_exhaustive=False)[1].boxes_xywh is None
    named = read(tmp_path, box_label_column=None, box_label="Lesion")
    assert named[0].box_names == ["Lesion", "Lesion"]
    # the derived gate label uses No Finding when present
    text = "image,No Finding,Mass\nb.png,1,\n"
    assert read_generic(write(tmp_path / "nf", text), tmp_path / "nf" / "images")[0].positive == 0.0


def test_missing_column_names_the_file(tmp_path):
    csv_path = write(tmp_path)
    with pytest.raises(ValueError) as info:
        read_generic(csv_path, tmp_path / "images", image_column="img")
    assert str(csv_path) in str(info.value) and "'img'" in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,patient,Mass\na.png,P1,1\na.png,P1,0\n", r"line 3: Mass = 0 contradicts 1"),
        ("image,patient,Mass\na.png,P1,1\na.png,P9,1\n", r"line 3: patient 'P9' differs from 'P1' on line 2"),
        ("image,patient,Mass\na.png,P1,yes\n", r"line 2: column 'Mass' must be 0, 1 or blank, got 'yes'"),
        ("image,patient,Mass,x,y,w,h,label\na.png,P1,1,2,3,,4,Mass\n", r"line 2: box columns .* must all be numbers"),
        ("image,patient,Mass,x,y,w,h,label\na.png,P1,1,2,3,0,4,Mass\n", r"line 2: invalid box"),
        ("image,patient,Mass,x,y,w,h,label\na.png,P1,1,2,3,4,4,\n", r"line 2: box without a 'label' label"),
        ("image,patient,Mass\nmissing.png,P1,1\n", r"line 2: file not found: .*missing.png"),
        ("image,patient,Mass\n,P1,1\n", r"line 2: empty 'image' cell"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, message):
    csv_path = write(tmp_path, text)
    options = {"label_columns": ["Mass"], "patient_column": "patient"}
    if "x," in text:
        options.update(box_columns=("x", "y", "w", "h"), box_label_column="label")
    with pytest.raises(ValueError, match=message) as info:
        read_generic(csv_path, tmp_path / "images", **options)
    assert str(csv_path) in str(info.value)


def test_skip_missing_and_helpers(tmp_path):
    csv_path = write(tmp_path, "image,Mass\nmissing.png,1\nb.png,0\n")
    refs = read_generic(csv_path, tmp_path / "images", skip_missing=True)
    assert [r.image_path.name for r in refs] == ["b.png"]
    header, rows = read_table(csv_path)
    assert header == ["image", "Mass"] and rows[1].line == 3 and rows[1].get("Mass") == "0"
    assert math.isnan(parse_flag(" ", csv_path, 2, "Mass")) and parse_flag("1.0", csv_path, 2, "Mass") == 1.0
    with pytest.raises(ValueError, match="box_columns needs box_label_column or box_label"):
        read_generic(csv_path, tmp_path / "images", box_columns=("a", "b", "c", "d"))
