"""Every registered encoder: its record, its features (declared widths and strides) and a MultiCheXNet on it."""

from __future__ import annotations

import pytest
import torch

from multichex.models.config import GateConfig, ModelConfig
from multichex.models.encoders import (
    ENCODERS,
    Encoder,
    EncoderSpec,
    LiteEncoder,
    MonaiDenseNetEncoder,
    MonaiResNetEncoder,
    encoder_spec,
    get_encoder,
    list_encoders,
    register_encoder,
)
from multichex.models.multichexnet import MultiCheXNet

SIZE = 64  # the smallest size whose stride-32 map is 2×2
ALL = list_encoders()
PYRAMID = [name for name in ALL if encoder_spec(name).supports_pyramid]


def test_the_registry_holds_both_families() -> None:
    assert {"lite", "lite-small", "resnet18", "resnet34", "resnet50", "densenet121"} <= set(ALL)
    assert {encoder_spec(name).family for name in ALL} >= {"lite", "monai"}
    assert ALL == sorted(ENCODERS) and all(ENCODERS[name].name == name for name in ALL)
    with pytest.raises(ValueError, match="unknown encoder"):
        encoder_spec("nope")


@pytest.mark.parametrize("name", ALL)
def test_features_have_the_declared_channels_and_strides(name: str) -> None:
    spec = encoder_spec(name)
    torch.manual_seed(0)
    encoder = get_encoder(name).eval()
    assert isinstance(encoder, Encoder)
    assert tuple(encoder.out_channels) == spec.out_channels and tuple(encoder.strides) == spec.strides
    images = torch.rand(2, spec.preprocessing.in_channels, SIZE, SIZE)
    with torch.no_grad():
        features = encoder(images)
    assert len(features) == len(spec.strides)
    for feature, channels, stride in zip(features, spec.out_channels, spec.strides):
        assert tuple(feature.shape) == (2, channels, SIZE // stride, SIZE // stride)


@pytest.mark.parametrize("name", ALL)
def test_a_multichexnet_on_every_encoder_gives_outputs_of_the_right_shapes(name: str) -> None:
    torch.manual_seed(0)
    classes, box_classes = ["Mass", "Nodule", "No Finding"], ["Mass", "Nodule"]
    config = ModelConfig(encoder=name, image_size=SIZE, class_names=classes, box_classes=box_classes, cls_hidden=16, det_stride=16,
                         gate=GateConfig(gated_heads=["seg", "det"]))
    model = MultiCheXNet(config).eval()
    images = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        outputs = model(images)
    assert outputs["cls"].shape == (2, len(classes))
    assert outputs["seg"].shape == (2, 1, SIZE, SIZE)
    assert outputs["gate"].shape == (2,)
    cells = SIZE // config.det_stride
    assert tuple(outputs["det"].shape) == (2, len(config.anchors), cells, cells, 5 + len(box_classes))
    prediction = model.predict(images, use_gate=False)
    assert prediction.class_probs.shape == (2, len(classes))
    assert all(p is not None and p.shape == (1, SIZE, SIZE) for p in prediction.seg_probs)


@pytest.mark.parametrize("name", PYRAMID)
def test_pyramid_input_keeps_the_feature_shapes(name: str) -> None:
    plain, pyramid = get_encoder(name).eval(), get_encoder(name, pyramid=True).eval()
    assert pyramid.pyramid is not None and plain.pyramid is None
    images = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        assert [f.shape for f in pyramid(images)] == [f.shape for f in plain(images)]


@pytest.mark.parametrize("name", sorted(set(ALL) - set(PYRAMID)))
def test_pyramid_input_is_refused_without_hooks(name: str) -> None:
    with pytest.raises(ValueError, match="lite encoder"):
        get_encoder(name, pyramid=True)


def test_state_dict_keys_of_the_families_are_unchanged() -> None:
    """Checkpoints name encoder weights by these attribute paths; a rename would orphan them."""
    lite = get_encoder("lite-small", pyramid=True).state_dict()
    assert {k.split(".")[0] for k in lite} == {"stem", "stages", "pyramid"}
    assert "stages.0.0.body.0.0.weight" in lite and "stages.1.0.shortcut.0.weight" in lite
    assert isinstance(get_encoder("lite"), LiteEncoder)
    resnet = MonaiResNetEncoder(18).state_dict()
    assert {k.split(".")[0] for k in resnet} == {"stem", "layers"} and "layers.3.1.conv2.weight" in resnet
    dense = MonaiDenseNetEncoder().state_dict()
    assert {k.split(".")[0] for k in dense} == {"stem", "blocks", "transitions", "final_norm"}


def test_register_encoder_adds_a_record_and_refuses_a_clash() -> None:
    spec = EncoderSpec(name="test-tiny-lite", builder=lambda in_channels=1: LiteEncoder(in_channels, (8, 8, 8, 8), (1, 1, 1, 1), 8),
                       out_channels=(8, 8, 8, 8), supports_pyramid=True, family="lite")
    try:
        assert register_encoder(spec) is spec and "test-tiny-lite" in list_encoders()
        assert get_encoder("test-tiny-lite", in_channels=3).stem[0][0].in_channels == 3
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(EncoderSpec(name="test-tiny-lite", builder=spec.builder, out_channels=(1, 2, 3, 4)))
    finally:
        ENCODERS.pop("test-tiny-lite", None)
    with pytest.raises(ValueError, match="stage widths"):
        EncoderSpec(name="bad", builder=spec.builder, out_channels=(8, 8), strides=(4, 8, 16))
