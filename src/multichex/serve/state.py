"""Server state of ``multichex serve``: the model holder, temp dir, worker pool, admission counter and recent results.

Everything the server writes lives in one :class:`tempfile.TemporaryDirectory`, removed on close::

    <tmp>/uploads/<uuid hex><.png|.jpg|.dcm>     one upload, deleted once predicted
    <tmp>/results/<result_id>/                   one folder per prediction (at most keep_results)
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from multichex.inference.predictor import Predictor

__all__ = ["ServeState"]

_RESULT_ID = re.compile(r"[0-9a-f]{32}")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


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
        """Give back the queue slot taken by :meth:`try_admit`."""
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
