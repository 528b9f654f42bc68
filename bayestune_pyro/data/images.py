"""The offline image task: scikit-learn's digits (1,797 8×8 scans), as 3×32×32 tensors for timm backbones."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageExample:
    """An image tensor (channels, height, width), normalised, and its class id."""

    image: torch.Tensor
    label: int


def load_digits(rng: random.Random, test_fraction: float = 0.2, size: int = 32):
    """Seeded (train, test) split of the digits, upsampled bilinearly to ``size``² and repeated on 3 channels."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    pixels = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    examples = [ImageExample(img, int(y)) for img, y in zip(images, raw.target)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    cut = int(round(len(order) * test_fraction))
    return [examples[i] for i in sorted(order[cut:])], [examples[i] for i in sorted(order[:cut])]


def collate_images(batch: list[ImageExample]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e.image for e in batch]),
            "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}
