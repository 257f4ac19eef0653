"""The registry of every source: the ``shared/data`` layouts and the data sets as their publishers ship them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multichex.data.native import native_reader, native_readers
from multichex.data.ref import SampleRef
from multichex.data.sources import READERS, bundled_sample_root


def all_readers() -> dict[str, Callable[[Path], list[SampleRef]]]:
    """The ``shared/data`` layouts plus every data set's native (as published) layout."""
    return {**READERS, **native_readers()}


def read_source(name: str, root: str | Path | None = None, options: dict[str, Any] | None = None) -> list[SampleRef]:
    """Read one known folder layout (``options`` go to its reader); ``root=None`` reads the bundled sample copy."""
    readers = all_readers()
    if name not in readers:
        raise ValueError(f"unknown source {name!r}; known: {sorted(readers)}")
    folder = Path(root) if root is not None else bundled_sample_root() / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder for source {name!r} not found")
    if options:
        if name in READERS:
            raise ValueError(f"source {name!r} takes no reader options, got {sorted(options)}")
        try:
            inspect.signature(native_reader(name)).bind(folder, **options)
        except TypeError as error:
            raise ValueError(f"bad reader options for source {name!r}: {error}") from error
    return readers[name](folder, **(options or {}))
