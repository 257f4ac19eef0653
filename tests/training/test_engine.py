"""The training engine: device placement, mixed precision, loader processes, accumulation, weight average,
compilation and the data-wait fraction (CPU here; a second device kind when the machine has one)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multichex.data.samplers import AlternatingBatches, LoaderOptions
from multichex.data.transforms import AugmentConfig
from multichex.inference.predictor import Predictor, prepare_image
from multichex.models.checkpoint import read_checkpoint
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet
from multichex.training import engine as engine_module
from multichex.training.config import SourceConfig, TeacherForcingConfig, TrainConfig
from multichex.training.data import build_datasets
from multichex.training.trainer import Trainer

CLASSES = ["Mass", "COVID-19", "No Finding"]


@pytest.fixture(scope="module")
def sample_image() -> Path:
    from multichex.data.io import list_images
    from multichex.data.sources import bundled_sample_root

    return list_images(bundled_sample_root())[0]


def _config(out: Path, covid_root: Path, nih_root: Path, **overrides) -> TrainConfig:
    values = dict(
        model=ModelConfig(encoder="lite-small", image_size=64, class_names=list(CLASSES), box_classes=["Mass"], anchors=[[0.2, 0.2]],
                          cls_hidden=32),
        sources=[SourceConfig("covid-chestxray", str(covid_root), ["cls", "gate", "seg"], limit=16),
                 SourceConfig("nih-cxr14-bbox", str(nih_root), ["cls", "gate", "det"], limit=16)],
        seed=0, out_dir=str(out), split={"train": 1.0}, epochs=1, steps_per_epoch=4, batch_size=4, lr=2e-3, warmup_steps=1,
        augment=AugmentConfig(enabled=False), device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _trainer(config: TrainConfig, device: str | None = None) -> Trainer:
    parts = build_datasets(config)
    return Trainer(config, parts["train"], progress=False, device=device)


def _batches(trainer: Trainer, n: int):
    return [batch for _, _, batch in trainer.batches.epoch(0, n)]


class DeviceRecorder(TorchDispatchMode):
    """The device of every tensor an operator returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor):
                self.devices.setdefault(tensor.device.type, set()).add(str(func))
        return out


def _step_devices(trainer: Trainer, batch) -> dict[str, set[str]]:
    recorder = DeviceRecorder()
    with recorder:
        losses = trainer.train_step(batch)
    assert losses is not None and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    return recorder.devices


def _other_device_kinds() -> list[str]:
    kinds = []
    if torch.cuda.is_available():
        kinds.append("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        kinds.append("mps")
    return kinds or ["none"]


@pytest.mark.parametrize("kind", _other_device_kinds())
def test_every_tensor_a_step_creates_is_on_the_models_device(tmp_path, covid_root, nih_root, kind):
    """A teacher-forced 3-task step on a second device kind: no operator returns a CPU tensor (the batch
    reaches the device once; anchors, coins, masks and the loss follow it)."""
    if kind == "none":
        pytest.skip("this machine has no second device kind (CUDA or MPS); the CPU path is tested below")
    config = _config(tmp_path, covid_root, nih_root, teacher_forcing=TeacherForcingConfig(p=0.5))
    trainer = _trainer(config, device=kind)
    for batch in _batches(trainer, 2):
        devices = _step_devices(trainer, batch)
        assert set(devices) == {kind}, {k: sorted(v)[:5] for k, v in devices.items() if k != kind}
    assert next(trainer.model.parameters()).device.type == kind


def test_the_device_recorder_sees_a_cpu_step(tmp_path, covid_root, nih_root):
    """The same check on the CPU: the recorder sees the step's operators (so it would see a stray device)."""
    trainer = _trainer(_config(tmp_path, covid_root, nih_root))
    devices = _step_devices(trainer, _batches(trainer, 1)[0])
    assert set(devices) == {"cpu"} and len(devices["cpu"]) > 20


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_and_prediction_are_finite_on_the_cpu(tmp_path, covid_root, nih_root, precision, sample_image):
    trainer = _trainer(_config(tmp_path, covid_root, nih_root, precision=precision))
    assert trainer.engine.precision == precision
    assert (trainer.engine.scaler is not None) == (precision == "fp16")  # fp16 gradients need a loss scaler
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trained = 0
    for batch in _batches(trainer, 4):
        losses = trainer.train_step(batch)
        if losses:
            trained += 1
            assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert trained == 4 and trainer.skipped_batches == 0
    changed = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the optimiser never stepped"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32 (autocast computes in 16 bits)
    predictor = Predictor(trainer.model, device="cpu", precision=precision)
    result = predictor.predict_prepared([prepare_image(sample_image, 64)])[0]
    assert all(0.0 <= p <= 1.0 for p in result["classes"].values())
    assert 0.0 <= result["gate"]["probability"] <= 1.0


def test_16_bit_forward_is_close_to_fp32(tmp_path):
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=list(CLASSES), cls_hidden=32)).eval()
    images = torch.rand(2, 1, 64, 64)
    reference = model.predict(images, use_gate=False).class_probs
    for precision in ("bf16", "fp16"):
        with engine_module.autocast(torch.device("cpu"), precision):
            got = model.predict(images, use_gate=False).to_cpu().class_probs
        assert got.dtype == torch.float32 and float((got - reference).abs().max()) < 0.05, precision


def test_loader_processes_give_the_same_batches_as_the_main_process(tmp_path, covid_root, nih_root):
    """Per-process seeding: augmentation draws from (seed, pass, index), so two persistent loader processes
    per source give exactly the batches of the main process, pass after pass."""
    config = _config(tmp_path, covid_root, nih_root, augment=AugmentConfig(enabled=True, rotate_deg=10.0, noise_std=0.05))
    train = build_datasets(config)["train"]
    main = AlternatingBatches(train, 4, seed=3)
    workers = AlternatingBatches(train, 4, seed=3, loading=LoaderOptions(num_workers=4, persistent_workers=True, prefetch_factor=2))
    for epoch in range(2):  # the second epoch reuses the processes of the first
        for (_, a_name, a), (_, b_name, b) in zip(main.epoch(epoch, 10), workers.epoch(epoch, 10)):
            assert a_name == b_name and [m["path"] for m in a.meta] == [m["path"] for m in b.meta]
            assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    loader = workers._loaders["covid-chestxray"].loader
    assert loader.num_workers == 2 and loader.persistent_workers  # 4 processes shared by 2 sources


def test_accumulation_steps_the_optimiser_every_k_batches(tmp_path, covid_root, nih_root):
    trainer = _trainer(_config(tmp_path, covid_root, nih_root, accumulate_steps=3, lr_schedule="constant"))
    for count, batch in enumerate(_batches(trainer, 5), start=1):
        trainer.train_step(batch)
        assert trainer.step.global_step == count // 3 and trainer.step.pending == count % 3
    trainer.step.optimizer_step()  # the epoch's end applies what is left
    assert trainer.step.global_step == 2 and trainer.step.pending == 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_epoch_log_records_the_data_wait_fraction(tmp_path, covid_root, nih_root, caplog, monkeypatch):
    monkeypatch.setattr(engine_module, "STARVED_FRACTION", 0.0)  # any wait counts as starving here
    trainer = _trainer(_config(tmp_path, covid_root, nih_root))
    with caplog.at_level(logging.INFO, logger="multichex.training.engine"):
        trainer.fit()
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert 0.0 < float(rows[0]["data_wait"]) < 1.0
    notes = [r for r in caplog.records if "reading and augmenting" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # on the CPU a note, not a warning


def test_a_starved_accelerator_is_warned_about(caplog):
    wait = engine_module.DataWait()
    list(wait.timed(iter([1, 2])))
    wait.waited = 10.0  # as if the steps had waited 10 s for batches
    with caplog.at_level(logging.WARNING, logger="multichex.training.engine"):
        assert wait.report(3, 0, accelerator=True) > engine_module.STARVED_FRACTION
    assert "epoch 3" in caplog.text and "starves the model" in caplog.text and "num_workers=0" in caplog.text


def test_weight_average_is_validated_saved_and_resumed(tmp_path, covid_root, nih_root):
    config = _config(tmp_path, covid_root, nih_root, epochs=2, ema_decay=0.5)
    parts = build_datasets(config)
    trainer = Trainer(config, parts["train"], progress=False)
    trainer.fit()
    average = {k: v.cpu() for k, v in trainer.average.module.state_dict().items()}
    raw = trainer.model.state_dict()
    assert any(not torch.equal(average[k], raw[k]) for k in raw if raw[k].is_floating_point())
    _, best = read_checkpoint(tmp_path / "best.safetensors")
    assert all(torch.equal(best["model." + k], v) for k, v in average.items())  # best holds the average
    header, last = read_checkpoint(tmp_path / "last.safetensors")
    assert all(torch.equal(last["ema." + k], v) for k, v in average.items()) and int(last["ema.n_averaged"]) == 8
    resumed = Trainer(config, parts["train"], progress=False)
    resumed.resume()
    assert all(torch.equal(v.cpu(), average[k]) for k, v in resumed.average.module.state_dict().items())


def _failing_backend(graph, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, covid_root, nih_root, caplog, monkeypatch):
    monkeypatch.setattr(engine_module, "COMPILE_BACKEND", _failing_backend)
    trainer = _trainer(_config(tmp_path, covid_root, nih_root, compile=True))
    keys = list(trainer.model.state_dict())
    with caplog.at_level(logging.WARNING):
        losses = [trainer.train_step(batch) for batch in _batches(trainer, 2)]
    assert all(loss is not None for loss in losses)
    assert sum("torch.compile cannot compile" in r.getMessage() for r in caplog.records) == 1
    assert trainer.step.compiled == [] and trainer.model.encoder._compiled_call_impl is None
    assert list(trainer.model.state_dict()) == keys  # checkpoints keep their parameter names


def test_compiled_training_keeps_parameter_names(tmp_path, covid_root, nih_root):
    """``compile: true`` with the eager backend (no code generation: quick): steps run, names unchanged."""
    engine_module.COMPILE_BACKEND, saved = "eager", engine_module.COMPILE_BACKEND
    try:
        trainer = _trainer(_config(tmp_path, covid_root, nih_root, compile=True))
        assert trainer.step.compiled
        assert trainer.train_step(_batches(trainer, 1)[0]) is not None
        assert all(not k.startswith("_orig_mod") for k in trainer.model.state_dict())
    finally:
        engine_module.COMPILE_BACKEND = saved


def test_an_epoch_ends_with_its_accumulated_gradients_applied(tmp_path, covid_root, nih_root):
    """5 batches, 3 per step: a step after batch 3 and one after the epoch's last batch, none pending after."""
    trainer = _trainer(_config(tmp_path, covid_root, nih_root, accumulate_steps=3, steps_per_epoch=5, lr_schedule="constant"))
    trainer.fit()
    assert trainer.step.global_step == 2 and trainer.step.pending == 0
