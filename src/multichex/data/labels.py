"""One named label vocabulary shared by every source (NaN = not labelled by that source)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CHEXPERT_EXTRA: tuple[str, ...] = ("Enlarged Cardiomediastinum", "Lung Lesion", "Fracture", "Support Devices", "Pleural Other")
CANONICAL_FINDINGS: tuple[str, ...] = NIH_FINDINGS + CHEXPERT_EXTRA + (
    "COVID-19", "Bacterial Pneumonia", "Viral Pneumonia", "Fungal Pneumonia", "Tuberculosis", "Lung Opacity", "No Finding",
)

# Source spellings → canonical name.
SYNONYMS: dict[str, str] = {
    "Infiltrate": "Infiltration",
    "No_Finding": "No Finding",
    "Pleural Thickening": "Pleural_Thickening",
    "COVID19": "COVID-19",
    "covid19": "COVID-19",
    "TB": "Tuberculosis",
    "Pleural Effusion": "Effusion",
    "Infiltrates": "Infiltration",
}


def canonical_name(name: str) -> str:
    """Map a source's label spelling to the canonical vocabulary."""
    return SYNONYMS.get(name.strip(), name.strip())


def relabel(findings: Mapping[str, float], class_names: Sequence[str]) -> torch.Tensor:
    """Vector over ``class_names``: the source's value where it labels that class, NaN elsewhere."""
    canonical = {canonical_name(k): float(v) for k, v in findings.items() if v is not None and not math.isnan(float(v))}
    return torch.tensor([canonical.get(name, math.nan) for name in class_names], dtype=torch.float32)
