"""``multichex serve``: a small local FastAPI app around :class:`~multichex.inference.predictor.Predictor`.

Research software, NOT for clinical use. There is no authentication: bind it to 127.0.0.1.

Everything the server writes lives in one :class:`tempfile.TemporaryDirectory` created by
:func:`create_app` and removed on shutdown::

    <tmp>/uploads/<uuid hex><.png|.jpg|.dcm>     one upload, deleted once predicted
    <tmp>/results/<result_id>/                   one folder per prediction (at most keep_results)

Upload types are sniffed from the bytes; the client's filename and content type are never used
in a path and only echoed back for display.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, HTMLResponse

from multichex import CLINICAL_DISCLAIMER, __version__
from multichex.inference.predictor import Predictor, predict_files

__all__ = ["create_app", "sniff_upload", "ServeState"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
"""Uploads are copied to disk in chunks of this size."""
MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Allowance for multipart boundaries and part headers on top of ``max_upload_bytes`` (whole-body limit)."""
_SNIFF_BYTES = 132  # DICOM: 128-byte preamble + b"DICM"
_RESULT_ID = re.compile(r"[0-9a-f]{32}")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_MAX_CLIENT_NAME = 255
_FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
RAW_DICOM = "raw-dicom"
"""Sniff result for a DICOM stream without preamble (accepted only if pydicom can parse it)."""


# --------------------------------------------------------------------------- sniffing


def sniff_upload(head: bytes) -> str | None:
    """Suffix for the upload's real type from its first bytes: ``.png``, ``.jpg``, ``.dcm``,
    :data:`RAW_DICOM` (needs a pydicom check), or ``None`` when it is none of PNG, JPEG or DICOM."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[128:132] == b"DICM":
        return ".dcm"
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00"):  # group 0x0002 / 0x0008 tag, no preamble
        return RAW_DICOM
    return None


def _pydicom_reads_image(path: Path) -> bool:
    """Whether pydicom parses ``path`` as a dataset that describes an image (rows and columns)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is simply not DICOM
        return False
    return "Rows" in dataset and "Columns" in dataset


# --------------------------------------------------------------------------- server state


class ServeState:
    """What one app owns: its temp dir, worker pool, admission counter and result folders."""

    def __init__(self, predictor: Predictor, max_upload_bytes: int, workers: int, max_queue: int, keep_results: int) -> None:
        for name, value in (("max_upload_bytes", max_upload_bytes), ("workers", workers),
                            ("max_queue", max_queue), ("keep_results", keep_results)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.predictor = predictor
        self.max_upload_bytes = max_upload_bytes
        self.workers = workers
        self.max_queue = max_queue
        self.keep_results = keep_results
        self._tmp = tempfile.TemporaryDirectory(prefix="multichex-serve-")
        self.root = Path(self._tmp.name)
        self.uploads = self.root / "uploads"
        self.results = self.root / "results"
        self.uploads.mkdir()
        self.results.mkdir()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="multichex-predict")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._kept: deque[str] = deque()
        self.closed = False

    @property
    def in_flight(self) -> int:
        """Predictions admitted and not finished (uploading, waiting or running)."""
        return self._in_flight

    def try_admit(self) -> bool:
        """Take a queue slot; ``False`` when ``max_queue`` predictions are already in flight."""
        with self._lock:
            if self._in_flight >= self.max_queue:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def keep_result(self, result_id: str) -> None:
        """Remember a finished result folder; delete the oldest beyond ``keep_results``."""
        with self._lock:
            self._kept.append(result_id)
            stale = [self._kept.popleft() for _ in range(len(self._kept) - self.keep_results)]
        for old in stale:
            shutil.rmtree(self.results / old, ignore_errors=True)

    def result_file(self, result_id: str, filename: str) -> Path | None:
        """The file ``filename`` of result ``result_id``, or ``None`` unless both names are plain and it exists."""
        if not _RESULT_ID.fullmatch(result_id) or not _FILENAME.fullmatch(filename) or ".." in filename:
            return None
        folder = self.results / result_id
        path = folder / filename
        if not path.is_file() or path.is_symlink() or path.resolve().parent != folder.resolve():
            return None
        return path

    def close(self) -> None:
        """Stop the pool (queued jobs are cancelled) and delete the temp dir; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._tmp.cleanup()


# --------------------------------------------------------------------------- upload and prediction


async def save_upload(upload: UploadFile, folder: Path, limit: int) -> tuple[Path, str]:
    """Copy ``upload`` in chunks to ``folder/<uuid><sniffed suffix>``; return the path and sniffed kind.

    Raises HTTPException 413 past ``limit`` bytes, 415 for content that is not PNG, JPEG or DICOM,
    422 for an empty upload.
    """
    head = b""
    while len(head) < _SNIFF_BYTES:
        chunk = await upload.read(CHUNK_BYTES)
        if not chunk:
            break
        head += chunk
    if not head:
        raise HTTPException(422, "the uploaded file is empty")
    _check_size(len(head), limit)
    kind = sniff_upload(head[:_SNIFF_BYTES])
    if kind is None:
        raise HTTPException(415, "unsupported file type: the content is not PNG, JPEG or DICOM "
                                 "(the type is detected from the file's bytes, not its name)")
    path = folder / f"{uuid.uuid4().hex}{'.dcm' if kind == RAW_DICOM else kind}"
    try:
        await _copy_rest(upload, head, path, limit)
        if kind == RAW_DICOM and not _pydicom_reads_image(path):
            raise HTTPException(415, "unsupported file type: looks like DICOM without preamble, but pydicom cannot read it")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, kind


async def _copy_rest(upload: UploadFile, head: bytes, path: Path, limit: int) -> None:
    size = len(head)
    with path.open("xb") as out:
        out.write(head)
        while chunk := await upload.read(CHUNK_BYTES):
            size += len(chunk)
            _check_size(size, limit)
            out.write(chunk)


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        mib = f" ({limit / 2**20:.1f} MiB)" if limit >= 2**20 else ""
        raise HTTPException(413, f"upload too large: the limit is {limit} bytes{mib}")


def run_prediction(state: ServeState, upload: Path, result_id: str, client_name: str) -> dict[str, Any]:
    """Worker-thread job: predict one uploaded file into its result folder; always deletes the upload.

    Returns the response body; raises HTTPException 422 when the image cannot be read.
    """
    result_dir = state.results / result_id
    try:
        records, errors = predict_files(state.predictor, [upload], result_dir, batch_size=1, progress=False)
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
            client_name = (file.filename or "upload")[:_MAX_CLIENT_NAME]
            future = state.executor.submit(run_prediction, state, upload, uuid.uuid4().hex, client_name)
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
