"""Kermany et al. (2018) pediatric chest X-rays (Guangzhou), as published on Kaggle / Mendeley.

Layout ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. ``root`` may be the folder
holding ``chest_xray`` or ``chest_xray`` itself; the Kaggle archive's duplicate nested
``chest_xray/chest_xray`` copy is used only when the outer one has no split folders, and
``__MACOSX`` / dot files are skipped.

File names give the patient and, for pneumonia, the pathogen:

* ``person<N>_bacteria_<K>.jpeg`` / ``person<N>_virus_<K>.jpeg`` → patient ``person<N>``;
* ``IM-<NNNN>-<NNNN>[-<NNNN>].jpeg`` → ``IM-<NNNN>``; ``NORMAL2-IM-<NNNN>-<NNNN>...`` → ``NORMAL2-IM-<NNNN>``;
* Mendeley release names ``NORMAL-<N>-<K>``, ``BACTERIA-<N>-<K>``, ``VIRUS-<N>-<K>`` → ``<N>``.

Labels: Pneumonia 0/1 by folder; Bacterial / Viral Pneumonia from the name (0 for NORMAL);
COVID-19 0 (2018 data); No Finding = 1 - Pneumonia. Gate label = Pneumonia.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

from multichex.data.ref import SampleRef

log = logging.getLogger(__name__)

__all__ = ["SPLITS", "parse_kermany_name", "read_native_kermany"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
_CLASSES = {"NORMAL": 0.0, "PNEUMONIA": 1.0}
_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)
_MENDELEY = re.compile(r"^(NORMAL|BACTERIA|VIRUS)-(\d+)-\d+$", re.IGNORECASE)


def parse_kermany_name(path: Path) -> tuple[str, str]:
    """``(patient id, pathogen)`` from a Kermany file name; pathogen ``"bacteria"``, ``"virus"`` or ``""``.

    Raises:
        ValueError: the name matches none of the published patterns.
    """
    stem = path.stem
    if match := _PERSON.match(stem):
        return match.group(1), match.group(2).lower()
    if match := _IM.match(stem):
        return match.group(1), ""
    if match := _MENDELEY.match(stem):
        kind = match.group(1).lower()
        return match.group(2), "" if kind == "normal" else kind
    raise ValueError(
        f"{path}: unrecognised Kermany file name "
        "(expected personN_bacteria_K, personN_virus_K, IM-NNNN-NNNN, NORMAL2-IM-NNNN-NNNN)"
    )


def _data_root(root: Path) -> Path:
    """The folder whose children are the split folders."""
    root = Path(root)
    for candidate in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if any((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise ValueError(f"{root}: no chest_xray/{{train,val,test}} folders found")


def _labels(pneumonia: float, pathogen: str, path: Path) -> dict[str, float]:
    """Findings of one image; a NORMAL image named like a pneumonia case is an error."""
    if not pneumonia and pathogen:
        raise ValueError(f"{path}: a NORMAL image named as a {pathogen} pneumonia case")
    known = bool(pathogen) or not pneumonia
    return {
        "Pneumonia": pneumonia,
        "Bacterial Pneumonia": float(pathogen == "bacteria") if known else math.nan,
        "Viral Pneumonia": float(pathogen == "virus") if known else math.nan,
        "COVID-19": 0.0,
        "No Finding": 1.0 - pneumonia,
    }


def read_native_kermany(root: Path, splits: Sequence[str] = SPLITS, dataset: str = "kermany-pediatric") -> list[SampleRef]:
    """Read the Kermany ``chest_xray`` tree as published: the requested official splits (missing split folders are skipped with a log line).

    Patient ids are ``kermany:<id>``; ``extra`` holds ``official_split`` and ``pathogen``.

    Raises:
        ValueError: no split folder found, an unknown split requested, an unrecognised file name.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown Kermany split(s) {unknown}; known: {list(SPLITS)}")
    base = _data_root(root)
    refs = []
    for split in splits:
        if not (base / split).is_dir():
            log.info("%s: no %s split folder", base, split)
            continue
        for class_name, pneumonia in _CLASSES.items():
            folder = base / split / class_name
            if not folder.is_dir():
                log.info("%s: folder not found", folder)
                continue
            for image in sorted(folder.iterdir()):
                if image.name.startswith(".") or not image.is_file() or image.suffix.lower() not in _SUFFIXES:
                    continue
                patient, pathogen = parse_kermany_name(image)
                refs.append(
                    SampleRef(
                        image_path=image,
                        dataset=dataset,
                        patient_id=f"kermany:{patient}",
                        findings=_labels(pneumonia, pathogen, image),
                        positive=pneumonia,
                        extra={"official_split": split, "pathogen": pathogen},
                    )
                )
    return refs
