"""Render model outputs (mask contour, boxes, class probabilities, gate) over a chest X-ray."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.morphology import dilation, disk
from skimage.segmentation import find_boundaries

__all__ = ["render_overlay", "DISCLAIMER", "MASK_COLOUR"]

DISCLAIMER = "Research use only - not for clinical use"
MASK_COLOUR = (0, 255, 0)
BOX_COLOURS = [(255, 64, 64), (255, 170, 0), (64, 160, 255), (220, 80, 255), (255, 255, 64), (0, 230, 200)]
PANEL_BG = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)
MAX_LISTED_BOXES = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (falls back to the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """H×W (or H×W×1/3) uint8 or float in [0, 1] → H×W uint8."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"image must be H×W, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    """Width and height of ``text`` drawn at the origin (including the font's top bearing)."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right), int(bottom)


def _caption(box: dict) -> str:
    """"label score" caption of one box."""
    label = str(box.get("label", ""))
    score = box.get("score")
    return f"{label} {float(score):.2f}".strip() if score is not None else label


def _panel_lines(class_probs: dict[str, float], gate: dict | None, boxes: list[dict]) -> list[str]:
    """Text of the side panel: gate decision, the top-5 class probabilities, then the boxes."""
    lines: list[str] = []
    if gate is not None:
        prob = gate.get("probability")
        decision = "POSITIVE" if gate.get("positive") else "negative"
        lines.append(f"Gate: {decision}" + (f" (p={float(prob):.2f})" if prob is not None else ""))
        lines.append("")
    top = sorted(class_probs.items(), key=lambda kv: float(kv[1]), reverse=True)[:5]
    if top:
        lines.append("Top classes:")
        lines.extend(f"{name}: {float(p):.2f}" for name, p in top)
    if boxes:
        lines.extend(["", f"Boxes ({len(boxes)}):"])
        lines.extend(_caption(b) or "(unlabelled)" for b in boxes[:MAX_LISTED_BOXES])
        if len(boxes) > MAX_LISTED_BOXES:
            lines.append(f"... {len(boxes) - MAX_LISTED_BOXES} more")
    return lines


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    boxes: list[dict],
    class_probs: dict[str, float],
    gate: dict | None,
    title: str = "",
) -> Image.Image:
    """Draw predictions over a grayscale X-ray and add an info panel and disclaimer footer.

    Args:
        image: ``H×W`` uint8, or float in [0, 1].
        mask: ``H×W`` bool mask (drawn as a green contour with a faint fill), or ``None``.
        boxes: dicts with ``x1, y1, x2, y2`` (pixels of ``image``), ``label`` and ``score``;
            drawn as rectangles captioned "label score" (caption omitted on the image when wider
            than it) and listed in the panel (first ``MAX_LISTED_BOXES``).
        class_probs: class name → probability; the five highest are listed in the panel.
        gate: ``{"probability": float, "positive": bool}`` or ``None``.
        title: optional line at the top of the panel.

    Returns:
        RGB image **larger than the input**: the X-ray is pasted unscaled at the top-left, so
        output pixel ``(x, y)`` with ``x < W, y < H`` is input pixel ``(x, y)``; a text panel is
        added on the right and a footer with ``DISCLAIMER`` at the bottom. Output size is
        ``(W + panel_width, max(H, panel_height) + footer_height)``. Line widths and font sizes
        scale with the image size.
    """
    gray = _to_gray_uint8(image)
    h, w = gray.shape
    longest = max(h, w)
    line_w = max(1, round(longest / 300))
    font_px = max(10, round(longest / 45))
    font = _font(font_px)

    # --- the image layer (drawing here clips everything to the X-ray) ---
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != (h, w):
            raise ValueError(f"mask shape {m.shape} differs from image shape {(h, w)}")
        colour = np.asarray(MASK_COLOUR, dtype=np.float32)
        rgb[m] = 0.75 * rgb[m] + 0.25 * colour  # faint fill
        edge = find_boundaries(m, mode="inner")
        if line_w > 1:
            edge = dilation(edge, disk(line_w // 2))
        rgb[edge] = colour
    layer = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(layer)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(box[k]) for k in ("x1", "y1", "x2", "y2"))
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        label = str(box.get("label", ""))
        colour_i = BOX_COLOURS[(zlib.crc32(label.encode()) if label else i) % len(BOX_COLOURS)]
        draw.rectangle([x1, y1, x2, y2], outline=colour_i, width=line_w)
        caption = _caption(box)
        tw, th = _text_size(draw, caption, font)
        if caption and tw <= w:  # too-wide captions (tiny images) are only listed in the panel
            ty = y1 - th - 2 * line_w if y1 - th - 2 * line_w >= 0 else y1 + line_w
            tx = min(max(0.0, x1), max(0.0, w - tw))
            draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=(0, 0, 0))
            draw.text((tx + 1, ty + 1), caption, fill=colour_i, font=font)

    # --- side panel and footer ---
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = ([title, ""] if title else []) + _panel_lines(class_probs, gate, boxes)
    pad = max(4, font_px // 2)
    line_h = _text_size(measure, "Ag", font)[1] + max(2, font_px // 4)
    panel_w = max([_text_size(measure, t, font)[0] for t in lines if t] + [w // 3]) + 2 * pad
    panel_h = len(lines) * line_h + 2 * pad
    foot_font = _font(max(10, round(font_px * 0.8)))
    foot_w, foot_h = _text_size(measure, DISCLAIMER, foot_font)
    footer_h = foot_h + 2 * pad
    width = max(w + panel_w, foot_w + 2 * pad)
    height = max(h, panel_h) + footer_h

    canvas = Image.new("RGB", (width, height), PANEL_BG)
    canvas.paste(layer, (0, 0))
    cdraw = ImageDraw.Draw(canvas)
    y = pad
    for text in lines:
        if text:
            cdraw.text((w + pad, y), text, fill=TEXT_COLOUR, font=font)
        y += line_h
    cdraw.text((pad, height - footer_h + pad), DISCLAIMER, fill=(255, 200, 0), font=foot_font)
    return canvas
