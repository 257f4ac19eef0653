"""Tests for multichex.data.native.kermany on a generated Kaggle-style chest_xray tree."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.native.kermany import parse_kermany_name, read_native_kermany

FILES = [
    "train/NORMAL/IM-0115-0001.jpeg",
    "train/NORMAL/NORMAL2-IM-0246-0001-0002.jpeg",
    "train/PNEUMONIA/person1_bacteria_1.jpeg",
    "train/PNEUMONIA/person1_virus_6.jpeg",
    "val/NORMAL/NORMAL2-IM-1427-0001.jpeg",
    "test/NORMAL/IM-0001-0001.jpeg",
    "test/PNEUMONIA/person100_bacteria_475.jpeg",
]
# (patient, split, pneumonia, bacterial, viral)
EXPECTED = [
    ("IM-0115", "train", 0.0, 0.0, 0.0),
    ("NORMAL2-IM-0246", "train", 0.0, 0.0, 0.0),
    ("person1", "train", 1.0, 1.0, 0.0),
    ("person1", "train", 1.0, 0.0, 1.0),
    ("NORMAL2-IM-1427", "val", 0.0, 0.0, 0.0),
    ("IM-0001", "test", 0.0, 0.0, 0.0),
    ("person100", "test", 1.0, 1.0, 0.0),
]


def jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(path, format="JPEG")


def kaggle_tree(root: Path) -> Path:
    """``root/chest_xray`` with the Kaggle duplicate nested copy and macOS junk."""
    for name in FILES:
        jpeg(root / "chest_xray" / name)
    jpeg(root / "chest_xray" / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg")  # duplicate copy, ignored
    jpeg(root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg")
    (root / "chest_xray" / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    (root / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"junk")
    return root / "chest_xray"


def test_reads_every_split_with_exact_labels(tmp_path):
    base = kaggle_tree(tmp_path)
    refs = read_native_kermany(tmp_path)
    # splits in (train, val, test) order, NORMAL before PNEUMONIA, names sorted; junk and the nested copy skipped
    assert [r.image_path for r in refs] == [base / name for name in FILES]
    for ref, (patient, split, pneumonia, bacterial, viral) in zip(refs, EXPECTED):
        assert ref.patient_id == f"kermany:{patient}"
        assert ref.findings == {
            "Pneumonia": pneumonia, "Bacterial Pneumonia": bacterial, "Viral Pneumonia": viral,
            "COVID-19": 0.0, "No Finding": 1.0 - pneumonia,
        }
        assert ref.positive == pneumonia
        assert ref.extra["official_split"] == split
        assert ref.dataset == "kermany-pediatric"
    assert [r.extra["pathogen"] for r in refs] == ["", "", "bacteria", "virus", "", "", "bacteria"]


def test_root_may_be_chest_xray_itself_and_splits_filter(tmp_path):
    base = kaggle_tree(tmp_path)
    assert [r.image_path for r in read_native_kermany(base)] == [r.image_path for r in read_native_kermany(tmp_path)]
    test_only = read_native_kermany(base, splits=("test",))
    assert [r.image_path.name for r in test_only] == ["IM-0001-0001.jpeg", "person100_bacteria_475.jpeg"]
    with pytest.raises(ValueError, match="unknown Kermany split"):
        read_native_kermany(base, splits=("training",))


def test_nested_only_copy_is_found(tmp_path):
    jpeg(tmp_path / "chest_xray" / "chest_xray" / "val" / "PNEUMONIA" / "person1946_bacteria_4874.jpeg")
    refs = read_native_kermany(tmp_path)
    assert [(r.patient_id, r.extra["official_split"]) for r in refs] == [("kermany:person1946", "val")]


def test_pneumonia_without_pathogen_in_name_leaves_subtypes_unknown(tmp_path):
    jpeg(tmp_path / "chest_xray" / "train" / "PNEUMONIA" / "BACTERIA-1008087-0001.jpeg")
    jpeg(tmp_path / "chest_xray" / "train" / "PNEUMONIA" / "IM-0500-0001.jpeg")
    refs = read_native_kermany(tmp_path)
    assert refs[0].patient_id == "kermany:1008087" and refs[0].findings["Bacterial Pneumonia"] == 1.0
    assert refs[1].patient_id == "kermany:IM-0500"
    assert math.isnan(refs[1].findings["Bacterial Pneumonia"]) and math.isnan(refs[1].findings["Viral Pneumonia"])


@pytest.mark.parametrize(
    "name, patient, pathogen",
    [
        ("person1_virus_9.jpeg", "person1", "virus"),
        ("NORMAL2-IM-0246-0001-0001.jpeg", "NORMAL2-IM-0246", ""),
        ("NORMAL-28501-0001.jpeg", "28501", ""),
        ("VIRUS-1001598-0001.jpeg", "1001598", "virus"),
    ],
)
def test_parse_names(name, patient, pathogen):
    assert parse_kermany_name(Path(name)) == (patient, pathogen)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no chest_xray"):
        read_native_kermany(tmp_path)
    jpeg(tmp_path / "chest_xray" / "train" / "NORMAL" / "person3_virus_1.jpeg")
    with pytest.raises(ValueError, match=r"person3_virus_1.jpeg: a NORMAL image named as a virus pneumonia case"):
        read_native_kermany(tmp_path)
    (tmp_path / "chest_xray" / "train" / "NORMAL" / "person3_virus_1.jpeg").unlink()
    jpeg(tmp_path / "chest_xray" / "train" / "NORMAL" / "scan.jpeg")
    with pytest.raises(ValueError, match=r"scan.jpeg: unrecognised Kermany file name"):
        read_native_kermany(tmp_path)
