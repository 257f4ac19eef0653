"""Per-source options of a run: repeated readers under ids, negatives as box-negatives, resolution bottleneck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multichex.data.record import collate_samples
from multichex.data.transforms import degrade_resolution
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.data import load_refs, make_datasets, split_sources

CLASSES = ["Mass", "No Finding"]


def test_negatives_become_annotated_empty_for_detection(nih_root):
    refs = load_refs(SourceConfig("nih-cxr14-bbox", str(nih_root), ["gate", "det"], empty_boxes_for_negatives=True))
    negatives = [r for r in refs if r.positive == 0]
    positives = [r for r in refs if r.positive == 1]
    assert negatives and all(r.boxes_xywh == [] for r in negatives)
    assert all(r.boxes_xywh for r in positives)
    plain = load_refs(SourceConfig("nih-cxr14-bbox", str(nih_root), ["gate", "det"]))
    assert all(r.boxes_xywh is None for r in plain if r.positive == 0)
    # Without the det task nothing is invented.
    assert all(r.boxes_xywh is None for r in load_refs(SourceConfig("nih-cxr14-bbox", str(nih_root), ["gate"], empty_boxes_for_negatives=True)))


def test_degrade_resolution_removes_detail_and_keeps_size():
    rng = np.random.default_rng(0)
    sharp = rng.random((128, 96)).astype(np.float32)
    blurred = degrade_resolution(sharp, 16)
    assert blurred.shape == sharp.shape and blurred.dtype == np.float32
    assert blurred.std() < 0.5 * sharp.std()
    assert degrade_resolution(sharp, 512) is sharp  # never up-samples


def test_resampled_source_matches_a_low_resolution_copy(nih_root):
    config = TrainConfig(model={"encoder": "lite-small", "image_size": 64, "class_names": CLASSES, "box_classes": ["Mass"]},
                         sources=[SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "det"]),
                                  SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls"], id="low", resample_to=16)],
                         split={"train": 1.0}, augment={"enabled": False})
    datasets = make_datasets(config, split_sources(config)["train"], train=False)
    sharp, low = datasets["nih-cxr14-bbox"][0], datasets["low"][0]
    assert sharp.meta["path"] == low.meta["path"]
    assert low.image.shape == sharp.image.shape
    assert (low.image[:, 1:] - low.image[:, :-1]).abs().mean() < (sharp.image[:, 1:] - sharp.image[:, :-1]).abs().mean()


def test_repeated_readers_need_distinct_ids(nih_root):
    with pytest.raises(ValueError, match="unique"):
        TrainConfig(sources=[SourceConfig("nih-cxr14-bbox", str(nih_root)), SourceConfig("nih-cxr14-bbox", str(nih_root))])


def test_batch_select_keeps_rows_aligned(nih_root):
    config = TrainConfig(model={"encoder": "lite-small", "image_size": 64, "class_names": CLASSES, "box_classes": ["Mass"]},
                         sources=[SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "gate", "det"])], split={"train": 1.0},
                         augment={"enabled": False})
    dataset = make_datasets(config, split_sources(config)["train"], train=False)["nih-cxr14-bbox"]
    batch = collate_samples([dataset[i] for i in range(6)])
    keep = torch.tensor([True, False, False, True, True, False])
    sub = batch.select(keep)
    assert len(sub) == 3
    assert [m["path"] for m in sub.meta] == [batch.meta[i]["path"] for i in (0, 3, 4)]
    assert torch.equal(sub.images, batch.images[[0, 3, 4]])
    assert all(torch.equal(a, batch.boxes[i]) for a, i in zip(sub.boxes, (0, 3, 4)))


def test_hiding_the_seg_task_hides_rle_masks_too():
    from pathlib import Path

    from multichex.data.sources import SampleRef
    from multichex.training.data import restrict_tasks

    ref = SampleRef(Path("x.png"), "siim", "p1", findings={"Pneumothorax": 1.0}, mask_rle=["1 2"])
    assert restrict_tasks(ref, ["cls", "seg"]).mask_rle == ["1 2"]
    hidden = restrict_tasks(ref, ["cls"])
    assert hidden.mask_rle is None and hidden.mask_path is None and hidden.findings == {"Pneumothorax": 1.0}
