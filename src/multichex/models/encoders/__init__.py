"""CheXEnc backbones behind one registry; every encoder returns features at strides 4, 8, 16, 32.

Each family lives in its own module and registers an :class:`EncoderSpec` per encoder on import:
:mod:`~multichex.models.encoders.lite` (``lite``, ``lite-small``) and
:mod:`~multichex.models.encoders.monai` (``resnet18/34/50``, ``densenet121``).
"""

from multichex.models.encoders.base import Encoder
from multichex.models.encoders.lite import LiteEncoder
from multichex.models.encoders.monai import MonaiDenseNetEncoder, MonaiResNetEncoder
from multichex.models.encoders.registry import (
    ENCODERS,
    EncoderSpec,
    Preprocessing,
    encoder_spec,
    get_encoder,
    list_encoders,
    register_encoder,
)

__all__ = [
    "ENCODERS", "Encoder", "EncoderSpec", "LiteEncoder", "MonaiDenseNetEncoder", "MonaiResNetEncoder", "Preprocessing",
    "encoder_spec", "get_encoder", "list_encoders", "register_encoder",
]
