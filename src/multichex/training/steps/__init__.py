"""Single training steps: the masked multi-task step, its teacher-forced forward and the few-label hooks."""

from multichex.training.steps.few_labels import FewLabelHooks
from multichex.training.steps.forced import forced_forward, gate_decision
from multichex.training.steps.ranks import LOSS_KEYS, StepForward
from multichex.training.steps.standard import TrainingStep

__all__ = ["LOSS_KEYS", "FewLabelHooks", "StepForward", "TrainingStep", "forced_forward", "gate_decision"]
