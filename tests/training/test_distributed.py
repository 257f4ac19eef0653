"""Data-parallel training under torchrun: rank-sharded order, equality with one process, rank-0 writes, resume.

The torchrun runs use 2 CPU ranks (gloo). Two ranks with batch size B and one process with 2B see the
same images at every step (each rank a half of the single process's batch), so with gradient averaging
and SyncBatchNorm they compute the same update up to float rounding. Exactness needs a loss that is a
mean over equally sized per-image terms (segmentation only: every covid image has a mask, and BCE + soft
Dice are per-image means) and no dropout (trainable: encoder and seg; the classifier, whose dropout
draws masks from each rank's RNG, does not run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from multichex.data.samplers import AlternatingBatches, JointBatches, RankShardSampler, make_loader
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import read_checkpoint
from multichex.training.config import TrainConfig
from multichex.training.data import make_datasets, split_sources
from multichex.training.loop import Trainer, seed_everything

RUN_TIMEOUT = 180  # seconds per torchrun launch; a hung rank fails the test instead of blocking CI
MODEL = {
    "encoder": "lite-small", "image_size": 64, "class_names": ["Mass", "COVID-19", "No Finding"],
    "box_classes": ["Mass"], "anchors": [[0.2, 0.2]], "cls_hidden": 32,
}
# Float rounding only: the ranks sum their halves of each BatchNorm statistic and average their
# gradients, one process sums the whole batch, so sums are taken in another order (~1e-7 relative per
# step). After these 6 SGD steps the largest weight difference measured was 8e-7 (weights are O(0.1-1));
# 1e-5 leaves a 10x margin and is still 100x below the training's own change of the weights (asserted).
ATOL = 1e-5


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def set_epoch(self, epoch: int) -> None:
        pass


def _flat(batches) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.fixture
def plain_collate(monkeypatch):
    monkeypatch.setattr("multichex.data.samplers.collate_samples", list)


def test_one_rank_reads_exactly_the_single_process_order(plain_collate):
    """World 1 is DataLoader(shuffle=True, generator=...) index for index; the order is not a bare
    randperm of the seeded generator (the DataLoader draws its base seed from it first), which is why
    DistributedSampler, seeding its own generator, could not reproduce it."""
    for n, batch_size, seed, epoch in [(1, 1, 0, 0), (7, 3, 0, 0), (48, 8, 3, 1), (37, 5, 1, 2001)]:
        reference = DataLoader(_Indices(n), batch_size=batch_size, shuffle=True, collate_fn=list,
                               generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert list(make_loader(_Indices(n), batch_size, True, seed, epoch)) == list(reference)
        if n > 2:
            bare = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
            assert bare != _flat(reference)


def test_rank_shards_make_up_the_single_process_batches(plain_collate):
    """Batch j of rank 0 and rank 1 (size B) together are batch j of one process with 2B."""
    for n in (48, 37):
        for epoch in (0, 5):
            single = list(make_loader(_Indices(n), 8, True, 0, epoch))
            ranks = [list(make_loader(_Indices(n), 4, True, 0, epoch, rank=r, world=2)) for r in range(2)]
            assert len(ranks[0]) == len(ranks[1]) == len(single)  # equal batch counts: ranks never wait on each other
            assert [len(b) for b in ranks[0]] == [len(b) for b in ranks[1]]  # the odd image out is wrapped round, not dropped
            if n % 2 == 0:
                assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in single]
            else:
                assert set(_flat(ranks[0]) + _flat(ranks[1])) == set(range(n))
    sampler = RankShardSampler(5, None, rank=1, world=2)
    assert list(sampler) == [1, 3, 0] and len(sampler) == 3  # wrapped: index 0 pads rank 1


def test_schedules_keep_the_same_source_on_every_rank_and_size_epochs_by_the_global_batch(plain_collate):
    sources = {"big": _Indices(20), "small": _Indices(6)}
    ranks = [AlternatingBatches(sources, 2, seed=0, rank=r, world=2) for r in range(2)]
    single = AlternatingBatches(sources, 4, seed=0)
    assert ranks[0].default_steps() == ranks[1].default_steps() == single.default_steps() == 2 * 5
    steps = [list(r.epoch(0, 10)) for r in ranks]
    assert [name for _, name, _ in steps[0]] == [name for _, name, _ in steps[1]]
    for (_, _, a), (_, _, b), (_, _, whole) in zip(*steps, single.epoch(0, 10)):
        assert sorted(a + b) == sorted(whole)
    joint = [JointBatches(sources, 2, seed=0, rank=r, world=2) for r in range(2)]
    assert joint[0].default_steps() == JointBatches(sources, 4, seed=0).default_steps() == 7


# --- torchrun --------------------------------------------------------------------------------------

AUDIT_SCRIPT = '''
"""`multichex` CLI that records, per rank, every file it writes under AUDIT_WATCH (via audit hooks)."""
import atexit, json, os, sys

WATCH = os.path.realpath(os.environ["AUDIT_WATCH"])
seen = []


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if writing else []
    elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
        paths = list(args[:2])
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(WATCH):
            seen.append([event, os.fsdecode(path)])


sys.addaudithook(hook)
atexit.register(lambda: open(os.path.join(os.environ["AUDIT_DIR"], "writes-%s.json" % os.environ.get("RANK", "0")), "w").write(json.dumps(seen)))
from multichex.cli import app

app(prog_name="multichex")
'''


def _config(covid_root: Path, epochs: int, batch_size: int, device: str = "cpu") -> dict:
    return {
        "device": device,  # cpu: gloo ranks; cuda: one GPU per rank (LOCAL_RANK), NCCL for the CUDA tensors
        "model": MODEL,
        "sources": [{"name": "covid-chestxray", "root": str(covid_root), "tasks": ["seg"]}],
        "seed": 0,
        "split": {"train": 0.75, "val": 0.25},  # a val part: rank 0 alone validates and picks `best`
        "epochs": epochs,
        "steps_per_epoch": 3,
        "batch_size": batch_size,
        # SGD and a constant rate: a 1-epoch run resumed to 2 epochs follows the 2-epoch run's schedule,
        # and SGD's update is linear in the gradient (Adam's first step is ~lr·sign(g), which turns
        # rounding-level differences of near-zero gradients into lr-sized ones).
        "optimizer": "sgd",
        "lr": 0.05,
        "lr_schedule": "constant",
        "trainable": ["encoder", "seg"],
        "augment": {"enabled": False},
        "threads": 1,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="400")
    return env


def _torchrun(entry: list[str], config: Path, out: Path, resume: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *entry,
           "train", str(config), "--out", str(out), "--no-progress"] + (["--resume"] if resume else [])
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env or _env())
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{cmd} timed out after {RUN_TIMEOUT} s:\n{(error.stderr or b'')[-4000:]}")
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _weights(path: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_checkpoint(path)
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def _log(out: Path) -> list[dict[str, str]]:
    import csv

    with (out / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per rank)"))])
def test_torchrun_two_ranks_match_one_process_write_on_rank_zero_and_resume(tmp_path, covid_root, device):
    """2 ranks × batch 4 = 1 process × batch 8 (weights and BatchNorm statistics within ATOL); only rank 0
    writes files; a 1-epoch run resumed to 2 epochs ends bit-identical to a straight 2-epoch run (on CUDA:
    within float rounding, since GPU reductions need not sum in one order)."""
    atol = ATOL if device == "cpu" else 10 * ATOL
    two_epochs = _write(tmp_path / "two.yaml", _config(covid_root, epochs=2, batch_size=4, device=device))
    one_epoch = _write(tmp_path / "one.yaml", _config(covid_root, epochs=1, batch_size=4, device=device))

    # Straight 2-epoch run through an audited `multichex` CLI (torchrun runs the script on every rank).
    script = tmp_path / "audited_multichex.py"
    script.write_text(AUDIT_SCRIPT)
    straight, audit = tmp_path / "straight", tmp_path / "audit"
    audit.mkdir()
    env = {**_env(), "AUDIT_WATCH": str(straight), "AUDIT_DIR": str(audit)}
    _torchrun([str(script)], two_epochs, straight, env=env)
    writes = {rank: json.loads((audit / f"writes-{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == [], f"rank 1 wrote files: {writes[1][:10]}"
    written = {Path(path).name for _, path in writes[0]}
    assert {"last.safetensors", "best.safetensors", "log.csv", "config.json", "split.json", "metrics.json"} <= written, written
    assert not list(straight.glob(".*.tmp"))
    rows = _log(straight)
    assert [row["epoch"] for row in rows] == ["1", "2"] and all(row["val_dice"] for row in rows)
    assert json.loads((straight / "metrics.json").read_text())["epochs_trained"] == 2

    # One process with the global batch (2 × 4), same data, same schedule.
    config = TrainConfig.from_dict({**_config(covid_root, epochs=2, batch_size=8, device=device), "out_dir": str(tmp_path / "single")})
    parts = split_sources(config)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(config, make_datasets(config, parts["train"], True), make_datasets(config, parts["val"], False), progress=False)
        history = trainer.fit()
    finally:
        torch.set_num_threads(threads)  # Trainer sets it process-wide
    single = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    distributed = _weights(straight / "last.safetensors")
    assert distributed.keys() == single.keys()  # plain names: no "module." prefix, BatchNorm buffers as before
    for key, value in single.items():
        if value.is_floating_point():
            assert torch.allclose(distributed[key], value, rtol=0, atol=atol), (key, (distributed[key] - value).abs().max())
        else:
            assert torch.equal(distributed[key], value), key  # num_batches_tracked
    seed_everything(0)
    initial = MultiCheXNet(ModelConfig.from_dict(MODEL)).state_dict()
    assert max(float((single[k] - initial[k]).abs().max()) for k in single if k.startswith("encoder.")) > 1000 * atol  # it trained
    # Logged training losses are averaged over the ranks, so they are those of the single process.
    for row, record in zip(rows, history):
        assert abs(float(row["train_seg"]) - record["train_seg"]) < 1e-4, (row, record)

    # 1 epoch via `torchrun -m multichex.cli`, then --resume to 2 epochs via the `multichex` console script.
    resumed = tmp_path / "resumed"
    _torchrun(["-m", "multichex.cli"], one_epoch, resumed)
    console_script = Path(sys.executable).with_name("multichex")
    entry = [str(console_script)] if console_script.is_file() else ["-m", "multichex.cli"]
    result = _torchrun(entry, two_epochs, resumed, resume=True)
    assert "resumed" in result.stderr and "at epoch 1" in result.stderr, result.stderr[-3000:]
    final = _weights(resumed / "last.safetensors")
    for key, value in distributed.items():
        assert torch.equal(final[key], value) if device == "cpu" else torch.allclose(final[key], value, rtol=0, atol=atol), key
    assert [row["train_seg"] for row in _log(resumed)] == [row["train_seg"] for row in rows]
