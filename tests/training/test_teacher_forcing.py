"""Teacher forcing: with p = 1 only ground-truth positives reach the gated heads, with p = 0 only what the gate passed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multichex.data.record import CXRSample, collate_samples
from multichex.models.config import GateConfig, ModelConfig
from multichex.training.config import TeacherForcingConfig, TrainConfig
from multichex.training.loop import Trainer
from multichex.training.teacher_forcing import ForcingCounts, ground_truth_positive, select_for_head


def batch_of(kinds: list[str], size: int = 64):
    """``pos`` = one box, ``neg`` = annotated with no box, ``unk`` = no box annotation; same for the mask."""
    samples = []
    for i, kind in enumerate(kinds):
        boxes = {"pos": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "neg": torch.zeros(0, 4), "unk": None}[kind]
        mask = {"pos": torch.zeros(1, size, size).index_fill_(1, torch.arange(10, 20), 1.0), "neg": torch.zeros(1, size, size), "unk": None}[kind]
        positive = {"pos": 1.0, "neg": 0.0, "unk": float("nan")}[kind]
        samples.append(CXRSample(image=torch.rand(1, size, size), labels=torch.tensor([positive, 0.0, 1.0 - positive]), positive=positive,
                                 mask=mask, boxes=boxes, box_labels=None if boxes is None else torch.zeros(len(boxes), dtype=torch.long),
                                 meta={"path": f"img{i}.png", "patient_id": f"p{i}"}))
    return collate_samples(samples)


KINDS = ["pos", "neg", "pos", "neg", "unk", "pos", "neg", "neg"]


@pytest.mark.parametrize("head", ["seg", "det"])
def test_ground_truth_positive_needs_a_non_empty_annotation(head):
    batch = batch_of(KINDS)
    assert ground_truth_positive(batch, head).tolist() == [k == "pos" for k in KINDS]


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_p_one_feeds_only_ground_truth_positives(per):
    batch = batch_of(KINDS)
    gate = torch.ones(len(KINDS), dtype=torch.bool)  # a gate that passes everything
    counts = ForcingCounts()
    chosen = select_for_head(batch, "det", gate, TeacherForcingConfig(p=1.0, per=per), np.random.default_rng(0), counts)
    assert chosen.tolist() == [k == "pos" for k in KINDS]
    assert counts.forced["det"] == 3 and counts.gated["det"] == 0


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_p_zero_feeds_what_the_gate_passed_including_false_positives(per):
    batch = batch_of(KINDS)
    gate = torch.tensor([True, True, False, False, True, True, False, True])
    counts = ForcingCounts()
    chosen = select_for_head(batch, "det", gate, TeacherForcingConfig(p=0.0, per=per), np.random.default_rng(0), counts)
    # passed and annotated: rows 0 (pos), 1 (neg), 5 (pos), 7 (neg); row 4 is passed but has no annotation.
    assert chosen.tolist() == [True, True, False, False, False, True, False, True]
    assert counts.gated["det"] == 4 and counts.gated_negative["det"] == 2 and counts.forced["det"] == 0


def test_per_sample_coin_mixes_sources_and_follows_p():
    batch = batch_of(["pos", "neg"] * 200)
    gate = torch.ones(400, dtype=torch.bool)
    counts = ForcingCounts()
    select_for_head(batch, "seg", gate, TeacherForcingConfig(p=0.7, per="sample"), np.random.default_rng(1), counts)
    # Forced rows are the positives whose coin came up (≈ 0.7 × 200); gated rows ≈ 0.3 × 400.
    assert 120 <= counts.forced["seg"] <= 160
    assert 95 <= counts.gated["seg"] <= 145


def tiny_trainer(tmp_path, p: float, threshold: float, **gate) -> Trainer:
    model = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                        anchors=[[0.2, 0.2]], cls_hidden=32, gate=GateConfig(threshold=threshold, **gate))
    config = TrainConfig(model=model, out_dir=str(tmp_path), trainable=["encoder", "det"], teacher_forcing={"p": p, "heads": ["det"]},
                         augment={"enabled": False}, steps_per_epoch=1, epochs=1)
    return Trainer(config, {"dummy": [None]}, progress=False)  # data sets unused: batches are fed by hand


def images_reaching(trainer: Trainer, batch) -> int:
    seen: list[int] = []
    handle = trainer.model.det.register_forward_hook(lambda module, args, out: seen.append(args[0][0].shape[0]))
    try:
        trainer.train_step(batch)
    finally:
        handle.remove()
    return sum(seen)


def test_trainer_runs_the_detection_head_only_on_the_selected_images(tmp_path):
    batch = batch_of(KINDS)
    # p = 1: the three positives, whatever the gate says.
    assert images_reaching(tiny_trainer(tmp_path / "a", p=1.0, threshold=2.0), batch) == 3
    # p = 0 with a gate that passes everything: every annotated image (positives and negatives) = 7.
    assert images_reaching(tiny_trainer(tmp_path / "b", p=0.0, threshold=-1.0), batch) == 7
    # p = 0 with a gate that passes nothing: the head is not run at all.
    trainer = tiny_trainer(tmp_path / "c", p=0.0, threshold=2.0)
    assert images_reaching(trainer, batch) == 0
    assert trainer.forcing.gated.get("det", 0) == 0


def test_gate_stays_frozen_and_counts_reach_the_log(tmp_path):
    trainer = tiny_trainer(tmp_path, p=0.0, threshold=-1.0)
    gate_before = {k: v.clone() for k, v in trainer.model.gate.state_dict().items()}
    trainer.train_step(batch_of(KINDS))
    for key, value in trainer.model.gate.state_dict().items():
        assert torch.equal(value, gate_before[key]), key
    assert trainer.forcing.as_record() == {"tf_det_forced": 0, "tf_det_gated": 7, "tf_det_gated_negative": 4}


def test_the_classifier_head_can_be_the_gate(tmp_path):
    """gate.source = classifier: the pass/reject decision comes from CheXCls' chosen classes (no gate module)."""
    batch = batch_of(KINDS)
    trainer = tiny_trainer(tmp_path / "a", p=0.0, threshold=-1.0, source="classifier", classes=["Mass"])
    calls: list[int] = []
    handle = trainer.model.gate.register_forward_hook(lambda *args: calls.append(1))
    assert images_reaching(trainer, batch) == 7
    handle.remove()
    assert not calls  # the separate gate module never ran
    assert images_reaching(tiny_trainer(tmp_path / "b", p=0.0, threshold=2.0, source="classifier", classes=["Mass"]), batch) == 0


def test_teacher_forced_segmentation_trains_with_the_few_label_objectives(tmp_path):
    """The segmentation head runs on the forced rows only: consistency, the adversarial pairs and deep
    supervision must use those rows (and their masks), not the whole batch."""
    model = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                        anchors=[[0.2, 0.2]], cls_hidden=32, seg_deep_supervision=True, discriminator_classes=["Mass", "COVID-19"])
    config = TrainConfig(model=model, out_dir=str(tmp_path), trainable=["encoder", "cls", "seg"], teacher_forcing={"p": 1.0, "heads": ["seg"]},
                         semi_supervised={"consistency_weight": 0.1, "threshold": 0.55}, adversarial={"weight": 0.1},
                         seg_side_weights=[0.25, 0.5, 1.0], augment={"enabled": False}, steps_per_epoch=1, epochs=1)
    trainer = Trainer(config, {"dummy": [None]}, progress=False)
    fake_rows: list[int] = []
    handle = trainer.model.disc.register_forward_hook(lambda module, args, out: fake_rows.append(args[0].shape[0]))
    try:
        losses = trainer.train_step(batch_of(KINDS))
    finally:
        handle.remove()
    assert losses is not None and np.isfinite(losses["total"]) and np.isfinite(losses["seg"])
    assert np.isfinite(losses["seg_adversarial"])
    assert trainer.objectives.counts.values["disc_steps"] == 1
    # p = 1: the three ground-truth positives reach the head; the segmentor's term and the discriminator's
    # real and predicted pairs all use those three rows (not the 7 images with a mask, nor all 8).
    assert fake_rows == [3, 3, 3]
    # Every row that reaches a teacher-forced head has a mask, so no unlabelled row is there to be consistent with.
    assert "seg_consistency" not in losses


def test_a_training_classifier_gate_decides_as_in_eval_mode(tmp_path, monkeypatch):
    """gate.source = classifier with the classifier training: the gate's decision is taken without dropout
    (as at inference), the heads go back to train mode, and nothing of the decision pass is learnt."""
    import multichex.training.steps.forced as loop

    model = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                        anchors=[[0.2, 0.2]], cls_hidden=32, gate=GateConfig(source="classifier", classes=["Mass"]))
    config = TrainConfig(model=model, out_dir=str(tmp_path), trainable=["cls", "seg"], teacher_forcing={"p": 0.0, "heads": ["seg"]},
                         augment={"enabled": False}, steps_per_epoch=1, epochs=1)
    trainer = Trainer(config, {"dummy": [None]}, progress=False)
    trainer.model.cls.feats[-1].p = 0.9  # heavy dropout: a train-mode decision would be noise
    with torch.no_grad():
        trainer.model.cls.dec.weight.mul_(100.0)  # spread the fresh classifier's probabilities around the threshold
    batch = batch_of(["pos", "neg"] * 8)
    with torch.no_grad():
        probs = trainer.model.eval().gate_probability(trainer.model(batch.images.contiguous(memory_format=torch.channels_last), ["cls"]))
    trainer.model.config.gate.threshold = float(probs.median())
    expected = probs >= trainer.model.config.gate.threshold
    assert 0 < int(expected.sum()) < len(expected)
    seen: list[torch.Tensor] = []

    def spy(batch, head, gate_passed, *args, **kwargs):
        seen.append(gate_passed.clone())
        return select_for_head(batch, head, gate_passed, *args, **kwargs)

    monkeypatch.setattr(loop, "select_for_head", spy)
    trainer._train_mode()
    for _ in range(3):
        with torch.no_grad():
            probs = trainer.model.eval().gate_probability(trainer.model(batch.images.contiguous(memory_format=torch.channels_last), ["cls"]))
        trainer._train_mode()
        trainer.train_step(batch)
        assert torch.equal(seen[-1], probs >= trainer.model.config.gate.threshold)
        assert trainer.model.cls.training and trainer.model.cls.feats[-1].training and trainer.model.seg.training
        assert not seen[-1].requires_grad
