"""Tests for multichex.data.io: robust image reading."""

from __future__ import annotations

import importlib.util
import io
import pickle
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from multichex.data.io import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageReadError,
    LoadedImage,
    list_images,
    read_image,
    to_uint8,
)


def _load_factory():
    """Import tests/_dicom_factory.py by path (pytest runs with --import-mode=importlib)."""
    if "_dicom_factory" in sys.modules:
        return sys.modules["_dicom_factory"]
    spec = importlib.util.spec_from_file_location(
        "_dicom_factory", Path(__file__).resolve().parents[1] / "_dicom_factory.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["_dicom_factory"] = module
    spec.loader.exec_module(module)
    return module


make_dicom = _load_factory().make_dicom


def _gradient_u16(h: int = 8, w: int = 10, top: int = 4000) -> np.ndarray:
    return np.linspace(0, top, h * w).reshape(h, w).astype(np.uint16)


def _assert_read_error(path: Path, *fragments: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width×height`` 8-bit gray but holds one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- error type


def test_image_read_error_format_and_pickle(tmp_path):
    err = ImageReadError(tmp_path / "a.png", "broken")
    assert str(err) == f"{tmp_path / 'a.png'}: broken"
    assert err.path == tmp_path / "a.png" and err.reason == "broken"
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and clone.reason == "broken"


# --------------------------------------------------------------------------- raster


def test_png_8bit_round_trip(tmp_path):
    pixels = np.array([[0, 64, 128], [191, 254, 255]], dtype=np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(pixels, mode="L").save(path)
    out = read_image(path)
    assert isinstance(out, LoadedImage)
    assert out.array.dtype == np.float32 and out.array.shape == (2, 3)
    np.testing.assert_allclose(out.array, pixels / 255.0, atol=1e-7)
    np.testing.assert_array_equal(to_uint8(out.array), pixels)
    assert out.original_size == (2, 3)
    assert out.meta["format"] == "png" and out.meta["bits_stored"] == 8
    assert out.meta["path"] == str(path) and out.meta["pixel_spacing"] is None


def test_png_16bit_min_max(tmp_path):
    pixels = np.array([[100, 1100], [2100, 4195]], dtype=np.uint16)  # 12-bit data in 16-bit PNG
    path = tmp_path / "g16.png"
    Image.fromarray(pixels).save(path)
    out = read_image(path)
    expected = (pixels.astype(np.float64) - 100) / (4195 - 100)
    np.testing.assert_allclose(out.array, expected, atol=1e-6)
    assert out.array.min() == 0.0 and out.array.max() == 1.0
    assert out.meta["bits_stored"] == 16


def test_constant_16bit_image_is_zeros(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((4, 5), 777, dtype=np.uint16)).save(path)
    out = read_image(path)
    assert out.array.shape == (4, 5) and not out.array.any()


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000 / 255


RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [200, 100, 50]]], dtype=np.uint8)


def test_rgb_png_becomes_luminance(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(RGB, mode="RGB").save(path)
    out = read_image(path)
    assert out.array.shape == (2, 2)
    np.testing.assert_allclose(out.array, _luma(RGB.astype(np.float64)), atol=1 / 255)


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.concatenate([RGB, np.array([[[0], [128]], [[255], [7]]], dtype=np.uint8)], axis=2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = read_image(path)
    np.testing.assert_allclose(out.array, _luma(RGB.astype(np.float64)), atol=1 / 255)


def test_la_png_drops_alpha(tmp_path):
    la = np.stack([np.array([[10, 20], [30, 40]]), np.array([[0, 50], [100, 255]])], axis=2).astype(np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    np.testing.assert_allclose(read_image(path).array, la[..., 0] / 255.0, atol=1e-7)


def test_palette_png_becomes_luminance(tmp_path):
    im = Image.fromarray(RGB, mode="RGB").quantize(colors=4, method=Image.Quantize.MEDIANCUT)
    assert im.mode == "P"
    path = tmp_path / "pal.png"
    im.save(path)
    expected = _luma(np.asarray(im.convert("RGB")).astype(np.float64))
    np.testing.assert_allclose(read_image(path).array, expected, atol=1 / 255)


def test_jpeg_reads(tmp_path):
    pixels = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    path = tmp_path / "x.jpg"
    Image.fromarray(pixels, mode="L").save(path, quality=95)
    out = read_image(path)
    assert out.meta["format"] == "jpeg" and out.array.shape == (16, 16)
    np.testing.assert_allclose(out.array, pixels / 255.0, atol=0.05)


def test_format_detected_from_content_not_extension(tmp_path):
    path = tmp_path / "actually_png.jpg"
    Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(path, format="PNG")
    assert read_image(path).meta["format"] == "png"


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((2, 4), np.uint8)
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = tmp_path / "rot.png"
    Image.fromarray(pixels, mode="L").save(path, exif=exif)
    out = read_image(path)
    assert out.array.shape == (4, 2)
    assert out.array[0, 1] == 1.0 and out.array.sum() == 1.0


def test_float_tiff_with_nan_is_refused(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 1.0], [2.0, 3.0]], dtype=np.float32)).save(path)
    _assert_read_error(path, "non-finite pixel values")


# --------------------------------------------------------------------------- broken files


def test_missing_file(tmp_path):
    _assert_read_error(tmp_path / "nope.png", "not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_read_error(path, "empty")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not an image\n")
    _assert_read_error(path, "not a recognised image format")


def test_text_file_named_dcm(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_text("this is not a DICOM file either\n" * 10)
    _assert_read_error(path)


def test_directory_is_refused(tmp_path):
    _assert_read_error(tmp_path, "directory")


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_raster(tmp_path, fmt, suffix):
    rng = np.random.default_rng(0)
    full = tmp_path / f"full.{suffix}"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(full, format=fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    _assert_read_error(path)


def test_zero_size_png(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_crafted_png(0, 5))
    _assert_read_error(path)


@pytest.mark.parametrize("side", [30_000, 8_000])  # Pillow's own bomb check, and ours (64 MP)
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    assert side * side > MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_crafted_png(side, side))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    _assert_read_error(path, "too large")
    assert time.perf_counter() - start < 2.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 100 * 1024  # far below the 64 MP+ a decode would allocate


# --------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_min_max(tmp_path):
    pixels = _gradient_u16()
    out = read_image(make_dicom(tmp_path / "m2.dcm", pixels))
    assert out.meta["format"] == "dicom" and out.meta["photometric"] == "MONOCHROME2"
    assert out.meta["bits_stored"] == 12
    assert out.original_size == pixels.shape and out.array.dtype == np.float32
    np.testing.assert_allclose(out.array, pixels / pixels.max(), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = _gradient_u16()
    m2 = read_image(make_dicom(tmp_path / "m2.dcm", pixels)).array
    m1 = read_image(make_dicom(tmp_path / "m1.dcm", pixels, monochrome1=True)).array
    dark = np.unravel_index(np.argmin(m2), m2.shape)
    assert m2[dark] == 0.0 and m1[dark] == 1.0
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_slope_intercept_applied(tmp_path):
    # After a negative slope the stored maximum becomes the darkest value.
    pixels = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    out = read_image(make_dicom(tmp_path / "r.dcm", pixels, slope=-2.0, intercept=-1024.0))
    np.testing.assert_allclose(out.array, [[1.0, 2 / 3], [1 / 3, 0.0]], atol=1e-6)


def test_dicom_window_applied(tmp_path):
    pixels = np.array([[0, 1000, 1500], [2000, 3000, 4000]], dtype=np.uint16)
    out = read_image(make_dicom(tmp_path / "w.dcm", pixels, window=(1500.0, 1000.0)))
    assert out.meta["voi_applied"] is True
    # Everything at or below 1000 is black, everything at or above 2000 white.
    assert out.array[0, 0] == out.array[0, 1] == 0.0
    assert out.array[1, 0] == out.array[1, 1] == out.array[1, 2] == 1.0
    assert out.array[0, 2] == pytest.approx(0.5, abs=0.01)


def test_dicom_pixel_spacing_kept(tmp_path):
    out = read_image(make_dicom(tmp_path / "s.dcm", _gradient_u16(), pixel_spacing=(0.143, 0.15)))
    assert out.meta["pixel_spacing"] == (0.143, 0.15)
    imager = make_dicom(
        tmp_path / "i.dcm", _gradient_u16(), pixel_spacing=(0.1, 0.1), spacing_tag="ImagerPixelSpacing"
    )
    assert read_image(imager).meta["pixel_spacing"] == (0.1, 0.1)
    none = make_dicom(tmp_path / "n.dcm", _gradient_u16(), pixel_spacing=None)
    assert read_image(none).meta["pixel_spacing"] is None


def test_dicom_uint8_and_multiframe_first_frame(tmp_path):
    frames = np.stack([np.arange(12, dtype=np.uint8).reshape(3, 4), np.full((3, 4), 9, np.uint8)])
    out = read_image(make_dicom(tmp_path / "mf.dcm", frames))
    assert out.array.shape == (3, 4)
    np.testing.assert_allclose(out.array, frames[0] / 11.0, atol=1e-6)


def test_dicom_detected_by_content_without_suffix(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", _gradient_u16())
    renamed = path.rename(tmp_path / "1.2.840.99")
    assert read_image(renamed).meta["format"] == "dicom"


def test_dicom_without_preamble(tmp_path):
    data = make_dicom(tmp_path / "full.dcm", _gradient_u16()).read_bytes()
    path = tmp_path / "raw.dcm"
    path.write_bytes(data[132:])  # no preamble, no "DICM"
    out = read_image(path)
    np.testing.assert_allclose(out.array, _gradient_u16() / 4000, atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "nopix.dcm", _gradient_u16(), with_pixels=False)
    _assert_read_error(path, "no pixel data")


def test_dicom_truncated(tmp_path):
    data = make_dicom(tmp_path / "full.dcm", _gradient_u16(64, 64)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 3000])
    _assert_read_error(path)


def test_dicom_non_finite_after_rescale(tmp_path):
    path = make_dicom(tmp_path / "inf.dcm", _gradient_u16(), slope=1e306)
    _assert_read_error(path, "non-finite pixel values")


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_dicom_compressed_without_decoder(tmp_path):
    path = make_dicom(tmp_path / "jls.dcm", _gradient_u16(), transfer_syntax=JPEGLSLossless)
    err = _assert_read_error(path, "no decoder", "JPEG-LS Lossless Image Compression", str(JPEGLSLossless))
    assert "pylibjpeg" in err.reason


def test_dicom_compressed_junk_names_syntax(tmp_path):
    # Pillow may provide a JPEG 2000 decoder here; either way the junk must not decode.
    path = make_dicom(tmp_path / "j2k.dcm", _gradient_u16(), transfer_syntax=JPEG2000Lossless)
    _assert_read_error(path, "JPEG 2000", str(JPEG2000Lossless))


def test_dicom_compressed_no_decoder_message_for_jpeg2000(tmp_path, monkeypatch):
    import pydicom.pixels

    class _Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _Missing())
    path = make_dicom(tmp_path / "j2k.dcm", _gradient_u16(), transfer_syntax=JPEG2000Lossless)
    _assert_read_error(path, "no decoder is installed", "JPEG 2000 Image Compression", str(JPEG2000Lossless))


# --------------------------------------------------------------------------- helpers


def test_to_uint8_clips_and_rounds():
    out = to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0, np.nan], dtype=np.float32))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 0])


def test_list_images_recursive_and_filtered(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a" / "b" / "deep.PNG")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "top.jpg")
    make_dicom(tmp_path / "a" / "img.dcm", _gradient_u16())
    no_suffix = make_dicom(tmp_path / "a" / "tmp.dcm", _gradient_u16()).rename(tmp_path / "a" / "IM0001")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "a" / "README").write_text("no suffix, not DICOM")
    (tmp_path / "a" / "b" / "sub.tif").mkdir()  # a directory with an image suffix
    found = list_images(tmp_path)
    assert found == sorted(
        [tmp_path / "a" / "b" / "deep.PNG", tmp_path / "top.jpg", tmp_path / "a" / "img.dcm", no_suffix]
    )
    assert all(isinstance(p, Path) for p in found)
    assert ".png" in IMAGE_SUFFIXES and ".txt" not in IMAGE_SUFFIXES


def test_every_listed_file_reads(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "x.bmp")
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(tmp_path / "x.tiff")
    for path in list_images(tmp_path):
        assert read_image(path).array.shape == (2, 2)


def test_no_other_exception_types_on_garbage(tmp_path):
    rng = np.random.default_rng(1)
    valid_png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(valid_png, format="PNG")
    base = bytearray(valid_png.getvalue())
    for i in range(30):
        corrupt = bytearray(base)
        for pos in rng.integers(8, len(corrupt), size=4):
            corrupt[pos] ^= 0xFF
        path = tmp_path / f"fuzz{i}.png"
        path.write_bytes(bytes(corrupt))
        try:
            read_image(path)
        except ImageReadError as err:
            assert str(path) in str(err)
