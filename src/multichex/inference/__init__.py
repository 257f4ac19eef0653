"""Inference: gated prediction on image files and the per-image output contract."""
