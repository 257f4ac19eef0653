"""Cumulative metrics: batch-wise accumulation equals the one-shot functions, reset clears, and the
distributed path gathers every rank's per-image buffers (a fake gather here, two gloo processes below)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from multichex.data.registry import read_source
from multichex.data.sources import CXRDataset
from multichex.evaluation.bootstrap import bootstrap_ci, bootstrap_statistic
from multichex.evaluation.evaluate import (
    Collected,
    PassMetrics,
    _detection_summary,
    collect,
    feed,
    macro_classification_intervals,
    summarize,
)
from multichex.evaluation.metrics import (
    ClassificationMetric,
    DetectionMetric,
    SegmentationMetric,
    classification_metrics,
    detection_map,
    segmentation_scores,
)
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

CLASSES = ["a", "b", "c"]
BOXES = ["Mass", "Nodule"]


def _classification_data(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    labels = torch.tensor(rng.integers(0, 2, size=(n, len(CLASSES))), dtype=torch.float32)
    labels[rng.random(labels.shape) < 0.15] = float("nan")
    probs = torch.tensor(rng.uniform(size=(n, len(CLASSES))), dtype=torch.float32)
    probs = (0.6 * probs + 0.4 * labels.nan_to_num(0.5)).clamp(0, 1)
    return probs, labels, [f"p{i // 3}" for i in range(n)]


def _masks(n: int = 12, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, 1, size, size)
    pred = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        target[i, 0, r : r + 6, c : c + 6] = 1
        if i % 5 != 4:  # every fifth prediction is empty: an undefined average Hausdorff distance
            pred[i, 0, r + 1 : r + 7, c : c + 5] = 1
    return pred, target, [f"p{i // 2}" for i in range(n)]


def _detections(n: int = 10, seed: int = 0) -> tuple[list, list, list[str], list[bool]]:
    gen = torch.Generator().manual_seed(seed)
    found, truth = [], []
    for i in range(n):
        k = i % 3
        gt = torch.rand(k, 2, generator=gen) * 40
        gt_boxes = torch.cat([gt, gt + 10 + torch.rand(k, 2, generator=gen) * 10], dim=1)
        boxes = torch.cat([gt_boxes + torch.randn(k, 4, generator=gen), torch.tensor([[50.0, 50.0, 60.0, 60.0]])])
        found.append({"boxes": boxes, "scores": torch.rand(k + 1, generator=gen), "labels": torch.randint(0, 2, (k + 1,), generator=gen)})
        truth.append((gt_boxes, torch.randint(0, 2, (k,), generator=gen)))
    return found, truth, [f"p{i // 2}" for i in range(n)], [i % 4 != 1 for i in range(n)]


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def test_classification_batch_by_batch_equals_one_shot() -> None:
    probs, labels, patients = _classification_data()
    metric = ClassificationMetric(CLASSES, threshold=[0.4, 0.5, 0.6], extended=True)
    for part in _batches(len(probs), 7):
        metric(probs[part], labels[part], patients[part])
    assert len(metric) == len(probs) and metric.patients == patients
    expected = classification_metrics(probs, labels, CLASSES, [0.4, 0.5, 0.6], extended=True)
    assert metric.aggregate() == expected
    intervals = metric.bootstrap(n_resamples=40, seed=3)
    by_evaluate = macro_classification_intervals(probs, labels, CLASSES, [0.4, 0.5, 0.6], patients, n_resamples=40, seed=3)
    for key, interval in by_evaluate.items():
        assert (intervals[key]["value"], intervals[key]["low"], intervals[key]["high"]) == (interval["value"], interval["low"], interval["high"])


def test_a_single_class_metric_also_bootstraps_its_auroc() -> None:
    probs, labels, patients = _classification_data()
    metric = ClassificationMetric(["a"])
    metric(probs[:, 0], labels[:, 0], patients)  # 1-D: one class
    one_shot = classification_metrics(probs[:, :1], labels[:, :1], ["a"])
    assert metric.aggregate() == one_shot
    compute = lambda idx: classification_metrics(probs[idx, :1], labels[idx, :1], ["a"])["per_class"]["a"]["auroc"]  # noqa: E731
    assert metric.bootstrap(n_resamples=30)["auroc"] == bootstrap_statistic(patients, compute, n_resamples=30)


def test_segmentation_batch_by_batch_equals_one_shot() -> None:
    pred, target, patients = _masks()
    metric = SegmentationMetric()
    for part in _batches(len(pred), 5):
        metric(pred[part], target[part], patients[part])
    scores = segmentation_scores(pred, target)
    buffers = metric.buffers()
    for key, values in scores.items():
        np.testing.assert_array_equal(buffers[key], values.tolist())  # NaN where exactly one mask is empty
    summary = metric.aggregate()
    for key, values in scores.items():
        finite = values[torch.isfinite(values)]
        assert summary[key] == pytest.approx(float(finite.double().mean()), rel=1e-12)
    assert summary["n_images"] == len(pred) and summary["n_patients"] == len(set(patients))
    intervals = metric.bootstrap(n_resamples=50, seed=1)
    assert intervals["dice"] == bootstrap_ci(scores["dice"].numpy().astype(float), patients, n_resamples=50, seed=1)

    quick = SegmentationMetric(surface=False)
    quick(pred, target)
    assert set(quick.aggregate()) == {"dice", "jaccard", "n_images", "n_patients"}
    assert quick.buffers()["dice"] == buffers["dice"]


def test_detection_batch_by_batch_equals_one_shot_and_the_evaluation_summary() -> None:
    found, truth, patients, passed = _detections()
    metric = DetectionMetric(BOXES)
    for part in _batches(len(found), 3):
        metric(found[part], truth[part], patients[part], gate_passed=passed[part])
    expected = detection_map([f["boxes"] for f in found], [f["scores"] for f in found], [f["labels"] for f in found],
                             [t[0] for t in truth], [t[1] for t in truth], BOXES)
    assert metric.aggregate() == expected
    summary = _detection_summary(metric.buffers(), BOXES, bootstrap=30, seed=0)
    intervals = metric.bootstrap(n_resamples=30, seed=0)
    for key in ("map", "map_gated"):
        assert (intervals[key]["value"], intervals[key]["low"], intervals[key]["high"]) == (
            summary[key]["value"], summary[key]["low"], summary[key]["high"])


def test_reset_clears_every_buffer() -> None:
    probs, labels, patients = _classification_data(6)
    pred, target, _ = _masks(4)
    found, truth, _, _ = _detections(4)
    metrics = [ClassificationMetric(CLASSES), SegmentationMetric(), DetectionMetric(BOXES)]
    metrics[0](probs, labels, patients)
    metrics[1](pred, target)
    metrics[2](found, truth)
    for metric in metrics:
        assert len(metric) > 0
        metric.reset()
        assert len(metric) == 0 and all(values == [] for values in metric.buffers().values())
    assert metrics[0].aggregate()["macro"]["auroc"] is None
    assert metrics[1].aggregate() == {"dice": None, "jaccard": None, "avg_hausdorff": None, "hd95": None, "ssim": None, "n_images": 0, "n_patients": 0}
    metrics[0](probs[:2], labels[:2])  # usable again after a reset; default ids: one group per image
    assert metrics[0].patients == ["image-0-0", "image-0-1"]


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ClassificationMetric(CLASSES)(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="patient ids"):
        ClassificationMetric(CLASSES)(torch.zeros(2, 3), torch.zeros(2, 3), ["p0"])


def test_distributed_aggregate_gathers_the_ranks_buffers_in_rank_order() -> None:
    """Two ranks simulated in one process: a fake gather hands each the other's buffers."""
    probs, labels, patients = _classification_data()
    pred, target, seg_patients = _masks()
    ranks = [(ClassificationMetric(CLASSES, extended=True), SegmentationMetric()) for _ in range(2)]
    halves = [slice(0, 13), slice(13, None)], [slice(0, 5), slice(5, None)]
    for rank, (cls, seg) in enumerate(ranks):
        cls(probs[halves[0][rank]], labels[halves[0][rank]], patients[halves[0][rank]])
        seg(pred[halves[1][rank]], target[halves[1][rank]], seg_patients[halves[1][rank]])

    def gather_for(index: int):
        def gather(local):
            assert local is ranks[0][index]._buffers  # each rank hands in its own buffers
            return [ranks[0][index]._buffers, ranks[1][index]._buffers]
        return gather

    cls0, seg0 = ranks[0]
    assert cls0.aggregate(distributed=True, gather=gather_for(0)) == classification_metrics(probs, labels, CLASSES, extended=True)
    assert cls0.sync(gather_for(0))["patients"] == patients
    assert cls0.aggregate() == classification_metrics(probs[:13], labels[:13], CLASSES, extended=True)  # local buffers untouched
    one_shot = SegmentationMetric()
    one_shot(pred, target, seg_patients)
    assert seg0.aggregate(distributed=True, gather=gather_for(1)) == one_shot.aggregate()
    assert seg0.bootstrap(n_resamples=20, distributed=True, gather=gather_for(1)) == one_shot.bootstrap(n_resamples=20)


def test_pass_metrics_feed_the_collection_evaluate_summarises(covid_test_root: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                         anchors=[[0.2, 0.2]], cls_hidden=16)
    model = MultiCheXNet(config).eval()
    dataset = CXRDataset(read_source("covid-chestxray", str(covid_test_root)), config.class_names, config.box_classes, 64)
    out = collect(model, {"covid": dataset}, batch_size=5, surface_metrics=False)
    assert len(out.patients) == len(dataset) == len(out.gate_probs) == len(out.dice)
    metrics = PassMetrics.for_model(config, surface_metrics=False)
    with torch.inference_mode():
        feed(model, dataset, metrics, batch_size=3)  # other batches, same per-image buffers
    again = metrics.collected()
    assert again.patients == out.patients and again.dice_patients == out.dice_patients
    torch.testing.assert_close(torch.cat(again.probs), torch.cat(out.probs), rtol=0, atol=1e-6)
    summary = summarize(out, config.class_names, config.box_classes, bootstrap=0)
    assert metrics.classification.aggregate()["macro"] == pytest.approx(summary["classification"]["macro"], abs=1e-6)
    seg = metrics.segmentation.aggregate()
    assert seg["dice"] == pytest.approx(summary["segmentation"]["dice"]["value"], abs=1e-6) and seg["n_images"] == len(out.dice)
    metrics.reset()
    assert metrics.collected().patients == [] and Collected.merge([metrics.collected()]).probs == []


WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    rank, world, rendezvous, data_root, out_dir = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    from multichex.data.registry import read_source
    from multichex.data.sources import CXRDataset
    from multichex.evaluation.evaluate import collect
    from multichex.evaluation.metrics import ClassificationMetric
    from multichex.models.config import ModelConfig
    from multichex.models.multichexnet import MultiCheXNet

    probs = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 24
    labels = (torch.arange(24).reshape(8, 3) % 2).float()
    metric = ClassificationMetric(["a", "b", "c"])
    share = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares
    metric(probs[share], labels[share], [f"p{i}" for i in range(8)][share])
    result = {"aggregate": metric.aggregate(distributed=True), "patients": metric.sync()["patients"], "local": len(metric)}
    torch.manual_seed(0)
    config = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                         anchors=[[0.2, 0.2]], cls_hidden=16)
    dataset = CXRDataset(read_source("covid-chestxray", data_root), config.class_names, config.box_classes, 64)
    out = collect(MultiCheXNet(config), {"covid": dataset}, batch_size=4, surface_metrics=False, distributed=True)
    result["collected"] = {"patients": out.patients, "gate_probs": out.gate_probs, "dice": out.dice, "probs": torch.cat(out.probs).tolist()}
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()
''')


@pytest.mark.slow  # two fresh interpreters importing torch and MONAI: ~10 s of CPU; still in the default run
def test_two_gloo_ranks_gather_their_buffers(tmp_path: Path, covid_test_root: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous"), str(covid_test_root), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a gloo rank hung")
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    probs = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 24
    labels = (torch.arange(24).reshape(8, 3) % 2).float()
    expected = json.loads(json.dumps(classification_metrics(probs, labels, ["a", "b", "c"])))
    for rank, result in enumerate(results):
        assert result["aggregate"] == expected and result["patients"] == [f"p{i}" for i in range(8)]
        assert result["local"] == (3 if rank == 0 else 5)

    torch.manual_seed(0)
    config = ModelConfig(encoder="lite-small", image_size=64, class_names=["Mass", "COVID-19", "No Finding"], box_classes=["Mass"],
                         anchors=[[0.2, 0.2]], cls_hidden=16)
    dataset = CXRDataset(read_source("covid-chestxray", str(covid_test_root)), config.class_names, config.box_classes, 64)
    single = collect(MultiCheXNet(config), {"covid": dataset}, batch_size=4, surface_metrics=False)
    for result in results:
        gathered = result["collected"]
        assert gathered["patients"] == single.patients  # every image once, in the single-process order
        np.testing.assert_allclose(gathered["probs"], torch.cat(single.probs).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(gathered["gate_probs"], single.gate_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(gathered["dice"], single.dice, rtol=0, atol=1e-6)
