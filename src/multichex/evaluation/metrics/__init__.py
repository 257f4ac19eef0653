"""Evaluation metrics for the three heads: multi-label classification, segmentation, detection.

The functions return plain Python floats / ints / ``None`` so results can go straight into JSON; the
cumulative metric objects (:mod:`~multichex.evaluation.metrics.cumulative`) buffer them batch by batch.
"""

from multichex.evaluation.metrics.classification import EXTENDED_KEYS, classification_metrics, macro_class_sets
from multichex.evaluation.metrics.cumulative import (
    ClassificationMetric,
    CumulativeMetric,
    DetectionMetric,
    SegmentationMetric,
    macro_bootstrap,
)
from multichex.evaluation.metrics.detection import detection_map
from multichex.evaluation.metrics.segmentation import (
    average_hausdorff_per_image,
    dice_per_image,
    hausdorff95_per_image,
    jaccard_per_image,
    segmentation_scores,
    ssim_per_image,
)

__all__ = [
    "classification_metrics",
    "dice_per_image",
    "detection_map",
    "average_hausdorff_per_image",
    "hausdorff95_per_image",
    "jaccard_per_image",
    "macro_class_sets",
    "segmentation_scores",
    "ssim_per_image",
    "EXTENDED_KEYS",
    "ClassificationMetric",
    "CumulativeMetric",
    "DetectionMetric",
    "SegmentationMetric",
    "macro_bootstrap",
]
