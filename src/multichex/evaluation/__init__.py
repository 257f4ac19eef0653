"""Evaluation: metrics, patient-bootstrap confidence intervals, overlays and reports."""
