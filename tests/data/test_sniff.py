"""File-type sniffing: one table of magic bytes for reading, caching and uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from multichex.data import sniff
from multichex.serve.uploads import RAW_DICOM, sniff_upload

PREAMBLE = b"\x00" * 128 + b"DICM"


def _raster(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, name", [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff"), ("BMP", "bmp"),
                                       ("GIF", "gif"), ("WEBP", "webp")])
def test_raster_formats_by_magic(fmt, name):
    head = _raster(fmt)[: sniff.SNIFF_BYTES]
    assert sniff.raster_format(head) == name and sniff.sniff(head) == name and sniff.looks_like_raster(head)


def test_dicom_with_and_without_preamble():
    assert sniff.sniff(PREAMBLE + b"\x02\x00\x00\x00") == sniff.DICOM and sniff.has_dicom_preamble(PREAMBLE)
    raw = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
    assert sniff.sniff(raw) == sniff.DICOM_RAW and sniff.looks_like_raw_dicom(raw)
    assert sniff.sniff(b"\x08\x00") is None  # too short to be a tag
    assert sniff.sniff(b"just text") is None and sniff.sniff(b"") is None


def test_preamble_wins_over_a_raster_magic():
    """The reader decodes such a file as DICOM, so every caller calls it DICOM."""
    head = b"\x89PNG\r\n\x1a\n" + b"\x00" * 120 + b"DICM"
    assert sniff.sniff(head) == sniff.DICOM and sniff_upload(head) == ".dcm"


@pytest.mark.parametrize("head, suffix", [
    (_raster("PNG"), ".png"),
    (_raster("JPEG"), ".jpg"),
    (PREAMBLE, ".dcm"),
    (b"\x02\x00\x10\x00UI\x14\x00", RAW_DICOM),
    (_raster("TIFF"), None),  # the server takes PNG, JPEG and DICOM only
    (b"GIF89a" + bytes(10), None),
    (b"hello world", None),
])
def test_upload_suffix_follows_the_shared_sniffer(head, suffix):
    assert sniff_upload(head) == suffix


def test_dicom_file_by_content_or_name(tmp_path):
    by_content = tmp_path / "1.2.840.113619"
    by_content.write_bytes(PREAMBLE + bytes(16))
    by_name = tmp_path / "scan.DCM"
    by_name.write_bytes(b"no preamble")
    png = tmp_path / "x.png"
    png.write_bytes(_raster("PNG"))
    assert sniff.looks_like_dicom_file(by_content) and sniff.looks_like_dicom_file(by_name)
    assert not sniff.looks_like_dicom_file(png) and not sniff.looks_like_dicom_file(tmp_path / "missing.dcm")
    assert sniff.read_head(by_content) == (PREAMBLE + bytes(16))[: sniff.SNIFF_BYTES]
