"""Tests for multichex.data.native.chexpert on generated CheXpert-style CSVs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from multichex.data.native.chexpert import OBSERVATIONS, read_chexpert

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
NAN = math.nan
CANONICAL = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]


def row(path: str, view: str, values: dict[str, str], sex: str = "Female", age: str = "68") -> dict[str, str]:
    return {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else "",
            **{name: values.get(name, "") for name in OBSERVATIONS}}


TRAIN = [
    row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal",
        {"No Finding": "1.0", "Support Devices": "1.0"}),
    row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Frontal",
        {"Edema": "-1.0", "Pleural Effusion": "1.0", "Cardiomegaly": "0.0", "Lung Opacity": "-1.0"}),
    row("CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Lateral", {"Edema": "1.0"}),
    row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Frontal", {"Atelectasis": "-1.0"}),
]
VALID = [row("valid/patient64541/study1/view1_frontal.jpg", "Frontal", {"Fracture": "0.0", "Pneumonia": "1.0"}, "Male", "73")]


def write(root: Path, train=TRAIN, valid=VALID) -> Path:
    """``root/CheXpert-v1.0-small`` with both CSVs and empty image files where the rows point."""
    folder = root / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        with (folder / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HEADER)
            writer.writeheader()
            writer.writerows(rows)
        for record in rows:
            # train paths are relative to the CSV's grandparent, valid paths to the data folder itself
            image = (root if record["Path"].startswith("CheXpert") else folder) / record["Path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"")
    return folder


def labels(**values: float) -> dict[str, float]:
    out = {name: values.pop(name.replace(" ", "_"), NAN) for name in CANONICAL}
    assert not values
    out["COVID-19"] = 0.0
    return out


def assert_labels(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert (math.isnan(actual[key]) and math.isnan(value)) or actual[key] == value, (key, actual[key], value)


def test_default_policies_frontal_only(tmp_path):
    folder = write(tmp_path)
    refs = read_chexpert(folder)
    assert [r.image_path for r in refs] == [
        tmp_path / TRAIN[0]["Path"], tmp_path / TRAIN[1]["Path"], tmp_path / TRAIN[3]["Path"], folder / VALID[0]["Path"],
    ]
    assert [r.patient_id for r in refs] == ["chexpert:patient00001", "chexpert:patient00002", "chexpert:patient00003", "chexpert:patient64541"]
    assert_labels(refs[0].findings, labels(No_Finding=1.0, Support_Devices=1.0))
    assert_labels(refs[1].findings, labels(Effusion=1.0, Cardiomegaly=0.0))
    assert_labels(refs[2].findings, labels())
    assert_labels(refs[3].findings, labels(Fracture=0.0, Pneumonia=1.0))
    assert [r.positive for r in refs[:2]] == [0.0, 1.0] and math.isnan(refs[2].positive) and refs[3].positive == 1.0
    assert "Pleural Effusion" not in refs[1].findings
    assert refs[1].extra == {"official_split": "train", "study": "study2", "sex": "Female", "age": "68", "view": "Frontal", "projection": "AP"}
    assert refs[3].extra["official_split"] == "valid" and refs[3].dataset == "chexpert"


def test_uncertain_and_blank_policies(tmp_path):
    folder = write(tmp_path)
    ones = read_chexpert(folder, splits=("train",), uncertain="ones")
    assert ones[1].findings["Edema"] == 1.0 and ones[1].findings["Lung Opacity"] == 1.0
    assert ones[2].findings["Atelectasis"] == 1.0 and ones[2].positive == 1.0
    zeros = read_chexpert(folder, splits=("train",), uncertain="zeros", blank="zeros")
    assert_labels(zeros[1].findings, {**{name: 0.0 for name in CANONICAL}, "Effusion": 1.0, "COVID-19": 0.0})
    assert zeros[2].positive == 1.0  # No Finding blank → 0 under blank="zeros"
    with_lateral = read_chexpert(folder, splits=("train",), frontal_only=False)
    assert len(with_lateral) == 4 and with_lateral[2].findings["Edema"] == 1.0
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        read_chexpert(folder, uncertain="maybe")


def test_missing_column_names_the_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text(",".join(h for h in HEADER if h != "Edema") + "\n")
    with pytest.raises(ValueError) as info:
        read_chexpert(folder, splits=("train",))
    assert str(folder / "train.csv") in str(info.value) and "'Edema'" in str(info.value)


def test_bad_value_and_missing_image_name_the_line(tmp_path):
    bad = [row("CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg", "Frontal", {"Edema": "2"})]
    folder = write(tmp_path, train=TRAIN + bad)
    with pytest.raises(ValueError, match=r"train.csv: line 6: column 'Edema': value must be 1.0, 0.0, -1.0 or blank, got '2'"):
        read_chexpert(folder, splits=("train",))
    (tmp_path / TRAIN[3]["Path"]).unlink()
    with pytest.raises(ValueError, match=r"train.csv: line 5: image not found"):
        read_chexpert(folder, splits=("train",))
    refs = read_chexpert(folder, splits=("valid",), skip_missing=True)
    assert len(refs) == 1
    with pytest.raises(ValueError, match="test.csv: file not found"):
        read_chexpert(folder, splits=("test",))


def test_path_without_patient_is_malformed(tmp_path):
    folder = write(tmp_path, valid=[row("valid/someone/study1/view1_frontal.jpg", "Frontal", {})])
    with pytest.raises(ValueError, match=r"valid.csv: line 2: 'Path' .* has no patientNNNNN component"):
        read_chexpert(folder, splits=("valid",))


def test_reader_options_flow_from_a_source_config(tmp_path):
    """The uncertainty policy set in a run config reaches the CheXpert reader."""
    from multichex.training.config import SourceConfig
    from multichex.training.data import load_refs

    folder = write(tmp_path)
    default = load_refs(SourceConfig("chexpert", root=str(folder), options={"splits": ["train"]}))
    ones = load_refs(SourceConfig("chexpert", root=str(folder), options={"splits": ["train"], "uncertain": "ones"}))
    by_patient = lambda refs: {r.patient_id: r.findings for r in refs}  # noqa: E731
    key = next(p for p in by_patient(default) if p.endswith("00003"))
    assert math.isnan(by_patient(default)[key]["Atelectasis"])
    assert by_patient(ones)[key]["Atelectasis"] == 1.0
    with pytest.raises(ValueError, match="bad reader options"):
        load_refs(SourceConfig("chexpert", root=str(folder), options={"no_such_option": 1}))
