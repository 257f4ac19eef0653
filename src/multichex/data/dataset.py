"""The torch data set: :class:`CXRDataset` turns :class:`SampleRef` into letterboxed, optionally augmented :class:`CXRSample`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from multichex.data.geometry import boxes_from_mask, validate_boxes, xywh_to_xyxy
from multichex.data.io import ImageReadError, read_image
from multichex.data.labels import canonical_name, relabel
from multichex.data.record import CXRSample
from multichex.data.ref import SampleRef, read_mask
from multichex.data.transforms import (
    AugmentConfig,
    JointAugment,
    Letterbox,
    degrade_resolution,
    normalize_intensity,
)

__all__ = ["CXRDataset"]

log = logging.getLogger(__name__)


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
