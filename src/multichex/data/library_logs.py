"""Third-party decoder logs at DEBUG: a library's messages and tracebacks reach users only with ``-v``.

pydicom logs every failed decoder plugin at ERROR with a full traceback before it raises; our own
one-line :class:`~multichex.data.pixels.ImageReadError` already says what went wrong. The readers
call :func:`quiet_library_logs` before decoding: from then on every record of the ``pydicom``
loggers is demoted to DEBUG where it is made (so every handler, ours or a test's, sees the same),
and kept only when DEBUG is on for the application (the :data:`APP_LOGGER` logger, i.e. ``-v``) or
for the library itself (e.g. ``pydicom.config.debug()``).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["APP_LOGGER", "LIBRARIES", "DemoteToDebug", "quiet_library_logs"]

LIBRARIES: tuple[str, ...] = ("pydicom",)
"""Logger trees whose records are demoted to DEBUG."""
APP_LOGGER = "multichex"
"""Logger whose level decides whether demoted records are shown (it follows the root level unless set)."""

_lock = threading.Lock()
_seen_loggers = -1  # size of the logger registry at the last scan


class DemoteToDebug(logging.Filter):
    """Logger filter: the record becomes DEBUG, and passes only when DEBUG is on for the app or its own logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(APP_LOGGER).isEnabledFor(logging.DEBUG) or (
            logging.getLogger(record.name).isEnabledFor(logging.DEBUG))


def quiet_library_logs() -> None:
    """Put :class:`DemoteToDebug` on every logger of the :data:`LIBRARIES` trees (idempotent, thread-safe).

    A logger filter only sees records made by that very logger, so each logger of a tree gets one;
    loggers created after a scan are caught by the next call (the readers call this on every read).
    """
    global _seen_loggers
    registry = logging.Logger.manager.loggerDict
    if len(registry) == _seen_loggers:
        return
    with _lock:
        for lib in LIBRARIES:  # the tree's root, even before the library made it
            logging.getLogger(lib)
        loggers = list(registry.items())
        for name, logger in loggers:
            in_tree = any(name == lib or name.startswith(lib + ".") for lib in LIBRARIES)
            if in_tree and isinstance(logger, logging.Logger) and not any(isinstance(f, DemoteToDebug) for f in logger.filters):
                logger.addFilter(DemoteToDebug())
        _seen_loggers = len(loggers)
