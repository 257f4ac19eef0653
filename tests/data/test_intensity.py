"""Intensity ops shared by the weak and strong augmentation, and the weak augmentation's opt-in ops."""

import numpy as np
import pytest
import torch

from multichex.data.intensity import clahe, gaussian_blur, low_resolution, unsharp
from multichex.data.transforms import AugmentConfig, JointAugment


def _edge_image(size: int = 32) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[:, :, size // 2 :] = 1.0
    return image


def test_gaussian_blur_softens_an_edge_and_keeps_the_mean() -> None:
    image = _edge_image()
    blurred = gaussian_blur(image, 1.5)
    assert blurred.shape == image.shape
    assert torch.isclose(blurred.mean(), image.mean(), atol=1e-4)
    row = blurred[0, 16]
    assert 0.05 < row[15].item() < 0.5 < row[16].item() < 0.95  # the step became a ramp
    assert torch.equal(gaussian_blur(image, 0.0), image)


def test_unsharp_overshoots_at_an_edge() -> None:
    sharp = unsharp(_edge_image(), amount=1.0, sigma=1.0)
    assert sharp.min() < 0 and sharp.max() > 1


def test_clahe_spreads_a_low_contrast_image() -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(0.4 + 0.1 * rng.random((1, 64, 64)).astype(np.float32))
    out = clahe(image, clip_limit=0.03)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.std() > 2 * image.std()
    assert 0 <= out.min() and out.max() <= 1


def test_low_resolution_removes_fine_detail() -> None:
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    image = checker.float()[None]
    assert low_resolution(image, 2.0).std() < 0.2 * image.std()
    assert torch.equal(low_resolution(image, 1.0), image)


def test_new_ops_off_by_default_draw_as_before() -> None:
    """Configs without the new ops get exactly the old random stream (demo results unchanged)."""
    image = torch.rand(1, 32, 32)
    plain = JointAugment(AugmentConfig())(image, None, None, None, np.random.default_rng(3))[0]
    zero = JointAugment(AugmentConfig(blur_p=0.0, clahe_p=0.0))(image, None, None, None, np.random.default_rng(3))[0]
    assert torch.equal(plain, zero)


def test_each_opt_in_op_changes_the_image() -> None:
    image = torch.rand(1, 32, 32)
    base = AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, gamma=(1, 1), contrast=(1, 1), brightness=0, noise_std=0, hflip_p=0)
    reference = JointAugment(base)(image, None, None, None, np.random.default_rng(0))[0]
    for option in ("blur_p", "sharpen_p", "clahe_p", "low_resolution_p"):
        config = AugmentConfig(**{**base.__dict__, option: 1.0})
        out = JointAugment(config)(image, None, None, None, np.random.default_rng(0))[0]
        assert not torch.allclose(out, reference, atol=1e-3), option
        assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("bad", [{"blur_p": 1.5}, {"clahe_clip": (0.05, 0.01)}, {"gamma": (1.0,)}])
def test_bad_augment_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="augment"):
        AugmentConfig(**bad)
