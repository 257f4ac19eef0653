"""Source readers (bundled sample and generated folders), CXRDataset, patient splits and batch schedules."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from multichex.data.labels import NIH_FINDINGS, canonical_name, relabel
from multichex.data.record import collate_samples
from multichex.data.registry import read_source
from multichex.data.samplers import AlternatingBatches, JointBatches
from multichex.data.sources import (
    CXRDataset,
    SampleRef,
    bundled_sample_root,
    read_covid_chestxray,
    read_hannover,
    read_shared_nih,
)
from multichex.data.splits import patient_split
from multichex.data.transforms import AugmentConfig
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import split_sources

CLASSES = ["Atelectasis", "Cardiomegaly", "Mass", "Pneumonia", "COVID-19", "No Finding"]
BOX_CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
SIZE = 64


def dataset(refs, size=SIZE, **kwargs) -> CXRDataset:
    return CXRDataset(refs, CLASSES, BOX_CLASSES, size, **kwargs)


# --------------------------------------------------------------------------- bundled sample


@pytest.mark.parametrize("name", ["nih-cxr14-bbox", "covid-chestxray", "kermany-pediatric"])
def test_bundled_sources_read(name):
    refs = read_source(name)
    assert len(refs) > 0
    assert all(r.image_path.is_file() for r in refs)
    assert all(r.dataset == name for r in refs)
    prefix = {"nih-cxr14-bbox": "nih:", "covid-chestxray": ("hannover:", "cohen:"), "kermany-pediatric": "kermany:"}[name]
    assert all(r.patient_id.startswith(prefix) for r in refs)
    if name == "covid-chestxray":
        with_mask = [r for r in refs if r.mask_path is not None]
        assert with_mask and all(r.mask_path.is_file() for r in with_mask)
        assert all(r.boxes_xywh is None for r in refs)
    if name == "nih-cxr14-bbox":
        with_boxes = [r for r in refs if r.boxes_xywh is not None]
        assert with_boxes
        assert all(len(r.boxes_xywh) == len(r.box_names) for r in with_boxes)
        assert all(r.mask_path is None for r in refs)
        assert all(r.findings["COVID-19"] == 0.0 for r in refs)
    if name == "kermany-pediatric":
        assert all(r.mask_path is None and r.boxes_xywh is None for r in refs)
        assert {r.findings["Pneumonia"] for r in refs} == {0.0, 1.0}


def test_read_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        read_source("imaginary")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_source("covid-chestxray", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_source("nih-cxr14-bbox", tmp_path / "empty")
    assert bundled_sample_root().is_dir()


def test_bundled_samples_through_dataset():
    covid = dataset(read_source("covid-chestxray")[:3])
    sample = covid[0]
    assert sample.image.shape == (1, SIZE, SIZE)
    assert float(sample.image.min()) >= 0.0 and float(sample.image.max()) <= 1.0
    assert sample.mask is not None and sample.mask.shape == (1, SIZE, SIZE)
    assert set(torch.unique(sample.mask).tolist()) <= {0.0, 1.0} and sample.mask.sum() > 0
    assert sample.labels[CLASSES.index("COVID-19")] == 1.0
    assert torch.isnan(sample.labels[CLASSES.index("Cardiomegaly")])
    assert sample.boxes is None

    kermany = dataset(read_source("kermany-pediatric")[:3])
    sample = kermany[0]
    assert sample.image.shape == (1, SIZE, SIZE)
    assert torch.isnan(sample.labels[CLASSES.index("Cardiomegaly")]), "Kermany does not label Cardiomegaly"
    assert torch.isnan(sample.labels[CLASSES.index("Mass")])
    assert not torch.isnan(sample.labels[CLASSES.index("Pneumonia")])
    assert sample.labels[CLASSES.index("COVID-19")] == 0.0
    assert sample.mask is None and sample.boxes is None

    nih_refs = [r for r in read_source("nih-cxr14-bbox") if r.boxes_xywh is not None][:4]
    nih = dataset(nih_refs)
    for index in range(len(nih)):
        sample = nih[index]
        assert not torch.isnan(sample.labels[CLASSES.index("Cardiomegaly")])
        assert sample.boxes is not None and len(sample.boxes) == len(sample.box_labels)
        assert (sample.boxes >= 0).all() and (sample.boxes <= SIZE).all()
        assert sample.meta["dataset"] == "nih-cxr14-bbox"


def test_unreadable_image_is_recorded_and_dropped(tmp_path):
    good = read_source("kermany-pediatric")[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    refs = [
        good,
        SampleRef(image_path=tmp_path / "missing.png", dataset="x", patient_id="p1"),
        SampleRef(image_path=corrupt, dataset="x", patient_id="p2"),
    ]
    data = dataset(refs)
    assert data[1] is None and data[2] is None
    assert set(data.failures) == {str(tmp_path / "missing.png"), str(corrupt)}
    assert "missing.png" in data.failures[str(tmp_path / "missing.png")]
    batch = collate_samples([data[i] for i in range(len(data))])
    assert len(batch) == 1 and batch.meta[0]["path"] == str(good.image_path)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_samples)
    assert [len(b) for b in loader] == [1]


def test_mask_of_wrong_size_is_a_failure(tmp_path, cxr_factory):
    root = cxr_factory.covid(tmp_path / "covid", n_patients=1, per_patient=1, seed=5)
    ref = read_covid_chestxray(root)[0]
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(ref.mask_path)
    data = dataset([ref])
    assert data[0] is None
    assert "mask size" in data.failures[str(ref.image_path)]


# --------------------------------------------------------------------------- generated folders


def test_generated_covid_folder(tmp_path, cxr_factory):
    root = cxr_factory.covid(tmp_path / "covid", n_patients=3, per_patient=2, seed=7, size=(48, 80))
    refs = read_source("covid-chestxray", root)
    assert len(refs) == 6
    assert all(r.mask_path is not None and r.patient_id.startswith("cohen:") for r in refs)
    assert len({r.patient_id for r in refs}) == 3
    data = dataset(refs)
    for index in range(len(data)):
        sample = data[index]
        letterbox = sample.meta["letterbox"]
        assert sample.meta["original_size"] == (48, 80)
        assert letterbox["pad_x"] == 0 and letterbox["pad_y"] > 0
        # The bright lungs and the mask line up after letterboxing.
        inside = sample.image[sample.mask > 0.5].mean()
        outside = sample.image[sample.mask < 0.5].mean()
        assert inside > outside + 0.4
        assert sample.mask[0, : letterbox["pad_y"]].sum() == 0
        covid = refs[index].findings["COVID-19"]
        assert sample.labels[CLASSES.index("COVID-19")] == covid
        assert sample.positive == covid


def test_generated_covid_optional_labels(tmp_path, cxr_factory):
    root = cxr_factory.covid(tmp_path / "covid", n_patients=2, per_patient=1, seed=8)
    lines = (root / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    first[header.index("has_lung_mask")] = "0"
    first[header.index("covid19")] = ""
    first[header.index("finding")] = ""
    lines[1] = ",".join(first)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    refs = read_covid_chestxray(root)
    assert refs[0].mask_path is None and refs[1].mask_path is not None
    assert math.isnan(refs[0].findings["COVID-19"]) and math.isnan(refs[0].positive)
    sample = dataset(refs)[0]
    assert sample.mask is None
    assert torch.isnan(sample.labels[CLASSES.index("COVID-19")]) and math.isnan(sample.positive)


def test_blank_finding_leaves_no_finding_unknown(tmp_path, cxr_factory):
    root = cxr_factory.covid(tmp_path / "covid", n_patients=1, per_patient=1, seed=8)
    lines = (root / "labels.csv").read_text().splitlines()
    header, row = lines[0].split(","), lines[1].split(",")
    row[header.index("finding")] = ""
    (root / "labels.csv").write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    ref = read_covid_chestxray(root)[0]
    assert math.isnan(ref.positive)
    assert math.isnan(ref.findings["No Finding"]), f"blank finding gave No Finding = {ref.findings['No Finding']}"


def test_generated_nih_folder_boxes_match_squares(tmp_path, cxr_factory):
    root = cxr_factory.nih(tmp_path / "nih", n_patients=4, per_patient=2, seed=9)
    refs = read_shared_nih(root, "nih-cxr14-bbox")
    assert len(refs) == 8 and len({r.patient_id for r in refs}) == 4
    positives = [r for r in refs if r.findings["Mass"] == 1.0]
    negatives = [r for r in refs if r.findings["Mass"] == 0.0]
    assert len(positives) == 4 and len(negatives) == 4
    assert all(r.boxes_xywh is not None and r.box_names == ["Mass"] for r in positives)
    assert all(r.boxes_xywh is None for r in negatives), "no box row = unknown, not 'no lesion'"
    assert all(r.positive == 1.0 for r in positives) and all(r.positive == 0.0 for r in negatives)
    assert all(set(NIH_FINDINGS) <= set(r.findings) for r in refs)
    data = dataset(refs)
    for index, ref in enumerate(refs):
        sample = data[index]
        if ref in positives:
            (x1, y1, x2, y2), = sample.boxes.round().long().tolist()
            assert sample.box_labels.tolist() == [BOX_CLASSES.index("Mass")]
            assert sample.image[0, y1:y2, x1:x2].mean() > 0.95, "the bright square sits exactly in the box"
        else:
            assert sample.boxes is None
        # Only positives hold an 8×8 patch that is uniformly bright.
        brightest_patch = float(torch.nn.functional.avg_pool2d(sample.image[None], 8, stride=1).max())
        assert (brightest_patch > 0.95) == (ref in positives), (ref.image_path.name, brightest_patch)


def test_dataset_augmentation_depends_on_seed_epoch_index(covid_root):
    refs = read_covid_chestxray(covid_root)[:2]
    data = dataset(refs, augment=AugmentConfig(), seed=1)
    data.set_epoch(0)
    a0 = data[0]
    a0_again = data[0]
    assert torch.equal(a0.image, a0_again.image) and torch.equal(a0.mask, a0_again.mask)
    data.set_epoch(1)
    a1 = data[0]
    assert not torch.equal(a0.image, a1.image)
    other_seed = dataset(refs, augment=AugmentConfig(), seed=2)
    assert not torch.equal(other_seed[0].image, a0.image)
    plain = dataset(refs, augment=None)
    assert not torch.equal(plain[0].image, a0.image)


def test_labels_vocabulary():
    assert canonical_name("Infiltrate") == "Infiltration" and canonical_name(" No_Finding ") == "No Finding"
    vector = relabel({"Infiltrate": 1.0, "COVID19": 0.0, "Mass": math.nan}, ["Infiltration", "COVID-19", "Mass", "Hernia"])
    assert vector[:2].tolist() == [1.0, 0.0]
    assert torch.isnan(vector[2:]).all()


# --------------------------------------------------------------------------- covid / hannover joint split


def test_covid_and_hannover_share_patient_ids(tmp_path, cxr_factory):
    shared = ["H001", "H002", "H003"]
    covid_root = cxr_factory.covid(tmp_path / "covid", n_patients=5, per_patient=2, seed=11,
                                   hannover_ids=["H001", None, "H002", "H003", None])
    hannover_root = cxr_factory.hannover(tmp_path / "hannover", shared + ["H004"], per_patient=2)
    covid_refs = read_covid_chestxray(covid_root)
    hannover_refs = read_hannover(hannover_root)
    assert all(r.findings["COVID-19"] == 1.0 and r.positive == 1.0 for r in hannover_refs)
    for hid in shared:
        from_covid = {r.patient_id for r in covid_refs if r.patient_id == f"hannover:{hid}"}
        from_hannover = {r.patient_id for r in hannover_refs if r.patient_id == f"hannover:{hid}"}
        assert from_covid == from_hannover == {f"hannover:{hid}"}
    assert sum(r.patient_id.startswith("cohen:") for r in covid_refs) == 4

    for seed in range(6):
        config = TrainConfig(
            sources=[SourceConfig("covid-chestxray", str(covid_root)), SourceConfig("hannover-covid19", str(hannover_root))],
            split={"train": 0.5, "val": 0.25, "test": 0.25},
            seed=seed,
        )
        parts = split_sources(config)
        part_of: dict[str, set[str]] = {}
        for part, per_source in parts.items():
            for refs in per_source.values():
                for ref in refs:
                    part_of.setdefault(ref.patient_id, set()).add(part)
        assert all(len(p) == 1 for p in part_of.values()), part_of
        assert sum(len(refs) for per_source in parts.values() for refs in per_source.values()) == 18


# --------------------------------------------------------------------------- patient_split


def make_patients(rng: np.random.Generator, n_patients: int, max_images: int = 4) -> list[str]:
    ids = [f"p{i:04d}" for i in range(n_patients) for _ in range(int(rng.integers(1, max_images + 1)))]
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("seed", range(8))
def test_patient_split_properties(seed):
    rng = np.random.default_rng(seed)
    ids = make_patients(rng, 200)
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    parts = patient_split(ids, fractions, seed=seed)
    # Every image lands in exactly one part.
    all_indices = sorted(i for indices in parts.values() for i in indices)
    assert all_indices == list(range(len(ids)))
    # No patient in two parts.
    owner: dict[str, str] = {}
    for part, indices in parts.items():
        for index in indices:
            assert owner.setdefault(ids[index], part) == part
    # Roughly the requested fractions (of images).
    for part, fraction in fractions.items():
        assert abs(len(parts[part]) / len(ids) - fraction) < 0.03, (part, len(parts[part]) / len(ids))
    # Deterministic per seed.
    assert patient_split(ids, fractions, seed=seed) == parts
    # Independent of input order: the same patients end up in the same parts.
    order = rng.permutation(len(ids))
    shuffled = [ids[i] for i in order]
    reparts = patient_split(shuffled, fractions, seed=seed)
    patients = {part: {ids[i] for i in indices} for part, indices in parts.items()}
    repatients = {part: {shuffled[i] for i in indices} for part, indices in reparts.items()}
    assert patients == repatients


def test_patient_split_seed_changes_assignment():
    ids = make_patients(np.random.default_rng(0), 100)
    splits = [patient_split(ids, seed=s) for s in range(4)]
    assert any(s != splits[0] for s in splits[1:])


def test_patient_split_strata_each_get_their_share():
    big = [f"a{i}" for i in range(300)]
    small = [f"b{i}" for i in range(40)]
    ids = big + small
    strata = ["big"] * len(big) + ["small"] * len(small)
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    parts = patient_split(ids, fractions, seed=1, strata=strata)
    for stratum, count in (("big", 300), ("small", 40)):
        for part, fraction in fractions.items():
            n = sum(1 for i in parts[part] if strata[i] == stratum)
            assert abs(n - fraction * count) <= 1, (stratum, part, n)


def test_patient_split_patient_in_two_strata_stays_whole():
    ids = ["shared", "shared", "x1", "x2", "y1", "y2", "shared"]
    strata = ["a", "b", "a", "a", "b", "b", "b"]
    for seed in range(10):
        parts = patient_split(ids, {"train": 0.5, "test": 0.5}, seed=seed, strata=strata)
        homes = {part for part, indices in parts.items() for i in indices if ids[i] == "shared"}
        assert len(homes) == 1


@pytest.mark.parametrize("fractions", [{"train": 0.5, "test": 0.4}, {"train": 1.2, "test": -0.2}])
def test_patient_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        patient_split(["a", "b"], fractions)


def test_patient_split_single_part_and_defaults():
    ids = ["a", "b", "b", "c"]
    assert patient_split(ids, {"all": 1.0}) == {"all": [0, 1, 2, 3]}
    parts = patient_split(ids)
    assert set(parts) == {"train", "val", "test"}


# --------------------------------------------------------------------------- batch schedules


def test_alternating_batches_take_turns(covid_root, nih_root):
    covid = dataset(read_covid_chestxray(covid_root)[:10])
    nih = dataset(read_shared_nih(nih_root)[:7])
    schedule = AlternatingBatches({"covid": covid, "nih": nih}, batch_size=4, seed=0)
    assert schedule.default_steps() == 2 * 3
    steps = list(schedule.epoch(0, steps=7))
    assert [name for _, name, _ in steps] == ["covid", "nih"] * 3 + ["covid"]
    assert [step for step, _, _ in steps] == list(range(7))
    for _, name, batch in steps:
        assert all(m["dataset"] == ("covid-chestxray" if name == "covid" else "nih-cxr14") for m in batch.meta)
    # Same epoch → same order; start_step skips the first steps but keeps the order.
    again = list(schedule.epoch(0, steps=7, start_step=3))
    assert [s for s, _, _ in again] == [3, 4, 5, 6]
    for (_, _, a), (_, _, b) in zip(steps[3:], again):
        assert [m["path"] for m in a.meta] == [m["path"] for m in b.meta]
    other = list(schedule.epoch(1, steps=7))
    assert [[m["path"] for m in b.meta] for _, _, b in other] != [[m["path"] for m in b.meta] for _, _, b in steps]
    # A small source is restarted: 7 NIH images in batches of 4 → batches of 4, 3, then 4 again.
    nih_sizes = [len(b) for _, name, b in list(schedule.epoch(0, steps=6)) if name == "nih"]
    assert nih_sizes == [4, 3, 4]


def test_joint_batches_mix_sources(covid_root, nih_root):
    covid = dataset(read_covid_chestxray(covid_root)[:12])
    nih = dataset(read_shared_nih(nih_root)[:12])
    schedule = JointBatches({"covid": covid, "nih": nih}, batch_size=6, seed=0)
    assert schedule.default_steps() == 4
    steps = list(schedule.epoch(0, steps=5))
    assert [name for _, name, _ in steps] == ["joint"] * 5
    seen = Counter(m["dataset"] for _, _, b in steps[:4] for m in b.meta)
    assert seen == {"covid-chestxray": 12, "nih-cxr14": 12}
    assert any(len({m["dataset"] for m in b.meta}) == 2 for _, _, b in steps)


def test_nih_sample_layout_reader(tmp_path, cxr_factory):
    root = cxr_factory.nih(tmp_path / "n", n_patients=1, per_patient=2)
    refs = read_source("nih-cxr14-sample", root)
    assert all(Path(r.image_path).parent == root / "images" for r in refs)
    assert all(r.dataset == "nih-cxr14-sample" for r in refs)


def test_box_outside_image_drops_its_own_label(tmp_path):
    """A box clipped away must take its label with it; the remaining box keeps its own label."""
    import numpy as np
    from PIL import Image

    from multichex.data.sources import CXRDataset, SampleRef

    path = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(path)
    ref = SampleRef(path, "t", "p1", boxes_xywh=[(100, 100, 5, 5), (10, 10, 8, 8)], box_names=["Mass", "Nodule"])
    sample = CXRDataset([ref], ["Mass"], ["Mass", "Nodule"], 40, augment=None)[0]
    assert sample.boxes.tolist() == [[10.0, 10.0, 18.0, 18.0]]
    assert sample.box_labels.tolist() == [1]


def test_shared_patient_does_not_eat_its_stratums_quota():
    """A patient with 1 image in stratum A and 40 in B must not fill A's training share by itself."""
    from multichex.data.splits import patient_split

    ids = [f"a{i}" for i in range(20)] + ["shared"] + ["shared"] * 40 + [f"b{i}" for i in range(20)]
    strata = ["A"] * 21 + ["B"] * 60
    for seed in range(5):
        parts = patient_split(ids, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=seed, strata=strata)
        a_counts = {part: sum(1 for i in idx if strata[i] == "A") for part, idx in parts.items()}
        assert all(a_counts[part] >= 3 for part in ("val", "test")), (seed, a_counts)
        where = {part for part, idx in parts.items() for i in idx if ids[i] == "shared"}
        assert len(where) == 1


def test_box_of_unknown_class_makes_image_unannotated_not_negative(tmp_path, caplog):
    """A box class outside ``box_classes`` must never turn a positive image into "annotated, no lesion"."""
    import logging

    from PIL import Image

    for name in ("partial.png", "unknown.png", "known.png", "empty.png"):
        Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(tmp_path / name)
    refs = [
        SampleRef(tmp_path / "partial.png", "t", "p1", {"Mass": 1.0}, 1.0,
                  boxes_xywh=[(2, 2, 8, 8), (20, 20, 6, 6)], box_names=["Mass", "Hernia"]),
        SampleRef(tmp_path / "unknown.png", "t", "p2", {"Pneumonia": 1.0}, 1.0,
                  boxes_xywh=[(4, 4, 10, 10)], box_names=["Lung Opacity"]),
        SampleRef(tmp_path / "known.png", "t", "p3", {"Mass": 1.0}, 1.0,
                  boxes_xywh=[(10, 10, 8, 8)], box_names=["Mass"]),
        SampleRef(tmp_path / "empty.png", "t", "p4", {"Mass": 0.0}, 0.0, boxes_xywh=[], box_names=[]),
    ]
    with caplog.at_level(logging.WARNING, logger="multichex.data.sources"):
        data = CXRDataset(refs, ["Mass"], ["Mass", "Nodule"], 40, augment=None)
        samples = [data[i] for i in range(len(data))] + [data[i] for i in range(len(data))]
    partial, unknown, known, empty = samples[:4]
    assert partial.boxes is None and partial.box_labels is None  # incomplete annotation → unknown, not negative
    assert unknown.boxes is None and unknown.box_labels is None
    assert known.boxes.tolist() == [[10.0, 10.0, 18.0, 18.0]] and known.box_labels.tolist() == [0]
    assert empty.boxes.shape == (0, 4)  # explicitly annotated as "no lesion" stays so
    assert [s.positive for s in samples[:4]] == [1.0, 1.0, 1.0, 0.0]  # the gate label is untouched
    batch = collate_samples(samples[:4])
    assert batch.has_boxes.tolist() == [False, False, True, True]
    warnings = [r.getMessage() for r in caplog.records if "not among the box classes" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one warning per data set, not one per image
    assert "2 of 4" in warnings[0] and "Hernia" in warnings[0] and "Lung Opacity" in warnings[0]
