"""multichex: one multi-task network for chest X-rays (classification, segmentation, detection).

Research software. Not for clinical use.
"""

__version__ = "0.1.0"

CLINICAL_DISCLAIMER = "multichex is research software and is NOT for clinical use."
