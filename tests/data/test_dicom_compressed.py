"""Compressed DICOM decodes through the pylibjpeg plugins that multichex depends on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from multichex.data.io import read_image

_spec = importlib.util.spec_from_file_location("_dicom_factory", Path(__file__).parents[1] / "_dicom_factory.py")
_factory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_factory)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compressed_dicom_matches_uncompressed(tmp_path, syntax):
    pixels = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 2) % 4096
    plain = tmp_path / "plain.dcm"
    _factory.make_dicom(plain, pixels)
    dataset = pydicom.dcmread(plain)
    dataset.compress(syntax)
    packed = tmp_path / "packed.dcm"
    dataset.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    expected, decoded = read_image(plain), read_image(packed)
    assert decoded.array.shape == (48, 40)
    np.testing.assert_allclose(decoded.array, expected.array, atol=1e-6)
