"""The additive search space: zero-initialised LoRA factors and adapters leave the network bitwise unchanged,
λ sits only on them (or on them and the backbone), and a run trains only kept added coordinates."""
import pytest
import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.pipeline import run
from bayestune_pyro.search_spaces.additive import Additive
from bayestune_pyro.selection.masks import Mask


def logits(backbone, batch):
    args, kwargs = backbone.inputs(batch)
    with torch.no_grad():
        return backbone.logits(backbone.model(*args, **kwargs))


@pytest.mark.parametrize("kinds", [("lora",), ("adapter",), ("lora", "adapter")])
def test_zero_modules_leave_the_network_bitwise_unchanged(kinds, text_batch):
    plain, added = load_backbone("tiny-bert", 3, seed=0), load_backbone("tiny-bert", 3, seed=0)
    lifted = LiftedBackbone(added, Additive(kinds=kinds, width=4))
    plain.model.eval(), added.model.eval()
    assert torch.equal(logits(added, text_batch), logits(plain, text_batch))
    assert torch.equal(lifted(lifted.theta_bar, text_batch), logits(plain, text_batch))
    names = lifted.layout.names
    assert names and all(n.rsplit(".", 1)[1].startswith(tuple(f"bt_{k}" for k in kinds)) for n in names)
    zero = {n for n in names if n.endswith(("bt_lora_B", "bt_adapter_up"))}
    for name, view in lifted.layout.split(lifted.theta_bar).items():  # exactly one factor of each module is 0
        assert (view == 0).all() == (name in zero)
    moved = lifted.theta_bar + 0.1 * torch.randn(lifted.d, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(lifted(moved, text_batch), logits(plain, text_batch))


def test_added_factors_are_seeded_and_both_covers_the_backbone():
    a = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), Additive(seed=3))
    b = LiftedBackbone(load_backbone("tiny-bert", 2, seed=1), Additive(seed=3))
    assert torch.equal(a.theta_bar, b.theta_bar)  # the added θ̄ depends on the space's seed only
    both = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), Additive(backbone=True))
    assert both.d > a.d and set(a.layout.names) < set(both.layout.names)
    with pytest.raises(ValueError, match="search_space: additive"):
        LiftedBackbone(load_backbone("tiny-bert", 2), Additive(kinds=("lora",), lora_targets=("nothing",)))


def test_a_run_on_the_additive_space_fine_tunes_only_added_coordinates(tmp_path):
    config = RunConfig.from_dict(dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=12, warmup=4,
                                      burnin=4, thin=2, stage2_steps=4, n_tracked=16, p=0.05,
                                      search_space="additive", additive_width=4))
    metrics = run(config, tmp_path, progress=False)
    mask = Mask.load(tmp_path)
    assert all(n.rsplit(".", 1)[1].startswith("bt_") for n, c in mask.counts().items() if c)
    assert metrics["n_updated"] == mask.k == int(0.05 * metrics["n_total"]) > 0
    with pytest.raises(ValueError, match="additive_kinds: unknown value 'prompt'"):
        RunConfig.from_dict({"search_space": "additive", "additive_kinds": ["prompt"]})
