"""ONNX exports of checkpoints, made once and kept under ``$MULTICHEX_HOME/exports``.

A registered model then runs in ONNX Runtime without a manual ``multichex export``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from multichex.fileio import atomic_write_text
from multichex.models.checkpoint import load_model
from multichex.models.pretrained import home, sha256_of

logger = logging.getLogger(__name__)


def cached_export(checkpoint: str | Path, opset: int = 18) -> Path:
    """The float32 ``model.onnx`` exported from ``checkpoint`` (exported on first use, keyed by the file's sha256)."""
    from multichex.inference.onnx_runtime import export_onnx, onnx_paths

    checkpoint = Path(checkpoint)
    folder = home() / "exports" / f"{sha256_of(checkpoint)[:16]}-opset{opset}"
    target = folder / "model.onnx"
    done = folder / "complete"
    if done.is_file() and all(p.is_file() for p in onnx_paths(target).values()):
        return target
    logger.info("exporting %s to ONNX once (kept in %s)", checkpoint.name, folder)
    model, _ = load_model(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model, target, opset)
    atomic_write_text(done, str(checkpoint.resolve()))
    return target
