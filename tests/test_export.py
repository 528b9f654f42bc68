"""`bayestune export --format peft|hf`: the fine-tuned model for PEFT and transformers, with merge()'s logits."""
import json
import shutil

import pytest
import torch

from bayestune_pyro.cli import main
from bayestune_pyro.finetune.delta import SparseDelta, merge
from bayestune_pyro.finetune.export import export_model, peft_plan
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.search_spaces.additive import Additive
from bayestune_pyro.search_spaces.subset import Subset

TINY_TEXT = ["--backbone", "tiny-bert", "--shots-per-class", "4", "--max-length", "24", "--steps", "12",
             "--warmup", "4", "--burnin", "4", "--thin", "2", "--stage2-steps", "6", "--n-tracked", "32",
             "--stage2-lr", "0.05", "--p", "0.01",
             "--exclude", "*.bias"]  # a Linear whose bias is updated goes whole: this run exercises the sparse targets
TEXTS = ["the cat sat on the mat", "stocks fell sharply in early trading", "hello"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["run", "--out", str(out), *TINY_TEXT]) == 0
    return out


def _logits(model, tokenizer):
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def test_peft_adapter_gives_the_logits_of_merge(run, capsys):
    from peft import PeftModel

    assert main(["export", str(run), "--format", "peft"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(run / "peft") and summary["sparse_modules"] > 0
    assert "classifier" in summary["modules_to_save"]  # the head
    assert "bert.embeddings.word_embeddings" in summary["modules_to_save"]  # not a Linear: held whole
    merged = merge(run / "delta.safetensors")
    sparse = SparseDelta.load(run / "delta.safetensors")
    base = load_backbone(sparse.backbone, sparse.num_labels, seed=sparse.seed + 1).model  # another head: replaced
    assert not torch.equal(_logits(base, merged.tokenizer), _logits(merged.model, merged.tokenizer))
    adapted = PeftModel.from_pretrained(base, run / "peft")
    # bitwise: Super-Tuning adds δ to W with one float addition, as merge does (and W + 0 at the padding)
    assert torch.equal(_logits(adapted, merged.tokenizer), _logits(merged.model, merged.tokenizer))
    targets = {n for n, m in adapted.named_modules() if hasattr(m, "supertuning_values")}
    assert len(targets) == summary["sparse_modules"]
    for name in targets:  # the adapter holds the delta's (index, δ) pairs themselves
        layer = adapted.get_submodule(name)
        index, delta = sparse.updates[name.removeprefix("base_model.model.") + ".weight"]
        held = dict(zip(layer.supertuning_indices["default"].tolist(), layer.supertuning_values["default"].tolist()))
        assert [held[i] for i in index.tolist()] == delta.tolist()
        assert sum(v != 0 for v in held.values()) <= index.numel()  # the rest is zero padding


def test_hf_checkpoint_gives_the_logits_of_merge(run, capsys):
    from transformers import AutoModelForSequenceClassification

    out = run.parent / "hf-out"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    merged = merge(run / "delta.safetensors")
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert torch.equal(_logits(loaded, merged.tokenizer), _logits(merged.model, merged.tokenizer))
    assert (out / "tokenizer.json").is_file()


def test_format_errors_are_one_line(run, tmp_path, capsys):
    def error(*argv):
        assert main(["export", *map(str, argv)]) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1
        return message

    assert "--p, --threshold, --auto, --rank and --z re-cut the mask" in error(run, "--format", "peft", "--p", "0.1")
    assert "--out is for --format peft or hf" in error(run, "--out", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert "already exists" in error(run, "--format", "hf", "--out", tmp_path / "full")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    assert "has no delta.safetensors" in error(bare, "--format", "peft")


def _delta(tmp_path, backbone: str, names: list[str], space=None):
    """A valid delta file of ``backbone`` (its search space ``space``) moving entries 0 and 5 of each named tensor."""
    lifted = LiftedBackbone(load_backbone(backbone, 2), space or Subset())
    offsets = dict(zip(lifted.layout.names, lifted.layout.offsets))
    index = torch.tensor(sorted(offsets[n] + i for n in names for i in (0, 5)))
    head = dict(zip(lifted.head_names, lifted.head_parameters()))
    run = tmp_path / backbone
    run.mkdir()
    SparseDelta.from_flat(lifted.layout, index, torch.full((index.numel(),), 0.5), head, backbone, 2,
                          search_space=None if space is None else {"name": "additive"}).save(run / "delta.safetensors")
    return run


def test_what_a_format_cannot_hold_is_named(tmp_path):
    additive = _delta(tmp_path, "tiny-bert", ["bert.encoder.layer.0.attention.self.query.bt_lora_B"], Additive())
    for fmt in ("peft", "hf"):
        with pytest.raises(ValueError, match=f"^format: {fmt} cannot hold the delta's updates to "
                                             r"bert.encoder.layer.0.attention.self.query.bt_lora_B \(a tensor the "
                                             "additive search space attaches"):
            export_model(additive, fmt)
    vit = _delta(tmp_path, "tiny-vit", ["cls_token", "blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match=r"^format: peft cannot hold the delta's updates to cls_token \(a parameter "
                                         "of the root module"):
        export_model(vit, "peft")
    with pytest.raises(ValueError, match="^format: hf writes a transformers checkpoint; 'tiny-vit' is a timm"):
        export_model(vit, "hf")
    assert not (additive / "peft").exists() and not (vit / "hf").exists()


def test_peft_plan_keeps_dense_layers_whole_and_leaves_room_for_every_delta():
    model = load_backbone("tiny-bert", 2).model
    dense, sparse_names = "bert.pooler.dense", ["bert.encoder.layer.0.attention.self.query",
                                                "bert.encoder.layer.1.intermediate.dense"]
    counts = {dense: 800, sparse_names[0]: 7, sparse_names[1]: 13}  # 78%, 0.7%, 0.6% of the weight
    updates = {f"{m}.weight": (torch.arange(n, dtype=torch.int32), torch.ones(n)) for m, n in counts.items()}
    updates["bert.encoder.layer.1.attention.output.dense.bias"] = (torch.tensor([1], dtype=torch.int32),
                                                                   torch.ones(1))
    targets, whole, sparsity = peft_plan(SparseDelta(updates, {"classifier.weight": torch.zeros(2, 32)}, "tiny-bert",
                                                     2), model)
    assert sorted(targets) == sparse_names
    assert whole == ["bert.encoder.layer.1.attention.output.dense", dense, "classifier"]
    numel = {m: model.get_submodule(m).weight.numel() for m in sparse_names}
    assert all(int(numel[m] * (1 - sparsity)) >= counts[m] for m in sparse_names)  # Super-Tuning's own rounding
    assert int(numel[sparse_names[0]] * (1 - sparsity)) < counts[sparse_names[0]] + 8  # padded to the densest only
