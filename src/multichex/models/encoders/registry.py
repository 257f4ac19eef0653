"""The encoder registry: one :class:`EncoderSpec` record per CheXEnc backbone, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multichex.models.encoders.base import Encoder

__all__ = ["ENCODERS", "EncoderSpec", "Preprocessing", "encoder_spec", "get_encoder", "list_encoders", "register_encoder"]


@dataclass(frozen=True)
class Preprocessing:
    """The input an encoder expects: ``in_channels`` planes, normalised as ``(image - mean) / std``.

    The values here are the encoder's declared defaults; a built ``MultiCheXNet`` normalises with the
    ``input_mean`` / ``input_std`` of its own config, which travel with its checkpoint.
    """

    in_channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    scheme: str = "mean-std"  # images in [0, 1], then (x - mean) / std


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder as data: how to build it and what its features look like.

    ``builder(in_channels=..., **kwargs)`` returns an :class:`Encoder` whose ``forward`` gives one
    feature map per stage, ``out_channels[i]`` wide at stride ``strides[i]`` of the input.
    """

    name: str
    builder: Callable[..., Encoder]
    out_channels: tuple[int, ...]
    strides: tuple[int, ...] = (4, 8, 16, 32)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    supports_pyramid: bool = False  # has ``add_pyramid_inputs`` (APPAU-Net's pyramid input)
    family: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.out_channels) != len(self.strides):
            raise ValueError(f"encoder {self.name!r}: {len(self.out_channels)} stage widths for {len(self.strides)} strides")

    def build(self, in_channels: int | None = None, pyramid: bool = False, **kwargs: Any) -> Encoder:
        """A fresh encoder (``in_channels`` defaults to the declared preprocessing's)."""
        if pyramid and not self.supports_pyramid:
            raise ValueError(f"pyramid_input needs a lite encoder, not {self.name!r}")
        channels = self.preprocessing.in_channels if in_channels is None else in_channels
        encoder = self.builder(in_channels=channels, **kwargs)
        if pyramid:
            encoder.add_pyramid_inputs()
        return encoder


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name`` (a second spec of the same name is refused)."""
    if spec.name in ENCODERS and ENCODERS[spec.name] != spec:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    ENCODERS[spec.name] = spec
    return spec


def encoder_spec(name: str) -> EncoderSpec:
    """The registered record of ``name``."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}")
    return ENCODERS[name]


def get_encoder(name: str, in_channels: int | None = None, pyramid: bool = False, **kwargs: Any) -> Encoder:
    """Build a registered encoder by name (``list_encoders()`` shows the choices).

    ``pyramid``: also feed the image, downsampled, into the later encoder stages (APPAU-Net's pyramid
    input); only encoders whose spec ``supports_pyramid`` (the ``lite`` family) have the hooks for it.
    Other keyword arguments go to the spec's builder.
    """
    return encoder_spec(name).build(in_channels, pyramid, **kwargs)


def list_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return sorted(ENCODERS)
