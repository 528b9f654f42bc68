"""Image tasks (scikit-learn's digits, ImageFolder directories, ``datasets`` image datasets) and their batches.

Examples hold RGB images in [0, 1] at their own size; batching resizes them to the backbone's input size and
normalises them with its mean and std (:class:`ImageInput`), so loading a task never depends on the backbone.
Images from files or datasets are decoded when batched: only a batch of them is in memory at a time.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class ImageExample:
    """An RGB image (3, height, width) in [0, 1], or a function decoding one, and its class id."""

    image: torch.Tensor | Callable[[], torch.Tensor]
    label: int

    def pixels(self) -> torch.Tensor:
        return self.image() if callable(self.image) else self.image


@dataclass(frozen=True)
class ImageInput:
    """What an image backbone takes: images of ``size`` (height, width), normalised per channel; ``fixed``: the
    network accepts no other size (a ViT's patch grid)."""

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    fixed: bool = False

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """An image in [0, 1] resized bilinearly (antialiased, ``align_corners=False``) and normalised."""
        resized = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return (resized - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


def collate_images(batch: list[ImageExample], image_input: ImageInput) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([image_input(e.pixels()) for e in batch]),
            "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}


def load_digits(rng: random.Random, test_fraction: float = 0.2):
    """Seeded (train, test) split of the 1,797 digits: 8×8 scans in [0, 1], repeated on 3 channels."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = (torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0).expand(-1, 3, -1, -1)
    examples = [ImageExample(img, int(y)) for img, y in zip(images, raw.target)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    cut = int(round(len(order) * test_fraction))
    return [examples[i] for i in sorted(order[cut:])], [examples[i] for i in sorted(order[:cut])]


def load_image_folder(root: Path):
    """Class names and (train, test) examples of ``root/train/<class>/*`` and ``root/test/<class>/*`` (or
    ``val/``); every file is checked to be an image now (its header only) and decoded when batched."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    layout = "expected DIR/train/<class>/*.png and DIR/test/<class>/*.png (or val/ for test)"
    if not (root / "train").is_dir():
        raise ValueError(f"data_dir: '{root}' has no train/ folder ({layout})")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise ValueError(f"data_dir: '{root}' has no test/ or val/ folder ({layout})")
    folders = []
    for split in (root / "train", test_dir):
        if not any(p.is_dir() for p in split.iterdir()):
            raise ValueError(f"data_dir: '{split}' has no class folders ({layout})")
        # hidden files (.DS_Store) are not data; every other file must be an image
        folder = ImageFolder(str(split), transform=_to_tensor, is_valid_file=lambda p: not Path(p).name.startswith("."),
                             allow_empty=True)
        empty = sorted(set(folder.classes) - {folder.classes[t] for t in folder.targets})
        if empty:
            raise ValueError(f"data_dir: class folder '{split / empty[0]}' holds no images")
        for path, _ in folder.samples:
            _check_image_file(path, IMG_EXTENSIONS)
        folders.append(folder)
    if folders[1].classes != folders[0].classes:
        raise ValueError(f"data_dir: '{test_dir}' has classes {', '.join(folders[1].classes)}, but "
                         f"'{root / 'train'}' has {', '.join(folders[0].classes)}; the class folders must match")
    _check_classes(folders[0].classes, root / "train")
    train, test = ([ImageExample(partial(_image, f, i), t) for i, t in enumerate(f.targets)] for f in folders)
    return tuple(folders[0].classes), train, test


def image_dataset(dataset, where: str):
    """Class names and (train, test) examples of a ``datasets.DatasetDict``: splits ``train`` and ``test`` (or
    ``validation``), each with an ``Image`` column (``image`` or ``img``) and a ``ClassLabel`` column (``label``
    or ``labels``); images are decoded when batched."""
    from datasets import DatasetDict

    splits = list(dataset) if isinstance(dataset, DatasetDict) else []
    test = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test is None:
        raise ValueError(f"data_dir: '{where}' has splits {', '.join(splits) or 'none'}; expected train and test "
                         "(or validation), e.g. a DatasetDict written by save_to_disk")
    (names, train), (test_names, test_examples) = (_dataset_split(dataset[s], where, s) for s in ("train", test))
    if test_names != names:
        raise ValueError(f"data_dir: '{where}' split {test!r} has classes {', '.join(test_names)}, but split "
                         f"'train' has {', '.join(names)}; the classes must match")
    _check_classes(names, where)
    return names, train, test_examples


def _dataset_split(part, where: str, split: str) -> tuple[tuple[str, ...], list[ImageExample]]:
    """A split's class names and examples."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    features = part.features
    image = next((c for c in _IMAGE_COLUMNS if isinstance(features.get(c), ImageFeature)), None)
    label = next((c for c in _LABEL_COLUMNS if isinstance(features.get(c), ClassLabel)), None)
    found = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items()) or "none"
    if image is None:
        raise ValueError(f"data_dir: '{where}' split {split!r} has no image column (expected {_either(_IMAGE_COLUMNS)} "
                         f"of type datasets.Image; found: {found})")
    if label is None:
        raise ValueError(f"data_dir: '{where}' split {split!r} has no class column (expected {_either(_LABEL_COLUMNS)} "
                         f"of type datasets.ClassLabel; found: {found})")
    names, labels = tuple(features[label].names), list(part[label])
    bad = next((y for y in labels if not 0 <= y < len(names)), None)
    if bad is not None:
        raise ValueError(f"data_dir: '{where}' split {split!r} has label {bad} (expected class ids 0 to "
                         f"{len(names) - 1}; unlabelled rows cannot be trained or tested on)")
    images = part.select_columns([image])
    return names, [ImageExample(partial(_row_image, images, i, image), y) for i, y in enumerate(labels)]


def _either(names: tuple[str, ...]) -> str:
    return " or ".join(repr(n) for n in names)


def _check_classes(names, where) -> None:
    if len(names) < 2:
        raise ValueError(f"data_dir: '{where}' has classes [{', '.join(names)}]; a classifier needs at least 2")


def _check_image_file(path: str, extensions: tuple[str, ...]) -> None:
    from PIL import Image

    if not path.lower().endswith(extensions):
        raise ValueError(f"data_dir: '{path}' is not an image file (allowed: {', '.join(extensions)})")
    try:
        Image.open(path).close()  # reads the header only
    except OSError:  # PIL.UnidentifiedImageError included
        raise ValueError(f"data_dir: '{path}' is not a readable image (PIL cannot identify it)") from None


def _to_tensor(image) -> torch.Tensor:
    """A PIL image as an RGB float tensor (3, height, width) in [0, 1]."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.convert("RGB")).float() / 255.0


def _image(folder, i: int) -> torch.Tensor:
    return folder[i][0]


def _row_image(dataset, i: int, column: str) -> torch.Tensor:
    return _to_tensor(dataset[i][column])
