"""Few-label options (issue: MultiMix, APPAU-Net, cross-data-set negatives) as switches of the one trainer."""

from __future__ import annotations

import math

import pytest
import torch

from multichex.data.transforms import AugmentConfig
from multichex.evaluation.evaluate import evaluate_datasets
from multichex.losses.adversarial import discriminator_loss, segmentor_adversarial_loss
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.models.saliency import saliency_maps
from multichex.training.checkpoint import load_model
from multichex.training.config import SemiSupervisedConfig, SourceConfig, TrainConfig
from multichex.training.data import build_datasets, split_sources
from multichex.training.loop import Trainer
from multichex.training.semi_supervised import FewLabelObjectives, pseudo_labels

from .test_training import model_config, train_config

ALL_OPTIONS = dict(pyramid_input=True, seg_attention=True, seg_deep_supervision=True, saliency_bridge=True)


def tiny(**options) -> MultiCheXNet:
    torch.manual_seed(0)
    return MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, anchors=[[0.2, 0.2]], cls_hidden=32, **options))


# --------------------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_below_the_threshold_give_no_target_and_known_labels_are_kept():
    probs = torch.tensor([[0.95, 0.5, 0.05], [0.69, 0.31, 0.8]])
    labels = torch.tensor([[math.nan, math.nan, math.nan], [1.0, math.nan, math.nan]])
    out = pseudo_labels(probs, labels, threshold=0.7, softmax=False)
    expected = torch.tensor([[1.0, math.nan, 0.0], [math.nan, math.nan, 1.0]])
    torch.testing.assert_close(out.targets, expected, equal_nan=True)
    assert out.candidates == 5 and out.kept == 3
    soft = pseudo_labels(torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2]]), torch.full((2, 3), math.nan), 0.7, softmax=True)
    assert soft.targets.tolist() == [0, -1]


def test_fixmatch_gives_no_loss_when_no_prediction_reaches_the_threshold():
    model = tiny()
    objectives = FewLabelObjectives(model, SemiSupervisedConfig(threshold=0.99, weight=1.0), None, 1e-3, 0)
    from multichex.data.record import CXRSample, collate_samples

    batch = collate_samples([CXRSample(torch.rand(1, 64, 64), torch.full((10,), math.nan)) for _ in range(3)])
    with torch.no_grad():  # a fresh model is unsure of everything: p ≈ 0.5 < 0.99
        model.cls.dec.bias.zero_()
        model.cls.dec.weight.zero_()
    assert objectives.terms(model, batch.images, batch, {}, {"cls"}) == {}
    assert objectives.counts.values["ssl_pseudo_labels"] == 0 and objectives.counts.values["ssl_candidates"] == 30
    with torch.no_grad():
        model.cls.dec.bias.fill_(8.0)  # now every class is confidently positive
    terms = objectives.terms(model, batch.images, batch, {}, {"cls"})
    assert terms["ssl_cls"] > 0 and terms["ssl_cls"].requires_grad


def unlabelled_batch(n: int, classes: int):
    from multichex.data.record import CXRSample, collate_samples

    return collate_samples([CXRSample(torch.rand(1, 64, 64), torch.full((classes,), math.nan)) for _ in range(n)])


def constant_classifier(model: MultiCheXNet, bias: torch.Tensor) -> MultiCheXNet:
    """The classifier's logits are ``bias`` whatever the image (so the strong view's logits are known)."""
    with torch.no_grad():
        model.cls.dec.weight.zero_()
        model.cls.dec.bias.copy_(bias)
    return model.eval()


def test_softmax_pseudo_labels_fire_with_a_class_subset():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.4, 0.3, 0.3], [0.05, 0.1, 0.85]])
    allowed = torch.tensor([True, True, False]).expand(4, 3)  # the third class gets no pseudo-label
    out = pseudo_labels(probs, torch.full((4, 3), math.nan), 0.7, softmax=True, allowed=allowed)
    assert out.candidates == 4 and out.kept == 2
    assert out.targets.tolist() == [0, 1, -1, -1]  # the last image's top class is not among the subset
    known = torch.tensor([[1.0, 0.0, 0.0]] + [[math.nan] * 3] * 3)  # an image with a known label is no candidate
    assert pseudo_labels(probs, known, 0.7, softmax=True, allowed=allowed).candidates == 3
    names = ["Mass", "COVID-19", "No Finding"]
    model = constant_classifier(tiny(cls_activation="softmax", class_names=names), torch.tensor([4.0, 0.0, 0.0]))
    objectives = FewLabelObjectives(model, SemiSupervisedConfig(weight=1.0, classes=["Mass", "COVID-19"]), None, 1e-3, 0)
    batch = unlabelled_batch(3, 3)
    terms = objectives.terms(model, batch.images, batch, {"cls": model.cls(model.encode(batch.images))}, {"cls"})
    assert objectives.counts.values == {"ssl_candidates": 3, "ssl_pseudo_labels": 3}
    assert terms["ssl_cls"] > 0


@pytest.mark.parametrize("normalise", ["all", "confident"])
def test_fixmatch_averages_over_every_unlabelled_entry(normalise):
    """FixMatch: the confidence mask multiplies the per-entry loss and the mean runs over every unlabelled
    entry (``normalise: all``, the default); ``confident`` divides by the confident entries only."""
    bias = torch.linspace(-2.0, 2.0, 10)
    model = constant_classifier(tiny(), bias)
    config = SemiSupervisedConfig(threshold=0.7, weight=1.0) if normalise == "all" else SemiSupervisedConfig(threshold=0.7, weight=1.0, normalise=normalise)
    objectives = FewLabelObjectives(model, config, None, 1e-3, 0)
    batch = unlabelled_batch(4, 10)
    weak = torch.zeros(4, 10)  # p = 0.5: no pseudo-label
    weak[:, :5] = torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0])  # half the entries confident (positive or negative)
    terms = objectives.terms(model, batch.images, batch, {"cls": weak}, {"cls"})
    assert objectives.counts.values == {"ssl_candidates": 40, "ssl_pseudo_labels": 20}
    targets = (weak[:, :5] > 0).float()
    masked = torch.nn.functional.binary_cross_entropy_with_logits(bias[:5].expand(4, 5), targets, reduction="sum")
    expected = masked / (40 if normalise == "all" else 20)
    assert float(terms["ssl_cls"].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_fixmatch_softmax_averages_over_every_unlabelled_image():
    names = ["Mass", "COVID-19", "No Finding"]
    bias = torch.tensor([0.5, -0.3, 0.1])
    model = constant_classifier(tiny(cls_activation="softmax", class_names=names), bias)
    objectives = FewLabelObjectives(model, SemiSupervisedConfig(threshold=0.7, weight=1.0), None, 1e-3, 0)
    batch = unlabelled_batch(4, 3)
    weak = torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 6.0], [0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # two confident images
    terms = objectives.terms(model, batch.images, batch, {"cls": weak}, {"cls"})
    expected = torch.nn.functional.cross_entropy(bias.expand(2, 3), torch.tensor([0, 2]), reduction="sum") / 4
    assert float(terms["ssl_cls"].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_semi_supervised_normalise_is_validated():
    with pytest.raises(ValueError, match="normalise"):
        SemiSupervisedConfig(normalise="kept")
    with pytest.raises(ValueError, match="normalise"):
        TrainConfig(model=model_config(), semi_supervised={"normalise": "mean"})


# --------------------------------------------------------------------------- model options


def test_saliency_map_has_the_input_size_and_changes_with_the_class():
    model = tiny().eval()
    images = torch.rand(2, 1, 64, 64)
    first = saliency_maps(model, images, torch.tensor([0, 0]))
    second = saliency_maps(model, images, torch.tensor([3, 3]))
    assert first.shape == images.shape and float(first.amax()) == pytest.approx(1.0)
    assert not torch.allclose(first, second)
    with torch.inference_mode():  # works where predict runs
        assert saliency_maps(model, images).shape == images.shape


def test_attention_gates_side_outputs_and_pyramid_have_the_shapes_the_decoder_expects():
    model = tiny(**ALL_OPTIONS).train()
    images = torch.rand(2, 1, 64, 64)
    outputs = model(images, ["cls", "seg"])
    assert outputs["seg"].shape == (2, 1, 64, 64) and outputs["seg_sides"].shape == (2, 2, 64, 64)
    features = model.encode(images)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
    for gate, skip in zip(model.seg.gates, features[2::-1]):
        assert gate(g=torch.zeros(2, gate.W_g[0].conv.in_channels if hasattr(gate.W_g[0], "conv") else gate.W_g[0].in_channels,
                                  *skip.shape[-2:]), x=skip).shape == skip.shape
    model.eval()
    assert "seg_sides" not in model(images, ["seg"])
    with pytest.raises(ValueError, match="saliency bridge"):
        model.seg(features, (64, 64))


def test_pyramid_input_needs_a_lite_encoder():
    with pytest.raises(ValueError, match="lite encoder"):
        MultiCheXNet(ModelConfig(encoder="resnet18", image_size=64, pyramid_input=True))


# --------------------------------------------------------------------------- adversarial losses


def test_discriminator_loss_matches_a_hand_computation():
    real = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])  # n = 2 real classes + "predicted"
    fake = torch.tensor([[0.0, 1.0, 3.0]])
    classes = torch.tensor([0, -1])  # second real pair: class unknown

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    supervised = -math.log(softmax(real[0].tolist())[0])
    unknown = -math.log(1 - softmax(real[1].tolist())[2])
    predicted = -math.log(softmax(fake[0].tolist())[2])
    assert float(discriminator_loss(real, classes, fake)) == pytest.approx(supervised + unknown + predicted, rel=1e-6)
    assert float(segmentor_adversarial_loss(fake)) == pytest.approx(-math.log(1 - softmax(fake[0].tolist())[2]), rel=1e-6)


# --------------------------------------------------------------------------- data options


def test_cross_data_set_negatives_train_only_and_each_head_scores_only_its_own_images(tmp_path, covid_root, nih_root):
    config = train_config(tmp_path, covid_root, nih_root, split={"train": 0.5, "test": 0.5},
                          sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls"], classes=["COVID-19"], negative_for=["Mass"]),
                                   SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls"], classes=["Mass"], negative_for=["COVID-19"])])
    parts = split_sources(config)
    covid_train = parts["train"]["covid-chestxray"]
    assert covid_train and all(r.findings["Mass"] == 0.0 for r in covid_train)
    assert all("Mass" not in r.findings and "No Finding" not in r.findings for r in parts["test"]["covid-chestxray"])
    assert all("COVID-19" not in r.findings for r in parts["test"]["nih-cxr14-bbox"])
    model = MultiCheXNet(config.model)
    metrics = evaluate_datasets(model, build_datasets(config)["test"], bootstrap=0)
    per_class = metrics["classification"]["per_class"]
    assert per_class["Mass"]["n_known"] == len(parts["test"]["nih-cxr14-bbox"])
    assert per_class["COVID-19"]["n_known"] == len(parts["test"]["covid-chestxray"])


def test_none_class_and_label_budgets(tmp_path, covid_root, nih_root):
    config = train_config(tmp_path, covid_root, nih_root, split={"train": 1.0},
                          sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls", "seg"], classes=["COVID-19"],
                                                none_class="No Finding", label_budget={"seg": 5, "cls": 7})])
    refs = split_sources(config)["train"]["covid-chestxray"]
    assert sum(r.mask_path is not None for r in refs) == 5
    labelled = [r for r in refs if r.findings]
    assert len(labelled) == 7 and len(refs) == 48
    assert all(r.findings["No Finding"] == 1 - r.findings["COVID-19"] for r in labelled)
    again = split_sources(config)["train"]["covid-chestxray"]
    assert [r.mask_path for r in again] == [r.mask_path for r in refs]  # the budget is drawn from the seed


# --------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("options", [
    dict(model=dict(ALL_OPTIONS, discriminator_classes=["COVID-19", "No Finding"]),
         train=dict(semi_supervised={"consistency_weight": 0.1, "threshold": 0.6}, adversarial={"weight": 0.05},
                    seg_loss={"name": "kl_tversky", "a": 1.0, "b": 1.0}, seg_side_weights=[0.25, 0.5, 1.0])),
    dict(model=dict(cls_activation="softmax", class_names=["Mass", "COVID-19", "No Finding"]), train=dict(seg_loss={"name": "xe_tversky"})),
])
def test_every_option_trains_with_the_multi_task_heads_and_reloads(tmp_path, covid_root, nih_root, options):
    model = model_config().to_dict() | options["model"]
    sources = [SourceConfig("covid-chestxray", str(covid_root), ["cls", "gate", "seg"], label_budget={"seg": 6, "cls": 6}),
               SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "gate", "det"])]
    config = TrainConfig(model=model, sources=sources, out_dir=str(tmp_path), split={"train": 0.75, "val": 0.25}, epochs=1,
                         steps_per_epoch=4, batch_size=8, schedule="joint", augment=AugmentConfig(enabled=False), **options["train"])
    parts = build_datasets(config)
    history = Trainer(config, parts["train"], parts["val"], progress=False).fit()
    record = history[-1]
    assert math.isfinite(record["train_total"]) and "train_seg" in record
    if config.semi_supervised:
        assert record["ssl_candidates"] > 0 and record["disc_steps"] > 0 and "train_seg_adversarial" in record
    reloaded, _ = load_model(tmp_path / "last.safetensors")
    with torch.inference_mode():
        out = reloaded.eval().predict(torch.rand(2, 1, 64, 64), use_gate=False)
    assert out.seg_probs[0].shape == (1, 64, 64)
    if config.model.cls_activation == "softmax":
        torch.testing.assert_close(out.class_probs.sum(dim=1), torch.ones(2))


def test_options_refuse_wrong_combinations():
    with pytest.raises(ValueError, match="discriminator_classes"):
        TrainConfig(model=model_config(), adversarial={"weight": 0.1})
    with pytest.raises(ValueError, match="threshold"):
        SemiSupervisedConfig(threshold=0.3)
    with pytest.raises(ValueError, match="none_class"):
        SourceConfig("kermany-pediatric", none_class="No Finding")
    with pytest.raises(ValueError, match="label_budget"):
        SourceConfig("kermany-pediatric", label_budget={"boxes": 3})
    with pytest.raises(ValueError, match="ONNX"):
        from multichex.inference.onnx_runtime import export_onnx

        export_onnx(tiny(saliency_bridge=True), "/tmp/never.onnx")


@pytest.mark.parametrize("name", ["multimix", "appau_net", "cross_negatives"])
def test_shipped_few_label_configs_load(name):
    from pathlib import Path

    from multichex.training.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    assert config.sources and config.model.image_size == 128


def test_a_bridge_model_is_explained_by_the_map_that_guides_its_decoder():
    from multichex.inference.explain import GradCamExplainer

    model = tiny(saliency_bridge=True).eval()
    image = torch.rand(1, 64, 64)
    maps = GradCamExplainer(model).maps(image, [0, 2])
    expected = saliency_maps(model, image[None].repeat(2, 1, 1, 1), torch.tensor([0, 2]))
    assert set(maps) == {0, 2}
    torch.testing.assert_close(torch.from_numpy(maps[2]), expected[1, 0])


def test_semi_supervised_adversarial_run_resumes_to_the_uninterrupted_weights(tmp_path, covid_root, nih_root):
    from .test_training import _fresh_trainer

    model = model_config().to_dict() | dict(discriminator_classes=["COVID-19", "No Finding"], seg_deep_supervision=True)
    common = dict(model=model, seed=5, split={"train": 0.75, "val": 0.25}, steps_per_epoch=3, batch_size=6, schedule="joint",
                  augment=AugmentConfig(enabled=True), semi_supervised={"threshold": 0.55, "consistency_weight": 0.1},
                  adversarial={"weight": 0.1},
                  sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls", "seg"], limit=24, label_budget={"seg": 6, "cls": 6})])
    straight = _fresh_trainer(train_config(tmp_path / "straight", covid_root, nih_root, epochs=2, **common))
    straight.fit()
    first = _fresh_trainer(train_config(tmp_path / "resumed", covid_root, nih_root, epochs=1, **common))
    first.fit()
    second = _fresh_trainer(train_config(tmp_path / "resumed", covid_root, nih_root, epochs=2, **common))
    second.resume()
    second.fit()
    assert straight.history[-1]["disc_steps"] > 0 and straight.history[-1]["ssl_candidates"] > 0
    expected, got = straight.model.state_dict(), second.model.state_dict()
    for key in expected:
        assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-5, rtol=0), key
