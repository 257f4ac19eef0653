"""Shared fixtures: tiny synthetic chest X-ray folders in the real layouts read by ``multichex.data.sources``.

The generated data carries a deliberately clear signal so a tiny model can learn it in seconds:

* covid-chestxray style: two bright elliptical "lungs" on a dark noisy background, with their mask.
* NIH style: dimmer lungs; positive images (``Mass``) also carry a bright square exactly at their box.

Test modules cannot import this file (``--import-mode=importlib``), so the generators are exposed
through the ``cxr_factory`` fixture.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multichex.data.labels import NIH_FINDINGS

COVID_COLUMNS = [
    "image", "patientid", "hannover_patient_id", "finding", "covid19", "view", "license",
    "has_lung_mask", "width", "height",
]
NIH_COLUMNS = ["image", "patient_id", "view", *NIH_FINDINGS, "No_Finding"]
BOX_COLUMNS = ["image", "label", "x", "y", "w", "h"]


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _save_gray(path: Path, array: np.ndarray) -> None:
    """Float array in [0, 1] → 8-bit grayscale PNG."""
    Image.fromarray(np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8), mode="L").save(path)


def lung_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Two jittered ellipses (left and right lung) as a bool ``H×W`` array."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    mask = np.zeros((height, width), dtype=bool)
    cy = height * (0.5 + rng.uniform(-0.05, 0.05))
    ry = height * rng.uniform(0.26, 0.34)
    for side in (0.3, 0.7):
        cx = width * (side + rng.uniform(-0.04, 0.04))
        rx = width * rng.uniform(0.12, 0.16)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def chest_image(mask: np.ndarray, rng: np.random.Generator, lung_level: float) -> np.ndarray:
    """Dark noisy background with the lung region at ``lung_level`` (plus a little noise)."""
    image = 0.15 + rng.normal(0.0, 0.03, size=mask.shape)
    image[mask] = lung_level + rng.normal(0.0, 0.03, size=int(mask.sum()))
    return np.clip(image, 0.0, 1.0)


class CXRFactory:
    """Writes tiny data set folders in the layouts of the real sources."""

    def covid(
        self,
        root: Path,
        n_patients: int = 8,
        per_patient: int = 3,
        seed: int = 0,
        size: int | tuple[int, int] = 64,
        hannover_ids: list[str | None] | None = None,
        prefix: str = "c",
    ) -> Path:
        """covid-chestxray layout: ``images/``, ``masks/`` and ``labels.csv``.

        ``hannover_ids[i]`` (when given) is written as patient ``i``'s ``hannover_patient_id``.
        """
        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        height, width = (size, size) if isinstance(size, int) else size
        rng = np.random.default_rng(seed)
        rows = []
        for patient in range(n_patients):
            patient_id = f"{prefix}{seed}p{patient:03d}"
            hannover = hannover_ids[patient] if hannover_ids is not None else None
            covid = int(rng.random() < 0.5)
            for shot in range(per_patient):
                name = f"{patient_id}_{shot}.png"
                mask = lung_mask(height, width, rng)
                _save_gray(root / "images" / name, chest_image(mask, rng, lung_level=0.8))
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(root / "masks" / name)
                rows.append({
                    "image": name,
                    "patientid": patient_id,
                    "hannover_patient_id": hannover or "",
                    "finding": "COVID-19" if covid else "No Finding",
                    "covid19": covid,
                    "view": "PA",
                    "license": "CC0",
                    "has_lung_mask": 1,
                    "width": width,
                    "height": height,
                })
        _write_csv(root / "labels.csv", COVID_COLUMNS, rows)
        return root

    def nih(
        self,
        root: Path,
        n_patients: int = 8,
        per_patient: int = 3,
        seed: int = 0,
        size: int = 64,
        positive_fraction: float = 0.5,
        finding: str = "Mass",
        prefix: str = "n",
    ) -> Path:
        """NIH layout: ``images/``, ``labels.csv`` (14 findings + No_Finding) and ``boxes.csv``.

        Positive images (``finding`` = 1) have a bright square exactly where their box is.
        """
        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + 10_000)
        rows, boxes = [], []
        index = 0
        for patient in range(n_patients):
            patient_id = f"{prefix}{seed}p{patient:03d}"
            for shot in range(per_patient):
                positive = index % 2 == 0 if positive_fraction == 0.5 else rng.random() < positive_fraction
                index += 1
                name = f"{patient_id}_{shot}.png"
                image = chest_image(lung_mask(size, size, rng), rng, lung_level=0.45)
                if positive:
                    side = int(rng.integers(size // 6, size // 4 + 1))
                    x = int(rng.integers(size // 8, size - size // 8 - side))
                    y = int(rng.integers(size // 8, size - size // 8 - side))
                    image[y : y + side, x : x + side] = 1.0
                    boxes.append({"image": name, "label": finding, "x": x, "y": y, "w": side, "h": side})
                row = {"image": name, "patient_id": patient_id, "view": "PA"}
                row.update({f: 0 for f in NIH_FINDINGS})
                row[finding] = int(positive)
                row["No_Finding"] = int(not positive)
                rows.append(row)
                _save_gray(root / "images" / name, image)
        _write_csv(root / "labels.csv", NIH_COLUMNS, rows)
        _write_csv(root / "boxes.csv", BOX_COLUMNS, boxes)
        return root

    def hannover(self, root: Path, patient_ids: list[str], per_patient: int = 1, seed: int = 0, size: int = 32) -> Path:
        """Hannover layout: ``images/`` and ``labels.csv`` (image, patient_id, projection)."""
        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        rows = []
        for patient in patient_ids:
            for shot in range(per_patient):
                name = f"h{patient}_{shot}.png"
                _save_gray(root / "images" / name, chest_image(lung_mask(size, size, rng), rng, 0.8))
                rows.append({"image": name, "patient_id": patient, "projection": "PA"})
        _write_csv(root / "labels.csv", ["image", "patient_id", "projection"], rows)
        return root


@pytest.fixture(scope="session")
def cxr_factory() -> CXRFactory:
    return CXRFactory()


@pytest.fixture(scope="session")
def covid_root(tmp_path_factory, cxr_factory) -> Path:
    """Training folder, covid-chestxray layout (16 patients × 3 images)."""
    return cxr_factory.covid(tmp_path_factory.mktemp("covid-train"), n_patients=16, per_patient=3, seed=1)


@pytest.fixture(scope="session")
def nih_root(tmp_path_factory, cxr_factory) -> Path:
    """Training folder, NIH layout (16 patients × 3 images, half of them with a Mass square)."""
    return cxr_factory.nih(tmp_path_factory.mktemp("nih-train"), n_patients=16, per_patient=3, seed=1)


@pytest.fixture(scope="session")
def covid_test_root(tmp_path_factory, cxr_factory) -> Path:
    """Held-out folder (different seed, different patients)."""
    return cxr_factory.covid(tmp_path_factory.mktemp("covid-test"), n_patients=8, per_patient=2, seed=2, prefix="ct")


@pytest.fixture(scope="session")
def nih_test_root(tmp_path_factory, cxr_factory) -> Path:
    """Held-out folder (different seed, different patients)."""
    return cxr_factory.nih(tmp_path_factory.mktemp("nih-test"), n_patients=10, per_patient=2, seed=2, prefix="nt")


@pytest.fixture(scope="session")
def dicom_factory():
    """``tests/_dicom_factory.py`` imported by path (tests/ is not a package)."""
    if "_dicom_factory" in sys.modules:
        return sys.modules["_dicom_factory"]
    spec = importlib.util.spec_from_file_location("_dicom_factory", Path(__file__).resolve().parent / "_dicom_factory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_dicom_factory"] = module
    spec.loader.exec_module(module)
    return module
