"""Staged protocols: phases freeze what they say, run in order, resume between phases; the shipped file runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from multichex.training.checkpoint import load_model, read_checkpoint
from multichex.training.protocol import PhaseConfig, Protocol, ProtocolRunner, is_protocol, load_protocol, smoke_overrides

REPO = Path(__file__).resolve().parents[2]
MODEL = {
    "encoder": "lite-small", "image_size": 64, "class_names": ["Mass", "COVID-19", "No Finding"],
    "box_classes": ["Mass"], "anchors": [[0.2, 0.2]], "cls_hidden": 32,
}


def protocol_dict(out_dir: Path, covid_root: Path, nih_root: Path, phases: list[dict]) -> dict:
    return {
        "seed": 0, "out_dir": str(out_dir), "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "batch_size": 6, "epochs": 1, "steps_per_epoch": 3, "lr": 0.003, "warmup_steps": 1,
        "augment": {"enabled": False}, "model": MODEL,
        "sources": [
            {"id": "seg", "name": "covid-chestxray", "root": str(covid_root), "tasks": ["gate", "seg"]},
            {"id": "det", "name": "nih-cxr14-bbox", "root": str(nih_root), "tasks": ["cls", "gate", "det"]},
            {"id": "covid", "name": "covid-chestxray", "root": str(covid_root), "tasks": ["cls"]},
        ],
        "phases": phases,
    }


STAGED = [
    {"name": "classifier", "sources": ["det"], "init": "random", "trainable": ["encoder", "cls", "gate"], "schedule": "single",
     "select_gate_threshold": "youden", "select_class_thresholds": "f1"},
    {"name": "det-head", "sources": ["det"], "trainable": ["encoder", "det"], "teacher_forcing": {"p": 0.5}},
    {"name": "mtl", "sources": ["det", "seg"], "trainable": ["encoder", "cls", "seg", "det"], "schedule": "alternating"},
    {"name": "transfer", "sources": ["covid"], "new_classes": ["COVID-19"], "trainable": ["cls.dec"]},
]


def write_protocol(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_checkpoint(path)
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and k in after and before[k].shape == after[k].shape and before[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, covid_root, nih_root):
    out = tmp_path_factory.mktemp("protocol")
    protocol = load_protocol(write_protocol(out / "p.yaml", protocol_dict(out / "run", covid_root, nih_root, STAGED)))
    metrics = ProtocolRunner(protocol, progress=False, bootstrap=50).run()
    return protocol, metrics


def test_phases_freeze_exactly_what_they_say(staged_run):
    protocol, _ = staged_run
    phase = [weights(protocol.phase_dir(i) / "best.safetensors") for i in range(4)]
    # det-head trains encoder + det only.
    assert changed(phase[0], phase[1], "encoder.") and changed(phase[0], phase[1], "det.")
    for frozen in ("cls.", "seg.", "gate."):
        assert not changed(phase[0], phase[1], frozen), frozen
    # mtl leaves the gate alone.
    assert not changed(phase[1], phase[2], "gate.")
    assert changed(phase[1], phase[2], "seg.") and changed(phase[1], phase[2], "cls.feats")
    # transfer: θ_enc and θ_feats bit-identical, θ_dec replaced by a 1-class layer.
    for frozen in ("encoder.", "cls.feats", "seg.", "det.", "gate."):
        assert not changed(phase[2], phase[3], frozen), frozen
    assert phase[2]["cls.dec.weight"].shape[0] == 3 and phase[3]["cls.dec.weight"].shape[0] == 1


def test_protocol_writes_state_metrics_and_final_checkpoint(staged_run):
    protocol, metrics = staged_run
    out = Path(protocol.base.out_dir)
    state = json.loads((out / "protocol_state.json").read_text())
    assert state["completed"] == [p.name for p in protocol.phases]
    assert set(metrics) == set(state["completed"])
    assert "detection" in metrics["det-head"] and "segmentation" in metrics["mtl"]
    model, _ = load_model(out / "final.safetensors")
    assert model.config.class_names == ["COVID-19"]
    split = json.loads((out / "split.json").read_text())["parts"]
    assert not set(split["train"]) & set(split["test"])
    # The gate threshold chosen on validation travels in the classifier phase's checkpoint.
    header, _ = read_checkpoint(protocol.phase_dir(0) / "best.safetensors")
    assert header["gate_threshold"]["criterion"] == "youden"
    assert header["model"]["gate"]["threshold"] == pytest.approx(header["gate_threshold"]["threshold"])
    thresholds = header["model"]["class_thresholds"]
    assert len(thresholds) == 3 and list(header["class_thresholds"]["values"].values()) == thresholds
    # Transfer to a new label set drops the old classes' thresholds.
    assert model.config.class_thresholds is None


def test_protocol_resumes_after_a_stop_between_phases(tmp_path, covid_root, nih_root, staged_run):
    protocol = load_protocol(write_protocol(tmp_path / "p.yaml", protocol_dict(tmp_path / "run", covid_root, nih_root, STAGED)))
    ProtocolRunner(protocol, progress=False, bootstrap=50).run(stop_after=2)
    state = json.loads((tmp_path / "run" / "protocol_state.json").read_text())
    assert state["completed"] == ["classifier", "det-head"]
    first_phase = (protocol.phase_dir(0) / "best.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--resume"):
        ProtocolRunner(protocol, progress=False).run()
    ProtocolRunner(protocol, progress=False, bootstrap=50).run(resume=True)
    assert (protocol.phase_dir(0) / "best.safetensors").stat().st_mtime_ns == first_phase  # not re-run
    reference = weights(Path(staged_run[0].base.out_dir) / "final.safetensors")
    resumed = weights(tmp_path / "run" / "final.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], msg=key)


def test_bigbang_single_phase_from_random_init(tmp_path, covid_root, nih_root):
    phases = [{"name": "bigbang", "sources": ["det", "seg"], "init": "random", "trainable": ["encoder", "cls", "seg", "det"]}]
    protocol = load_protocol(write_protocol(tmp_path / "p.yaml", protocol_dict(tmp_path / "run", covid_root, nih_root, phases)))
    metrics = ProtocolRunner(protocol, progress=False, bootstrap=0).run()
    assert {"classification", "segmentation", "detection"} <= set(metrics["bigbang"])


@pytest.mark.parametrize(
    "phase, message",
    [
        ({"name": "a", "sources": ["nope"]}, "unknown sources"),
        ({"name": "a", "sources": ["det"], "seed": 3}, "unknown keys"),
        ({"name": "a", "sources": ["det"], "trainable": ["decoder"]}, "trainable"),
        ({"name": "a", "sources": ["det"], "teacher_forcing": {"p": 2}}, "teacher_forcing.p"),
        ({"sources": ["det"]}, "needs `name`"),
    ],
)
def test_invalid_protocols_fail_before_training(tmp_path, covid_root, nih_root, phase, message):
    path = write_protocol(tmp_path / "p.yaml", protocol_dict(tmp_path / "run", covid_root, nih_root, [phase]))
    with pytest.raises(ValueError, match=message):
        load_protocol(path)


def test_unknown_trainable_submodule_is_named(tmp_path, covid_root, nih_root):
    phases = [{"name": "a", "sources": ["det"], "trainable": ["cls.nothing"]}]
    protocol = load_protocol(write_protocol(tmp_path / "p.yaml", protocol_dict(tmp_path / "run", covid_root, nih_root, phases)))
    with pytest.raises(ValueError, match="cls.nothing"):
        ProtocolRunner(protocol, progress=False).run()


def test_shipped_multichexnet_protocol_runs_at_smoke_size(tmp_path, cxr_factory):
    """configs/multichexnet.yaml with every source root pointed at generated folders in the same layouts."""
    path = REPO / "configs" / "multichexnet.yaml"
    assert is_protocol(path)
    data = yaml.safe_load(path.read_text())
    covid = cxr_factory.covid(tmp_path / "covid", n_patients=8, per_patient=2, seed=3)
    nih = cxr_factory.nih(tmp_path / "nih", n_patients=10, per_patient=2, seed=3)
    hannover = cxr_factory.hannover(tmp_path / "hannover", ["h1", "h2", "h3", "h4"], per_patient=2)
    roots = {"covid-chestxray": covid, "nih-cxr14-bbox": nih, "nih-cxr14-sample": nih, "hannover-covid19": hannover}
    for source in data["sources"]:
        source["root"] = str(roots[source["name"]])
    data["out_dir"] = str(tmp_path / "run")
    protocol = smoke_overrides(load_protocol(write_protocol(tmp_path / "p.yaml", data)), steps=1)
    metrics = ProtocolRunner(protocol, progress=False, bootstrap=0).run()
    assert list(metrics) == [p["name"] for p in data["phases"]]
    model, _ = load_model(tmp_path / "run" / "final.safetensors")
    assert model.config.class_names == ["COVID-19"]


def test_phase_config_merges_settings_over_base(tmp_path, covid_root, nih_root):
    protocol = load_protocol(write_protocol(tmp_path / "p.yaml", protocol_dict(tmp_path / "run", covid_root, nih_root, STAGED)))
    config = protocol.phase_config(1)
    assert config.trainable == ["encoder", "det"] and config.teacher_forcing.p == 0.5
    assert [s.key for s in config.sources] == ["det"] and config.lr == 0.003
    assert protocol.phase_config(3).model.class_names == ["COVID-19"]
    assert isinstance(protocol.phases[0], PhaseConfig) and isinstance(protocol, Protocol)


def test_joint_phase_trains_detection_on_boxes_fitted_to_masks(tmp_path, covid_root, nih_root):
    """Joint training (eq. 8): one data set with masks, boxes fitted to the mask's components."""
    data = protocol_dict(tmp_path / "run", covid_root, nih_root, [
        {"name": "joint", "sources": ["joint"], "init": "random", "trainable": ["encoder", "cls", "seg", "det"], "schedule": "joint"},
    ])
    data["sources"].append({"id": "joint", "name": "covid-chestxray", "root": str(covid_root), "tasks": ["cls", "seg", "det"],
                            "boxes_from_masks": "Mass"})
    runner = ProtocolRunner(load_protocol(write_protocol(tmp_path / "p.yaml", data)), progress=False, bootstrap=0)
    config = runner.protocol.phase_config(0)
    train = runner.datasets(config, ["joint"])["train"]["joint"]
    sample = train[0]
    assert sample.boxes is not None and len(sample.boxes) == 2  # one box per lung
    assert torch.all(sample.box_labels == 0)
    runner.run()
    log = (runner.protocol.phase_dir(0) / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    assert {"train_det", "train_seg", "train_cls"} <= set(header)


def test_phase_checkpoints_remember_the_protocol_split(staged_run, nih_root, tmp_path):
    """`evaluate --part test` on a phase checkpoint must use the protocol's joint split, not draw a new one."""
    from multichex.training.config import TrainConfig
    from multichex.training.data import split_sources

    protocol, _ = staged_run
    header, _ = read_checkpoint(protocol.phase_dir(1) / "best.safetensors")
    config = TrainConfig.from_dict({**header["train_config"], "out_dir": str(tmp_path),
                                    "sources": [{"name": "nih-cxr14-bbox", "root": str(nih_root.resolve())}]})
    test = {str(Path(r.image_path).resolve()) for r in split_sources(config)["test"]["nih-cxr14-bbox"]}
    saved = json.loads((Path(protocol.base.out_dir) / "split.json").read_text())["parts"]["test"]
    assert test and test == {str(Path(p).resolve()) for p in saved if Path(p).resolve().is_relative_to(nih_root.resolve())}


def test_saved_split_refuses_images_it_does_not_list(tmp_path, covid_root, nih_root, staged_run):
    from multichex.training.config import SourceConfig, TrainConfig
    from multichex.training.data import split_sources

    protocol, _ = staged_run
    shutil.copytree(nih_root, tmp_path / "elsewhere")  # the same images at another path
    config = TrainConfig(sources=[SourceConfig("nih-cxr14-bbox", str(tmp_path / "elsewhere"))], split_file=str(Path(protocol.base.out_dir) / "split.json"))
    with pytest.raises(ValueError, match="not in this split"):
        split_sources(config)
