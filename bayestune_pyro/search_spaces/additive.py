"""Search space ``additive``: zero-initialised modules attached to the network, λ only on them (θ̄ = their init).

The paper's additive search space (Sec. 5.3): the backbone stays frozen at its pretrained values, and every
chosen layer gains small modules whose output is exactly 0 at initialisation, so the network's function at θ̄ is
the pretrained one, bitwise. The posterior then decides which module coordinates leave their start. Each module
has one random factor and one zero factor, so the gradient is not 0 at the start. Kinds:

- ``lora``     on every linear layer (an ``nn.Linear``, or a pointwise ``nn.Conv2d`` as in EfficientNet's blocks)
               matching ``additive_lora_targets``: y += (x·Aᵀ)·Bᵀ with A (w × in, random) and B (out × w, zeros).
- ``adapter``  after every linear layer matching ``additive_adapter_targets`` (Houlsby's placement: the
               attention and feed-forward output projections, before the residual; in an EfficientNet, each
               block's pointwise projection): y += GELU(y·Dᵀ)·Uᵀ with D (w × out, random) and U (out × w, zeros).
- ``prompt``   on every self-attention matching ``additive_prompt_targets`` (timm's ``Attention``, transformers'
               BERT-style self-attention): w prompt tokens P (w × hidden, random) that every token attends to in
               each head, in a softmax of their own, gated per channel by g (hidden, zeros):
               context += g ⊙ softmax(q·K(P)ᵀ/√d_h)·V(P). This is the zero-init gated prompt of LLaMA-Adapter; a
               plain VPT prompt prepended to the tokens would change the network's function at any value, zero
               included, so it could not have θ̄ = the pretrained function.

w is ``additive_width``. Added tensors are named ``<module>.bt_<kind>_<factor>``. With ``additive_backbone`` the
backbone's own parameters are covered too (the paper's "both"). Each module's random factor is drawn from a
generator seeded by ``additive_seed`` and the module's name, so ``merge`` rebuilds the same θ̄ from the delta
file's record of the space, and switching one kind on or off leaves the others' factors unchanged.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Options, check_at_least_one, option
from . import SearchSpace, Space, register

KINDS = ("lora", "adapter", "prompt")
PREFIX = "bt_"


def _on_features(module: nn.Module, t: torch.Tensor, f) -> torch.Tensor:
    """``f`` applied along the feature axis of ``t``: the last one, or a 1×1 convolution's channels (axis 1)."""
    return f(t.movedim(1, -1)).movedim(-1, 1) if isinstance(module, nn.Conv2d) else f(t)


def _lora_hook(module: nn.Module, inputs, out):
    return out + _on_features(module, inputs[0], lambda x: (x @ module.bt_lora_A.T) @ module.bt_lora_B.T)


def _adapter_hook(module: nn.Module, inputs, out):
    return out + _on_features(module, out, lambda y: F.gelu(y @ module.bt_adapter_down.T) @ module.bt_adapter_up.T)


def _prompt_context(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    scale: float) -> torch.Tensor:
    """g ⊙ softmax(q·kᵀ·scale)·v per head: q (B, N, D) of the tokens, k and v (w, D) of the prompt tokens."""
    (batch, n, dim), w = q.shape, k.shape[0]
    q = q.reshape(batch, n, heads, dim // heads).transpose(1, 2)
    k, v = (t.reshape(w, heads, dim // heads).transpose(0, 1) for t in (k, v))
    attention = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    return (attention @ v).transpose(1, 2).reshape(batch, n, dim) * module.bt_prompt_gate


def _timm_prompt_hook(module: nn.Module, inputs, out):
    """timm ``Attention``: the gated prompt context goes through ``proj`` (without its bias) into the output."""
    x, tokens, dim = inputs[0], module.bt_prompt_tokens, module.num_heads * module.head_dim
    weight, bias = module.qkv.weight, module.qkv.bias
    q, k, v = (F.linear(t, weight[i * dim:(i + 1) * dim], None if bias is None else bias[i * dim:(i + 1) * dim])
               for i, t in enumerate((x, tokens, tokens)))
    heads, per_head = module.num_heads, module.head_dim
    q = module.q_norm(q.unflatten(-1, (heads, per_head))).flatten(-2)
    k = module.k_norm(k.unflatten(-1, (heads, per_head))).flatten(-2)
    return out + F.linear(_prompt_context(module, q, k, v, heads, module.scale), module.proj.weight)


def _transformers_prompt_hook(module: nn.Module, args, kwargs, out):
    """transformers' BERT-style self-attention: the gated prompt context is added to its context output."""
    x, tokens = args[0] if args else kwargs["hidden_states"], module.bt_prompt_tokens
    context = _prompt_context(module, module.query(x), module.key(tokens), module.value(tokens),
                              module.num_attention_heads, module.scaling)
    return (out[0] + context, *out[1:])


def _attach_prompt(module: nn.Module, name: str, width: int, generator: torch.Generator, like: dict):
    if isinstance(getattr(module, "qkv", None), nn.Linear) and all(
            hasattr(module, a) for a in ("num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj")):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity) or getattr(module, "gate", None):
            raise ValueError(f"additive_prompt_targets: {name!r} normalises or gates its attention output before "
                             "proj; the gated prompt supports timm's plain Attention")
        hidden = module.qkv.in_features
        handle = module.register_forward_hook(_timm_prompt_hook)
    elif all(isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")) \
            and hasattr(module, "num_attention_heads"):
        hidden = module.query.in_features
        handle = module.register_forward_hook(_transformers_prompt_hook, with_kwargs=True)
    else:
        raise ValueError(f"additive_prompt_targets: {name!r} ({type(module).__name__}) is not a self-attention the "
                         "prompt can join; match timm Attention modules (e.g. '*attn') or transformers "
                         "self-attentions (e.g. '*attention.self')")
    module.bt_prompt_tokens = nn.Parameter(torch.randn(width, hidden, generator=generator).to(**like))
    module.bt_prompt_gate = nn.Parameter(torch.zeros(hidden, **like))
    return handle


def _features(module: nn.Module, name: str, kind: str) -> tuple[int, int]:
    """(in, out) features of an ``nn.Linear`` or of a pointwise (1×1, stride 1, ungrouped) ``nn.Conv2d``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) \
            and module.groups == 1:
        return module.in_channels, module.out_channels
    raise ValueError(f"additive_{kind}_targets: {name!r} is a {type(module).__name__}; {kind} attaches to an "
                     "nn.Linear or a pointwise nn.Conv2d")


def _attach_linear(kind: str):
    """LoRA factors on, or an adapter after, a linear layer: the random factor is Kaiming-uniform, as
    ``nn.Linear`` initialises its weight (bound 1/√fan-in); the zero factor is 0."""
    random, zero, fan_in, hook = {"lora": ("A", "B", 0, _lora_hook), "adapter": ("down", "up", 1, _adapter_hook)}[kind]

    def attach(module: nn.Module, name: str, width: int, generator: torch.Generator, like: dict):
        features = _features(module, name, kind)
        bound = 1.0 / math.sqrt(features[fan_in])
        setattr(module, f"{PREFIX}{kind}_{random}", nn.Parameter(
            ((torch.rand(width, features[fan_in], generator=generator) * 2 - 1) * bound).to(**like)))
        setattr(module, f"{PREFIX}{kind}_{zero}", nn.Parameter(torch.zeros(features[1], width, **like)))
        return module.register_forward_hook(hook)

    return attach


ATTACH = {"lora": _attach_linear("lora"), "adapter": _attach_linear("adapter"), "prompt": _attach_prompt}


@dataclass(frozen=True)
class Additive(SearchSpace):
    kinds: tuple[str, ...] = KINDS
    width: int = 10
    lora_targets: tuple[str, ...] = ("*query", "*value", "*q_proj", "*v_proj", "*qkv", "*conv_pw")
    adapter_targets: tuple[str, ...] = ("*output.dense", "*attn.proj", "*mlp.fc2", "*o_proj", "*down_proj",
                                        "*conv_pwl")
    prompt_targets: tuple[str, ...] = ("*attn", "*attention.self")
    backbone: bool = False
    seed: int = 0

    def attach(self, model: nn.Module) -> Callable[[], None]:
        targets = {"lora": self.lora_targets, "adapter": self.adapter_targets, "prompt": self.prompt_targets}
        attached = []  # (module, kind, its hook)
        for name, module in list(model.named_modules()):
            weight = next(module.parameters(), None)
            like = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
            for kind in (k for k in KINDS if k in self.kinds):
                if any(fnmatchcase(name, p) for p in targets[kind]):
                    generator = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(f"{kind}:{name}".encode()))
                    attached.append((module, kind, ATTACH[kind](module, name, self.width, generator, like)))
        if not attached:
            raise ValueError(f"search_space: additive kinds={list(self.kinds)} found no module matching their "
                             f"targets ({', '.join(f'{k}: {list(targets[k])}' for k in self.kinds)})")

        def remove() -> None:
            for module, kind, hook in attached:
                hook.remove()
                for factor in [n for n, _ in module.named_parameters(recurse=False) if n.startswith(PREFIX + kind)]:
                    delattr(module, factor)

        return remove

    def covered(self, names: list[str], head_names: list[str]) -> list[str]:
        head = set(head_names)
        return [n for n in names if n not in head and (self.backbone or self.added(n))]

    def added(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1].startswith(PREFIX)


# random factor → (its zero partner, the partner's axis that pairs with the random factor's rows; None: any coordinate)
PARTNERS = {"lora_A": ("lora_B", 0), "adapter_down": ("adapter_up", 0), "prompt_tokens": ("prompt_gate", None)}


def stranded(chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per random factor in ``chosen`` (a bool per coordinate of each added tensor, by name, e.g.
    ``Layout.split(mask.dense())``): the chosen coordinates that stage 2 cannot move.

    A random factor's row r feels the loss only through its zero partner's column r (LoRA: ∂L/∂A[r] ∝ B[:, r];
    adapter: ∂L/∂D[r] ∝ U[:, r]), and the prompt tokens only through the gate. A partner with nothing chosen
    stays 0 in stage 2, so the random coordinates it pairs with keep a zero gradient.
    """
    out = {}
    for name, mask in chosen.items():
        module, _, factor = name.rpartition(".")
        if not factor.startswith(PREFIX) or factor[len(PREFIX):] not in PARTNERS:
            continue
        partner, axis = PARTNERS[factor[len(PREFIX):]]
        partner_mask = chosen.get(f"{module}.{PREFIX}{partner}")
        if partner_mask is None:  # the partner is not covered: it is frozen at 0
            alive = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        elif axis is None:
            alive = partner_mask.any().expand(mask.shape[0])
        else:
            alive = partner_mask.any(dim=axis)
        out[name] = mask & ~alive.unsqueeze(1)
    return out


@dataclass
class AdditiveOptions(Options):
    additive_kinds: list[str] = option(list(KINDS), "additive: the kinds of zero-initialised module to attach",
                                       nargs="+", choices=KINDS)
    additive_width: int = option(10, "additive: width w of every module (LoRA rank, adapter bottleneck, prompt "
                                 "tokens)")
    additive_lora_targets: list[str] = option(list(Additive.lora_targets), "additive: globs of the nn.Linear "
                                              "layers that get LoRA factors", nargs="+")
    additive_adapter_targets: list[str] = option(list(Additive.adapter_targets), "additive: globs of the nn.Linear "
                                                 "layers followed by an adapter", nargs="+")
    additive_prompt_targets: list[str] = option(list(Additive.prompt_targets), "additive: globs of the "
                                                "self-attention modules that get gated prompt tokens", nargs="+")
    additive_backbone: bool = option(False, "additive: cover the backbone's own parameters too (the paper's both)")
    additive_seed: int = option(0, "additive: seed of the random factors (LoRA A, adapter down, prompt tokens)")

    def check(self):
        check_at_least_one(self, "additive_width")
        for kind in self.additive_kinds:
            if kind not in KINDS:
                raise ValueError(f"additive_kinds: unknown value {kind!r}; choose from: {', '.join(KINDS)}")
        if not self.additive_kinds:
            raise ValueError("additive_kinds: empty; choose from: " + ", ".join(KINDS))


def build(o: AdditiveOptions) -> Additive:
    return Additive(tuple(o.additive_kinds), o.additive_width, tuple(o.additive_lora_targets),
                    tuple(o.additive_adapter_targets), tuple(o.additive_prompt_targets), o.additive_backbone,
                    o.additive_seed)


def step_sizes(o: AdditiveOptions) -> dict:
    """Module coordinates start at 0 and need larger steps than pretrained weights: stage 1's θ step, stage 2's
    masked rate and the dense module rate (``full``, ``l1sp``), each chosen on validation
    (benchmarks/results/glue-minilm-additive.md). With the backbone covered too, the backbone's defaults stay."""
    return {} if o.additive_backbone else {"lr": 1e-3, "stage2_lr": 1e-2, "dense_lr": 3e-3}


register(Space("additive", "zero-initialised LoRA factors, adapters and gated prompts attached to the network, "
               "λ only on them", AdditiveOptions, build, step_sizes))
