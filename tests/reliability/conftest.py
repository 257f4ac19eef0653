"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest


@contextmanager
def _console_log(level: int) -> Iterator[io.StringIO]:
    """What a terminal shows at ``level``: a plain handler on the root logger, as ``multichex`` sets up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@pytest.fixture
def console_log() -> Callable[[int], AbstractContextManager[io.StringIO]]:
    """``with console_log(logging.INFO) as stream:`` captures what the console would show."""
    return _console_log
