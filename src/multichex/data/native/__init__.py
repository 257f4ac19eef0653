"""Readers for chest X-ray data sets exactly as their publishers ship them.

``native_readers()`` maps a source name to its reader; imports are deferred so that reading one
data set never imports the others' code.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

# source name → (module, function)
NATIVE_SOURCES: dict[str, tuple[str, str]] = {
    "nih-chestxray14": ("nih", "read_native_nih"),
    "rsna-pneumonia": ("rsna", "read_rsna"),
    "siim-acr-pneumothorax": ("siim", "read_siim"),
    "cohen-covid": ("cohen", "read_cohen"),
    "montgomery-tb": ("tb", "read_montgomery"),
    "shenzhen-tb": ("tb", "read_shenzhen"),
    "jsrt": ("jsrt", "read_jsrt"),
    "kermany-chest-xray": ("kermany", "read_native_kermany"),
    "chexpert": ("chexpert", "read_chexpert"),
}


def native_reader(name: str) -> Callable[..., list]:
    """The reader function of a native source, imported on first use."""
    module, function = NATIVE_SOURCES[name]
    return getattr(import_module(f"{__name__}.{module}"), function)


def native_readers() -> dict[str, Callable[..., list]]:
    """Name → ``reader(root, **options)`` for every native source."""
    return {name: (lambda root, _name=name, **options: native_reader(_name)(root, **options)) for name in NATIVE_SOURCES}
