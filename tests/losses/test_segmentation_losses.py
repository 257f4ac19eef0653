"""Segmentation losses: hand-computed values, asymmetry, deep supervision, consistency, registry."""

from __future__ import annotations

import pytest
import torch

from multichex.losses.segmentation import (
    SEGMENTATION_LOSSES,
    consistency_kl,
    deep_supervision_loss,
    kl_abs_loss,
    kl_tversky_loss,
    make_segmentation_loss,
    tversky_loss,
)

BIG = 20.0  # sigmoid(±20) is 0/1 up to ~2e-9


def _logits_for(mask: torch.Tensor) -> torch.Tensor:
    """Logits ±BIG that predict exactly ``mask``."""
    return torch.where(mask > 0.5, torch.tensor(BIG), torch.tensor(-BIG))


# 4×4 mask with a 2×2 foreground square.
MASK = torch.zeros(1, 1, 4, 4)
MASK[0, 0, 1:3, 1:3] = 1.0


def test_kltv_zero_for_perfect_prediction() -> None:
    assert kl_tversky_loss(_logits_for(MASK), MASK).item() < 1e-3
    assert kl_abs_loss(_logits_for(MASK), MASK).item() < 1e-3


@pytest.mark.parametrize("loss_name", ["kl_tversky", "tversky", "xe_tversky", "dice", "bce_dice"])
def test_loss_grows_with_disagreement(loss_name: str) -> None:
    loss_fn = make_segmentation_loss(loss_name)
    flat = MASK.flatten()
    order = [5, 6, 0, 3, 15, 12]  # two foreground pixels first (FN), then background pixels (FP)
    values = []
    for k in range(len(order) + 1):
        pred = flat.clone()
        pred[order[:k]] = 1 - pred[order[:k]]
        values.append(loss_fn(_logits_for(pred.reshape(MASK.shape)), MASK).item())
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_tversky_matches_hand_computation() -> None:
    # 2×2: target [[1, 1], [0, 0]], probabilities [[0.8, 0.4], [0.3, 0.1]].
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    probs = torch.tensor([[[[0.8, 0.4], [0.3, 0.1]]]])
    logits = torch.logit(probs)
    tp = 0.8 + 0.4
    fp = 0.3 + 0.1
    fn = 0.2 + 0.6
    for alpha, beta in [(0.3, 0.7), (0.5, 0.5), (0.9, 0.1)]:
        smooth = 1e-5  # MONAI's default smooth_nr / smooth_dr
        expected = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
        assert tversky_loss(logits, target, alpha, beta).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.7), (0.7, 0.3)])
def test_tversky_alpha_weighs_false_positives(alpha: float, beta: float) -> None:
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    fp_only = _logits_for(torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]]))  # TP 2, FP 1
    fn_only = _logits_for(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))  # TP 1, FN 1
    loss_fp = tversky_loss(fp_only, target, alpha, beta).item()
    loss_fn = tversky_loss(fn_only, target, alpha, beta).item()
    assert loss_fp == pytest.approx(1 - 2 / (2 + alpha), abs=1e-4)
    assert loss_fn == pytest.approx(1 - 1 / (1 + beta), abs=1e-4)
    # alpha < beta: a missed pixel costs more than a spurious one (and the other way round).
    assert (loss_fn > loss_fp) == (beta > alpha)


def test_deep_supervision_weighted_sum() -> None:
    torch.manual_seed(0)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    final = torch.randn(2, 1, 8, 8)
    sides = torch.randn(2, 3, 8, 8)
    loss_fn = make_segmentation_loss("kl_tversky")
    weights = [0.1, 0.2, 0.3, 1.0]
    expected = 1.0 * loss_fn(final, masks) + sum(w * loss_fn(sides[:, i : i + 1], masks) for i, w in enumerate(weights[:3]))
    got = deep_supervision_loss(final, sides, masks, loss_fn, weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    equal = deep_supervision_loss(final, sides, masks, loss_fn, None)
    assert equal.item() == pytest.approx(sum(loss_fn(x, masks).item() for x in [final, *sides.split(1, dim=1)]), rel=1e-6)
    assert deep_supervision_loss(final, None, masks, loss_fn).item() == pytest.approx(loss_fn(final, masks).item())
    with pytest.raises(ValueError, match="weights"):
        deep_supervision_loss(final, sides, masks, loss_fn, [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        deep_supervision_loss(final, None, masks, loss_fn, [1.0, 1.0])
    with pytest.raises(ValueError):
        deep_supervision_loss(final, sides[:, :, :4], masks, loss_fn)


@pytest.mark.parametrize(("n_labelled", "n_unlabelled"), [(2, 2), (3, 1), (1, 4)])
def test_consistency_kl(n_labelled: int, n_unlabelled: int) -> None:
    torch.manual_seed(1)
    base = torch.randn(1, 1, 5, 5)
    same = consistency_kl(base.expand(n_labelled, -1, -1, -1), base.expand(n_unlabelled, -1, -1, -1))
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    labelled = torch.randn(n_labelled, 1, 5, 5)
    unlabelled = torch.randn(n_unlabelled, 1, 5, 5)
    assert consistency_kl(labelled, unlabelled).item() > 0
    # only the batch means matter: a batch and its own mirror image pair have the same mean as [x, x]
    pair = torch.cat([base, -base])
    zeros = torch.zeros(1, 1, 5, 5)  # sigmoid 0.5 everywhere = mean of sigmoid(x) and sigmoid(-x)
    assert consistency_kl(pair, zeros).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        consistency_kl(labelled, torch.randn(1, 1, 4, 5))


def test_make_segmentation_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="kl_tversky"):
        make_segmentation_loss("focal")
    with pytest.raises(ValueError, match="alpha"):
        make_segmentation_loss("tversky", gamma=2.0)
    with pytest.raises(ValueError, match="dice_weight"):
        make_segmentation_loss("bce_dice", alpha=0.3)
    with pytest.raises(ValueError, match="number"):
        make_segmentation_loss("tversky", alpha="0.3")  # type: ignore[arg-type]
    tuned = make_segmentation_loss("tversky", alpha=0.9, beta=0.1)
    logits = torch.randn(2, 1, 4, 4)
    masks = (torch.rand(2, 1, 4, 4) > 0.5).float()
    assert tuned(logits, masks).item() == pytest.approx(tversky_loss(logits, masks, 0.9, 0.1).item())


@pytest.mark.parametrize("name", sorted(SEGMENTATION_LOSSES))
def test_losses_backpropagate_finite_gradients(name: str) -> None:
    torch.manual_seed(2)
    logits = (torch.randn(3, 1, 6, 6) * 10).requires_grad_()  # includes saturated logits
    masks = torch.rand(3, 1, 6, 6)  # soft targets
    masks[0] = (masks[0] > 0.5).float()
    loss = make_segmentation_loss(name)(logits, masks)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_deep_supervision_and_consistency_backpropagate() -> None:
    torch.manual_seed(3)
    final = torch.randn(2, 1, 6, 6, requires_grad=True)
    sides = torch.randn(2, 2, 6, 6, requires_grad=True)
    masks = (torch.rand(2, 1, 6, 6) > 0.5).float()
    deep_supervision_loss(final, sides, masks, make_segmentation_loss("xe_tversky"), [0.25, 0.5, 1.0]).backward()
    for t in (final, sides):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    labelled = torch.randn(2, 1, 6, 6, requires_grad=True)
    unlabelled = torch.randn(3, 1, 6, 6, requires_grad=True)
    consistency_kl(labelled, unlabelled).backward()
    for t in (labelled, unlabelled):  # gradient reaches both batches
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _kl_by_hand(probs: list[float], target: list[float], eps: float) -> float:
    """Σ over pixels of |(y − p)·log((y + ε)/(p + ε))| + the same for the background channel, one image."""
    import math

    total = 0.0
    for p, y in zip(probs, target):
        total += abs((y - p) * math.log((y + eps) / (p + eps)))
        total += abs(((1 - y) - (1 - p)) * math.log((1 - y + eps) / (1 - p + eps)))
    return total


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.1])
def test_kl_term_matches_a_hand_computation_with_its_eps_and_reduction(eps: float) -> None:
    """APPAU-Net eq. 3 sums the absolute KL over the m² pixels (per image; images are averaged): the
    default. ``kl_reduction: mean`` averages over pixels instead; ``kl_eps`` is the ε inside the logs."""
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 1.0], [0.0, 0.0]]]])
    probs = torch.tensor([[[[0.8, 0.4], [0.3, 0.1]]], [[[0.2, 0.9], [0.6, 0.05]]]])
    logits = torch.logit(probs)
    per_image = [_kl_by_hand(probs[i].flatten().tolist(), target[i].flatten().tolist(), eps) for i in range(2)]
    summed = sum(per_image) / 2
    assert kl_abs_loss(logits, target, eps).item() == pytest.approx(summed, rel=1e-5)
    assert kl_abs_loss(logits, target, eps, "mean").item() == pytest.approx(summed / 4, rel=1e-5)
    tv = tversky_loss(logits, target, 0.3, 0.7).item()
    kltv = make_segmentation_loss("kl_tversky", a=0.5, b=2.0, kl_eps=eps)
    assert kltv(logits, target).item() == pytest.approx(0.5 * summed + 2.0 * tv, rel=1e-5)
    kltv_mean = make_segmentation_loss("kl_tversky", kl_eps=eps, kl_reduction="mean")
    assert kltv_mean(logits, target).item() == pytest.approx(summed / 4 + tv, rel=1e-5)


def test_kl_eps_weighs_the_kl_term_on_hard_masks() -> None:
    """On a hard mask a wrong pixel costs ≈ |y − p|·log(1/ε): a smaller ε is a larger KL weight."""
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    small, large = (make_segmentation_loss("kl_tversky", b=0.0, kl_eps=e)(logits, target).item() for e in (1e-6, 1e-2))
    assert small > large > 0
    import math

    # every pixel: 0.5·log((1 + ε)/(0.5 + ε)) + 0.5·log((0.5 + ε)/ε) (one channel right, one wrong), 16 pixels.
    per_pixel = lambda e: 0.5 * math.log((1 + e) / (0.5 + e)) + 0.5 * math.log((0.5 + e) / e)  # noqa: E731
    assert small == pytest.approx(16 * per_pixel(1e-6), rel=1e-5) and large == pytest.approx(16 * per_pixel(1e-2), rel=1e-5)


def test_kl_settings_are_validated() -> None:
    from multichex.training.config import TrainConfig

    with pytest.raises(ValueError, match="kl_reduction"):
        make_segmentation_loss("kl_tversky", kl_reduction="max")
    with pytest.raises(ValueError, match="kl_eps"):
        make_segmentation_loss("kl_tversky", kl_eps=0.0)
    with pytest.raises(ValueError, match="kl_reduction"):
        TrainConfig(seg_loss={"name": "kl_tversky", "kl_reduction": "median"})
    with pytest.raises(ValueError, match="kl_eps"):
        TrainConfig(seg_loss={"name": "kl_tversky", "kl_eps": -1.0})
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(seg_loss={"name": "tversky", "gamma": 2.0})
    assert TrainConfig(seg_loss={"name": "kl_tversky", "kl_eps": 1e-4, "kl_reduction": "mean"}).seg_loss["kl_reduction"] == "mean"
