"""Routes of ``multichex serve``: :func:`create_app` and the prediction job behind ``POST /predict``.

Research software, NOT for clinical use. There is no authentication: bind it to 127.0.0.1.
Uploads are handled by :mod:`multichex.serve.uploads`, the temp dir, pool and results by
:class:`~multichex.serve.state.ServeState`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, HTMLResponse

from multichex import CLINICAL_DISCLAIMER, __version__
from multichex.inference.predictor import Predictor, PreparedImage, predict_files
from multichex.serve.state import ServeState

# CHUNK_BYTES, RAW_DICOM and save_upload lived here before uploads.py: still importable from this module.
from multichex.serve.uploads import (
    CHUNK_BYTES,
    RAW_DICOM,
    caption_for,
    display_name,
    save_upload,
    sniff_upload,
)

__all__ = ["CHUNK_BYTES", "RAW_DICOM", "ServeState", "create_app", "save_upload", "sniff_upload"]

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Allowance for multipart boundaries and part headers on top of ``max_upload_bytes`` (whole-body limit)."""
_FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


# --------------------------------------------------------------------------- prediction job


class _CaptionedPredictor:
    """The app's predictor as :func:`predict_files` sees it, except that each prepared image is named
    ``caption``: the overlay caption shows the client's file name, not the temporary upload's uuid."""

    def __init__(self, predictor: Predictor, caption: str) -> None:
        self._predictor = predictor
        self._caption = caption

    def prepare(self, path: str | Path) -> PreparedImage:
        return dataclasses.replace(self._predictor.prepare(path), path=Path(self._caption))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)


def run_prediction(state: ServeState, upload: Path, result_id: str, client_name: str) -> dict[str, Any]:
    """Worker-thread job: predict one uploaded file into its result folder; always deletes the upload.

    Returns the response body; raises HTTPException 422 when the image cannot be read.
    """
    result_dir = state.results / result_id
    predictor = cast(Predictor, _CaptionedPredictor(state.predictor, caption_for(client_name)))  # duck-typed
    try:
        records, errors = predict_files(predictor, [upload], result_dir, batch_size=1, progress=False)
    except BaseException:
        shutil.rmtree(result_dir, ignore_errors=True)
        raise
    finally:
        upload.unlink(missing_ok=True)
    if errors or not records:
        shutil.rmtree(result_dir, ignore_errors=True)
        reason = errors[0][1].replace(str(upload), client_name) if errors else "no prediction was produced"
        raise HTTPException(422, f"could not read the image: {reason}")
    body = response_body(records[0], result_id, client_name)
    (result_dir / f"{upload.stem}.json").write_text(json.dumps(body, indent=2))  # no server paths in it
    state.keep_result(result_id)
    return body


def _job_done(state: ServeState, upload: Path) -> None:
    """Done callback of a prediction job (also when cancelled before it ran): free its slot and upload."""
    upload.unlink(missing_ok=True)
    state.release()


def response_body(record: dict[str, Any], result_id: str, client_name: str) -> dict[str, Any]:
    """The per-image record with the client's filename, the result id and URLs of its files."""
    heatmaps = record.get("heatmaps") or {}
    return {
        **record,
        "image": client_name,
        "result_id": result_id,
        "urls": {
            "overlay": _result_url(result_id, record["overlay"]),
            "mask": _result_url(result_id, record["mask"]) if record.get("mask") else None,
            "heatmaps": {name: _result_url(result_id, file) for name, file in heatmaps.items()},
        },
    }


def _result_url(result_id: str, filename: str) -> str:
    return f"/results/{result_id}/{quote(filename)}"


# --------------------------------------------------------------------------- app


def model_summary(predictor: Predictor) -> dict[str, Any]:
    """Small description of the loaded model for ``/health``."""
    config = predictor.model.config
    return {
        "encoder": config.encoder,
        "image_size": config.image_size,
        "class_names": list(config.class_names),
        "box_classes": list(config.box_classes),
        "gate": {
            "enabled": predictor.use_gate,
            "threshold": config.gate.threshold,
            "source": config.gate.source,
            "gated_heads": list(config.gate.gated_heads),
        },
        "score_threshold": predictor.score_threshold,
    }


def _load_page() -> str:
    return resources.files("multichex.serve").joinpath("page.html").read_text(encoding="utf-8")


def _route_body_limit(limit: int) -> dict[str, Any]:
    """``max_body_size`` for the upload route when this FastAPI supports it (stops reading early)."""
    if "max_body_size" in inspect.signature(FastAPI.post).parameters:
        return {"max_body_size": limit + MULTIPART_OVERHEAD_BYTES}
    return {}


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = 20 * 2**20,
    workers: int = 2,
    max_queue: int = 16,
    keep_results: int = 200,
) -> FastAPI:
    """The web app: ``/`` (page), ``/health``, ``POST /predict`` and ``/results/{id}/{file}``.

    ``app.state.serve`` is the :class:`ServeState` (temp dir, pool); it is closed on shutdown, so
    an app serves one lifespan.
    """
    state = ServeState(predictor, max_upload_bytes, workers, max_queue, keep_results)
    page = _load_page()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="multichex serve — research software, NOT for clinical use",
        description=(f"Local web app for the multichex chest X-ray model (classification, lung segmentation, "
                     f"detection). {CLINICAL_DISCLAIMER} No authentication: keep it on 127.0.0.1."),
        version=__version__,
        lifespan=lifespan,
    )
    app.state.serve = state

    @app.get("/", response_class=HTMLResponse, summary="The web page")
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/health", summary="Liveness and model summary")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_summary(state.predictor),
            "limits": {"max_upload_bytes": state.max_upload_bytes, "workers": state.workers, "max_queue": state.max_queue},
            "disclaimer": CLINICAL_DISCLAIMER,
        }

    @app.post(
        "/predict",
        summary="Predict for one chest X-ray (PNG, JPEG or DICOM)",
        responses={413: {"description": "Upload too large"}, 415: {"description": "Not PNG, JPEG or DICOM"},
                   422: {"description": "Unreadable image"}, 503: {"description": "Too many predictions in flight"}},
        **_route_body_limit(max_upload_bytes),
    )
    async def predict(file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM; type sniffed from content")]) -> dict[str, Any]:
        if not state.try_admit():
            raise HTTPException(503, f"server busy: {state.max_queue} predictions already in flight; try again shortly",
                                headers={"Retry-After": "1"})
        submitted = False
        try:
            upload, _ = await save_upload(file, state.uploads, state.max_upload_bytes)
            future = state.executor.submit(run_prediction, state, upload, uuid.uuid4().hex, display_name(file.filename))
            future.add_done_callback(lambda _: _job_done(state, upload))  # the slot stays taken while the job runs
            submitted = True
        finally:
            if not submitted:
                state.release()
        try:
            return await asyncio.wrap_future(future)
        except HTTPException:
            raise
        except Exception as error:
            log.exception("prediction failed")
            raise HTTPException(500, f"prediction failed: {type(error).__name__}") from error

    @app.get("/results/{result_id}/{filename}", summary="A file of a prediction (overlay, mask, heat map, JSON)")
    def result_file(result_id: str, filename: str) -> FileResponse:
        path = state.result_file(result_id, filename)
        if path is None:
            raise HTTPException(404, "no such result file")
        return FileResponse(path, headers=_FILE_HEADERS)

    return app
