"""The packaged EfficientNet-Lite0 weights, renamed onto timm's ``tf_efficientnet_lite0``.

Every tensor arrives unchanged at its key, hand-checked keys land where they belong, the result gives the
original EfficientNet-Lite implementation's logits (``efficientnet-lite-pytorch``, a test dependency) and
recognises a photograph.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.efficientnet_lite import ARCHITECTURE, package_weights, timm_names

BELL_COTE = 442  # ImageNet class of the temple in scikit-learn's china.jpg


@pytest.fixture(scope="module")
def weights():
    return package_weights()


@pytest.fixture(scope="module")
def imagenet_model(weights):
    """timm's tf_efficientnet_lite0 with every packaged tensor, its 1000-class classifier included."""
    model = timm.create_model(ARCHITECTURE, pretrained=False)
    names = timm_names(weights, model, head=True)
    model.load_state_dict({name: weights[key] for key, name in names.items()})  # strict: every key filled
    return model.eval()


def test_every_packaged_tensor_arrives_unchanged(weights, imagenet_model):
    names = timm_names(weights, imagenet_model, head=True)
    state = imagenet_model.state_dict()
    assert sorted(names.values()) == sorted(state) and len(names) == len(weights) == 296
    for key, name in names.items():
        assert torch.equal(state[name], weights[key]), key


def test_keys_land_on_the_matching_timm_layers(weights, imagenet_model):
    names = timm_names(weights, imagenet_model, head=True)
    assert names["_conv_stem.weight"] == "conv_stem.weight" and names["_bn0.running_mean"] == "bn1.running_mean"
    assert names["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert names["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert names["_blocks.4._bn0.bias"] == "blocks.2.1.bn1.bias"  # stage depths 1, 2, 2, 3, 3, 4, 1
    assert names["_blocks.11._depthwise_conv.weight"] == "blocks.5.0.conv_dw.weight"
    assert names["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"
    assert names["_bn1.weight"] == "bn2.weight" and names["_fc.bias"] == "classifier.bias"


def test_mapped_model_gives_the_original_logits(weights, imagenet_model, one_thread):
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(weights)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = original.eval()(x)
        assert torch.allclose(imagenet_model(x), reference, rtol=0, atol=1e-4)
        plain = timm.create_model("efficientnet_lite0", pretrained=False).eval()  # timm's even padding
        plain.load_state_dict({name: weights[key] for key, name in timm_names(weights, plain, head=True).items()})
        assert (plain(x) - reference).abs().max() > 0.1  # why ARCHITECTURE is the TF-padded twin


def test_mapped_model_recognises_a_photograph(imagenet_model, one_thread):
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    cfg = imagenet_model.pretrained_cfg
    image = (image - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        assert imagenet_model(image).argmax().item() == BELL_COTE


def test_load_backbone_uses_packaged_weights_with_a_fresh_head(weights):
    backbone = load_backbone("timm:efficientnet_lite0", 10, pretrained=True)
    assert backbone.model.pretrained_cfg["architecture"] == ARCHITECTURE
    state = backbone.model.state_dict()
    assert backbone.head_names == ["classifier.weight", "classifier.bias"] and state["classifier.bias"].shape == (10,)
    assert torch.equal(state["conv_stem.weight"], weights["_conv_stem.weight"])
    assert torch.equal(state["blocks.6.0.conv_pwl.weight"], weights["_blocks.15._project_conv.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update({"_blocks.3._se_reduce.weight": torch.zeros(1)}), "'_blocks.3._se_reduce.weight' has no"),
    (lambda w: w.pop("_blocks.7._bn1.running_var"), "'blocks.3.2.bn2.running_var' has no packaged weight"),
    (lambda w: w.update({"_conv_head.weight": torch.zeros(1280, 320)}), r"'_conv_head.weight' has shape \(1280, 320\)"),
])
def test_unmappable_weights_fail_with_one_line(weights, imagenet_model, change, message):
    broken = dict(weights)
    change(broken)
    with pytest.raises(ValueError, match=message) as err:
        timm_names(broken, imagenet_model, head=False)
    assert "\n" not in str(err.value)
