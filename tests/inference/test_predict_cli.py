"""End to end through the command line: demo → predict (PNG, JPEG, DICOM, corrupt), train and evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from multichex.cli import app
from multichex.training.checkpoint import load_model, save_checkpoint

WIDTH, HEIGHT = 80, 60  # non-square inputs: masks must come back at this size
REQUIRED_KEYS = {"image", "classes", "findings", "gate", "boxes", "mask"}
OPTIONAL_KEYS = {"overlay", "disclaimer"}
BOX_KEYS = {"x1", "y1", "x2", "y2", "score", "label"}


def invoke(args: list[str], expected_code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == expected_code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def chest_array(seed: int) -> np.ndarray:
    """An ``HEIGHT×WIDTH`` float image with two bright ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    image = 0.15 + rng.normal(0, 0.03, (HEIGHT, WIDTH))
    for cx in (0.3 * WIDTH, 0.7 * WIDTH):
        image[((yy - HEIGHT / 2) / (HEIGHT * 0.3)) ** 2 + ((xx - cx) / (WIDTH * 0.14)) ** 2 <= 1] = 0.8
    return np.clip(image, 0, 1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    invoke(["demo", "--image-size", 64, "--epochs", 1, "--steps-per-epoch", 3, "--minutes", 1, "--out", out, "--no-progress"])
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, dicom_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    png = folder / "chest_png.png"
    Image.fromarray((chest_array(0) * 255).astype(np.uint8), mode="L").save(png)
    jpeg = folder / "chest_jpeg.jpg"
    rgb = np.repeat((chest_array(1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb, mode="RGB").save(jpeg, quality=90)
    dicom = dicom_factory.make_dicom(folder / "chest_dicom.dcm", (chest_array(2) * 4000).astype(np.uint16))
    corrupt = folder / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00not really a png" * 4)
    return {"png": png, "jpeg": jpeg, "dicom": Path(dicom), "corrupt": corrupt}


def test_demo_writes_outputs(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert "dice" in metrics["segmentation"] and 0.0 <= metrics["segmentation"]["dice"]["value"] <= 1.0
    assert metrics["epochs_trained"] == 1
    assert set(metrics["split"]) == {"train", "val", "test"}
    report = (demo_run / "report.md").read_text()
    assert report.strip() and "Dice" in report
    overlays = sorted((demo_run / "overlays").glob("*_overlay.png"))
    assert overlays
    for overlay in overlays:
        with Image.open(overlay) as image:
            assert image.format == "PNG" and image.width > 0
    assert (demo_run / "best.safetensors").is_file() and (demo_run / "best.json").is_file()
    model, header = load_model(demo_run / "best.safetensors")
    assert model.config.image_size == 64
    split = json.loads((demo_run / "split.json").read_text())["parts"]
    assert not set(split["train"]) & set(split["test"])


def check_record(record: dict, source: Path, out: Path, class_names: list[str], box_classes: list[str]) -> None:
    assert REQUIRED_KEYS <= set(record) <= REQUIRED_KEYS | OPTIONAL_KEYS, set(record)
    assert record["image"] == str(source)
    assert set(record["classes"]) == set(class_names)
    assert all(0.0 <= p <= 1.0 for p in record["classes"].values())
    assert set(record["findings"]) <= set(class_names)
    assert set(record["gate"]) == {"probability", "positive"}
    assert 0.0 <= record["gate"]["probability"] <= 1.0 and isinstance(record["gate"]["positive"], bool)
    assert isinstance(record["boxes"], list)
    for box in record["boxes"]:
        assert set(box) == BOX_KEYS
        assert 0 <= box["x1"] <= box["x2"] <= WIDTH and 0 <= box["y1"] <= box["y2"] <= HEIGHT
        assert 0.0 <= box["score"] <= 1.0 and box["label"] in box_classes
    assert record["mask"] is None or isinstance(record["mask"], str)
    if record["mask"] is not None:
        with Image.open(out / record["mask"]) as mask:
            assert mask.size == (WIDTH, HEIGHT), "the mask is written at the original input size"
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255}
    if "overlay" in record:
        overlay = out / record["overlay"]
    else:
        overlay = out / f"{source.stem}_overlay.png"
    with Image.open(overlay) as image:
        assert image.format == "PNG"


def test_predict_png_jpeg_dicom_and_corrupt(demo_run, inputs, tmp_path):
    out = tmp_path / "pred"
    checkpoint = demo_run / "best.safetensors"
    files = [inputs["png"], inputs["jpeg"], inputs["dicom"], inputs["corrupt"]]
    invoke(["predict", *files, "--checkpoint", checkpoint, "--out", out, "--score-threshold", 0.0, "--no-progress"])
    model, _ = load_model(checkpoint)
    gated = model.config.gate.gated_heads
    for kind in ("png", "jpeg", "dicom"):
        source = inputs[kind]
        record = json.loads((out / f"{source.stem}.json").read_text())
        check_record(record, source, out, model.config.class_names, model.config.box_classes)
        positive = record["gate"]["positive"]
        assert positive == (record["gate"]["probability"] >= model.config.gate.threshold)
        # With score threshold 0 a head that ran always yields boxes; a gated-out head yields none.
        ran_det = positive or "det" not in gated
        assert bool(record["boxes"]) == ran_det, (kind, record["gate"], len(record["boxes"]))
        ran_seg = positive or "seg" not in gated
        assert (record["mask"] is not None) == ran_seg
    assert not (out / "broken.json").exists()
    with (out / "errors.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["path"]).name for r in rows] == ["broken.png"]
    assert rows[0]["reason"]


def test_predict_no_gate_processes_every_image(demo_run, inputs, tmp_path):
    out = tmp_path / "pred-nogate"
    folder = inputs["png"].parent  # a folder argument: every image inside, the corrupt one included
    invoke(["predict", folder, "--checkpoint", demo_run / "best.safetensors", "--out", out, "--no-gate",
            "--score-threshold", 0.0, "--no-progress", "--batch-size", 2])
    model, _ = load_model(demo_run / "best.safetensors")
    for kind in ("png", "jpeg", "dicom"):
        record = json.loads((out / f"{inputs[kind].stem}.json").read_text())
        check_record(record, inputs[kind], out, model.config.class_names, model.config.box_classes)
        assert record["gate"]["positive"] is True
        assert isinstance(record["boxes"], list) and record["boxes"], "det ran on every image"
        assert record["mask"] is not None
    assert "broken.png" in (out / "errors.csv").read_text()


def test_predict_gate_negative_skips_gated_heads(demo_run, inputs, tmp_path):
    """A checkpoint whose gate guards seg and det and can never fire: no boxes, ``mask: null`` — unless --no-gate."""
    model, header = load_model(demo_run / "best.safetensors")
    model.config.gate.threshold = 1.01
    model.config.gate.gated_heads = ["seg", "det"]
    checkpoint = save_checkpoint(tmp_path / "strict-gate.safetensors", model, {"note": "gate never fires"})
    files = [inputs["png"], inputs["jpeg"], inputs["dicom"]]
    out = tmp_path / "gated"
    invoke(["predict", *files, "--checkpoint", checkpoint, "--out", out, "--score-threshold", 0.0, "--no-progress"])
    for source in files:
        record = json.loads((out / f"{source.stem}.json").read_text())
        check_record(record, source, out, model.config.class_names, model.config.box_classes)
        assert record["gate"]["positive"] is False
        assert record["boxes"] == [] and record["mask"] is None
        assert not (out / f"{source.stem}_mask.png").exists()
    assert not (out / "errors.csv").exists()
    out = tmp_path / "ungated"
    invoke(["predict", *files, "--checkpoint", checkpoint, "--out", out, "--score-threshold", 0.0, "--no-progress", "--no-gate"])
    for source in files:
        record = json.loads((out / f"{source.stem}.json").read_text())
        check_record(record, source, out, model.config.class_names, model.config.box_classes)
        assert record["gate"]["positive"] is True and record["boxes"] and record["mask"] is not None


def test_predict_only_unreadable_files_fails(demo_run, inputs, tmp_path):
    result = invoke(["predict", inputs["corrupt"], "--checkpoint", demo_run / "best.safetensors", "--out", tmp_path / "x",
                     "--no-progress"], expected_code=1)
    assert "broken.png" in (tmp_path / "x" / "errors.csv").read_text()
    assert result.exit_code == 1


def test_predict_refuses_non_checkpoint(inputs, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a checkpoint")
    result = CliRunner().invoke(app, ["predict", str(inputs["png"]), "--checkpoint", str(fake), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2  # a usage error naming the file, not a traceback
    assert "fake.safetensors" in " ".join(result.output.split()).replace("│", "").replace(" ", "")


def test_train_and_evaluate_cli(tmp_path, covid_root, covid_test_root):
    config = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    config.write_text(
        "seed: 0\n"
        "epochs: 1\n"
        "steps_per_epoch: 4\n"
        "batch_size: 8\n"
        "split: {train: 0.5, val: 0.25, test: 0.25}\n"
        f"sources:\n  - {{name: covid-chestxray, root: '{covid_root}', tasks: [cls, gate, seg]}}\n"
        "model:\n  encoder: lite-small\n  image_size: 64\n  class_names: [COVID-19, No Finding]\n  box_classes: [Mass]\n"
        "augment: {enabled: false}\n"
        "out_dir: should-be-overridden\n"
    )
    invoke(["train", config, "--out", run, "--no-progress"])
    for name in ("best.safetensors", "last.safetensors", "metrics.json", "split.json", "log.csv", "config.json"):
        assert (run / name).is_file(), name
    assert not Path("should-be-overridden").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1
    assert sum(metrics["split"]["test"].values()) > 0 and "segmentation" in metrics
    assert json.loads((run / "config.json").read_text())["out_dir"] == str(run)

    evaluation = tmp_path / "eval"
    invoke(["evaluate", f"covid-chestxray={covid_test_root}", "--checkpoint", run / "best.safetensors", "--out", evaluation,
            "--bootstrap", 20])
    result = json.loads((evaluation / "metrics.json").read_text())
    assert result["segmentation"]["n_images"] == 16
    dice = result["segmentation"]["dice"]
    assert 0.0 <= dice["value"] <= 1.0 and dice["low"] <= dice["value"] <= dice["high"]
    assert (evaluation / "report.md").read_text().strip()

    part = tmp_path / "eval-test"
    invoke(["evaluate", f"covid-chestxray={covid_root}", "--checkpoint", run / "best.safetensors", "--out", part,
            "--part", "test", "--bootstrap", 0])
    assert json.loads((part / "metrics.json").read_text())["segmentation"]["n_images"] == sum(metrics["split"]["test"].values())

    only_seg = tmp_path / "eval-seg"
    invoke(["evaluate", f"covid-chestxray={covid_test_root}", "--checkpoint", run / "best.safetensors", "--out", only_seg,
            "--bootstrap", 0, "--tasks", "seg"])
    scored = json.loads((only_seg / "metrics.json").read_text())
    assert scored["segmentation"]["n_images"] == 16 and "jaccard" in scored["segmentation"]
    assert scored["classification"]["per_class"]["COVID-19"]["n_known"] == 0  # class labels not scored
    assert CliRunner().invoke(app, ["evaluate", f"covid-chestxray={covid_test_root}", "--checkpoint", str(run / "best.safetensors"),
                                    "--tasks", "boxes"]).exit_code != 0


def test_predict_files_unique_stems_and_extreme_aspect(demo_run, tmp_path):
    """Same stem in two folders (and a real ``<stem>_2`` file) never overwrite each other; a 3×500 image works."""
    from multichex.inference.predictor import Predictor, predict_files

    rng = np.random.default_rng(0)
    paths = []
    for folder, name, shape in (("a", "chest.png", (HEIGHT, WIDTH)), ("b", "chest.png", (HEIGHT, WIDTH)),
                                ("a", "chest_2.png", (HEIGHT, WIDTH)), ("a", "thin.png", (3, 500))):
        (tmp_path / folder).mkdir(exist_ok=True)
        path = tmp_path / folder / name
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    predictor = Predictor.from_checkpoint(demo_run / "best.safetensors", use_gate=False, score_threshold=0.0)
    records, errors = predict_files(predictor, paths, tmp_path / "out", batch_size=3, progress=False)
    assert errors == []
    assert [r["image"] for r in records] == [str(p) for p in paths]
    masks = [r["mask"] for r in records]
    assert len(set(masks)) == 4 and all(m is not None for m in masks)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert len(names) == 4 and {"chest_2.json", "thin.json"} <= set(names)
    assert sum(n.startswith("chest__") for n in names) == 2  # same name in two folders: a hash of the path tells them apart
    # Walking a folder names outputs by the path inside it.
    walked = [(p, tmp_path) for p in paths[:2]]
    walked_records, _ = predict_files(predictor, walked, tmp_path / "walk", progress=False)
    assert [r["overlay"] for r in walked_records] == ["a__chest_overlay.png", "b__chest_overlay.png"]
    with Image.open(tmp_path / "out" / records[-1]["mask"]) as mask:
        assert mask.size == (500, 3)
    for box in records[-1]["boxes"]:
        assert 0 <= box["x1"] <= box["x2"] <= 500 and 0 <= box["y1"] <= box["y2"] <= 3
