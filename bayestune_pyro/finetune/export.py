"""A run's fine-tuned model for other libraries: a PEFT adapter, or a transformers checkpoint (``bayestune export
RUN --format peft|hf``). Both are built from the run's sparse delta and give the logits of :func:`delta.merge`.

``peft``: PEFT's Super-Tuning tuner (``SupertuningConfig``) keeps, per ``nn.Linear`` weight W, flat int32 indices
and float32 values scatter-added onto the frozen W in the forward pass: W + scatter(δ), the float addition of
``merge``, so the logits are identical. Its support has one size per layer, ⌊numel·(1 − sparsity)⌋ for a single
``sparsity``, so each targeted weight's (index, δ) pairs are padded with zero-valued entries at unmasked positions
(W_i + 0 = W_i). Padding to the densest layer would make every layer that dense, so a layer denser than the chosen
fraction f goes whole into ``modules_to_save`` instead; f is the layer density that minimises the adapter's bytes
(8 per sparse entry, 4 per dense value). Every other module with an update (biases, LayerNorms, embeddings) and the
head go whole into ``modules_to_save``, with their merged values. PEFT cannot hold a parameter of the root module
(``modules_to_save`` wraps submodules) nor a tensor the base model lacks (the additive search space's modules).

``hf``: the merged model through transformers' ``save_pretrained``, plus the tokenizer, for
``AutoModelForSequenceClassification.from_pretrained``. timm backbones are refused (merge the delta instead).
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_directory
from ..models.backbones import Backbone
from .delta import SparseDelta, checked

FORMATS = ("peft", "hf")
DELTA = "delta.safetensors"


def export_model(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> dict:
    """Write RUN's fine-tuned model (its ``delta.safetensors``) in format ``fmt`` to ``out`` (default RUN/<fmt>)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown value {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "peft" and importlib.util.find_spec("peft") is None:
        raise ValueError("format: peft needs the peft package (pip install peft)")
    run_dir = Path(run_dir)
    if not (run_dir / DELTA).is_file():
        raise ValueError(f"format: {str(run_dir)!r} has no {DELTA} to export (run `bayestune stage2 {run_dir}` "
                         "first; methods stochastic, full and lora write none)")
    out = Path(out) if out is not None else run_dir / fmt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {str(out)!r} already exists; choose another --out or remove it")
    sparse, backbone = merged(run_dir / DELTA, fmt)
    with atomic_directory(out) as tmp:
        summary = to_peft(sparse, backbone, tmp) if fmt == "peft" else to_hf(backbone, tmp)
    return {"format": fmt, "out": str(out), "backbone": sparse.backbone, "n_updated": sparse.n_updated, **summary}


def merged(path: Path, fmt: str) -> tuple[SparseDelta, Backbone]:
    """The delta at ``path`` and the pretrained backbone, without its search space's modules, with it merged in."""
    sparse, backbone, detach = checked(path)  # a one-line error naming the file if it does not fit
    detach()
    params = dict(backbone.model.named_parameters())
    for name in [*sparse.updates, *sparse.head]:
        if name not in params:
            raise ValueError(f"format: {fmt} cannot hold the delta's updates to {name} (a tensor the "
                             f"{sparse.search_space['name']} search space attaches, not part of the base model); "
                             "load it with bayestune_pyro.finetune.delta.merge")
    sparse.merge_into(backbone.model)  # modules a space attached but the delta left at θ̄ add exactly 0: not needed
    return sparse, backbone


def to_hf(backbone: Backbone, out: Path) -> dict:
    """``save_pretrained`` of the merged transformers model and its tokenizer."""
    if backbone.kind != "text":
        raise ValueError(f"format: hf writes a transformers checkpoint; {backbone.source!r} is a timm backbone "
                         "(load it with bayestune_pyro.finetune.delta.merge, or use --format peft)")
    backbone.model.save_pretrained(out)
    backbone.tokenizer.save_pretrained(out)
    return {}


def peft_plan(sparse: SparseDelta, model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                             list[str], float | None]:
    """(sparse Linear weights: module → (index, δ), modules held whole, Super-Tuning's ``sparsity``)."""
    modules = dict(model.named_modules())
    owners = {}  # updated module → its updated parameter names
    for name in [*sparse.updates, *sparse.head]:
        owner, _, leaf = name.rpartition(".")
        if not owner:
            raise ValueError(f"format: peft cannot hold the delta's updates to {name} (a parameter of the root "
                             "module; modules_to_save holds submodules only); use --format hf")
        owners.setdefault(owner, set()).add(leaf)
    linear = {m: sparse.updates[f"{m}.weight"] for m, leaves in owners.items()
              if type(modules[m]) is nn.Linear and leaves == {"weight"} and f"{m}.weight" in sparse.updates}
    density = {m: index.numel() / modules[m].weight.numel() for m, (index, _) in linear.items()}

    def size(f: float) -> float:  # bytes of the linear layers with sparse ones at fraction f
        return sum(8 * numel * f if density[m] <= f else 4 * numel
                   for m, numel in ((m, modules[m].weight.numel()) for m in linear))

    f = min(density.values(), key=size, default=None)
    targets = {m: v for m, v in linear.items() if density[m] <= f}
    whole = [m for m in owners if m not in targets]
    whole = [m for m in whole if not any(m.startswith(w + ".") for w in whole)]  # an enclosing module holds it
    targets = {m: v for m, v in targets.items() if not any(m.startswith(w + ".") for w in whole)}
    if not targets:
        return {}, sorted(whole), None
    sparsity = 1.0 - f
    while any(int(modules[m].weight.numel() * (1 - sparsity)) < index.numel() for m, (index, _) in targets.items()):
        sparsity = math.nextafter(sparsity, 0.0)  # Super-Tuning's own rounding must leave room for every δ
    return targets, sorted(whole), sparsity


def to_peft(sparse: SparseDelta, backbone: Backbone, out: Path) -> dict:
    """A Super-Tuning adapter (see the module docstring) written by PEFT's own ``save_pretrained``."""
    from peft import SupertuningConfig, get_peft_model

    targets, whole, sparsity = peft_plan(sparse, backbone.model)
    if not targets:
        raise ValueError(f"format: peft cannot hold the delta's updates to {whole[0]} (the delta updates no "
                         "nn.Linear weight alone, so PEFT's sparse tuner would hold nothing and modules_to_save "
                         "every update dense); use --format hf")
    config = SupertuningConfig(target_modules=sorted(targets), sparsity=sparsity, modules_to_save=whole or None)
    with warnings.catch_warnings():  # transformers' deprecation notice about a method PEFT calls
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(backbone.model, config)
    with torch.no_grad():
        for name, (index, delta) in targets.items():
            layer = model.base_model.model.get_submodule(name)
            support, values = layer.supertuning_indices["default"], layer.supertuning_values["default"]
            free = torch.ones(layer.get_base_layer().weight.numel(), dtype=torch.bool)
            free[index.long()] = False
            padding = free.nonzero().squeeze(1)[: support.numel() - index.numel()]
            support.copy_(torch.cat([index.long(), padding]))
            values.zero_()[: delta.numel()].copy_(delta)
    model.save_pretrained(out)
    return {"sparse_modules": len(targets), "sparsity": sparsity, "modules_to_save": whole,
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")}
