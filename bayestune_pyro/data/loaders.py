"""Batches for transformers sequence-classification models (tokenised once, padded per batch) and for image
classifiers (resized and normalised per batch)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader

from .images import ImageExample, ImageInput, collate_images
from .tasks import Example

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_loader(examples: list[Example], tokenizer, *, batch_size: int, max_length: int,
                shuffle: bool, seed: int = 0, regression: bool = False,
                drop_last: bool = False, image_input: ImageInput | None = None) -> DataLoader:
    """A DataLoader of ``model(**batch)`` dicts: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
    tokenizer makes them) and ``labels`` (float if ``regression``); image examples (no tokenizer) give
    ``pixel_values``, made by the image backbone's ``image_input`` (its size and normalisation), and ``labels``.

    Texts are truncated to ``max_length`` and each batch is padded to its longest sequence;
    shuffling draws from a generator seeded with ``seed``, so runs repeat exactly.
    """
    if examples and isinstance(examples[0], ImageExample):
        if image_input is None:
            raise ValueError("image_input: not given, but the examples are images; use an image backbone "
                             "(tiny-vit or timm:<name>)")
        return DataLoader(examples, batch_size=batch_size, shuffle=shuffle,
                          collate_fn=partial(collate_images, image_input=image_input),
                          generator=torch.Generator().manual_seed(seed) if shuffle else None,
                          drop_last=drop_last, num_workers=0)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token; set tokenizer.pad_token first")
    features = _tokenize(examples, tokenizer, max_length)
    fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    collate = partial(_pad, fill=fill, left=tokenizer.padding_side == "left",
                      label_dtype=torch.float32 if regression else torch.long)
    return DataLoader([(f, e.label) for f, e in zip(features, examples)], batch_size=batch_size,
                      shuffle=shuffle, generator=torch.Generator().manual_seed(seed) if shuffle else None,
                      collate_fn=collate, drop_last=drop_last, num_workers=0)


def infinite_batches(loader: DataLoader) -> Iterator[dict]:
    """Batches from ``loader``, epoch after epoch, forever."""
    if len(loader) == 0:
        raise ValueError("loader: yields no batches")
    while True:
        yield from loader


def _tokenize(examples: list[Example], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Per-example token lists, tokenising text pairs as pairs."""
    if not examples:
        return []
    kinds = {e.text_b is None for e in examples}
    if len(kinds) > 1:
        raise ValueError("examples: mix single texts and text pairs")
    pairs = None if kinds == {True} else [e.text_b for e in examples]
    encoded = tokenizer([e.text_a for e in examples], pairs, truncation=True, max_length=max_length)
    keys = [k for k in _INPUTS if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(examples))]


def _pad(batch, *, fill: dict[str, int], left: bool, label_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    width = max(len(features["input_ids"]) for features, _ in batch)
    out = {}
    for key in batch[0][0]:
        rows = []
        for features, _ in batch:
            pad = [fill[key]] * (width - len(features[key]))
            rows.append(pad + features[key] if left else features[key] + pad)
        out[key] = torch.tensor(rows, dtype=torch.long)
    out["labels"] = torch.tensor([label for _, label in batch], dtype=label_dtype)
    return out
