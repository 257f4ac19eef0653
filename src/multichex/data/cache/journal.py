"""The preparation journal: an append-only, fsynced record of finished items that makes a rerun resume."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multichex.fileio import atomic_write_bytes

__all__ = ["Journal", "done_records"]

log = logging.getLogger(__name__)


class Journal:
    """Append-only JSON-lines record of finished items; every append is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """Complete records in order; a torn last line (killed mid-write) is dropped and the file repaired."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        records, valid_bytes = [], 0
        for line in raw.split(b"\n")[:-1]:  # the part after the last newline is incomplete
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            valid_bytes += len(line) + 1
        if valid_bytes != len(raw):
            log.warning("%s: dropping %d bytes of an interrupted write", self.path, len(raw) - valid_bytes)
            atomic_write_bytes(self.path, raw[:valid_bytes])
        return records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (one line each) and make them durable before returning."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def done_records(journal: Journal, out: Path) -> dict[str, dict[str, Any]]:
    """The last journal record per id whose files are still on disk."""
    done: dict[str, dict[str, Any]] = {}
    for record in journal.load():
        files = [record["image"]] + ([record["mask"]] if record["mask"] else [])
        if all((out / f).is_file() for f in files):
            done[record["id"]] = record
        else:
            done.pop(record["id"], None)
    return done
