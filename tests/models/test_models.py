"""MultiCheXNet: shared encoder, per-task heads and gated inference."""

from __future__ import annotations

import pytest
import torch

from multichex.models.config import GateConfig, ModelConfig
from multichex.models.encoders import get_encoder, list_encoders
from multichex.models.heads.detection import Detections
from multichex.models.multichexnet import MultiCheXNet

SIZE = 64
CLASSES = ["Atelectasis", "Mass", "Nodule", "COVID-19", "No Finding"]


def make_model(gated_heads=("seg", "det"), source="module", classes=(), threshold=0.5, seed=0) -> MultiCheXNet:
    torch.manual_seed(seed)
    config = ModelConfig(
        encoder="lite-small",
        image_size=SIZE,
        class_names=list(CLASSES),
        box_classes=["Mass", "Nodule"],
        cls_hidden=32,
        gate=GateConfig(source=source, classes=list(classes), threshold=threshold, gated_heads=list(gated_heads)),
    )
    return MultiCheXNet(config).eval()


class Recorder:
    """Forward hooks that record the batch size each module saw."""

    def __init__(self, model: MultiCheXNet) -> None:
        self.calls: dict[str, list[int]] = {"encoder": [], "seg": [], "det": [], "cls": [], "gate": []}
        self.handles = [
            model.encoder.register_forward_hook(lambda m, args, out: self.calls["encoder"].append(args[0].shape[0])),
            model.seg.register_forward_hook(lambda m, args, out: self.calls["seg"].append(args[0][0].shape[0])),
            model.det.register_forward_hook(lambda m, args, out: self.calls["det"].append(args[0][0].shape[0])),
            model.cls.register_forward_hook(lambda m, args, out: self.calls["cls"].append(args[0][0].shape[0])),
            model.gate.register_forward_hook(lambda m, args, out: self.calls["gate"].append(args[0][0].shape[0])),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def force_gate(monkeypatch, model: MultiCheXNet, probs: list[float]) -> None:
    """Make the gate return fixed probabilities (after it has run on the batch)."""
    original = model.gate_probability
    fixed = torch.tensor(probs)

    def patched(outputs):
        original(outputs)  # the real computation still has to work on the outputs it gets
        return fixed.clone()

    monkeypatch.setattr(model, "gate_probability", patched)


@pytest.fixture()
def images():
    torch.manual_seed(123)
    return torch.rand(5, 1, SIZE, SIZE)


def test_encoder_registry_and_strides():
    assert {"lite", "lite-small"} <= set(list_encoders())
    encoder = get_encoder("lite-small")
    features = encoder(torch.rand(2, 1, SIZE, SIZE))
    assert [f.shape[-1] for f in features] == [SIZE // s for s in (4, 8, 16, 32)]
    assert tuple(f.shape[1] for f in features) == encoder.out_channels
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder("nope")


def test_forward_runs_only_requested_heads(images):
    model = make_model()
    recorder = Recorder(model)
    outputs = model(images, ["cls", "seg"])
    assert set(outputs) == {"cls", "seg"}
    assert outputs["cls"].shape == (5, len(CLASSES))
    assert outputs["seg"].shape == (5, 1, SIZE, SIZE)
    assert recorder.calls["encoder"] == [5] and recorder.calls["det"] == [] and recorder.calls["gate"] == []
    outputs = model(images, ["det", "gate"])
    assert outputs["gate"].shape == (5,)
    assert outputs["det"].shape[:2] == (5, len(model.config.anchors)) and outputs["det"].shape[-1] == 5 + 2
    with pytest.raises(ValueError, match="unknown task"):
        model(images, ["bogus"])


def test_gate_negatives_skip_gated_heads(monkeypatch, images):
    model = make_model(gated_heads=("seg", "det"))
    force_gate(monkeypatch, model, [0.9, 0.1, 0.7, 0.2, 0.5])  # 0.5 is exactly the threshold → positive
    recorder = Recorder(model)
    out = model.predict(images, score_threshold=0.0)
    expected_positive = [True, False, True, False, True]
    assert out.gate_positive.tolist() == expected_positive
    assert recorder.calls["encoder"] == [5], "the encoder must run exactly once per predict call"
    assert recorder.calls["seg"] == [3] and recorder.calls["det"] == [3], "gated heads get only the positive images"
    assert recorder.calls["cls"] == [5] and recorder.calls["gate"] == [5]
    for index, positive in enumerate(expected_positive):
        if positive:
            assert out.seg_probs[index] is not None and out.seg_probs[index].shape == (1, SIZE, SIZE)
            assert isinstance(out.detections[index], Detections)
        else:
            assert out.seg_probs[index] is None and out.detections[index] is None


def test_gated_head_outputs_match_ungated_run(monkeypatch, images):
    """The positives' segmentation from cached features equals a full forward pass on them."""
    model = make_model(gated_heads=("seg", "det"))
    full = torch.sigmoid(model(images, ["seg"])["seg"])
    force_gate(monkeypatch, model, [0.9, 0.1, 0.7, 0.2, 0.6])
    out = model.predict(images)
    for index in (0, 2, 4):
        torch.testing.assert_close(out.seg_probs[index], full[index], atol=1e-5, rtol=1e-4)


def test_ungated_head_sees_all_images(monkeypatch, images):
    model = make_model(gated_heads=("det",))
    force_gate(monkeypatch, model, [0.1, 0.9, 0.1, 0.1, 0.9])
    recorder = Recorder(model)
    out = model.predict(images)
    assert recorder.calls["encoder"] == [5]
    assert recorder.calls["seg"] == [5], "seg is not gated, so it must see every image"
    assert recorder.calls["det"] == [2]
    assert all(p is not None for p in out.seg_probs)
    assert [d is not None for d in out.detections] == [False, True, False, False, True]


def test_use_gate_false_runs_every_head_on_every_image(monkeypatch, images):
    model = make_model(gated_heads=("seg", "det"))
    force_gate(monkeypatch, model, [0.0, 0.0, 0.0, 0.0, 0.0])
    recorder = Recorder(model)
    out = model.predict(images, use_gate=False)
    assert recorder.calls["encoder"] == [5] and recorder.calls["seg"] == [5] and recorder.calls["det"] == [5]
    assert out.gate_positive.all()
    assert all(p is not None for p in out.seg_probs) and all(d is not None for d in out.detections)
    torch.testing.assert_close(out.gate_probs, torch.zeros(5))


def test_all_negative_gate_via_bias_runs_no_gated_head(images):
    """A real (unpatched) gate pushed far negative: no gated head runs at all."""
    model = make_model(gated_heads=("seg", "det"))
    final = model.gate.net[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-20.0)
    recorder = Recorder(model)
    out = model.predict(images)
    assert not out.gate_positive.any()
    assert (out.gate_probs < 1e-6).all()
    assert recorder.calls["encoder"] == [5] and recorder.calls["seg"] == [] and recorder.calls["det"] == []
    assert out.seg_probs == [None] * 5 and out.detections == [None] * 5
    assert out.class_probs.shape == (5, len(CLASSES))


def test_input_dependent_gate_via_bias(images):
    """Gate logit = w·mean(features) + b tuned so exactly the brighter images pass."""
    model = make_model(gated_heads=("seg", "det"))
    images = images.clone()
    images[1] = 0.0
    images[3] = 0.0
    with torch.no_grad():
        features = model.encode(images)[-1]
        hidden = model.gate.net[:-1](features)  # B×64 after ReLU
        logits_dir = hidden[[0, 2, 4]].mean(0) - hidden[[1, 3]].mean(0)
        final = model.gate.net[-1]
        final.weight.copy_(logits_dir[None])
        raw = hidden @ logits_dir
        final.bias.fill_(-float((raw[[0, 2, 4]].min() + raw[[1, 3]].max()) / 2))
    if not (raw[[0, 2, 4]].min() > raw[[1, 3]].max()):
        pytest.skip("random features do not separate the images")
    recorder = Recorder(model)
    out = model.predict(images)
    assert out.gate_positive.tolist() == [True, False, True, False, True]
    assert recorder.calls["seg"] == [3] and recorder.calls["det"] == [3]


def test_classifier_gate_uses_max_of_chosen_classes(images):
    model = make_model(source="classifier", classes=("Mass", "Nodule"), gated_heads=("det",))
    recorder = Recorder(model)
    out = model.predict(images)
    assert recorder.calls["gate"] == [], "with source='classifier' the gate module is not run"
    chosen = [CLASSES.index("Mass"), CLASSES.index("Nodule")]
    expected = out.class_probs[:, chosen].max(dim=1).values
    torch.testing.assert_close(out.gate_probs, expected)
    # gate_probability on raw outputs agrees too.
    with torch.no_grad():
        logits = model(images, ["cls"])
    torch.testing.assert_close(model.gate_probability(logits), torch.sigmoid(logits["cls"][:, chosen]).max(dim=1).values)
    assert out.gate_positive.tolist() == (expected >= 0.5).tolist()


def test_classifier_gate_threshold_selects_images(images):
    model = make_model(source="classifier", classes=("Mass", "Nodule"), gated_heads=("seg", "det"))
    with torch.no_grad():
        probs = model.predict(images).gate_probs
    threshold = float(probs.median())
    model.config.gate.threshold = threshold
    recorder = Recorder(model)
    out = model.predict(images)
    expected = (probs >= threshold).tolist()
    assert out.gate_positive.tolist() == expected
    assert recorder.calls["seg"] == [sum(expected)] and recorder.calls["det"] == [sum(expected)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gate": GateConfig(gated_heads=["cls"])}, "gated_heads"),
        ({"gate": GateConfig(source="magic")}, "gate.source"),
        ({"gate": GateConfig(source="classifier")}, "needs gate.classes"),
        ({"gate": GateConfig(source="classifier", classes=["Unknown"])}, "not in class_names"),
        ({"image_size": 100}, "multiple of 32"),
    ],
)
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(encoder="lite-small", **kwargs)


def test_model_config_dict_round_trip():
    config = ModelConfig(encoder="lite-small", image_size=64, gate=GateConfig(source="classifier", classes=["Mass"], gated_heads=["seg", "det"]))
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and isinstance(again.gate, GateConfig)
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_detection_postprocess_boxes_inside_image(images):
    model = make_model()
    with torch.no_grad():
        raw = model(images, ["det"])["det"]
    found = model.det.postprocess(raw, SIZE, score_threshold=0.0, max_detections=7)
    assert len(found) == 5
    for det in found:
        assert 0 < len(det.boxes) <= 7
        assert (det.boxes >= 0).all() and (det.boxes <= SIZE).all()
        assert (det.boxes[:, 2] > det.boxes[:, 0]).all() and (det.boxes[:, 3] > det.boxes[:, 1]).all()
        assert ((det.scores >= 0) & (det.scores <= 1)).all()
        assert det.labels.max() < 2
