"""Binary segmentation losses (Dice, Tversky, KL+Tversky, BCE+Tversky), deep supervision and a
labelled/unlabelled consistency term.

Every loss takes logits ``B×1×H×W`` and float targets of the same shape in [0, 1] (soft targets
allowed) and averages over the images it is given: the caller selects the images that have a mask
(at least one). Losses are chosen by name with :func:`make_segmentation_loss`.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, TverskyLoss

from multichex.losses.masked import segmentation_loss

__all__ = [
    "KL_REDUCTIONS",
    "SEGMENTATION_LOSSES",
    "bce_dice_loss",
    "consistency_kl",
    "deep_supervision_loss",
    "dice_loss",
    "kl_abs_loss",
    "kl_tversky_loss",
    "make_segmentation_loss",
    "tversky_loss",
    "xe_tversky_loss",
]

SegmentationLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_dice = DiceLoss(sigmoid=True, reduction="mean")


@functools.lru_cache(maxsize=32)
def _tversky(alpha: float, beta: float) -> TverskyLoss:
    """One MONAI Tversky module per (alpha, beta) (they hold no state besides the settings)."""
    return TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, reduction="mean")


def _check_shapes(logits: torch.Tensor, masks: torch.Tensor) -> None:
    if logits.shape != masks.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ in shape")
    if logits.shape[0] == 0:
        raise ValueError("segmentation losses need at least one image")


def dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MONAI soft Dice loss on ``sigmoid(logits)``, per image, averaged."""
    _check_shapes(logits, masks)
    return _dice(logits, masks)


def bce_dice_loss(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Pixel BCE + ``dice_weight`` × soft Dice: the existing :func:`segmentation_loss` on all given images."""
    _check_shapes(logits, masks)
    loss = segmentation_loss(logits, masks, torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), dice_weight)
    assert loss is not None  # every image has a mask here
    return loss


def tversky_loss(logits: torch.Tensor, masks: torch.Tensor, alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
    """MONAI Tversky loss ``1 - TP / (TP + alpha·FP + beta·FN)`` on ``sigmoid(logits)``, per image, averaged.

    In MONAI's convention ``alpha`` weighs false positives and ``beta`` false negatives, so the
    default ``beta > alpha`` penalises missed foreground more than spurious foreground.
    """
    _check_shapes(logits, masks)
    return _tversky(float(alpha), float(beta))(logits, masks)


KL_REDUCTIONS = ("sum", "mean")


def kl_abs_loss(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6, reduction: str = "sum") -> torch.Tensor:
    """"Absolute KL" term of Imran & Terzopoulos 2019 (APPAU-Net, eq. 3).

    Per pixel ``|(y - p) · log((y + eps) / (p + eps))|`` over the foreground channel (``p = sigmoid``,
    ``y = mask``) plus the same over the background channel (``1 - p``, ``1 - y``); 0 when ``p == y``.
    ``reduction="sum"`` (the paper's Σ over the m² pixels) sums the pixels of each image, ``"mean"``
    averages them; either way the images are averaged.

    ``eps`` is not in the paper's formula, but on a hard mask ``log(y / p)`` is infinite wherever the
    prediction is wrong, so it sets the term's scale: a wrong pixel costs about ``|y - p| · log(1 / eps)``
    (≈ 13.8·|y − p| at 1e-6), which makes ``eps`` a weight of the KL term against the Tversky term.
    Hand-written: no library offers this term.
    """
    _check_shapes(logits, masks)
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if not eps > 0:
        raise ValueError(f"kl_eps must be > 0, got {eps}")
    fg = torch.sigmoid(logits)
    bg = torch.sigmoid(-logits)  # 1 - p without cancellation for large logits
    y = masks.to(fg.dtype)
    term_fg = ((y - fg) * torch.log((y + eps) / (fg + eps))).abs()
    term_bg = (((1 - y) - bg) * torch.log((1 - y + eps) / (bg + eps))).abs()
    per_pixel = (term_fg + term_bg).flatten(1)
    per_image = per_pixel.sum(dim=1) if reduction == "sum" else per_pixel.mean(dim=1)
    return per_image.mean()


def kl_tversky_loss(
    logits: torch.Tensor, masks: torch.Tensor, a: float = 1.0, b: float = 1.0, alpha: float = 0.3, beta: float = 0.7,
    kl_eps: float = 1e-6, kl_reduction: str = "sum",
) -> torch.Tensor:
    """"KLTV": ``a`` × :func:`kl_abs_loss` (with ``kl_eps``, ``kl_reduction``) + ``b`` × :func:`tversky_loss`
    (alpha: FP weight, beta: FN weight)."""
    return a * kl_abs_loss(logits, masks, kl_eps, kl_reduction) + b * tversky_loss(logits, masks, alpha, beta)


def xe_tversky_loss(logits: torch.Tensor, masks: torch.Tensor, alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
    """"XETV": pixel BCE + :func:`tversky_loss` (alpha: FP weight, beta: FN weight)."""
    _check_shapes(logits, masks)
    return F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype)) + tversky_loss(logits, masks, alpha, beta)


SEGMENTATION_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "bce_dice": bce_dice_loss,
    "dice": dice_loss,
    "tversky": tversky_loss,
    "xe_tversky": xe_tversky_loss,
    "kl_tversky": kl_tversky_loss,
}


def _parameters(fn: Callable[..., torch.Tensor]) -> list[str]:
    """Names of a loss's tuning parameters (everything after ``logits, masks``)."""
    return list(inspect.signature(fn).parameters)[2:]


# Parameters that take one of a few names instead of a number.
_CHOICE_PARAMETERS: dict[str, tuple[str, ...]] = {"kl_reduction": KL_REDUCTIONS}
# Numeric parameters that must be strictly positive.
_POSITIVE_PARAMETERS = frozenset({"kl_eps"})


def make_segmentation_loss(name: str, **params: float | str) -> SegmentationLoss:
    """The loss called ``name`` (see ``SEGMENTATION_LOSSES``) with its ``params`` fixed (numbers, except
    ``kl_reduction``: ``"sum"`` or ``"mean"``).

    Raises:
        ValueError: unknown name, unknown parameter or a parameter value of the wrong kind or range.
    """
    if name not in SEGMENTATION_LOSSES:
        raise ValueError(f"unknown segmentation loss {name!r}; choose one of {sorted(SEGMENTATION_LOSSES)}")
    fn = SEGMENTATION_LOSSES[name]
    allowed = _parameters(fn)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"segmentation loss {name!r} has no parameter(s) {unknown}; it accepts {allowed}")
    fixed: dict[str, float | str] = {}
    for key, value in params.items():
        if key in _CHOICE_PARAMETERS:
            if value not in _CHOICE_PARAMETERS[key]:
                raise ValueError(f"segmentation loss {name!r}: {key} must be one of {_CHOICE_PARAMETERS[key]}, got {value!r}")
            fixed[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"segmentation loss {name!r}: parameter {key!r} must be a number, got {value!r}")
        if key in _POSITIVE_PARAMETERS and not value > 0:
            raise ValueError(f"segmentation loss {name!r}: {key} must be > 0, got {value!r}")
        fixed[key] = float(value)
    return functools.partial(fn, **fixed)


def deep_supervision_loss(
    final_logits: torch.Tensor,
    side_logits: torch.Tensor | None,
    masks: torch.Tensor,
    loss_fn: SegmentationLoss,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over the side outputs and the final output.

    Args:
        final_logits: ``B×1×H×W`` final output.
        side_logits: ``B×K×H×W`` side outputs, already upsampled to the mask size, coarsest first;
            ``None`` when there are none (K = 0).
        masks: ``B×1×H×W`` targets.
        loss_fn: a segmentation loss, e.g. from :func:`make_segmentation_loss`.
        weights: K + 1 weights: the side outputs coarse → fine, then the final output; ``None``
            means every weight is 1.

    Returns:
        ``weights[-1] · loss_fn(final) + Σ_k weights[k] · loss_fn(side_k)``.
    """
    k = 0
    if side_logits is not None:
        if side_logits.ndim != 4 or side_logits.shape[0] != masks.shape[0] or side_logits.shape[2:] != masks.shape[2:]:
            raise ValueError(f"side_logits {tuple(side_logits.shape)} must be B×K×H×W matching masks {tuple(masks.shape)}")
        k = side_logits.shape[1]
    w = [1.0] * (k + 1) if weights is None else [float(x) for x in weights]
    if len(w) != k + 1:
        raise ValueError(f"{len(w)} weights for {k} side outputs + the final output (need {k + 1})")
    loss = w[-1] * loss_fn(final_logits, masks)
    for i in range(k):
        loss = loss + w[i] * loss_fn(side_logits[:, i : i + 1], masks)  # type: ignore[index]
    return loss


def consistency_kl(labelled_logits: torch.Tensor, unlabelled_logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MultiMix consistency: ``KL(mean_labelled || mean_unlabelled)`` of the batch-mean foreground
    probability maps, each pixel a Bernoulli distribution, averaged over pixels.

    The batches are different images and may differ in size (only ``H×W`` must match). Gradient
    flows into both batches; detach one side to make it a fixed target. 0 when the mean maps are equal.
    Hand-written: the Bernoulli KL between two batch-mean maps is not a library loss.
    """
    if labelled_logits.shape[1:] != unlabelled_logits.shape[1:]:
        raise ValueError(
            f"labelled {tuple(labelled_logits.shape)} and unlabelled {tuple(unlabelled_logits.shape)} differ beyond the batch size"
        )
    if labelled_logits.shape[0] == 0 or unlabelled_logits.shape[0] == 0:
        raise ValueError("consistency_kl needs at least one image in each batch")
    p = torch.sigmoid(labelled_logits).mean(0)
    q = torch.sigmoid(unlabelled_logits).mean(0)
    kl = p * torch.log((p + eps) / (q + eps)) + (1 - p) * torch.log((1 - p + eps) / (1 - q + eps))
    return kl.mean()
