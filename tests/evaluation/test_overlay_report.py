"""Tests for the overlay renderer and the Markdown report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from multichex.evaluation.metrics import classification_metrics
from multichex.evaluation.overlay import DISCLAIMER, MASK_COLOUR, render_overlay
from multichex.evaluation.report import format_value, write_markdown_report

GRAY = 128
PROBS = {"Effusion": 0.1, "Nodule": 0.9, "Mass": 0.5, "Atelectasis": 0.3, "Edema": 0.2, "Hernia": 0.05}


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    image = np.full((n, n), GRAY, dtype=np.uint8)
    mask = np.zeros((n, n), dtype=bool)
    mask[n // 8 : n // 2, n // 8 : n // 2] = True  # top-left square
    box = {"x1": 0.6 * n, "y1": 0.6 * n, "x2": 0.9 * n, "y2": 0.9 * n, "score": 0.87, "label": "nodule"}
    return image, mask, [box]


@pytest.mark.parametrize("n", [32, 256, 1024])
def test_overlay_size_and_drawn_pixels(n: int) -> None:
    image, mask, boxes = _inputs(n)
    out = render_overlay(image, mask, boxes, PROBS, {"probability": 0.8, "positive": True}, title="case 1")
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    # The X-ray is pasted unscaled at the top-left; panel on the right, footer at the bottom.
    assert out.width > n and out.height > n
    px = np.asarray(out)
    region = px[:n, :n]

    # mask contour: the top-left corner of the mask square is a boundary pixel
    assert tuple(region[n // 8, n // 8]) == MASK_COLOUR
    # faint fill inside the mask: changed, but not the contour colour
    centre = region[(n // 8 + n // 2) // 2, (n // 8 + n // 2) // 2]
    assert tuple(centre) != (GRAY, GRAY, GRAY) and tuple(centre) != MASK_COLOUR
    assert centre[1] > centre[0]  # tinted green
    # box outline on the left edge at mid-height
    x1, y_mid = int(0.6 * n), int(0.75 * n)
    assert tuple(region[y_mid, x1]) != (GRAY, GRAY, GRAY)
    # a pixel away from mask and box is untouched
    assert tuple(region[n - 1, 2]) == (GRAY, GRAY, GRAY)
    # panel and footer contain drawn text (pixels brighter than the dark background)
    assert px[:, n:].max() > 200
    assert px[-max(8, n // 40) :, :].max() > 150


def test_overlay_without_predictions_keeps_image() -> None:
    image = np.linspace(0.0, 1.0, 64 * 48).reshape(48, 64)  # float in [0, 1], non-square
    out = render_overlay(image, None, [], {}, None)
    px = np.asarray(out)
    expected = (image * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(px[:48, :64, 0], expected)
    assert np.array_equal(px[:48, :64, 1], expected)


def test_line_width_scales_with_size() -> None:
    def box_edge_thickness(n: int) -> int:
        image = np.full((n, n), GRAY, dtype=np.uint8)
        # no label/score → no caption that could cross the measured row
        box = {"x1": n // 4, "y1": n // 4, "x2": 3 * n // 4, "y2": 3 * n // 4, "score": None, "label": ""}
        px = np.asarray(render_overlay(image, None, [box], {}, None))[: n, : n]
        row = px[n // 2, : n // 2]
        return int((row != GRAY).any(axis=-1).sum())

    assert box_edge_thickness(1024) > box_edge_thickness(32) >= 1


def test_overlay_mask_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        render_overlay(np.zeros((32, 32)), np.zeros((16, 16), bool), [], {}, None)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.81234, "0.812"),
        (None, "n/a"),
        (float("nan"), "n/a"),
        (3, "3"),
        ({"value": 0.8123, "low": 0.78, "high": 0.8401}, "0.812 (95% CI 0.780-0.840)"),
        ({"value": 0.5, "low": None, "high": None}, "0.500"),
        ({"value": None, "low": 0.1, "high": 0.2}, "n/a"),
    ],
)
def test_format_value(value, text: str) -> None:
    assert format_value(value) == text


def _full_metrics() -> dict:
    return {
        "classification": {
            "per_class": {
                "Atelectasis": {"auroc": 0.75, "f1": 2 / 3, "accuracy": 0.75, "n_known": 4, "n_positive": 2},
                "Hernia": {"auroc": None, "f1": 0.8, "accuracy": 2 / 3, "n_known": 3, "n_positive": 3},
            },
            "macro_auroc": {"value": 0.75, "low": 0.6, "high": 0.9},
        },
        "segmentation": {"dice": {"value": 0.8123, "low": 0.78, "high": 0.8401}, "n_images": 12},
        "detection": {"per_class": {"Nodule": 0.5, "Mass": None}, "map": {"value": 0.5, "low": 0.25, "high": 0.75}},
    }


def test_report_contents(tmp_path: Path) -> None:
    overlay_dir = tmp_path / "overlays"
    overlay_dir.mkdir()
    overlays = []
    for name in ("case_1", "case_2"):
        p = overlay_dir / f"{name}.png"
        Image.new("RGB", (4, 4)).save(p)
        overlays.append(p)
    config = {"model": {"encoder": "resnet18", "classes": ("a", "b")}, "out": tmp_path / "run", "lr": np.float32(0.5)}

    path = write_markdown_report(tmp_path / "report.md", _full_metrics(), overlays, "Validation report", config)
    text = path.read_text()

    assert text.startswith("# Validation report")
    assert DISCLAIMER in text
    assert "| Atelectasis | 0.750 | 0.667 | 0.750 | 4 | 2 |" in text
    assert "| Hernia | n/a | 0.800 | 0.667 | 3 | 3 |" in text
    assert "| macro_auroc | 0.750 (95% CI 0.600-0.900) |" in text
    assert "| Dice (mean) | 0.812 (95% CI 0.780-0.840) |" in text
    assert "| n images | 12 |" in text
    assert "| Nodule | 0.500 | n/a |" in text
    assert "| Mass | n/a | n/a |" in text
    assert "| mAP@0.5 | 0.500 (95% CI 0.250-0.750) |" in text
    assert "![case_1](overlays/case_1.png)" in text
    assert "![case_2](overlays/case_2.png)" in text
    assert "<details>" in text and "```yaml" in text

    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    parsed = yaml.safe_load(block)
    assert parsed["model"] == {"encoder": "resnet18", "classes": ["a", "b"]}
    assert parsed["lr"] == 0.5
    assert parsed["out"] == str(tmp_path / "run")


@pytest.mark.parametrize("present", [[], ["classification"], ["segmentation"], ["detection"], ["segmentation", "detection"]])
def test_report_with_missing_heads(tmp_path: Path, present: list[str]) -> None:
    metrics = {k: v for k, v in _full_metrics().items() if k in present}
    text = write_markdown_report(tmp_path / "sub" / "r.md", metrics, [], "T").read_text()
    for head in ("classification", "segmentation", "detection"):
        assert (f"## {head.capitalize()}" in text) == (head in present)
    if not present:
        assert "No metrics were computed." in text
    assert "<details>" not in text  # no config given
    assert "## Overlays" not in text


def test_report_from_classification_metrics_output(tmp_path: Path) -> None:
    import torch

    cls = classification_metrics(
        torch.tensor([[0.1, 0.4, 0.35, 0.8]]).T, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).T, ["Effusion"]
    )
    text = write_markdown_report(tmp_path / "r.md", {"classification": cls}, [], "T").read_text()
    assert "| Effusion | 0.750 | 0.667 | 0.750 | 4 | 2 |" in text
    assert "| macro auroc | 0.750 |" in text


def test_overlay_link_outside_report_folder(tmp_path: Path) -> None:
    img = tmp_path / "images" / "a b.png"
    img.parent.mkdir()
    Image.new("RGB", (2, 2)).save(img)
    text = write_markdown_report(tmp_path / "reports" / "r.md", {}, [img], "T").read_text()
    assert "![a b](../images/a%20b.png)" in text


def test_report_from_detection_map_output(tmp_path: Path) -> None:
    import torch

    from multichex.evaluation.metrics import detection_map

    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    det = detection_map([box], [torch.tensor([0.9])], [torch.tensor([0])], [box], [torch.tensor([0])], ["Nodule", "Mass"])
    text = write_markdown_report(tmp_path / "r.md", {"detection": det}, [], "T").read_text()
    assert "| Nodule | 1.000 | 1 |" in text
    assert "| Mass | n/a | 0 |" in text
    assert "| mAP@0.5 | 1.000 |" in text
    assert "iou_threshold" not in text
