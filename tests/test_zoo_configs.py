"""The recipes of the shipped models (configs/zoo/) load, train only on permissively licensed folders, and
chain: each later step starts from weights an earlier step writes, on the first step's saved split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multichex.training.config import load_config
from multichex.training.protocol import is_protocol, load_protocol

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "configs" / "zoo"
RECIPES = sorted(ZOO.glob("*.yaml")) + sorted((REPO / "experiments" / "zoo" / "lungs").glob("*.yaml"))
# The folders of the project's data whose licences allow redistributing weights trained on them (each folder's
# SOURCE.md); covid-chestxray-nc (CC BY-NC) is for experiments only.
PERMISSIVE = {"covid-chestxray", "hannover-covid19", "nih-cxr14-bbox", "nih-cxr14-sample", "kermany-pediatric"}
# Folders an experiment derives from permissive folders only (pseudo lung masks of experiments/zoo/lungs/pseudo_lungs.py).
DERIVED = {"runs/zoo/pseudo-lungs"}


def configs_of(path: Path):
    """Every run config of a recipe (a protocol's phases, or the plain run config)."""
    if is_protocol(path):
        protocol = load_protocol(path)
        return protocol, [protocol.phase_config(i) for i in range(len(protocol.phases))]
    config = load_config(path)
    return None, [config]


@pytest.fixture(scope="module")
def pseudo():
    """The pseudo-mask experiment script, imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pseudo_lungs", REPO / "experiments" / "zoo" / "lungs" / "pseudo_lungs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_zoo_recipe_trains_only_on_permissive_folders(path: Path) -> None:
    protocol, configs = configs_of(path)
    size = 320 if "-320" in path.name else 256
    for config in configs:
        assert config.sources
        for source in config.sources:
            assert source.root is not None and source.prepared is None, source.key
            permissive = Path(source.root).parent.as_posix() == "../shared/data" and Path(source.root).name in PERMISSIVE
            assert permissive or source.root in DERIVED, source.key
        assert config.augment.enabled and config.augment.hflip_p == 0.0  # laterality: no mirror images
        assert config.model.image_size == size and config.seed == 0


@pytest.mark.parametrize("size", [256, 320])
def test_polish_step_starts_from_step_one_on_the_shipped_split(size: int) -> None:
    step1 = load_config(ZOO / f"multichex-lite-{size}.yaml")
    protocol, phases = configs_of(ZOO / f"multichex-lite-{size}-polish.yaml")
    assert protocol is not None
    split = "experiments/zoo/multichex-lite-256/split.json"
    assert (REPO / split).is_file()
    if size == 320:  # the candidate is judged on the shipped model's own split
        assert step1.split_file == split and protocol.base.split_file == split
    polish, thresholds = protocol.phases
    assert polish.init == f"{step1.out_dir}/last.safetensors"
    assert phases[0].trainable == ["seg"] and {s.name for s in phases[0].sources} == {"covid-chestxray"}
    assert phases[1].epochs == 0
    assert {s.key for s in phases[1].sources} == {s.key for s in step1.sources}  # thresholds on every source


def test_joint_lungs_experiment_chains_from_step_one() -> None:
    step1 = load_config(ZOO / "multichex-lite-256.yaml")
    protocol, phases = configs_of(REPO / "experiments" / "zoo" / "lungs" / "joint-lungs.yaml")
    assert protocol is not None
    assert protocol.base.split_file == "experiments/zoo/multichex-lite-256/split.json"
    joint, polish, thresholds = protocol.phases
    assert joint.init == f"{step1.out_dir}/last.safetensors"
    assert polish.init == f"{protocol.base.out_dir}/phases/01-{joint.name}/last.safetensors"
    assert thresholds.init == "previous" and phases[2].epochs == 0
    mask_batches = [s for s in phases[0].sources if "seg" in s.tasks]
    assert len(mask_batches) == 3 and len(phases[0].sources) == 8  # the masks get 3 of every 8 batches
    assert {s.name for s in mask_batches} == {"covid-chestxray"}
    assert phases[1].trainable == ["seg"]
    assert {s.key for s in phases[2].sources} == {s.key for s in step1.sources}  # thresholds on every source, once


def test_pseudo_masks_come_from_permissive_training_images_only(pseudo) -> None:
    assert set(pseudo.FOLDERS) <= PERMISSIVE
    train = ["../shared/data/hannover-covid19/images/a.png", "../shared/data/kermany-pediatric/images/b.png",
             "../shared/data/nih-cxr14-bbox/images/c.png", "../shared/data/nih-cxr14-bbox/images/c.png",
             "../shared/data/covid-chestxray/images/masked.png", "../shared/data/covid-chestxray/images/unmasked.png"]
    chosen = pseudo.candidates(train, have_mask={"masked.png"})
    assert [(folder, path.name) for folder, path in chosen] == [
        ("covid-chestxray", "unmasked.png"), ("hannover-covid19", "a.png"), ("nih-cxr14-bbox", "c.png")]
    protocol, phases = configs_of(REPO / "experiments" / "zoo" / "lungs" / "pseudo-polish.yaml")
    assert protocol is not None and protocol.base.split_file == "runs/zoo/pseudo-lungs/split.json"
    assert all(p.trainable == ["seg"] for p in phases) and all(p.init.endswith("multichex-lite-256.safetensors") for p in protocol.phases)


def test_pseudo_mask_is_kept_only_for_a_lung_pair(pseudo) -> None:
    prob = np.zeros((100, 100), dtype=np.float32)
    prob[20:80, 10:45] = 0.95
    prob[20:80, 55:90] = 0.95
    prob[50, 20] = 0.0  # a hole, filled by the clean-up
    prob[5, 5] = 0.99  # a speck, dropped by the clean-up
    mask, unsure = pseudo.judge(prob)
    assert unsure == 0.0 and mask[50, 20] and not mask[5, 5] and mask.sum() == 2 * 60 * 35
    one_lung = prob.copy()
    one_lung[:, 50:] = 0.0
    assert pseudo.judge(one_lung)[1] is None  # one part only: no lung pair
    unsure_prob = np.where(prob > 0.5, 0.6, 0.0).astype(np.float32)
    assert pseudo.judge(unsure_prob)[1] == 1.0  # every mask pixel between 0.1 and 0.9
