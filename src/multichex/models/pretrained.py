"""Named trained models: the registry of shipped (package) and user-placed (``MULTICHEX_HOME``) weights.

Each entry names a safetensors checkpoint (its sha256 pinned in the index), a one-line summary and a
model card. The package's index is ``multichex/models/zoo/index.json``; a user's is
``$MULTICHEX_HOME/models/index.json`` (default home ``~/.multichex``), same format, files beside it.
Nothing is downloaded: a name resolves to a file on disk or is refused. A file whose sha256 differs from
the pinned one is refused, so a truncated or swapped file never loads silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from multichex.models.checkpoint import load_model as load_checkpoint
from multichex.models.multichexnet import MultiCheXNet

INDEX_NAME = "index.json"
HOME_VARIABLE = "MULTICHEX_HOME"


class ModelNotFoundError(LookupError):
    """A model name that neither the package nor ``MULTICHEX_HOME`` registers (and that is not a file)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


@dataclass(frozen=True)
class PretrainedModel:
    """One registry entry: where its weights are, what they hash to, what it is for."""

    name: str
    path: Path  # the safetensors checkpoint
    sha256: str
    summary: str
    card: Path | None  # the model card (markdown)
    origin: str  # "package" or the MULTICHEX_HOME index it came from
    default: bool = False
    extra: dict[str, Any] | None = None  # further index fields (e.g. headline metrics, image size)

    def card_text(self) -> str:
        """The model card, or a line saying there is none."""
        if self.card is None or not self.card.is_file():
            return f"{self.name}: no model card"
        return self.card.read_text(encoding="utf-8")


def package_zoo() -> Path:
    """The folder of the package's shipped models."""
    return Path(str(resources.files("multichex") / "models" / "zoo"))


def home() -> Path:
    """``$MULTICHEX_HOME`` or ``~/.multichex``."""
    value = os.environ.get(HOME_VARIABLE)
    return Path(value).expanduser() if value else Path.home() / ".multichex"


def _read_index(folder: Path, origin: str) -> list[PretrainedModel]:
    index = folder / INDEX_NAME
    if not index.is_file():
        return []
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        entries = data["models"]
        models = []
        for entry in entries:
            known = {"name", "file", "sha256", "summary", "card", "default"}
            card = entry.get("card")
            models.append(PretrainedModel(
                name=str(entry["name"]), path=folder / entry["file"], sha256=str(entry["sha256"]).lower(),
                summary=str(entry.get("summary", "")), card=folder / card if card else None, origin=origin,
                default=bool(entry.get("default", False)), extra={k: v for k, v in entry.items() if k not in known},
            ))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index}: not a valid model index ({error})") from error
    return models


def list_models() -> list[PretrainedModel]:
    """Every registered model: the package's first, then ``MULTICHEX_HOME``'s (a home entry may not reuse a package name)."""
    found = _read_index(package_zoo(), "package")
    names = {m.name for m in found}
    for model in _read_index(home() / "models", str(home() / "models" / INDEX_NAME)):
        if model.name in names:
            raise ValueError(f"{home() / 'models' / INDEX_NAME}: model name {model.name!r} is already a shipped model; rename it")
        names.add(model.name)
        found.append(model)
    return found


def get_pretrained(name: str) -> PretrainedModel:
    """The entry named ``name``; refuses with the known names."""
    models = list_models()
    for model in models:
        if model.name == name:
            return model
    known = ", ".join(m.name for m in models) or "none"
    raise ModelNotFoundError(f"{name!r} is neither a file nor a registered model (registered: {known}; "
                             f"add your own under ${HOME_VARIABLE}/models, see `multichex models list`)")


def default_model_name() -> str:
    """The shipped model used when a command is given no checkpoint."""
    for model in list_models():
        if model.default:
            return model.name
    raise ModelNotFoundError("no default model is registered in this installation; pass --checkpoint")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: dict[tuple[str, int, float], str] = {}


def verified_path(model: PretrainedModel) -> Path:
    """The entry's file after checking it exists and hashes to the pinned sha256 (once per file version)."""
    if not model.path.is_file():
        raise FileNotFoundError(f"{model.path}: weights of registered model {model.name!r} are missing")
    stat = model.path.stat()
    key = (str(model.path), stat.st_size, stat.st_mtime)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_of(model.path)
    if _VERIFIED[key] != model.sha256:
        raise ValueError(f"{model.path}: sha256 {_VERIFIED[key][:12]}… does not match the {model.sha256[:12]}… pinned for "
                         f"model {model.name!r}; the file is damaged or was replaced — refusing to load it")
    return model.path


def resolve_checkpoint(name_or_path: str | Path | None, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """A checkpoint path from an existing file, a registered name, or ``None`` (the default model).

    A string that names an existing file is that file; otherwise it must be a registered name (its file is
    sha256-checked). ``suffixes``: file types a path may have (e.g. ``.onnx`` for ONNX Runtime).
    """
    if name_or_path is None:
        return verified_path(get_pretrained(default_model_name()))
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix not in suffixes:
            raise ValueError(f"{path}: expected a {' or '.join(suffixes)} file")
        return path
    if path.suffix or os.sep in str(name_or_path) or "/" in str(name_or_path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return verified_path(get_pretrained(str(name_or_path)))


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> MultiCheXNet:
    """A registered model by name (``None``: the default model) or a checkpoint path, in eval mode.

    Weights stored as float16 (the shipped copies) come back as float32.
    """
    model, _ = load_checkpoint(resolve_checkpoint(name_or_path), map_location=device)
    return model
