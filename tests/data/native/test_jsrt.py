"""Tests for JSRT raw reading (multichex.data.io) and multichex.data.native.jsrt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.io import ImageReadError, read_image, read_jsrt_raw
from multichex.data.native.jsrt import prepare_scr_masks, read_jsrt, read_jsrt_clinical
from multichex.data.sources import CXRDataset

N = 2048


def raw_pattern() -> np.ndarray:
    """12-bit pattern: a gradient, a saturated 'air' block top-left, a zero 'bone' block bottom-right."""
    rows, cols = np.mgrid[:N, :N]
    raw = ((rows * 3 + cols) % 4096).astype(np.uint16)
    raw[:64, :128] = 4095
    raw[-64:, -128:] = 0
    raw[500, 700] = 0x0102
    return raw


def write_img(path: Path, raw: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (raw_pattern() if raw is None else raw).astype(">u2").tofile(path)
    return path


def test_read_image_reads_big_endian_12_bit_inverted(tmp_path):
    path = write_img(tmp_path / "JPCLN001.IMG")
    assert path.read_bytes()[(500 * N + 700) * 2 : (500 * N + 700) * 2 + 2] == b"\x01\x02"  # big-endian on disk
    loaded = read_image(path)
    raw = raw_pattern()
    assert loaded.array.shape == (N, N) and loaded.array.dtype == np.float32
    np.testing.assert_allclose(loaded.array, (4095 - raw.astype(np.float64)) / 4095, rtol=0, atol=1e-7)
    assert loaded.array[500, 700] == pytest.approx((4095 - 258) / 4095)
    # orientation: row 0 is the top of the image; high raw (air, lung) → dark, raw 0 (bone) → bright
    assert np.all(loaded.array[:64, :128] == 0.0) and np.all(loaded.array[-64:, -128:] == 1.0)
    assert loaded.meta["format"] == "jsrt-raw" and loaded.meta["bits_stored"] == 12
    assert loaded.meta["pixel_spacing"] == (0.175, 0.175)
    assert loaded.meta["photometric"] == "MONOCHROME2" and loaded.meta["inverted"] is True
    assert loaded.original_size == (N, N)


def test_raw_polarity_option_and_clipping(tmp_path):
    raw = raw_pattern()
    raw[0, 0] = 5000  # outside 12 bits: clipped and counted
    path = write_img(tmp_path / "jpcnn001.img", raw)
    loaded = read_jsrt_raw(path, invert=False)
    assert loaded.array[0, 0] == 1.0 and loaded.meta["clipped_pixels"] == 1
    assert loaded.array[500, 700] == pytest.approx(258 / 4095)
    assert loaded.meta["photometric"] == "MONOCHROME1"


def test_wrong_size_img_is_refused(tmp_path):
    path = tmp_path / "JPCLN002.IMG"
    np.zeros((100, 100), ">u2").tofile(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "8388608 bytes" in message and "20000 bytes" in message


def test_img_suffix_with_png_content_is_still_a_png(tmp_path):
    path = tmp_path / "scan.img"
    Image.fromarray(np.full((3, 4), 255, np.uint8)).save(path, format="PNG")
    assert read_image(path).array.shape == (3, 4)


def write_scr(root: Path, stems: list[str], right: bool = True) -> Path:
    """SCR-style 1024×1024 GIF lung masks (left: rows 100–199 × cols 50–149; right: rows 300–349 × cols 600–699)."""
    for stem in stems:
        left_mask = np.zeros((1024, 1024), np.uint8)
        left_mask[100:200, 50:150] = 255
        right_mask = np.zeros((1024, 1024), np.uint8)
        right_mask[300:350, 600:700] = 255
        for organ, mask in (("left lung", left_mask), ("right lung", right_mask)):
            if organ == "right lung" and not right:
                continue
            (root / organ).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / organ / f"{stem}.gif")
    return root


def expected_mask() -> np.ndarray:
    mask = np.zeros((N, N), np.uint8)
    mask[200:400, 100:300] = 255
    mask[600:700, 1200:1400] = 255
    return mask


def test_prepare_scr_masks_merges_and_upsamples_exactly(tmp_path):
    scr = write_scr(tmp_path / "scr" / "masks", ["JPCLN001", "JPCNN001"])
    written = prepare_scr_masks(scr, tmp_path / "prepared")
    assert written == [tmp_path / "prepared" / "JPCLN001.png", tmp_path / "prepared" / "JPCNN001.png"]
    array = np.asarray(Image.open(written[0]))
    assert array.shape == (N, N)
    np.testing.assert_array_equal(array, expected_mask())


def test_prepare_scr_masks_needs_both_lungs(tmp_path):
    scr = write_scr(tmp_path / "masks", ["JPCLN001"], right=False)
    (scr / "right lung").mkdir()
    with pytest.raises(ValueError, match=r"right lung.*JPCLN001.gif: missing 'right lung' mask"):
        prepare_scr_masks(scr, tmp_path / "out")


CLNDAT = "JPCLN001.IMG\t3\t17.5\t53\tmale\t1000\t700\tmalignant\tl.upper lobe\tlung cancer\n\n"
CNNDAT = "JPCNN001.IMG\t45\tfemale\tnon-nodule\n"


def jsrt_root(tmp_path: Path) -> Path:
    root = tmp_path / "JSRT"
    write_img(root / "All247images" / "JPCLN001.IMG")
    write_img(root / "All247images" / "JPCNN001.IMG")
    (root / "CLNDAT_EN.txt").write_text(CLNDAT)
    (root / "CNNDAT_EN.TXT").write_text(CNNDAT)
    return root


def test_read_jsrt_labels_clinical_boxes_and_masks(tmp_path):
    root = jsrt_root(tmp_path)
    prepared = tmp_path / "prepared"
    prepare_scr_masks(write_scr(tmp_path / "scr", ["JPCLN001"]), prepared)
    refs = read_jsrt(root, masks_root=prepared)
    assert [r.patient_id for r in refs] == ["jsrt:JPCLN001", "jsrt:JPCNN001"]
    assert [r.findings for r in refs] == [{"Nodule": 1.0, "COVID-19": 0.0}, {"Nodule": 0.0, "COVID-19": 0.0}]
    assert [r.positive for r in refs] == [1.0, 0.0]
    assert refs[0].mask_path == prepared / "JPCLN001.png" and refs[1].mask_path is None
    assert refs[0].boxes_xywh == [pytest.approx((950.0, 650.0, 100.0, 100.0))] and refs[0].box_names == ["Nodule"]
    assert refs[1].boxes_xywh == [] and refs[1].box_names == []
    assert refs[0].extra["diagnosis"] == "lung cancer" and refs[0].extra["nodule_size_mm"] == 17.5
    assert refs[0].extra["malignancy"] == "malignant" and refs[0].extra["age"] == 53.0
    assert refs[1].extra == {"age": 45.0, "sex": "female"}

    sample = CXRDataset(refs[:1], ["Nodule"], ["Nodule"], N, augment=None)[0]
    np.testing.assert_array_equal(sample.mask[0].numpy(), expected_mask() > 0)
    assert sample.boxes.tolist() == [[950.0, 650.0, 1050.0, 750.0]]
    assert sample.labels.tolist() == [1.0]
    assert sample.image[0, 0, 0] == 0.0 and sample.image[0, -1, -1] == 1.0  # lungs dark, bone bright


def test_read_jsrt_without_clinical_files(tmp_path):
    root = tmp_path / "JSRT"
    write_img(root / "JPCLN002.IMG", np.zeros((N, N), np.uint16))
    (root / "JPCNN009.IMG").write_bytes(b"")  # not read by read_jsrt
    refs = read_jsrt(root)
    assert [r.boxes_xywh for r in refs] == [None, []]
    assert [r.extra for r in refs] == [{}, {}]
    assert all(r.boxes_xywh is None for r in read_jsrt(root, nodule_boxes=False))


def test_raw_scr_masks_are_refused_with_a_hint(tmp_path):
    root = jsrt_root(tmp_path)
    scr = write_scr(tmp_path / "scr", ["JPCLN001"])
    with pytest.raises(ValueError, match=r"JPCLN001.gif: mask is 1024×1024 but JSRT images are 2048×2048; run .*prepare_scr_masks"):
        read_jsrt(root, masks_root=scr)


def test_bad_names_and_clinical_rows(tmp_path):
    root = tmp_path / "JSRT"
    root.mkdir()
    with pytest.raises(ValueError, match="no JSRT .IMG files found"):
        read_jsrt(root)
    (root / "CLNDAT_EN.txt").write_text("JPCLN001.IMG\t3\t17.5\n")
    with pytest.raises(ValueError, match=r"CLNDAT_EN.txt: line 1: expected at least 7 tab-separated fields"):
        read_jsrt_clinical(root)
    (root / "CLNDAT_EN.txt").write_text("JPCLN001.IMG\t3\t?\t53\tmale\t1000\t700\n")
    with pytest.raises(ValueError, match=r"CLNDAT_EN.txt: line 1: nodule size / x / y must be numbers"):
        read_jsrt_clinical(root)
    (root / "CLNDAT_EN.txt").unlink()
    (root / "SCAN01.IMG").write_bytes(b"")
    with pytest.raises(ValueError, match=r"SCAN01.IMG: not a JSRT file name"):
        read_jsrt(root)
