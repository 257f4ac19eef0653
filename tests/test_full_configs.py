"""The full-size training recipes in configs/full/ load with the project's own loaders and read the data sets'
native layouts from the user's own folders."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from multichex.data.native import NATIVE_SOURCES, native_reader
from multichex.data.registry import all_readers
from multichex.models.encoders import list_encoders
from multichex.training.config import TrainConfig, read_yaml
from multichex.training.protocol import is_protocol, load_protocol

FULL = Path(__file__).resolve().parents[1] / "configs" / "full"
RECIPES = sorted(FULL.glob("*.yaml"))
PATH_OPTIONS = ("masks_root", "masks_dir")  # reader options that name a folder


def load_recipe(path: Path, tmp_path: Path) -> tuple[TrainConfig, list[TrainConfig]]:
    """The recipe's base config and every phase's config (a plain run config: itself, once)."""
    if is_protocol(path):
        protocol = load_protocol(path)
        return protocol.base, [protocol.phase_config(i) for i in range(len(protocol.phases))]
    from multichex.training.config import load_config

    config = load_config(path)
    return config, [config]


def test_the_full_recipes_exist() -> None:
    names = {path.name for path in RECIPES}
    assert {"multichexnet-densenet121-256.yaml", "multichexnet-densenet121-512.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_reads_native_layouts(path: Path, tmp_path: Path) -> None:
    raw = read_yaml(path)
    base, phases = load_recipe(path, tmp_path)
    size = int(re.search(r"-(\d+)$", path.stem).group(1))
    assert size in (256, 512)
    assert base.model.image_size == size
    assert base.model.encoder in list_encoders()
    assert base.model.encoder in path.stem
    assert "threads" not in raw and all("threads" not in phase for phase in raw.get("phases", []))  # the engine decides
    assert raw["num_workers"] == "auto" and raw["device"] == "auto" and raw["precision"] == "auto"
    assert base.device == "auto" and base.precision == "auto" and base.num_workers == "auto"
    assert all(phase.batch_size * phase.accumulate_steps >= 32 for phase in phases)
    assert base.sources
    readers = all_readers()
    for source in base.sources:
        assert source.name in readers, source.name
        assert source.name in NATIVE_SOURCES, f"{source.name}: full recipes read the published layouts"
        inspect.signature(native_reader(source.name)).bind(Path("root"), **source.options)  # options the reader takes
        folders = [f for f in (source.root, source.prepared) if f is not None]
        folders += [str(source.options[k]) for k in PATH_OPTIONS if k in source.options]
        assert (source.root is None) != (source.prepared is None), source.key
        for folder in folders:
            assert not Path(folder).is_absolute(), f"{source.key}: {folder} should be a relative placeholder"
            assert "shared/data" not in Path(folder).as_posix(), f"{source.key}: full recipes read the user's own data"
        if source.prepared is not None:
            assert not source.options, f"{source.key}: a prepared cache is read with the reader defaults"
            assert source.prepared.endswith(f"-{size}"), f"{source.key}: cache {source.prepared} is not at {size} px"
            assert f"--out {source.prepared} --size {size}" in path.read_text(encoding="utf-8")
    assert f"multichex train configs/full/{path.name}" in path.read_text(encoding="utf-8")
    for config in phases:
        assert config.warmup_steps >= 1 and config.lr > 0 and config.epochs >= 1
        assert config.ema_decay is None or 0.99 <= config.ema_decay < 1


@pytest.mark.parametrize("size", [256, 512])
def test_multichexnet_recipe_is_the_staged_protocol(size: int, tmp_path: Path) -> None:
    path = FULL / f"multichexnet-densenet121-{size}.yaml"
    assert is_protocol(path)
    base, phases = load_recipe(path, tmp_path)
    names = [p["name"] for p in read_yaml(path)["phases"]]
    assert names == ["cls-pretrain", "det-classifier", "det-head", "seg-classifier", "seg-head", "mtl", "transfer-covid"]
    keys = {s.key: s.name for s in base.sources}
    assert keys == {"nih": "nih-chestxray14", "rsna": "rsna-pneumonia", "siim": "siim-acr-pneumothorax", "covid": "cohen-covid"}
    by_name = dict(zip(names, phases))
    assert by_name["cls-pretrain"].trainable == ["encoder", "cls"]
    assert [s.key for s in by_name["cls-pretrain"].sources] == ["nih"]
    assert set(by_name["det-head"].trainable) == {"encoder", "det"} and by_name["det-head"].teacher_forcing.p == 0.9
    assert set(by_name["seg-head"].trainable) == {"encoder", "seg"} and by_name["seg-head"].teacher_forcing.heads == ["seg"]
    assert "gate" in by_name["det-classifier"].trainable and "gate" in by_name["seg-classifier"].trainable
    mtl = by_name["mtl"]
    assert mtl.schedule == "alternating" and "gate" not in mtl.trainable
    assert {s.key for s in mtl.sources} == {"nih", "rsna", "siim"}
    transfer = by_name["transfer-covid"]
    assert transfer.model.class_names == ["COVID-19"] and transfer.trainable == ["cls.dec"]
    assert set(base.model.gate.gated_heads) == {"seg", "det"}
    tasks = {s.key: set(s.tasks) for s in base.sources}
    assert "det" in tasks["rsna"] and "seg" in tasks["siim"] and "cls" in tasks["nih"]
    assert base.model.encoder == "densenet121"


def test_the_two_sizes_see_the_same_images(tmp_path: Path) -> None:
    """512 px: a quarter of the batch and four times the steps, so each phase is the same pass over its data."""
    small = load_recipe(FULL / "multichexnet-densenet121-256.yaml", tmp_path / "a")
    large = load_recipe(FULL / "multichexnet-densenet121-512.yaml", tmp_path / "b")
    for a, b in zip(small[1], large[1]):
        assert a.epochs == b.epochs
        assert [s.key for s in a.sources] == [s.key for s in b.sources]
        if a.steps_per_epoch is None:
            assert b.steps_per_epoch is None
        else:
            assert a.steps_per_epoch * a.batch_size == b.steps_per_epoch * b.batch_size
