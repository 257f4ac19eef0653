"""Readers for the chest X-ray folders shipped with the package and in ``shared/data``.

Each reader turns one folder layout into a list of :class:`SampleRef` — where the image is and
which labels that data set really has. :class:`CXRDataset` turns refs into :class:`CXRSample`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from multichex.data.geometry import boxes_from_mask, validate_boxes, xywh_to_xyxy
from multichex.data.io import ImageReadError, read_image
from multichex.data.labels import NIH_FINDINGS, canonical_name, relabel
from multichex.data.record import CXRSample
from multichex.data.rle import merge_rle
from multichex.data.transforms import AugmentConfig, JointAugment, Letterbox, degrade_resolution, normalize_intensity

log = logging.getLogger(__name__)


@dataclass
class SampleRef:
    """Where one image lives and the labels its data set gives it (absent task = None / missing key)."""

    image_path: Path
    dataset: str
    patient_id: str
    findings: dict[str, float] = field(default_factory=dict)
    positive: float = math.nan
    mask_path: Path | list[Path] | None = None  # several paths are merged (e.g. left + right lung)
    mask_rle: list[str] | None = None  # SIIM-style column-major relative RLE rows, merged; ["-1"] = empty mask
    boxes_xywh: list[tuple[float, float, float, float]] | None = None
    box_names: list[str] | None = None
    mask_box_label: str | None = None
    resample_to: int | None = None  # degrade the image to this longest side before use (see SourceConfig)
    extra: dict[str, Any] = field(default_factory=dict)


def _read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file; a missing file or column is a ValueError naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: label file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if None in row or any(row.get(c) is None for c in required):
            raise ValueError(f"{path}: row {number}: wrong number of cells")
    return rows


def _read_boxes(path: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """``image,label,x,y,w,h`` rows grouped by image."""
    grouped: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {}
    if not path.exists():
        return grouped
    for number, row in enumerate(_read_csv(path, ("image", "label", "x", "y", "w", "h")), start=2):
        try:
            box = (float(row["x"]), float(row["y"]), float(row["w"]), float(row["h"]))
        except ValueError as error:
            raise ValueError(f"{path}: row {number}: bad box {row}: {error}") from error
        grouped.setdefault(row["image"], []).append((canonical_name(row["label"]), box))
    return grouped


def _flag(value: str | None) -> float:
    """CSV cell → 0/1 float, NaN when blank."""
    if value is None or value.strip() == "":
        return math.nan
    return float(value)


def read_nih(root: Path, dataset: str = "nih-cxr14") -> list[SampleRef]:
    """NIH ChestX-ray14 sample folders: ``labels.csv`` with 14 0/1 finding columns, optional ``boxes.csv``.

    Box annotations are not exhaustive, so images without a box row have ``boxes_xywh=None`` (unknown).
    NIH images predate COVID-19, so that label is a known 0.
    """
    boxes = _read_boxes(root / "boxes.csv")
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patient_id", *NIH_FINDINGS, "No_Finding")):
        findings = {name: _flag(row.get(name)) for name in NIH_FINDINGS}
        findings["No Finding"] = _flag(row.get("No_Finding"))
        findings["COVID-19"] = 0.0
        image_boxes = boxes.get(row["image"])
        refs.append(
            SampleRef(
                image_path=root / "images" / row["image"],
                dataset=dataset,
                patient_id=f"nih:{row['patient_id']}",
                findings=findings,
                positive=1.0 - findings["No Finding"],
                boxes_xywh=[b for _, b in image_boxes] if image_boxes else None,
                box_names=[n for n, _ in image_boxes] if image_boxes else None,
                extra={"view": row.get("view", "")},
            )
        )
    return refs


def read_covid_chestxray(root: Path, dataset: str = "covid-chestxray") -> list[SampleRef]:
    """COVID-19 image data collection subset: lung masks, COVID-19 flag, Hannover patient ids for joint splits.

    Patient ids: the Hannover id where the image is also in the Hannover repository (so both folders
    split jointly), else ``split_group`` (the non-commercial folder's grouping), else the collection id.
    """
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patientid")):
        hannover = (row.get("hannover_patient_id") or "").strip()
        group = (row.get("split_group") or "").strip()
        if hannover:
            patient = f"hannover:{hannover}"
        elif group:
            patient = f"cohen:{group}"
        else:
            patient = f"cohen:{row['patientid']}"
        covid = _flag(row.get("covid19"))
        finding = (row.get("finding") or "").strip()
        mask_path = root / "masks" / row["image"]
        has_mask = (row.get("has_lung_mask") or "0").strip() == "1" and mask_path.exists()
        refs.append(
            SampleRef(
                image_path=root / "images" / row["image"],
                dataset=dataset,
                patient_id=patient,
                findings={"COVID-19": covid, "No Finding": float(finding == "No Finding") if finding else math.nan},
                positive=float(finding != "No Finding") if finding else math.nan,
                mask_path=mask_path if has_mask else None,
                extra={"view": row.get("view", "")},
            )
        )
    return refs


def read_hannover(root: Path) -> list[SampleRef]:
    """Hannover COVID-19 image repository: every patient is a COVID-19 case."""
    return [
        SampleRef(
            image_path=root / "images" / row["image"],
            dataset="hannover-covid19",
            patient_id=f"hannover:{row['patient_id']}",
            findings={"COVID-19": 1.0, "No Finding": 0.0},
            positive=1.0,
            extra={"view": row.get("projection", "")},
        )
        for row in _read_csv(root / "labels.csv", ("image", "patient_id"))
    ]


def read_kermany(root: Path) -> list[SampleRef]:
    """Kermany pediatric set: NORMAL / PNEUMONIA (2018 data, so COVID-19 is a known 0)."""
    refs = []
    for row in _read_csv(root / "labels.csv", ("image", "patient_id", "pneumonia")):
        pneumonia = _flag(row.get("pneumonia"))
        refs.append(
            SampleRef(
                image_path=root / "images" / row["image"],
                dataset="kermany-pediatric",
                patient_id=f"kermany:{row['patient_id']}",
                findings={"Pneumonia": pneumonia, "COVID-19": 0.0, "No Finding": 1.0 - pneumonia},
                positive=pneumonia,
                extra={"pathogen": row.get("pathogen", "")},
            )
        )
    return refs


def read_mask(ref: SampleRef, height: int, width: int) -> np.ndarray | None:
    """The ref's mask as an ``height×width`` bool array (union of files or RLE rows), or None if it has none."""
    if ref.mask_rle is not None:
        try:
            return merge_rle(ref.mask_rle, height, width)
        except ValueError as error:
            raise ImageReadError(ref.image_path, f"bad run-length mask: {error}") from error
    if ref.mask_path is None:
        return None
    paths = ref.mask_path if isinstance(ref.mask_path, list) else [ref.mask_path]
    merged = np.zeros((height, width), dtype=bool)
    for path in paths:
        array = read_image(path).array
        if array.shape != (height, width):
            raise ImageReadError(path, f"mask size {array.shape} differs from image size {(height, width)}")
        merged |= array > 0.5
    return merged


READERS: dict[str, Callable[[Path], list[SampleRef]]] = {
    "nih-cxr14-bbox": lambda root: read_nih(root, "nih-cxr14-bbox"),
    "nih-cxr14-sample": lambda root: read_nih(root, "nih-cxr14-sample"),
    "covid-chestxray": read_covid_chestxray,
    "covid-chestxray-nc": lambda root: read_covid_chestxray(root, "covid-chestxray-nc"),
    "hannover-covid19": read_hannover,
    "kermany-pediatric": read_kermany,
}


def bundled_sample_root() -> Path:
    """Folder of the small permissively licensed sample shipped inside the package."""
    return Path(str(resources.files("multichex") / "sample_data"))


class CXRDataset(Dataset):
    """Turns :class:`SampleRef` into letterboxed, optionally augmented :class:`CXRSample`.

    Unreadable images are logged and yield ``None`` (dropped by the collate function) so one bad
    file never stops a run. With ``cache=True`` the letterboxed images are kept in memory as uint8.
    """

    def __init__(
        self,
        refs: Sequence[SampleRef],
        class_names: Sequence[str],
        box_classes: Sequence[str],
        image_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.refs = list(refs)
        self.class_names = list(class_names)
        self.box_classes = list(box_classes)
        self.image_size = image_size
        self.augment = JointAugment(augment) if augment is not None and augment.enabled else None
        self.seed = seed
        self.epoch = 0
        self.cache: dict[int, tuple] | None = {} if cache else None
        self.failures: dict[str, str] = {}
        self._warn_unknown_box_classes()

    def __len__(self) -> int:
        return len(self.refs)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index): reproducible and resumable."""
        self.epoch = epoch

    def _load(self, index: int) -> tuple:
        ref = self.refs[index]
        loaded = read_image(ref.image_path)
        height, width = loaded.array.shape
        box = Letterbox.fit(height, width, self.image_size)
        array = normalize_intensity(loaded.array)
        if ref.resample_to:
            array = degrade_resolution(array, ref.resample_to)
        image = box.apply_image(torch.from_numpy(array)[None])
        mask = None
        mask_array = read_mask(ref, height, width)
        if mask_array is not None:
            mask = (box.apply_image(torch.from_numpy(mask_array).float()[None]) > 0.5).to(torch.uint8)
        boxes = names = None
        if ref.boxes_xywh is not None:
            raw = xywh_to_xyxy(torch.tensor(ref.boxes_xywh, dtype=torch.float32).reshape(-1, 4))
            names = [canonical_name(n) for n in (ref.box_names or [])]
            if len(names) != len(raw):
                raise ValueError(f"{ref.image_path}: {len(raw)} boxes but {len(names)} box labels")
            raw, inside = validate_boxes(raw, height, width, str(ref.image_path))
            names = [n for n, kept in zip(names, inside.tolist()) if kept]
            boxes = box.apply_boxes(raw)
        boxes, labels = self._box_targets(boxes, names, mask, ref)
        return (image * 255).round().to(torch.uint8), mask, boxes, labels, box, (height, width)

    def _annotated_box_names(self) -> list[list[str] | None]:
        """Per item, the class names of its box annotation (None: the item is not box-annotated)."""
        return [(ref.box_names or []) if ref.boxes_xywh is not None else None for ref in self.refs]

    def _unknown_box_classes(self, names: Sequence[str]) -> set[str]:
        """The canonical names among ``names`` that are not box classes of this data set."""
        return {canonical_name(n) for n in names} - set(self.box_classes)

    def _warn_unknown_box_classes(self) -> None:
        """One warning per data set counting the box-annotated items that have boxes of other classes.

        Such an item's box annotation is incomplete for this model (a lesion it shows would otherwise be
        taught as "no lesion"), so :meth:`_box_targets` treats it as not box-annotated.
        """
        annotated = affected = 0
        classes: Counter[str] = Counter()
        for names in self._annotated_box_names():
            if names is None:
                continue
            annotated += 1
            unknown = self._unknown_box_classes(names)
            if unknown:
                affected += 1
                classes.update(unknown)
        if affected:
            log.warning(
                "data set %s: %d of %d box-annotated images have boxes of classes that are not among the box classes %s "
                "(images per class: %s); their box annotation is treated as unknown (boxes=None), not as "
                "'no lesion' (add those classes to box_classes to train on them)",
                ", ".join(sorted({ref.dataset for ref in self.refs})), affected, annotated, self.box_classes,
                dict(sorted(classes.items())),
            )

    def _box_targets(
        self, boxes: torch.Tensor | None, names: list[str] | None, mask: torch.Tensor | None, ref: SampleRef
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Boxes (letterbox pixels, canonical ``names``) with their indices into this data set's box
        classes; without annotated boxes, boxes fitted to the mask when the ref asks for them.

        An annotation with a box of a class outside the box classes is incomplete for this model:
        dropping that box would make the image "annotated, no lesion" there, so the whole annotation
        is returned as unknown (None). An explicitly empty annotation stays "no lesion".
        """
        if boxes is not None:
            names = list(names or [])
            if len(names) != len(boxes):
                raise ValueError(f"{ref.image_path}: {len(boxes)} boxes but {len(names)} box labels")
            if self._unknown_box_classes(names):
                return None, None
            labels = torch.tensor([self.box_classes.index(n) for n in names], dtype=torch.long)
            return (boxes if len(names) else torch.zeros(0, 4)), labels
        if mask is not None and ref.mask_box_label is not None:
            return self._mask_boxes(mask, ref)
        return None, None

    def _mask_boxes(self, mask: torch.Tensor, ref: SampleRef) -> tuple[torch.Tensor, torch.Tensor]:
        """Detection targets fitted to the mask's connected components (joint training, eq. 8)."""
        if ref.mask_box_label not in self.box_classes:
            raise ValueError(f"{ref.image_path}: mask box label {ref.mask_box_label!r} is not among the box classes {self.box_classes}")
        min_area = max(4, (self.image_size // 64) ** 2 * 4)
        boxes = boxes_from_mask(mask, min_area=min_area)
        return boxes, torch.full((len(boxes),), self.box_classes.index(ref.mask_box_label), dtype=torch.long)

    def __getitem__(self, index: int) -> CXRSample | None:
        ref = self.refs[index]
        try:
            if self.cache is not None and index in self.cache:
                loaded = self.cache[index]
            else:
                loaded = self._load(index)
                if self.cache is not None:
                    self.cache[index] = loaded
        except (ImageReadError, ValueError) as error:
            if str(ref.image_path) not in self.failures:
                log.warning("skipping unreadable sample: %s", error)
            self.failures[str(ref.image_path)] = str(error)
            return None
        image_u8, mask, boxes, box_labels, letterbox, (height, width) = loaded
        image = image_u8.float() / 255.0
        mask = mask.float() if mask is not None else None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask, boxes, box_labels = self.augment(image, mask, boxes, box_labels, rng)
        return CXRSample(
            image=image,
            labels=relabel(ref.findings, self.class_names),
            positive=ref.positive,
            mask=mask,
            boxes=boxes,
            box_labels=box_labels,
            meta={
                "dataset": ref.dataset,
                "patient_id": ref.patient_id,
                "path": str(ref.image_path),
                "letterbox": letterbox.to_dict(),
                "original_size": (height, width),
                **ref.extra,
            },
        )
