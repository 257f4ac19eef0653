"""Transfer to new classes: θ_enc/θ_feats kept bit-identical when frozen, fresh θ_dec, nested few-shot draws."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multichex.data.sources import SampleRef
from multichex.models.config import GateConfig, ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import load_model, save_checkpoint
from multichex.training.config import SourceConfig, TrainConfig
from multichex.training.transfer import few_shot_refs, parse_shots, run_transfer, transfer_model

CLASSES = ["Mass", "COVID-19", "No Finding"]


def model_config(**gate) -> ModelConfig:
    return ModelConfig(encoder="lite-small", image_size=64, class_names=list(CLASSES), box_classes=["Mass"], anchors=[[0.2, 0.2]],
                       cls_hidden=32, gate=GateConfig(**gate) if gate else GateConfig())


def test_transfer_model_replaces_only_the_decoder():
    torch.manual_seed(0)
    model = MultiCheXNet(model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transfer_model(model, ["COVID-19"])
    after = model.state_dict()
    assert after["cls.dec.weight"].shape == (1, 32) and before["cls.dec.weight"].shape == (3, 32)
    for key, value in before.items():
        if not key.startswith("cls.dec"):
            assert torch.equal(after[key], value), key
    assert model.config.class_names == ["COVID-19"]
    assert model(torch.rand(2, 1, 64, 64), ["cls"])["cls"].shape == (2, 1)


def test_transfer_refuses_a_gate_that_reads_lost_classes():
    model = MultiCheXNet(model_config(source="classifier", classes=["Mass"]))
    with pytest.raises(ValueError, match="gate reads classifier classes"):
        transfer_model(model, ["COVID-19"])


def refs(n_pos: int, n_neg: int, n_unknown: int = 3) -> list[SampleRef]:
    values = [1.0] * n_pos + [0.0] * n_neg + [math.nan] * n_unknown
    return [SampleRef(image_path=f"{i}.png", dataset="d", patient_id=f"p{i}", findings={"COVID-19": v}) for i, v in enumerate(values)]


def test_few_shot_draws_k_per_class_nested_and_never_unlabelled():
    pool = refs(30, 12)
    five, ten, everything = (few_shot_refs(pool, ["COVID-19"], k, seed=4) for k in (5, 10, None))
    count = lambda chosen, v: sum(r.findings["COVID-19"] == v for r in chosen)  # noqa: E731
    assert (count(five, 1.0), count(five, 0.0)) == (5, 5)
    assert (count(ten, 1.0), count(ten, 0.0)) == (10, 10)
    assert {r.image_path for r in five} <= {r.image_path for r in ten}
    assert len(everything) == 42
    assert few_shot_refs(pool, ["COVID-19"], 20, seed=4).__len__() == 20 + 12  # capped by the 12 negatives


@pytest.mark.parametrize("text, expected", [("5,10,all", [5, 10, None]), ("all", [None]), (" 3 ", [3])])
def test_parse_shots(text, expected):
    assert parse_shots(text) == expected


@pytest.mark.parametrize("text", ["0", "five", "-2"])
def test_parse_shots_rejects_bad_values(text):
    with pytest.raises(ValueError, match="shots"):
        parse_shots(text)


def test_frozen_transfer_run_keeps_encoder_and_feats_bit_identical(tmp_path, covid_root):
    source = tmp_path / "source.safetensors"
    torch.manual_seed(0)
    save_checkpoint(source, MultiCheXNet(model_config()))
    original, _ = load_model(source)
    config = TrainConfig(model=model_config().__class__(**{**model_config().to_dict(), "class_names": ["COVID-19"], "gate": {}}),
                         sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls"])], out_dir=str(tmp_path / "run"),
                         split={"train": 0.6, "val": 0.2, "test": 0.2}, epochs=1, steps_per_epoch=3, batch_size=6,
                         augment={"enabled": False})
    results = run_transfer(config, source, [2, None], bootstrap=20)
    assert [r["shots"] for r in results] == [2, "all"] and results[0]["n_train"] <= 4
    transferred, _ = load_model(tmp_path / "run" / "shots-all" / "best.safetensors")
    old, new = original.state_dict(), transferred.state_dict()
    for key in old:
        if key.startswith(("encoder.", "cls.feats")):
            assert torch.equal(old[key], new[key]), key
    assert new["cls.dec.weight"].shape[0] == 1
    saved = json.loads((tmp_path / "run" / "transfer.json").read_text())
    assert saved["classes"] == ["COVID-19"] and len(saved["results"]) == 2
    assert "| 2 |" in (tmp_path / "run" / "transfer.md").read_text()
