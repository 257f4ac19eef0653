"""Tests for multichex.data.native.nih: NIH ChestX-ray14 in its published file layout."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.labels import NIH_FINDINGS
from multichex.data.native.nih import find_entry_file, read_native_nih, read_nih_boxes

REAL_BOX_LIST = Path("/work/shared/data/nih-cxr14-sample/metadata/BBox_List_2017_original_coords.csv")

# NIH's own header: the bracketed names hold unquoted commas and the row ends with an empty cell.
ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
ENTRY_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Effusion,1,1,058Y,M,PA,2894,2729,0.143,0.143,",
    "00000002_000.png,No Finding,0,2,081Y,F,AP,2500,2048,0.168,0.168,",
    "00000002_001.png,Infiltration|Mass,1,2,082Y,F,PA,2048,2500,0.168,0.168,",
    "00000003_000.png,Nodule,0,3,045Y,M,PA,2048,2500,0.168,0.168,",  # image file missing
]
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_ROWS = [
    "00000001_001.png,Cardiomegaly,100.5,200.25,300,400,,,",
    "00000001_001.png,Effusion,10,20,30,40,,,",
    "00000002_001.png,Infiltrate,512,256.5,64,32,,,",
    "00000099_000.png,Mass,1,2,3,4,,,",  # image not in this copy's entry list
]


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(path)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def nih_native(tmp_path: Path) -> Path:
    """Four images of two patients in NIH's layout (+ one entry row whose image is absent)."""
    _write(tmp_path / "Data_Entry_2017.csv", [ENTRY_HEADER, *ENTRY_ROWS])
    _write(tmp_path / "BBox_List_2017.csv", [BOX_HEADER, *BOX_ROWS])
    _write(tmp_path / "train_val_list.txt", ["00000001_000.png", "00000001_001.png", "00000003_000.png"])
    _write(tmp_path / "test_list.txt", ["00000002_000.png", "00000002_001.png"])
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png"):
        _png(tmp_path / "images_001" / "images" / name)
    _png(tmp_path / "images" / "00000002_001.png")
    return tmp_path


def _expected(*positives: str) -> dict[str, float]:
    findings = {name: float(name in positives) for name in NIH_FINDINGS}
    findings["No Finding"] = float(not positives)
    findings["COVID-19"] = 0.0
    return findings


def test_labels_boxes_and_missing_images(nih_native: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multichex.data.native.nih"):
        refs = read_native_nih(nih_native)
    by_name = {ref.image_path.name: ref for ref in refs}
    assert list(by_name) == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000002_001.png"]
    assert by_name["00000001_000.png"].image_path == nih_native / "images_001" / "images" / "00000001_000.png"
    assert by_name["00000002_001.png"].image_path == nih_native / "images" / "00000002_001.png"
    assert [r.message for r in caplog.records if "dropped" in r.message] == [
        f"{nih_native / 'Data_Entry_2017.csv'}: 1 selected rows have no image file under images/ or images_*/images/; dropped"
    ]

    assert by_name["00000001_000.png"].findings == _expected("Cardiomegaly")
    assert by_name["00000001_001.png"].findings == _expected("Cardiomegaly", "Effusion")
    assert by_name["00000002_000.png"].findings == _expected()
    assert by_name["00000002_001.png"].findings == _expected("Infiltration", "Mass")
    assert [r.positive for r in refs] == [1.0, 1.0, 0.0, 1.0]
    assert [r.patient_id for r in refs] == ["nih:1", "nih:1", "nih:2", "nih:2"]
    assert {r.dataset for r in refs} == {"nih-cxr14"}
    assert by_name["00000002_000.png"].extra == {"view": "AP", "age": 81, "sex": "F", "follow_up": 0}
    assert by_name["00000001_001.png"].extra == {"view": "PA", "age": 58, "sex": "M", "follow_up": 1}

    assert by_name["00000001_000.png"].boxes_xywh is None  # not exhaustive: no row = unknown
    assert by_name["00000001_000.png"].box_names is None
    # The fixture's images are 8×8: boxes of the 1024×1024 frame are scaled by 8/1024 = 1/128.
    assert by_name["00000001_001.png"].boxes_xywh == [
        tuple(v / 128 for v in (100.5, 200.25, 300.0, 400.0)), tuple(v / 128 for v in (10.0, 20.0, 30.0, 40.0))
    ]
    assert by_name["00000001_001.png"].box_names == ["Cardiomegaly", "Effusion"]
    assert by_name["00000002_001.png"].boxes_xywh == [tuple(v / 128 for v in (512.0, 256.5, 64.0, 32.0))]
    assert by_name["00000002_001.png"].box_names == ["Infiltration"]
    assert all(r.mask_path is None and r.mask_rle is None for r in refs)


def test_split_views_and_keep_missing(nih_native: Path) -> None:
    names = lambda refs: [r.image_path.name for r in refs]  # noqa: E731
    assert names(read_native_nih(nih_native, split="train_val")) == ["00000001_000.png", "00000001_001.png"]
    assert names(read_native_nih(nih_native, split="test")) == ["00000002_000.png", "00000002_001.png"]
    assert names(read_native_nih(nih_native, views=("PA",))) == ["00000001_000.png", "00000001_001.png", "00000002_001.png"]
    assert len(read_native_nih(nih_native, views=None)) == 4
    kept = read_native_nih(nih_native, require_images=False)
    assert kept[-1].image_path == nih_native / "images" / "00000003_000.png"
    assert kept[-1].findings == _expected("Nodule") and kept[-1].patient_id == "nih:3"
    assert all(r.boxes_xywh is None for r in read_native_nih(nih_native, boxes=False))
    with pytest.raises(ValueError, match="unknown NIH split"):
        read_native_nih(nih_native, split="val")
    (nih_native / "test_list.txt").unlink()
    with pytest.raises(ValueError, match=r"test_list\.txt.*not found"):
        read_native_nih(nih_native, split="test")


def test_v2020_file_with_plain_ages_is_preferred(nih_native: Path) -> None:
    v2020 = [row.replace("058Y", "57").replace("081Y", "80") for row in ENTRY_ROWS]
    _write(nih_native / "Data_Entry_2017_v2020.csv", [ENTRY_HEADER.rstrip(","), *[r.rstrip(",") for r in v2020]])
    assert find_entry_file(nih_native).name == "Data_Entry_2017_v2020.csv"
    refs = read_native_nih(nih_native)
    assert [r.extra["age"] for r in refs] == [57, 57, 80, 82]


def test_errors_name_file_and_row(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no Data_Entry_2017"):
        read_native_nih(tmp_path)
    entry = _write(tmp_path / "Data_Entry_2017.csv", [ENTRY_HEADER.replace("Patient ID,", ""), *ENTRY_ROWS])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: row 1: missing required column\(s\) \['Patient ID'\]"):
        read_native_nih(tmp_path)
    _write(entry, [ENTRY_HEADER, ENTRY_ROWS[0], ENTRY_ROWS[1].replace("Effusion", "Effusions")])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: row 3: unknown finding label\(s\) \['Effusions'\]"):
        read_native_nih(tmp_path)
    _write(entry, [ENTRY_HEADER, ENTRY_ROWS[0].replace("Cardiomegaly", "No Finding|Mass")])
    with pytest.raises(ValueError, match="row 2: 'No Finding' combined"):
        read_native_nih(tmp_path)
    _write(entry, [ENTRY_HEADER, ENTRY_ROWS[0].replace("058Y", "old")])
    with pytest.raises(ValueError, match="row 2: malformed 'Patient Age'"):
        read_native_nih(tmp_path)
    _write(entry, [ENTRY_HEADER, ENTRY_ROWS[0], ENTRY_ROWS[0]])
    with pytest.raises(ValueError, match="row 3: duplicate image"):
        read_native_nih(tmp_path)
    boxes = _write(tmp_path / "BBox_List_2017.csv", [BOX_HEADER, BOX_ROWS[0], "00000001_001.png,Effusion,10,20,,,,"])
    with pytest.raises(ValueError, match=r"BBox_List_2017\.csv: row 3: box needs four numbers"):
        read_nih_boxes(boxes)
    _write(boxes, [BOX_HEADER, "00000001_001.png,Effusion,10,20,-3,4"])
    with pytest.raises(ValueError, match="row 2: invalid box"):
        read_nih_boxes(boxes)


def test_real_nih_box_list() -> None:
    if not REAL_BOX_LIST.is_file():
        pytest.skip(f"{REAL_BOX_LIST} not available")
    boxes = read_nih_boxes(REAL_BOX_LIST)
    assert len(boxes) == 880
    assert sum(len(v) for v in boxes.values()) == 984
    first_image, (first_label, first_box) = next(iter(boxes.items()))[0], boxes["00013118_008.png"][0]
    assert first_image == "00013118_008.png" and first_label == "Atelectasis"
    assert first_box == pytest.approx((225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661))
    assert boxes["00014716_007.png"][0] == (
        "Atelectasis",
        pytest.approx((686.101694915254, 131.543498411017, 185.491525423729, 313.491525423729)),
    )
    labels = [label for entries in boxes.values() for label, _ in entries]
    assert labels.count("Infiltration") == 123 and "Infiltrate" not in labels
    assert all(0 <= x and 0 <= y and x + w <= 1025 and y + h <= 1025 for e in boxes.values() for _, (x, y, w, h) in e)
    assert not any(math.isnan(v) for e in boxes.values() for _, b in e for v in b)


def test_boxes_follow_a_resized_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """BBox_List_2017.csv is in the 1024×1024 frame: on 256 px copies (and any other size) boxes are scaled
    by width/1024 and height/1024, so they land on the lesion instead of being clipped or dropped."""
    from multichex.data.sources import CXRDataset

    _write(tmp_path / "Data_Entry_2017.csv", [
        ENTRY_HEADER,
        "00000005_000.png,Mass,0,5,050Y,M,PA,2500,2048,0.168,0.168,",
        "00000006_000.png,Nodule,0,6,050Y,F,PA,2500,2048,0.168,0.168,",
        "00000007_000.png,Mass,0,7,050Y,F,PA,2500,2048,0.168,0.168,",  # image file missing
    ])
    _write(tmp_path / "BBox_List_2017.csv", [
        BOX_HEADER,
        "00000005_000.png,Mass,512,256,128,64,,,",
        "00000005_000.png,Mass,100,900,24,40,,,",
        "00000006_000.png,Nodule,512,256,128,64,,,",
        "00000007_000.png,Mass,512,256,128,64,,,",
    ])
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((256, 256), dtype=np.uint8), mode="L").save(tmp_path / "images" / "00000005_000.png")
    Image.fromarray(np.zeros((128, 512), dtype=np.uint8), mode="L").save(tmp_path / "images" / "00000006_000.png")  # 512 wide, 128 high
    refs = read_native_nih(tmp_path)
    assert [r.image_path.name for r in refs] == ["00000005_000.png", "00000006_000.png"]
    assert refs[0].boxes_xywh == [(128.0, 64.0, 32.0, 16.0), (25.0, 225.0, 6.0, 10.0)]
    assert refs[1].boxes_xywh == [(256.0, 32.0, 64.0, 8.0)]

    sample = CXRDataset(refs[:1], ["Mass"], ["Mass", "Nodule"], 256, augment=None)[0]
    assert sample is not None and sample.boxes.tolist() == [[128.0, 64.0, 160.0, 80.0], [25.0, 225.0, 31.0, 235.0]]

    with caplog.at_level(logging.WARNING, logger="multichex.data.native.nih"):
        kept = read_native_nih(tmp_path, require_images=False)
    assert kept[-1].image_path.name == "00000007_000.png"
    assert kept[-1].boxes_xywh is None and kept[-1].box_names is None  # size unknown: never boxes in a wrong frame
    assert [r.boxes_xywh for r in kept[:2]] == [r.boxes_xywh for r in refs]
    assert sum("size could not be read" in r.getMessage() for r in caplog.records) == 1
