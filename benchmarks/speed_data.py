"""Synthetic inputs and model construction shared by ``bench_speed.py``'s sections and ``bench_inference.py``.

Speed does not depend on the weights or the image content (except through the gate and the number of boxes
reaching NMS), so everything runs on random images, masks and boxes, with channels_last tensors.
"""

from __future__ import annotations

import torch

from multichex.data.record import CXRBatch, CXRSample, collate_samples
from multichex.models.config import GateConfig, ModelConfig
from multichex.models.multichexnet import MultiCheXNet

CL = torch.channels_last
DEFAULT_ENCODER = "lite"
LIGHT_ENCODERS = {"lite", "lite-small"}


def synthetic_image(size: int, gen: torch.Generator) -> torch.Tensor:
    """A 1×H×W image in [0, 1]: random brightness/contrast, a few smooth blobs and noise."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.full((size, size), float(torch.rand(1, generator=gen)) * 0.5 + 0.1)
    for _ in range(int(torch.randint(2, 6, (1,), generator=gen))):
        cx, cy, sx, sy = torch.rand(4, generator=gen).tolist()
        amp = float(torch.rand(1, generator=gen)) * 0.6 - 0.3
        image += amp * torch.exp(-(((xs - cx) / (0.05 + 0.3 * sx)) ** 2 + ((ys - cy) / (0.05 + 0.3 * sy)) ** 2))
    image += 0.05 * torch.randn(size, size, generator=gen)
    return image.clamp(0, 1).unsqueeze(0)


def synthetic_mask(size: int, gen: torch.Generator) -> torch.Tensor:
    """A binary 1×H×W mask made of 2–3 random ellipses."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(int(torch.randint(2, 4, (1,), generator=gen))):
        cx, cy = (torch.rand(2, generator=gen) * 0.6 + 0.2).mul(size).tolist()
        rx, ry = (torch.rand(2, generator=gen) * 0.2 + 0.08).mul(size).tolist()
        mask |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return mask.float().unsqueeze(0)


def synthetic_boxes(size: int, num_classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1–2 random xyxy boxes (pixels) with random class indices."""
    count = int(torch.randint(1, 3, (1,), generator=gen))
    boxes = []
    for _ in range(count):
        w, h = (torch.rand(2, generator=gen) * 0.3 + 0.05).mul(size).tolist()
        x1 = float(torch.rand(1, generator=gen)) * (size - w)
        y1 = float(torch.rand(1, generator=gen)) * (size - h)
        boxes.append([x1, y1, x1 + w, y1 + h])
    return torch.tensor(boxes), torch.randint(0, num_classes, (count,), generator=gen)


def synthetic_batch(config: ModelConfig, batch: int, gen: torch.Generator) -> CXRBatch:
    """A collated training batch (image, labels, gate label, mask, boxes per sample), images channels_last."""
    samples = []
    for index in range(batch):
        boxes, box_labels = synthetic_boxes(config.image_size, len(config.box_classes), gen)
        samples.append(
            CXRSample(
                image=synthetic_image(config.image_size, gen),
                labels=torch.randint(0, 2, (len(config.class_names),), generator=gen).float(),
                positive=float(torch.randint(0, 2, (1,), generator=gen)),
                mask=synthetic_mask(config.image_size, gen),
                boxes=boxes,
                box_labels=box_labels,
                meta={"dataset": "synthetic", "index": index},
            )
        )
    collated = collate_samples(samples)
    assert collated is not None
    collated.images = collated.images.contiguous(memory_format=CL)
    return collated


def synthetic_images(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` synthetic images as one channels_last N×1×H×W tensor."""
    return torch.stack([synthetic_image(size, gen) for _ in range(count)]).contiguous(memory_format=CL)


def build_model(encoder: str, image_size: int, gated_heads: list[str] | None = None, seed: int = 0) -> MultiCheXNet:
    """A randomly initialised (seeded) channels_last MultiCheXNet."""
    torch.manual_seed(seed)
    gate = GateConfig(gated_heads=list(gated_heads)) if gated_heads is not None else GateConfig()
    model = MultiCheXNet(ModelConfig(encoder=encoder, image_size=image_size, gate=gate))
    return model.to(memory_format=CL)
