"""Generate a corpus of bad (and awkward-but-valid) inputs for the reliability tests.

Nothing here is checked in as a binary: every file is written from code, so the corpus is small,
reviewable and reproducible. Run as a script to write it to a folder and print what it made::

    python tests/reliability/make_corpus.py /tmp/bad-corpus

Each :class:`Case` says what the package should do with it:

* ``"ok"``    – reads fine (single file) and is processed normally in batch modes;
* ``"error"`` – single-file use raises a clear ``ImageReadError`` / ``ValueError`` naming the file
  and the reason (for CSV cases: the label file is refused when it is read);
* ``"skip"``  – the file itself may parse, but the sample is unusable: batch modes (predict, data
  prepare, training data sets) skip it and log the reason (``errors.csv`` / ``failures``).

Case kinds: ``image`` (one image file), ``covid`` / ``siim`` / ``nih`` (one sample of the
corresponding folder layout, ``path`` is the image), ``csv`` (a label folder whose CSV is bad;
``path`` is the CSV, ``source`` says which reader reads its folder).
"""

from __future__ import annotations

import csv
import importlib.util
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from multichex.data.labels import NIH_FINDINGS

__all__ = ["Case", "make_corpus", "good_image", "load_dicom_factory"]

COVID_COLUMNS = [
    "image", "patientid", "hannover_patient_id", "finding", "covid19", "view", "license",
    "has_lung_mask", "width", "height",
]
NIH_COLUMNS = ["image", "patient_id", "view", *NIH_FINDINGS, "No_Finding"]
BOX_COLUMNS = ["image", "label", "x", "y", "w", "h"]
SIZE = 32  # side of every small valid image in the corpus


@dataclass(frozen=True)
class Case:
    """One corpus entry (see the module docstring for ``kind`` and ``expected``)."""

    name: str
    path: Path
    kind: str
    expected: str
    source: str = ""  # reader name for csv / folder cases
    note: str = ""


# --------------------------------------------------------------------------- helpers


def load_dicom_factory():
    """``tests/_dicom_factory.py`` imported by path (tests/ is not a package)."""
    if "_dicom_factory" in sys.modules:
        return sys.modules["_dicom_factory"]
    path = Path(__file__).resolve().parent.parent / "_dicom_factory.py"
    spec = importlib.util.spec_from_file_location("_dicom_factory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_dicom_factory"] = module
    spec.loader.exec_module(module)
    return module


def _gradient(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy * 7 + xx * 3) % 256).astype(np.uint8)


def good_image(path: Path, height: int = SIZE, width: int = SIZE) -> Path:
    """A valid 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_gradient(height, width), mode="L").save(path)
    return path


def _png_bytes(height: int = SIZE, width: int = SIZE) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(_gradient(height, width), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A tiny PNG whose (CRC-correct) header declares ``side``×``side`` 8-bit grayscale pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1))  # one filtered row; the rest is "missing"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _write_csv(path: Path, columns: list[str], rows: list[dict], *, raw_lines: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        for line in raw_lines or []:
            handle.write(line + "\r\n")
    return path


def _covid_row(name: str, patient: str, has_mask: int = 0) -> dict:
    return {
        "image": name, "patientid": patient, "hannover_patient_id": "", "finding": "COVID-19",
        "covid19": 1, "view": "PA", "license": "CC0", "has_lung_mask": has_mask, "width": SIZE, "height": SIZE,
    }


def _nih_row(name: str, patient: str, finding: str = "Mass") -> dict:
    row = {"image": name, "patient_id": patient, "view": "PA", **{f: 0 for f in NIH_FINDINGS}, "No_Finding": 0}
    row[finding] = 1
    return row


# --------------------------------------------------------------------------- image cases


def _image_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    dicom = load_dicom_factory()
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    cases: list[Case] = []

    def add(name: str, path: Path, expected: str, note: str) -> None:
        cases.append(Case(name, path, "image", expected, note=note))

    path = folder / "zero_byte.png"
    path.write_bytes(b"")
    add("zero-byte PNG", path, "error", "empty file")

    png = _png_bytes(64, 64)
    path = folder / "truncated.png"
    path.write_bytes(png[: len(png) // 2])
    add("truncated PNG", path, "error", "cut in the middle of the IDAT data")

    jpeg = _jpeg_bytes()
    path = folder / "truncated.jpg"
    path.write_bytes(jpeg[: len(jpeg) // 2])
    add("truncated JPEG", path, "error", "cut in the middle of the entropy-coded data")

    path = folder / "text_named.png"
    path.write_text("this is not an image, just text with a .png name\n" * 4)
    add("text file named .png", path, "error", "not a recognised image format")

    rgba = np.dstack([_gradient(), _gradient()[::-1], _gradient().T, np.full((SIZE, SIZE), 128, np.uint8)])
    path = folder / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    add("RGBA PNG", path, "ok", "alpha dropped, luminance")

    path = folder / "palette.png"
    Image.fromarray(rgba[..., :3], mode="RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    add("palette PNG", path, "ok", "expanded to luminance")

    path = folder / "sixteen_bit.png"
    Image.fromarray(_gradient().astype(np.uint16) * 257).save(path)
    add("16-bit PNG", path, "ok", "min-max scaled")

    path = folder / "one_pixel.png"
    Image.fromarray(np.array([[200]], np.uint8), mode="L").save(path)
    add("1x1 PNG", path, "ok", "constant image becomes zeros")

    path = folder / "one_row.png"
    Image.fromarray(_gradient(1, 50), mode="L").save(path)
    add("1-row PNG", path, "ok", "1x50 pixels")

    add("decompression bomb PNG", bomb_png(folder / "bomb.png"), "error", "header declares 30000x30000")

    pixels = (_gradient().astype(np.uint16) * 16)
    add("DICOM without pixel data", dicom.make_dicom(folder / "no_pixels.dcm", pixels, with_pixels=False),
        "error", "no PixelData element")
    add("DICOM JPEG-LS junk", dicom.make_dicom(folder / "jpegls_junk.dcm", pixels, transfer_syntax=JPEGLSLossless),
        "error", "encapsulated junk under JPEG-LS Lossless")
    add("DICOM JPEG 2000 junk", dicom.make_dicom(folder / "j2k_junk.dcm", pixels, transfer_syntax=JPEG2000Lossless),
        "error", "encapsulated junk under JPEG 2000 Lossless")
    add("DICOM MONOCHROME1", dicom.make_dicom(folder / "monochrome1.dcm", pixels, monochrome1=True),
        "ok", "inverted so bone is bright")
    add("DICOM rescale overflow", dicom.make_dicom(folder / "inf_rescale.dcm", pixels, slope=1e306),
        "error", "RescaleSlope=1e306 overflows float64 to inf")
    return cases


# --------------------------------------------------------------------------- folder layouts


def _covid_folder(root: Path) -> list[Case]:
    """covid-chestxray layout with two good samples, three unreadable images and a wrong-size mask."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows, cases = [], []
    for i in range(2):
        name = f"good{i}.png"
        good_image(root / "images" / name)
        good_image(root / "masks" / name)
        rows.append(_covid_row(name, f"p{i}", has_mask=1))
        cases.append(Case(f"covid good sample {i}", root / "images" / name, "covid", "ok", "covid-chestxray"))
    (root / "images" / "zero.png").write_bytes(b"")
    png = _png_bytes()
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "text.png").write_text("not an image\n")
    for name, note in (("zero.png", "empty image file"), ("truncated.png", "truncated image"),
                       ("text.png", "text named .png")):
        rows.append(_covid_row(name, "pbad"))
        cases.append(Case(f"covid {note}", root / "images" / name, "covid", "skip", "covid-chestxray", note))
    good_image(root / "images" / "wrong_mask.png")
    good_image(root / "masks" / "wrong_mask.png", SIZE // 2, SIZE + 3)
    rows.append(_covid_row("wrong_mask.png", "pmask", has_mask=1))
    cases.append(Case("covid mask size differs from image", root / "images" / "wrong_mask.png", "covid", "skip",
                      "covid-chestxray", f"mask {SIZE // 2}x{SIZE + 3}, image {SIZE}x{SIZE}"))
    _write_csv(root / "labels.csv", COVID_COLUMNS, rows)
    return cases


def _siim_folder(root: Path) -> list[Case]:
    """SIIM-ACR layout: 16×16 DICOMs, one with an empty mask, one valid run, one run that overruns."""
    dicom = load_dicom_factory()
    side = 16
    images = root / "dicom-images-train" / "1.2.3" / "1.2.3.4"
    images.mkdir(parents=True, exist_ok=True)
    codes = {"siim_empty": "-1", "siim_valid": "20 5 10 6", "siim_overrun": f"200 {side * side}"}
    cases = []
    for image_id, code in codes.items():
        path = dicom.make_dicom(images / f"{image_id}.dcm", (_gradient(side, side).astype(np.uint16) * 8))
        expected = "skip" if image_id == "siim_overrun" else "ok"
        cases.append(Case(f"SIIM RLE {image_id.split('_')[1]}", path, "siim", expected, "siim-acr-pneumothorax",
                          f"EncodedPixels {code!r} on a {side}x{side} image"))
    with (root / "train-rle.csv").open("w", newline="", encoding="utf-8") as handle:
        handle.write("ImageId, EncodedPixels\n")
        for image_id, code in codes.items():
            handle.write(f"{image_id}, {code}\n")
    return cases


def _nih_folder(root: Path) -> list[Case]:
    """NIH layout with one good box, an unknown box label, a negative-size box and a box outside the image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    boxes = {
        "box_good.png": ("Mass", 4, 4, 10, 10, "ok", "valid box"),
        "box_unknown_label.png": ("Dragon", 4, 4, 10, 10, "ok", "unknown label: box ignored, sample kept"),
        "box_negative.png": ("Mass", 10, 10, -5, 8, "skip", "w < 0"),
        "box_outside.png": ("Mass", SIZE + 50, SIZE + 50, 10, 10, "skip", "box entirely right/below the image"),
    }
    rows, box_rows, cases = [], [], []
    for i, (name, (label, x, y, w, h, expected, note)) in enumerate(boxes.items()):
        good_image(root / "images" / name)
        rows.append(_nih_row(name, f"n{i}"))
        box_rows.append({"image": name, "label": label, "x": x, "y": y, "w": w, "h": h})
        cases.append(Case(f"NIH {note}", root / "images" / name, "nih", expected, "nih-cxr14-bbox", note))
    _write_csv(root / "labels.csv", NIH_COLUMNS, rows)
    _write_csv(root / "boxes.csv", BOX_COLUMNS, box_rows)
    return cases


def _csv_cases(root: Path) -> list[Case]:
    """Label folders whose CSV is malformed; each is refused when its folder is read."""
    cases = []

    def nih_folder(name: str) -> Path:
        folder = root / name
        good_image(folder / "images" / "a.png")
        _write_csv(folder / "labels.csv", NIH_COLUMNS, [_nih_row("a.png", "n0")])
        return folder

    folder = root / "covid_missing_image_column"
    good_image(folder / "images" / "a.png")
    columns = [c for c in COVID_COLUMNS if c != "image"]
    _write_csv(folder / "labels.csv", columns, [{k: v for k, v in _covid_row("a.png", "p0").items() if k != "image"}])
    cases.append(Case("covid labels.csv without 'image' column", folder / "labels.csv", "csv", "error",
                      "covid-chestxray", "missing required column"))

    folder = root / "nih_missing_patient_column"
    good_image(folder / "images" / "a.png")
    columns = [c for c in NIH_COLUMNS if c != "patient_id"]
    _write_csv(folder / "labels.csv", columns, [{k: v for k, v in _nih_row("a.png", "n0").items() if k != "patient_id"}])
    cases.append(Case("NIH labels.csv without 'patient_id' column", folder / "labels.csv", "csv", "error",
                      "nih-cxr14-bbox", "missing required column"))

    folder = nih_folder("boxes_missing_h_column")
    _write_csv(folder / "boxes.csv", ["image", "label", "x", "y", "w"],
               [{"image": "a.png", "label": "Mass", "x": 1, "y": 1, "w": 4}])
    cases.append(Case("boxes.csv without 'h' column", folder / "boxes.csv", "csv", "error", "nih-cxr14-bbox",
                      "missing box column"))

    folder = nih_folder("boxes_missing_image_column")
    _write_csv(folder / "boxes.csv", ["label", "x", "y", "w", "h"],
               [{"label": "Mass", "x": 1, "y": 1, "w": 4, "h": 4}])
    cases.append(Case("boxes.csv without 'image' column", folder / "boxes.csv", "csv", "error", "nih-cxr14-bbox",
                      "missing box column"))

    folder = nih_folder("boxes_non_numeric")
    _write_csv(folder / "boxes.csv", BOX_COLUMNS, [{"image": "a.png", "label": "Mass", "x": "left", "y": 1, "w": 4, "h": 4}])
    cases.append(Case("boxes.csv with non-numeric x", folder / "boxes.csv", "csv", "error", "nih-cxr14-bbox",
                      "malformed box row"))

    folder = nih_folder("boxes_short_row")
    _write_csv(folder / "boxes.csv", BOX_COLUMNS, [], raw_lines=["a.png,Mass,1,1"])
    cases.append(Case("boxes.csv row with too few cells", folder / "boxes.csv", "csv", "error", "nih-cxr14-bbox",
                      "malformed box row (w, h missing)"))

    folder = root / "siim_missing_column"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-rle.csv").write_text("ImageId\nx1\n", encoding="utf-8")
    cases.append(Case("SIIM train-rle.csv without EncodedPixels", folder / "train-rle.csv", "csv", "error",
                      "siim-acr-pneumothorax", "missing required column"))

    folder = root / "siim_odd_code"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-rle.csv").write_text("ImageId, EncodedPixels\nx1, -1\nx2, 5 6 7\n", encoding="utf-8")
    cases.append(Case("SIIM train-rle.csv odd-length RLE", folder / "train-rle.csv", "csv", "error",
                      "siim-acr-pneumothorax", "malformed RLE (row 3)"))
    return cases


# --------------------------------------------------------------------------- entry points


def make_corpus(root: Path) -> list[Case]:
    """Write the whole corpus under ``root`` and return its cases (``root/good.png`` is a valid image)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good_image(root / "good.png")
    cases = _image_cases(root / "images")
    cases += _covid_folder(root / "covid")
    cases += _siim_folder(root / "siim")
    cases += _nih_folder(root / "nih")
    cases += _csv_cases(root / "csv")
    return cases


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: make_corpus.py OUTPUT_FOLDER", file=sys.stderr)
        return 2
    cases = make_corpus(Path(args[0]))
    for case in cases:
        print(f"{case.expected:5}  {case.kind:6}  {case.name:45}  {case.path}")
    print(f"{len(cases)} cases written under {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
