"""Markdown evaluation report: metric tables per head, overlay images and the run config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from multichex.evaluation.overlay import DISCLAIMER
from multichex.numbers import finite_or_none

__all__ = ["write_markdown_report", "format_value"]

_CI_KEYS = ("value", "low", "high")


def _number(x: Any) -> float | None:
    """A finite float, or ``None`` for None/NaN/inf/non-numbers."""
    if isinstance(x, bool):
        return None
    try:
        return finite_or_none(x.item() if hasattr(x, "item") else x)
    except (TypeError, ValueError):
        return None


def format_value(x: Any) -> str:
    """Format a metric: numbers to 3 decimals, ``None``/NaN as "n/a", and a CI dict
    ``{"value", "low", "high"}`` as "0.812 (95% CI 0.780-0.840)"."""
    if isinstance(x, Mapping):
        if "value" not in x:
            return "n/a"
        value = format_value(x.get("value"))
        low, high = _number(x.get("low")), _number(x.get("high"))
        if value == "n/a" or low is None or high is None:
            return value
        level = _number(x.get("confidence"))
        pct = f"{level * 100:g}%" if level is not None else "95%"
        return f"{value} ({pct} CI {low:.3f}-{high:.3f})"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    number = _number(x)
    return "n/a" if number is None else f"{number:.3f}"


def _count(x: Any) -> str:
    number = _number(x)
    return "n/a" if number is None else str(int(number))


def _cell(text: str) -> str:
    """Escape a table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _summary_rows(section: Mapping[str, Any], skip: set[str]) -> list[list[str]]:
    """Rows "metric | value" for scalar or CI entries of a section (nested metric dicts flattened)."""
    rows: list[list[str]] = []
    for key, value in section.items():
        if key in skip:
            continue
        if isinstance(value, Mapping) and "value" not in value:
            for sub, sub_value in value.items():  # e.g. {"macro": {"auroc": .., "f1": ..}}
                if sub_value is None or _number(sub_value) is not None or isinstance(sub_value, Mapping):
                    rows.append([f"{key} {sub}", format_value(sub_value)])
        elif value is None or isinstance(value, Mapping) or _number(value) is not None:
            rows.append([key, format_value(value)])
    return rows


def _classification(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Classification", ""]
    per_class = section.get("per_class") or {}
    if per_class:
        rows = [
            [
                str(name),
                format_value(m.get("auroc")),
                format_value(m.get("f1")),
                format_value(m.get("accuracy")),
                _count(m.get("n_known")),
                _count(m.get("n_positive")),
            ]
            for name, m in per_class.items()
            if isinstance(m, Mapping)
        ]
        lines += _table(["Class", "AUROC", "F1", "Accuracy", "n", "n positive"], rows) + [""]
    summary = _summary_rows(section, skip={"per_class"})
    if summary:
        lines += _table(["Summary", "Value"], summary) + [""]
    if not per_class and not summary:
        lines += ["No classification metrics.", ""]
    return lines


def _segmentation(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Segmentation", ""]
    rows = []
    if "dice" in section:
        rows.append(["Dice (mean)", format_value(section.get("dice"))])
    rows += _summary_rows(section, skip={"dice", "n_images"})
    if "n_images" in section:
        rows.append(["n images", _count(section.get("n_images"))])
    lines += (_table(["Metric", "Value"], rows) if rows else ["No segmentation metrics."]) + [""]
    return lines


def _detection(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Detection", ""]
    per_class = section.get("per_class") or {}
    n_gt = section.get("n_gt") or {}
    iou = _number(section.get("iou_threshold"))
    at = f"@{iou:g}" if iou is not None else "@0.5"
    if per_class:
        rows = [[str(name), format_value(ap), _count(n_gt.get(name))] for name, ap in per_class.items()]
        lines += _table(["Class", f"AP{at}", "n GT boxes"], rows) + [""]
    rows = []
    if "map" in section:
        rows.append([f"mAP{at}", format_value(section.get("map"))])
    rows += _summary_rows(section, skip={"per_class", "map", "n_gt", "n_pred", "iou_threshold"})
    if rows:
        lines += _table(["Summary", "Value"], rows) + [""]
    if not per_class and not rows:
        lines += ["No detection metrics.", ""]
    return lines


def _plain(obj: Any) -> Any:
    """Make a config YAML-safe (paths, numpy scalars/arrays, tuples, unknown objects → plain types)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_markdown_report(
    path: Path,
    metrics: dict,
    overlays: list[Path],
    title: str,
    config: dict | None = None,
) -> Path:
    """Write a Markdown evaluation report and return its path.

    Args:
        path: output ``.md`` file (parent folders are created).
        metrics: ``{"classification": {"per_class": {name: {auroc, f1, accuracy, n_known,
            n_positive}}, "macro_auroc": {value, low, high}, ...}, "segmentation": {"dice":
            {value, low, high}, "n_images": int}, "detection": {"per_class": {name: ap}, "map":
            {value, low, high}}}``; any top-level key may be missing, and any value may be a plain
            number, ``None`` or a ``{value, low, high}`` CI dict.
        overlays: overlay images, linked relative to the report's folder.
        title: report heading.
        config: run configuration, shown as YAML in a collapsed block.

    Floats are written with 3 decimals and missing values as "n/a".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = metrics or {}
    lines = [f"# {title}", "", f"**{DISCLAIMER}.**", ""]

    sections = (
        ("classification", _classification),
        ("segmentation", _segmentation),
        ("detection", _detection),
    )
    present = False
    for key, render in sections:
        section = metrics.get(key)
        if isinstance(section, Mapping):
            lines += render(section)
            present = True
    if not present:
        lines += ["No metrics were computed.", ""]

    if overlays:
        lines += ["## Overlays", ""]
        base = path.parent.resolve()
        for overlay in overlays:
            overlay = Path(overlay)
            target = overlay if overlay.is_absolute() else Path.cwd() / overlay
            rel = Path(os.path.relpath(target.resolve(), base)).as_posix()
            lines += [f"![{overlay.stem}]({rel.replace(' ', '%20')})", ""]

    if config:
        dumped = yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True).rstrip()
        lines += ["<details>", "<summary>Run config</summary>", "", "```yaml", dumped, "```", "", "</details>", ""]

    path.write_text("\n".join(lines), encoding="utf-8")
    return path
