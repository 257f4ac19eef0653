"""Prepared cache: prepare → index/split/info, resumability after SIGKILL, bad files, equivalence with CXRDataset."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from multichex.cli.data import data_app, parse_fractions
from multichex.data.cache import (
    DELAY_ENV,
    JOURNAL_NAME,
    Journal,
    PreparedDataset,
    cache_summary,
    item_id,
    prepare_cache,
    read_errors,
    read_index,
    read_split,
)
from multichex.data.registry import read_source
from multichex.data.sources import READERS, CXRDataset, SampleRef
from multichex.data.transforms import AugmentConfig
from multichex.training.data import restrict_tasks

CLASSES = ["Atelectasis", "Infiltration", "Mass", "Pneumonia", "COVID-19", "No Finding"]
BOX_CLASSES = ["Atelectasis", "Infiltration", "Mass", "Nodule", "Lung"]
SIZE = 32


# --------------------------------------------------------------------------- fixtures and helpers


def _append_box_rows(root: Path, rows: list[dict]) -> None:
    with (root / "boxes.csv").open("a", newline="", encoding="utf-8") as handle:
        csv.DictWriter(handle, fieldnames=["image", "label", "x", "y", "w", "h"]).writerows(rows)


@pytest.fixture(scope="module")
def nih_src(tmp_path_factory, cxr_factory) -> Path:
    """NIH layout, 6 patients × 2 images; extra boxes with a synonym label and a label outside BOX_CLASSES."""
    root = cxr_factory.nih(tmp_path_factory.mktemp("nih-src"), n_patients=6, per_patient=2, size=48, seed=3)
    _append_box_rows(root, [
        {"image": "n3p000_0.png", "label": "Infiltrate", "x": 2, "y": 3, "w": 10.5, "h": 7.25},
        {"image": "n3p001_1.png", "label": "Hernia", "x": 20, "y": 20, "w": 8, "h": 8},
    ])
    return root


@pytest.fixture(scope="module")
def covid_src(tmp_path_factory, cxr_factory) -> Path:
    """covid-chestxray layout with non-square 40×56 images (letterbox pads vertically) and lung masks."""
    return cxr_factory.covid(tmp_path_factory.mktemp("covid-src"), n_patients=6, per_patient=2, size=(40, 56), seed=4)


@pytest.fixture(scope="module")
def nih_cache(nih_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nih-cache") / "cache"
    prepare_cache("nih-cxr14-bbox", nih_src, out, SIZE, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def covid_cache(covid_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("covid-cache") / "cache"
    prepare_cache("covid-chestxray", covid_src, out, SIZE, workers=2, progress=False)
    return out


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)))


def assert_same_sample(prepared, raw) -> None:
    """The acceptance tolerances: image within 1/255, masks equal, boxes within 1e-4, labels equal incl. NaN."""
    assert (prepared is None) == (raw is None)
    if raw is None:
        return
    assert prepared.image.shape == raw.image.shape
    assert float((prepared.image - raw.image).abs().max()) <= 1 / 255 + 1e-6
    assert _nan_equal(prepared.labels, raw.labels)
    assert (math.isnan(prepared.positive) and math.isnan(raw.positive)) or prepared.positive == raw.positive
    assert (prepared.mask is None) == (raw.mask is None)
    if raw.mask is not None:
        assert torch.equal(prepared.mask, raw.mask)
    assert (prepared.boxes is None) == (raw.boxes is None)
    if raw.boxes is not None:
        assert prepared.boxes.shape == raw.boxes.shape
        assert torch.allclose(prepared.boxes, raw.boxes, atol=1e-4)
        assert torch.equal(prepared.box_labels, raw.box_labels)
    assert prepared.meta == raw.meta


def raw_dataset_like(prepared: PreparedDataset, refs: list[SampleRef], **kwargs) -> CXRDataset:
    """CXRDataset over ``refs`` put in the prepared data set's order (augmentation depends on the index)."""
    by_path = {str(r.image_path): r for r in refs}
    ordered = [by_path[str(r.image_path)] for r in prepared.refs]
    return CXRDataset(ordered, CLASSES, BOX_CLASSES, SIZE, cache=False, **kwargs)


def cache_files(out: Path) -> dict[str, bytes]:
    """Every image/mask file of a cache, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for folder in ("images", "masks") for p in sorted((out / folder).iterdir())}


# --------------------------------------------------------------------------- prepare, index, info


def test_prepare_writes_index_images_and_counts(nih_src, nih_cache):
    refs = read_source("nih-cxr14-bbox", nih_src)
    records = read_index(nih_cache)
    assert len(records) == len(refs) == 12
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    for record in records:
        with Image.open(nih_cache / record["image"]) as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE)
        assert record["mask"] == "" and record["size"] == SIZE and record["orig_height"] == 48
        assert record["scale"] == SIZE / 48 and record["pad_x"] == record["pad_y"] == 0
        assert record["id"] == item_id(record["rel_path"]) and record["rel_path"].startswith("images/")
        assert Path(record["path"]).is_file() and record["pixel_spacing"] is None
        assert record["extra"] == {"view": "PA"}
    with_boxes = [r for r in records if r["boxes"] is not None]
    assert len(with_boxes) == len({r.image_path for r in refs if r.boxes_xywh is not None})
    synonym = next(r for r in records if r["rel_path"] == "images/n3p000_0.png")
    assert "Infiltration" in synonym["box_names"]
    box = synonym["boxes"][synonym["box_names"].index("Infiltration")]
    assert box == pytest.approx([2 * SIZE / 48, 3 * SIZE / 48, 12.5 * SIZE / 48, 10.25 * SIZE / 48], abs=1e-4)
    # NaN = absent key; NIH gives every finding, COVID-19 is a known 0.
    assert all(r["findings"]["COVID-19"] == 0.0 and len(r["findings"]) == 16 for r in records)

    summary = cache_summary(nih_cache)
    masses = sum(r.findings["Mass"] == 1.0 for r in refs)
    assert summary["images"] == 12 and summary["patients"] == 6 and summary["errors"] == 0
    assert summary["labels"]["Mass"] == {"positive": masses, "negative": 12 - masses, "unknown": 0}
    assert summary["tasks"]["boxes"] == len(with_boxes) and summary["tasks"]["mask"] == 0
    assert sum(p["images"] for p in summary["parts"].values()) == 12
    manifest = json.loads((nih_cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["size"] == SIZE and manifest["source"] == "nih-cxr14-bbox"
    assert manifest["counts"]["images"] == 12 and manifest["multichex_version"]

    result = CliRunner().invoke(data_app, ["info", str(nih_cache)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "nih-cxr14-bbox" in result.output and "Mass" in result.output and "train" in result.output


def test_covid_masks_letterbox_and_counts(covid_cache):
    records = read_index(covid_cache)
    assert len(records) == 12 and all(r["mask"] for r in records)
    record = records[0]
    assert (record["orig_height"], record["orig_width"]) == (40, 56)
    assert record["pad_x"] == 0 and record["pad_y"] > 0 and record["boxes"] is None
    mask = np.array(Image.open(covid_cache / record["mask"]))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert not mask[: record["pad_y"]].any()  # padding is background
    summary = cache_summary(covid_cache)
    assert summary["tasks"]["mask"] == 12 and summary["tasks"]["boxes"] == 0
    assert summary["labels"]["gate (positive)"]["unknown"] == 0


def test_split_is_patient_wise_and_covers_everything(covid_cache, nih_cache):
    for cache in (covid_cache, nih_cache):
        split = read_split(cache)
        records = {r["id"]: r for r in read_index(cache)}
        assert sorted(i for ids in split["parts"].values() for i in ids) == sorted(records)
        owners: dict[str, str] = {}
        for part, ids in split["parts"].items():
            for i in ids:
                assert owners.setdefault(records[i]["patient_id"], part) == part
        assert split["seed"] == 0 and "dataset/gate" in split["stratify"]
        sizes = [len(PreparedDataset(cache, CLASSES, BOX_CLASSES, SIZE, part=p)) for p in split["parts"]]
        assert sum(sizes) == len(records) and sizes[0] > 0


def test_parse_fractions():
    assert parse_fractions("0.8,0.1,0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert parse_fractions("train=0.5,test=0.5") == {"train": 0.5, "test": 0.5}
    with pytest.raises(Exception, match="sum to 1"):
        parse_fractions("0.5,0.1,0.1")


# --------------------------------------------------------------------------- equivalence with CXRDataset


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("source", ["nih", "covid"])
def test_prepared_equals_raw(source, augment, nih_src, covid_src, nih_cache, covid_cache):
    name, root, cache = {"nih": ("nih-cxr14-bbox", nih_src, nih_cache), "covid": ("covid-chestxray", covid_src, covid_cache)}[source]
    config = AugmentConfig() if augment else None
    prepared = PreparedDataset(cache, CLASSES, BOX_CLASSES, SIZE, augment=config, seed=5)
    raw = raw_dataset_like(prepared, read_source(name, root), augment=config, seed=5)
    assert len(prepared) == len(raw) == 12
    for epoch in (0, 3):
        prepared.set_epoch(epoch)
        raw.set_epoch(epoch)
        for index in range(len(raw)):
            assert_same_sample(prepared[index], raw[index])
    assert prepared.failures == raw.failures == {}


def test_prepared_equals_raw_with_tasks_and_mask_boxes(covid_src, covid_cache):
    """``tasks`` hides labels like ``restrict_tasks``; ``boxes_from_masks`` fits boxes like ``mask_box_label``."""
    refs = [restrict_tasks(r, ["cls", "seg", "det"]) for r in read_source("covid-chestxray", covid_src)]
    refs = [SampleRef(**{**r.__dict__, "mask_box_label": "Lung"}) for r in refs]
    prepared = PreparedDataset(covid_cache, CLASSES, BOX_CLASSES, SIZE, augment=AugmentConfig(), seed=1,
                               tasks=["cls", "seg", "det"], boxes_from_masks="Lung")
    raw = raw_dataset_like(prepared, refs, augment=AugmentConfig(), seed=1)
    for index in range(len(raw)):
        sample = prepared[index]
        assert math.isnan(sample.positive) and sample.boxes is not None and len(sample.boxes) >= 1
        assert_same_sample(sample, raw[index])
    hidden = PreparedDataset(covid_cache, CLASSES, BOX_CLASSES, SIZE, tasks=["gate"])[0]
    assert hidden.mask is None and hidden.boxes is None and torch.isnan(hidden.labels).all()


def test_prepared_dataset_rejects_wrong_size_and_part(covid_cache):
    with pytest.raises(ValueError, match="prepared at 32 px"):
        PreparedDataset(covid_cache, CLASSES, BOX_CLASSES, 64)
    with pytest.raises(ValueError, match="unknown split part"):
        PreparedDataset(covid_cache, CLASSES, BOX_CLASSES, SIZE, part="holdout")


def test_unreadable_cached_png_becomes_failure(covid_cache, tmp_path):
    """A cache file damaged after preparation behaves like an unreadable source image in CXRDataset."""
    dataset = PreparedDataset(covid_cache, CLASSES, BOX_CLASSES, SIZE)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset.items[0] = type(dataset.items[0])(**{**dataset.items[0].__dict__, "image": broken})
    assert dataset[0] is None and str(dataset.refs[0].image_path) in dataset.failures
    assert dataset[1] is not None


def test_special_refs_known_empty_boxes_rle_and_spacing(tmp_path, monkeypatch, dicom_factory):
    """Boxes annotated as none → ``[]``; RLE masks; DICOM pixel spacing; duplicates → errors.csv."""
    root = tmp_path / "special"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(root / "images" / "a.png")
    dicom_factory.make_dicom(root / "images" / "b.dcm", rng.integers(0, 4000, (24, 24)).astype(np.uint16), pixel_spacing=(0.15, 0.2))
    refs = [
        SampleRef(root / "images" / "a.png", "special", "p1", {"Mass": 0.0}, 0.0, boxes_xywh=[], box_names=[]),
        SampleRef(root / "images" / "b.dcm", "special", "p2", {"Mass": 1.0, "Nodule": math.nan}, 1.0,
                  mask_rle=["30 20 100 40"], boxes_xywh=[(2.0, 2.0, 10.0, 6.0)], box_names=["Mass"]),
        SampleRef(root / "images" / "a.png", "special", "p1", {}, math.nan),
    ]
    monkeypatch.setitem(READERS, "test-special", lambda folder: list(refs))
    result = prepare_cache("test-special", root, tmp_path / "cache", SIZE, workers=1, progress=False)
    assert result.total == 2 and [e[1] for e in result.errors] == ["duplicate image in the source listing; the first entry was kept"]
    by_path = {r["rel_path"]: r for r in read_index(tmp_path / "cache")}
    assert by_path["images/a.png"]["boxes"] == [] and by_path["images/a.png"]["box_names"] == []
    assert by_path["images/a.png"]["positive"] == 0.0 and by_path["images/a.png"]["mask"] == ""
    dicom = by_path["images/b.dcm"]
    assert dicom["pixel_spacing"] == [0.15, 0.2] and dicom["mask"] and dicom["box_names"] == ["Mass"]
    assert dicom["findings"] == {"Mass": 1.0}  # NaN = absent key
    assert cache_summary(tmp_path / "cache")["tasks"]["known-empty boxes"] == 1
    prepared = PreparedDataset(tmp_path / "cache", CLASSES, BOX_CLASSES, SIZE, augment=AugmentConfig(), seed=2)
    raw = raw_dataset_like(prepared, refs[:2], augment=AugmentConfig(), seed=2)
    for index in range(2):
        assert_same_sample(prepared[index], raw[index])


# --------------------------------------------------------------------------- bad files


def test_bad_files_are_listed_in_errors_csv(tmp_path, cxr_factory):
    root = cxr_factory.nih(tmp_path / "nih-bad", n_patients=3, per_patient=2, size=40, seed=9, prefix="b")
    (root / "images" / "b9p000_1.png").write_bytes(b"this is not an image")
    full = (root / "images" / "b9p001_0.png").read_bytes()
    (root / "images" / "b9p001_0.png").write_bytes(full[: len(full) // 2])
    (root / "images" / "b9p002_1.png").unlink()
    result = prepare_cache("nih-cxr14-bbox", root, tmp_path / "cache", SIZE, workers=2, progress=False)
    errors = {Path(row["path"]).name: row["reason"] for row in read_errors(tmp_path / "cache")}
    assert set(errors) == {"b9p000_1.png", "b9p001_0.png", "b9p002_1.png"}
    assert "not a recognised image format" in errors["b9p000_1.png"]
    assert "truncated" in errors["b9p001_0.png"] or "corrupt" in errors["b9p001_0.png"]
    assert "file not found" in errors["b9p002_1.png"]
    assert len(result.errors) == 3 and len(read_index(tmp_path / "cache")) == 3
    summary = cache_summary(tmp_path / "cache")
    assert summary["errors"] == 3 and summary["images"] == 3
    output = CliRunner().invoke(data_app, ["info", str(tmp_path / "cache")], terminal_width=250).output
    assert "errors (first 3 of 3)" in output and "file not found" in output


def test_rerun_with_other_size_is_refused(covid_src, tmp_path):
    prepare_cache("covid-chestxray", covid_src, tmp_path / "c", SIZE, workers=1, limit=2, progress=False)
    with pytest.raises(ValueError, match="different preparation"):
        prepare_cache("covid-chestxray", covid_src, tmp_path / "c", SIZE * 2, workers=1, progress=False)
    result = CliRunner().invoke(data_app, ["prepare", "covid-chestxray", str(covid_src), "--out", str(tmp_path / "c"), "--size", "64"])
    assert result.exit_code == 1 and "different preparation" in result.output
    assert len(read_index(tmp_path / "c")) == 2


def test_journal_drops_torn_last_line(tmp_path):
    journal = Journal(tmp_path / JOURNAL_NAME)
    journal.append([{"id": "a"}, {"id": "b"}])
    with (tmp_path / JOURNAL_NAME).open("ab") as handle:
        handle.write(b'{"id": "c", "ima')
    assert [r["id"] for r in journal.load()] == ["a", "b"]
    journal.append([{"id": "d"}])
    assert [r["id"] for r in journal.load()] == ["a", "b", "d"]


# --------------------------------------------------------------------------- resumability


def _journal_lines(out: Path) -> int:
    path = out / JOURNAL_NAME
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_sigkill_gives_identical_cache(tmp_path, cxr_factory):
    root = cxr_factory.nih(tmp_path / "nih-resume", n_patients=10, per_patient=3, size=40, seed=11, prefix="r")
    (root / "images" / "r11p004_2.png").write_bytes(b"broken")  # errors must survive the interruption too
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    prepare_cache("nih-cxr14-bbox", root, clean, SIZE, workers=1, progress=False)

    command = [sys.executable, "-m", "multichex.cli", "data", "prepare", "nih-cxr14-bbox", str(root),
               "--out", str(resumed), "--size", str(SIZE), "--workers", "2", "--no-progress"]
    env = {**os.environ, DELAY_ENV: "0.15"}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_lines(resumed) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its workers, mid-run
    process.wait(timeout=30)
    process.stderr.close()
    done = _journal_lines(resumed)
    assert 4 <= done < 29
    assert not json.loads((resumed / "manifest.json").read_text())["complete"]
    for record in Journal(resumed / JOURNAL_NAME).load():  # every journalled item is whole
        with Image.open(resumed / record["image"]) as image:
            image.load()
            assert image.size == (SIZE, SIZE)
    with (resumed / JOURNAL_NAME).open("ab") as handle:  # as if killed while appending
        handle.write(b'{"id": "r11p0')

    result = prepare_cache("nih-cxr14-bbox", root, resumed, SIZE, workers=2, progress=False)
    assert result.total == 30 and result.skipped == done and result.prepared == 30 - done  # the broken file is retried
    assert (resumed / "index.csv").read_bytes() == (clean / "index.csv").read_bytes()
    assert (resumed / "errors.csv").read_bytes() == (clean / "errors.csv").read_bytes()
    assert (resumed / "split.json").read_bytes() == (clean / "split.json").read_bytes()
    assert cache_files(resumed) == cache_files(clean)  # no temp files left, same names, same bytes
    assert len(read_index(resumed)) == 29 and len(read_errors(resumed)) == 1


def test_prepare_reads_a_native_layout(tmp_path):
    """A data set in its published layout (Kermany's chest_xray tree) prepares like any other source."""
    from multichex.data.cache import prepare_cache, read_index

    rng = np.random.default_rng(0)
    names = {("train", "NORMAL"): ["IM-0001-0001.jpeg", "IM-0003-0001.jpeg"],
             ("test", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person7_virus_13.jpeg"]}
    for (split, label), files in names.items():
        folder = tmp_path / "chest_xray" / split / label
        folder.mkdir(parents=True)
        for name in files:
            Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(folder / name)
    result = prepare_cache("kermany-chest-xray", tmp_path, tmp_path / "cache", size=32, workers=1, progress=False)
    assert (result.total, result.prepared, result.skipped) == (5, 5, 0)
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "cache")}
    assert rows["person7_virus_13.jpeg"]["patient_id"] == "kermany:person7"
    assert rows["person7_virus_13.jpeg"]["findings"]["Viral Pneumonia"] == 1
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["options"]["reader"] == "multichex.data.native.kermany.read_kermany"
    with pytest.raises(ValueError, match="unknown source"):
        prepare_cache("no-such-source", tmp_path, tmp_path / "cache2", size=32, workers=1, progress=False)


def test_prepared_box_of_unknown_class_makes_image_unannotated(nih_src, nih_cache, caplog):
    """The cache keeps every box; a class outside ``box_classes`` (here Hernia) → boxes unknown, as for raw folders."""
    import logging

    with caplog.at_level(logging.WARNING, logger="multichex.data.sources"):
        prepared = PreparedDataset(nih_cache, CLASSES, BOX_CLASSES, SIZE)
        samples = [prepared[i] for i in range(len(prepared))]
    by_name = {Path(s.meta["path"]).name: s for s in samples}
    assert by_name["n3p001_1.png"].boxes is None
    assert by_name["n3p000_0.png"].boxes is not None and len(by_name["n3p000_0.png"].boxes) >= 1
    warnings = [r.getMessage() for r in caplog.records if "not among the box classes" in r.getMessage()]
    assert len(warnings) == 1 and "Hernia" in warnings[0] and "1 of " in warnings[0], warnings
    raw = raw_dataset_like(prepared, read_source("nih-cxr14-bbox", nih_src))
    for index in range(len(raw)):
        assert_same_sample(prepared[index], raw[index])


# --------------------------------------------------------------------------- caches in a run: options and the joint split


def _train_config(sources: list, seed: int = 0, **overrides):
    from multichex.models.config import ModelConfig
    from multichex.training.config import TrainConfig

    model = ModelConfig(encoder="lite-small", image_size=SIZE, class_names=CLASSES, box_classes=BOX_CLASSES)
    return TrainConfig(model=model, sources=sources, seed=seed, split={"train": 0.5, "val": 0.25, "test": 0.25},
                       augment=AugmentConfig(enabled=False), **overrides)


def _by_path(dataset) -> dict[str, int]:
    return {str(ref.image_path): index for index, ref in enumerate(dataset.refs)}


def test_cache_source_gets_the_label_options_of_its_raw_source(covid_src, covid_cache):
    """classes / none_class / negative_for / label_budget / limit act on a cache exactly as on its raw folder."""
    from multichex.training.config import SourceConfig
    from multichex.training.data import build_datasets

    options = {"classes": ["COVID-19"], "none_class": "No Finding", "negative_for": ["Mass"], "tasks": ["cls", "gate", "seg"]}
    raw = build_datasets(_train_config([SourceConfig("covid-chestxray", str(covid_src), **options)]))
    cached = build_datasets(_train_config([SourceConfig("covid-chestxray", prepared=str(covid_cache), **options)]))
    assert set(raw) == set(cached)
    for part in raw:
        raw_set, cached_set = raw[part]["covid-chestxray"], cached[part]["covid-chestxray"]
        assert isinstance(cached_set, PreparedDataset)
        raw_index, cached_index = _by_path(raw_set), _by_path(cached_set)
        assert set(raw_index) == set(cached_index), part  # same patients in the same part
        for path, index in raw_index.items():
            assert_same_sample(cached_set[cached_index[path]], raw_set[index])
        mass = cached_set[0].labels[CLASSES.index("Mass")]
        assert (float(mass) == 0.0) == (part == "train")  # negative_for is a training-only option
    budget = {"label_budget": {"seg": 2, "cls": 3}}
    train = build_datasets(_train_config([SourceConfig("covid-chestxray", prepared=str(covid_cache), **budget)]))["train"]["covid-chestxray"]
    samples = [train[i] for i in range(len(train))]
    assert len(samples) > 3
    assert sum(s.mask is not None for s in samples) == 2
    assert sum(not torch.isnan(s.labels).all() for s in samples) == 3
    limited = build_datasets(_train_config([SourceConfig("covid-chestxray", prepared=str(covid_cache), limit=5)]))
    assert sum(len(dataset) for sources in limited.values() for dataset in sources.values()) == 5


def test_cache_source_refuses_options_fixed_at_preparation(covid_cache):
    from multichex.training.config import SourceConfig
    from multichex.training.data import build_datasets

    with pytest.raises(ValueError, match="reader options"):
        build_datasets(_train_config([SourceConfig("covid-chestxray", prepared=str(covid_cache), options={"uncertain": "ones"})]))
    with pytest.raises(ValueError, match="resample_to"):
        build_datasets(_train_config([SourceConfig("covid-chestxray", prepared=str(covid_cache), resample_to=16)]))


def test_cached_and_raw_sources_split_jointly_with_the_run_seed(tmp_path, cxr_factory):
    """covid-chestxray (raw) and hannover-covid19 (cached) share patients: none of them in two parts, for any
    seed; and the cached source's split follows the run's seed, not the one it was prepared with."""
    from multichex.training.config import SourceConfig
    from multichex.training.data import build_datasets

    shared = [f"H{i:03d}" for i in range(10)]
    covid = cxr_factory.covid(tmp_path / "covid", n_patients=12, per_patient=2, seed=21, size=SIZE, hannover_ids=shared + [None, None])
    hannover = cxr_factory.hannover(tmp_path / "hannover", shared + ["H100", "H101"], per_patient=2, size=SIZE)
    cache = tmp_path / "hannover-cache"
    prepare_cache("hannover-covid19", hannover, cache, SIZE, workers=1, progress=False)
    cached_parts = []
    for seed in range(6):
        config = _train_config([SourceConfig("covid-chestxray", str(covid)), SourceConfig("hannover-covid19", prepared=str(cache))], seed=seed)
        parts = build_datasets(config)
        owner: dict[str, str] = {}
        for part, sources in parts.items():
            for dataset in sources.values():
                for ref in dataset.refs:
                    assert owner.setdefault(ref.patient_id, part) == part, (seed, ref.patient_id)
        assert sum(len(d) for sources in parts.values() for d in sources.values()) == 48
        cached_parts.append({part: sorted(str(r.image_path) for r in sources["hannover-covid19"].refs)
                             for part, sources in parts.items() if "hannover-covid19" in sources})
    assert any(parts != cached_parts[0] for parts in cached_parts[1:])
