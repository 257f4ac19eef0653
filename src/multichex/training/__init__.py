"""Training: run configs (YAML), data splits, the multi-task loop, checkpoints and resume."""
