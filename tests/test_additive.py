"""The additive search space: zero-initialised LoRA factors, adapters and gated prompts leave the network bitwise
unchanged on transformers and timm backbones, λ sits only on them (or on them and the backbone), and a run trains
only kept added coordinates."""
import pytest
import torch

from bayestune_pyro.cli import build_parser, resolve_config
from bayestune_pyro.config import RunConfig, merge
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.pipeline import run
from bayestune_pyro.search_spaces.additive import Additive, stranded
from bayestune_pyro.selection.masks import Mask


def logits(backbone, batch):
    args, kwargs = backbone.inputs(batch)
    with torch.no_grad():
        return backbone.logits(backbone.model(*args, **kwargs))


ZERO_FACTORS = ("bt_lora_B", "bt_adapter_up", "bt_prompt_gate")


@pytest.mark.parametrize("kinds", [("lora",), ("adapter",), ("prompt",), ("lora", "adapter", "prompt")])
def test_zero_modules_leave_the_network_bitwise_unchanged(kinds, text_batch):
    plain, added = load_backbone("tiny-bert", 3, seed=0), load_backbone("tiny-bert", 3, seed=0)
    lifted = LiftedBackbone(added, Additive(kinds=kinds, width=4))
    plain.model.eval(), added.model.eval()
    assert torch.equal(logits(added, text_batch), logits(plain, text_batch))
    assert torch.equal(lifted(lifted.theta_bar, text_batch), logits(plain, text_batch))
    names = lifted.layout.names
    assert names and all(n.rsplit(".", 1)[1].startswith(tuple(f"bt_{k}" for k in kinds)) for n in names)
    zero = {n for n in names if n.endswith(ZERO_FACTORS)}
    for name, view in lifted.layout.split(lifted.theta_bar).items():  # exactly one factor of each module is 0
        assert (view == 0).all() == (name in zero)
    moved = lifted.theta_bar + 0.1 * torch.randn(lifted.d, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(lifted(moved, text_batch), logits(plain, text_batch))


def timm_pair(name: str, **kwargs):
    """Two identical random-initialised timm classifiers, in eval mode."""
    import timm

    from bayestune_pyro.models.backbones import Backbone

    models = [timm.create_model(name, pretrained=False, num_classes=3, **kwargs) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    head = models[0].pretrained_cfg["classifier"]
    return [Backbone(m.eval(), [f"{head}.weight", f"{head}.bias"], "image", name) for m in models]


@pytest.mark.parametrize("name, kwargs, kinds, size", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
     {"bt_lora_A", "bt_lora_B", "bt_adapter_down", "bt_adapter_up", "bt_prompt_tokens", "bt_prompt_gate"}, 32),
    ("tf_efficientnet_lite0", {}, {"bt_lora_A", "bt_lora_B", "bt_adapter_down", "bt_adapter_up"}, 64),
])
def test_zero_modules_leave_timm_backbones_bitwise_unchanged(name, kwargs, kinds, size):
    plain, added = timm_pair(name, **kwargs)
    lifted = LiftedBackbone(added, Additive(width=4))
    batch = {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}
    assert {n.rsplit(".", 1)[1] for n in lifted.layout.names} == kinds  # ViT: all three; EfficientNet: 1×1 convs
    assert torch.equal(lifted(lifted.theta_bar, batch), logits(plain, batch))
    theta = lifted.theta_bar.clone().requires_grad_()
    lifted(theta, batch).square().sum().backward()
    for factor, grad in lifted.layout.split(theta.grad).items():  # only the zero factors feel the loss at θ̄
        assert (grad.abs().max() > 0) == factor.endswith(ZERO_FACTORS), factor


def test_a_moved_prompt_changes_what_the_tokens_attend_to(text_batch):
    plain, added = load_backbone("tiny-bert", 3, seed=0), load_backbone("tiny-bert", 3, seed=0)
    lifted = LiftedBackbone(added, Additive(kinds=("prompt",), width=4))
    plain.model.eval(), added.model.eval()
    views = lifted.layout.split(lifted.theta_bar.clone())
    gate = "bert.encoder.layer.1.attention.self.bt_prompt_gate"
    views[gate].fill_(1.0)  # an open gate on the last layer adds softmax(q·K(P)ᵀ/√d)·V(P) to its context
    theta = torch.cat([v.flatten() for v in views.values()])
    moved = lifted(theta, text_batch)
    assert not torch.allclose(moved, logits(plain, text_batch))
    views[gate].zero_()  # closed again: bitwise the pretrained network
    assert torch.equal(lifted(torch.cat([v.flatten() for v in views.values()]), text_batch),
                       logits(plain, text_batch))


def test_added_factors_are_seeded_and_both_covers_the_backbone():
    a = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), Additive(seed=3))
    b = LiftedBackbone(load_backbone("tiny-bert", 2, seed=1), Additive(seed=3))
    assert torch.equal(a.theta_bar, b.theta_bar)  # the added θ̄ depends on the space's seed only
    both = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), Additive(backbone=True))
    assert both.d > a.d and set(a.layout.names) < set(both.layout.names)
    lora_only = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), Additive(kinds=("lora",), seed=3))
    lora_of_all = {n: v for n, v in a.layout.split(a.theta_bar).items() if ".bt_lora_" in n}
    assert lora_of_all.keys() == lora_only.layout.split(lora_only.theta_bar).keys()
    assert all(torch.equal(v, lora_only.layout.split(lora_only.theta_bar)[n]) for n, v in lora_of_all.items())
    with pytest.raises(ValueError, match="search_space: additive"):
        LiftedBackbone(load_backbone("tiny-bert", 2), Additive(kinds=("lora",), lora_targets=("nothing",)))
    with pytest.raises(ValueError, match="additive_prompt_targets: 'bert.encoder.layer.0.output' .* not a self-att"):
        LiftedBackbone(load_backbone("tiny-bert", 2), Additive(kinds=("prompt",), prompt_targets=("*0.output",)))
    with pytest.raises(ValueError, match="additive_lora_targets: 'bert.encoder.layer.0.attention.self' is a Bert"):
        LiftedBackbone(load_backbone("tiny-bert", 2), Additive(kinds=("lora",), lora_targets=("*0.attention.self",)))


def test_a_run_on_the_additive_space_fine_tunes_only_added_coordinates(tmp_path):
    config = RunConfig.from_dict(dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=12, warmup=4,
                                      burnin=4, thin=2, stage2_steps=4, n_tracked=16, p=0.05,
                                      search_space="additive", additive_width=4))
    metrics = run(config, tmp_path, progress=False)
    mask = Mask.load(tmp_path)
    assert all(n.rsplit(".", 1)[1].startswith("bt_") for n, c in mask.counts().items() if c)
    assert metrics["n_updated"] == mask.k == int(0.05 * metrics["n_total"]) > 0
    with pytest.raises(ValueError, match="additive_kinds: unknown value 'vpt'"):
        RunConfig.from_dict({"search_space": "additive", "additive_kinds": ["vpt"]})


def test_the_additive_space_brings_its_step_sizes_and_a_given_value_wins():
    def config(*flags):
        return resolve_config(build_parser().parse_args(["run", *flags]))

    steps = ("lr", "stage2_lr")
    assert [getattr(config(), n) for n in steps] == [1e-4, 1e-3]  # the backbone's (subset) defaults
    assert [getattr(config("--search-space", "additive"), n) for n in steps] == [1e-3, 1e-2]
    assert [getattr(config("--search-space", "additive", "--lr", "3e-4"), n) for n in steps] == [3e-4, 1e-2]
    assert [getattr(config("--search-space", "additive", "--additive-backbone"), n) for n in steps] == [1e-4, 1e-3]
    for method in ("full", "l1sp"):
        assert config("--search-space", "additive", "--method", method).dense_lr == 3e-3
        assert config("--method", method).dense_lr == 5e-5
    nested = RunConfig.from_dict({"search_space": "additive", "method": {"name": "bayestune", "lr": 2e-4}})
    assert nested.lr == 2e-4 and nested.stage2_lr == 1e-2
    given = config("--search-space", "additive", "--stage2-lr", "3e-3")
    assert RunConfig.from_dict(given.to_dict()).stage2_lr == 3e-3  # a run's config.yaml keeps what was given


def test_leaving_the_additive_space_leaves_its_step_sizes_behind_but_not_given_ones():
    additive = RunConfig.from_dict({"search_space": "additive", "stage2_lr": 3e-3})
    subset = additive.replace(search_space="subset")
    assert (subset.lr, subset.stage2_lr) == (1e-4, 3e-3)  # stage2_lr was given, lr was the space's
    assert additive.replace(additive_backbone=True).lr == 1e-4  # the backbone covered: its defaults
    assert additive.replace(search_space="subset", lr=1e-3).lr == 1e-3
    assert merge(additive.to_dict(), {"seed": 1}) == {**additive.to_dict(), "seed": 1}
    dense = RunConfig.from_dict({"search_space": "additive", "method": "full"})
    assert dense.replace(search_space="subset").dense_lr == 5e-5
    assert dense.replace(search_space="subset").replace(search_space="additive").dense_lr == 3e-3


def test_stranded_coordinates_are_the_chosen_random_ones_without_a_gradient(text_batch):
    """After the zero factors' chosen coordinates have moved (as in stage 2), a chosen coordinate of a random
    factor has a zero gradient exactly when ``stranded`` says so."""
    lifted = LiftedBackbone(load_backbone("tiny-bert", 3, seed=0), Additive(width=4))
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(lifted.d, generator=g) < 0.03
    theta = torch.where(chosen, lifted.theta_bar + 0.1 * torch.randn(lifted.d, generator=g), lifted.theta_bar)
    theta.requires_grad_()
    lifted.model.eval()
    lifted(theta, text_batch).square().sum().backward()
    grads, parts = lifted.layout.split(theta.grad), lifted.layout.split(chosen)
    lost = stranded(parts)
    assert {n.rsplit(".", 1)[1] for n in lost} == {"bt_lora_A", "bt_adapter_down", "bt_prompt_tokens"}
    for name, cut in lost.items():
        assert (grads[name][cut] == 0).all(), name
        assert (grads[name][parts[name] & ~cut] != 0).all(), name
    counts = [int(cut.sum()) for cut in lost.values()], [int((parts[n] & ~cut).sum()) for n, cut in lost.items()]
    assert sum(counts[0]) > 0 and sum(counts[1]) > 0  # both cases occur
