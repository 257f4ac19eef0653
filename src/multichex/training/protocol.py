"""Staged training protocols (MultiCheXNet Algorithm 1 / Figure 4) as data: a YAML list of phases.

A protocol file is a run config (every key of :class:`TrainConfig`, the defaults of every phase) plus
``phases:``. Each phase names the sources it reads, where its weights start (``init``: ``previous``,
``random`` or a checkpoint path), optionally ``new_classes`` (transfer: a fresh θ_dec), the sources its
held-out metrics are computed on (``evaluate``), and any :class:`TrainConfig` keys it changes
(``trainable``, ``schedule``, ``epochs``, ``lr``, ``optimizer``, ``teacher_forcing``, ...).

All sources are split once, jointly by patient, so no phase ever trains on another phase's test patients.
Each phase writes ``phases/NN-name/`` (checkpoints, log, metrics); ``protocol_state.json`` records the
finished phases, and ``--resume`` skips them and continues the unfinished one from its ``last`` checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from multichex.data.sources import CXRDataset
from multichex.fileio import atomic_write_text
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import load_model
from multichex.training.config import TrainConfig, read_yaml
from multichex.training.data import make_datasets, split_sources
from multichex.training.run import train_and_evaluate
from multichex.training.trainer import seed_everything
from multichex.training.transfer import transfer_model

log = logging.getLogger(__name__)

PROTOCOL_LEVEL = {"sources", "model", "seed", "out_dir", "split"}  # keys a phase may not change


@dataclass
class PhaseConfig:
    """One stage of a protocol."""

    name: str
    sources: list[str]
    init: str = "previous"
    new_classes: list[str] | None = None
    evaluate: list[str] | None = None  # source keys for the held-out metrics (default: the phase's sources)
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys this phase changes

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PhaseConfig":
        data = dict(data)
        own = {f.name for f in fields(cls)} - {"settings"}
        phase = {k: data.pop(k) for k in list(data) if k in own}
        if "name" not in phase or "sources" not in phase:
            raise ValueError(f"a phase needs `name` and `sources`, got {sorted(phase)}")
        known = {f.name for f in fields(TrainConfig)} - PROTOCOL_LEVEL
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"phase {phase['name']!r}: unknown keys {sorted(unknown)} (a phase may set {sorted(known)})")
        return cls(**phase, settings=data)


@dataclass
class Protocol:
    """Shared run settings (``base``, with every source) and the ordered phases."""

    base: TrainConfig
    phases: list[PhaseConfig]

    def __post_init__(self) -> None:
        keys = {s.key for s in self.base.sources}
        names = [p.name for p in self.phases]
        if not self.phases:
            raise ValueError("a protocol needs at least one phase")
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        for phase in self.phases:
            missing = set(phase.sources + (phase.evaluate or [])) - keys
            if missing:
                raise ValueError(f"phase {phase.name!r} names unknown sources {sorted(missing)}; sources are {sorted(keys)}")
        for index in range(len(self.phases)):
            self.phase_config(index)  # validate every phase's settings up front, not after an hour of training

    def phase_config(self, index: int) -> TrainConfig:
        phase = self.phases[index]
        data = self.base.to_dict()
        data.update(phase.settings)
        data["sources"] = [s for s in data["sources"] if (s["id"] or s["name"]) in phase.sources]
        data["out_dir"] = str(self.phase_dir(index))
        data["split_file"] = str((Path(self.base.out_dir) / "split.json").resolve())  # the protocol's joint split, for `evaluate --part`
        if phase.new_classes:
            data["model"]["class_names"] = list(phase.new_classes)
            data["model"]["class_thresholds"] = None
        return TrainConfig.from_dict(data)

    def phase_dir(self, index: int) -> Path:
        return Path(self.base.out_dir) / "phases" / f"{index + 1:02d}-{self.phases[index].name}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.base.to_dict(), "phases": [{"name": p.name, "sources": p.sources, "init": p.init, "new_classes": p.new_classes,
                                                   "evaluate": p.evaluate, **p.settings} for p in self.phases]}


def is_protocol(path: str | Path) -> bool:
    """A YAML run config with a ``phases`` list (a file :func:`read_yaml` refuses raises its ValueError)."""
    return "phases" in read_yaml(path)


def load_protocol(path: str | Path, overrides: dict[str, Any] | None = None) -> Protocol:
    """Read a YAML protocol; ``overrides`` replace top-level (protocol-level) keys."""
    path = Path(path)
    data = read_yaml(path)
    phases = data.pop("phases", None)
    if not isinstance(phases, list):
        raise ValueError(f"{path}: `phases` must be a list of phases")
    data.update(overrides or {})
    try:
        return Protocol(TrainConfig.from_dict(data), [PhaseConfig.from_dict(p) for p in phases])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def smoke_overrides(protocol: Protocol, image_size: int = 64, steps: int = 2, limit: int = 12) -> Protocol:
    """The same protocol at toy size (one epoch of ``steps`` batches per phase, tiny images): a CI check that
    every phase runs, not a result."""
    base = protocol.base.to_dict()
    base["model"]["image_size"] = image_size
    base.update(batch_size=4, max_minutes=None, warmup_steps=1)
    for source in base["sources"]:
        source["limit"] = limit if source.get("limit") is None else min(limit, source["limit"])
    phases = []
    for phase in protocol.phases:
        settings = {**phase.settings, "epochs": 1, "steps_per_epoch": steps, "batch_size": 4}
        phases.append(PhaseConfig(phase.name, phase.sources, phase.init, phase.new_classes, phase.evaluate, settings))
    return Protocol(TrainConfig.from_dict(base), phases)


class ProtocolRunner:
    """Runs the phases in order; each starts from the previous phase's best weights (or as ``init`` says)."""

    def __init__(self, protocol: Protocol, progress: bool = True, bootstrap: int = 1000) -> None:
        self.protocol = protocol
        self.out_dir = Path(protocol.base.out_dir)
        self.progress = progress
        self.bootstrap = bootstrap
        self._split: dict[str, dict[str, list]] | None = None
        self._datasets: dict[tuple, CXRDataset] = {}

    @property
    def state_path(self) -> Path:
        return self.out_dir / "protocol_state.json"

    def read_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"completed": [], "metrics": {}, "seconds": {}}

    def datasets(self, config: TrainConfig, keys: list[str]) -> dict[str, dict[str, CXRDataset]]:
        """Part → source key → data set for ``keys``, from the protocol's one joint split of every source,
        prepared caches included (built once, reused across phases with the same label set so images are
        decoded once)."""
        if self._split is None:
            self._split = split_sources(self.protocol.base, self.out_dir)
        parts: dict[str, dict[str, CXRDataset]] = {}
        for source in self.protocol.base.sources:
            if source.key not in keys:
                continue
            for part, refs in self._split.items():
                memo = (tuple(config.model.class_names), config.model.image_size, source.key, part)
                if memo not in self._datasets and refs.get(source.key):
                    self._datasets[memo] = make_datasets(config, {source.key: refs[source.key]}, train=part == "train")[source.key]
                if memo in self._datasets:
                    parts.setdefault(part, {})[source.key] = self._datasets[memo]
        return parts

    def initial_model(self, index: int) -> MultiCheXNet:
        phase, config = self.protocol.phases[index], self.protocol.phase_config(index)
        seed_everything(config.seed + index, config.deterministic)
        if phase.init == "random" or (phase.init == "previous" and index == 0):
            model = MultiCheXNet(self.protocol.base.model)
        elif phase.init == "previous":
            model, _ = load_model(self.protocol.phase_dir(index - 1) / "best.safetensors")
        else:
            model, _ = load_model(phase.init)
        if phase.new_classes:
            transfer_model(model, phase.new_classes)
        return model

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Run (or, with ``resume``, finish) the protocol; returns per-phase held-out metrics.

        ``stop_after`` ends the run after that many phases (used to test resuming between phases).
        Under torchrun every rank trains each phase; rank 0 alone writes (split, state, metrics) and
        evaluates, and the other ranks return empty metrics.
        """
        from multichex.training import distributed

        distributed.init_from_env()
        main = distributed.is_main()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and self.state_path.exists():
            raise FileExistsError(f"{self.out_dir} already holds a protocol run; pass --resume to continue it or choose another --out")
        state = self.read_state()
        if not main and self._split is None:
            self._split = split_sources(self.protocol.base)  # the same split, computed here; rank 0 writes split.json
        if main:
            atomic_write_text(self.out_dir / "protocol.json", json.dumps(self.protocol.to_dict(), indent=2))
        for index, phase in enumerate(self.protocol.phases):
            if stop_after is not None and index >= stop_after:
                break
            if phase.name in state["completed"]:
                log.info("phase %d (%s) already finished; skipped", index + 1, phase.name)
                continue
            started = time.monotonic()
            config = self.protocol.phase_config(index)
            log.info("phase %d/%d: %s — trains %s on %s", index + 1, len(self.protocol.phases), phase.name, config.trainable, phase.sources)
            parts = self.datasets(config, sorted(set(phase.sources) | set(phase.evaluate or [])))
            _, metrics = self.run_phase(index, config, parts, resume)
            state["completed"].append(phase.name)
            state["metrics"][phase.name] = metrics
            state["seconds"][phase.name] = round(time.monotonic() - started, 1) + state["seconds"].get(phase.name, 0.0)
            if main:
                atomic_write_text(self.state_path, json.dumps(state, indent=2))
        if len(state["completed"]) == len(self.protocol.phases) and main:
            shutil.copyfile(self.protocol.phase_dir(len(self.protocol.phases) - 1) / "best.safetensors", self.out_dir / "final.safetensors")
            atomic_write_text(self.out_dir / "metrics.json", json.dumps(state["metrics"], indent=2))
        return state["metrics"]

    def run_phase(self, index: int, config: TrainConfig, parts: dict[str, dict[str, CXRDataset]], resume: bool) -> tuple[Path, dict[str, Any]]:
        """Train phase ``index`` on its sources' train and validation parts (from its ``init`` weights, or
        from its ``last`` checkpoint with ``resume``), then score its best weights on the test patients of its
        ``evaluate`` sources (``phases/NN-name/metrics.json``; ``{}`` when it has none, and on ranks other
        than 0 under torchrun)."""
        phase = self.protocol.phases[index]
        train = {k: d for k, d in parts.get("train", {}).items() if k in phase.sources}
        val = {k: d for k, d in parts.get("val", {}).items() if k in phase.sources}
        chosen = sorted(k for k in parts.get("test", {}) if k in (phase.evaluate or phase.sources))

        def described(_trainer: Any, model: MultiCheXNet | None) -> dict[str, Any]:
            return {"sources": chosen, "gate_threshold": model.config.gate.threshold} if model is not None else {}

        return train_and_evaluate(
            config, {"train": train, "val": val, "test": parts.get("test", {})}, model=self.initial_model(index),
            evaluate_on=chosen, bootstrap=self.bootstrap, per_source=len(chosen) > 1,
            resume=resume and (self.protocol.phase_dir(index) / "last.safetensors").exists(),
            progress=self.progress, summary=described,
        )
