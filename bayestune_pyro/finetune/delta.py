"""The sparse delta: the only artifact stage 2 needs to ship.

``delta.safetensors`` holds, for every covered tensor with updated coordinates, ``<name>.index`` (flat indices
within the tensor) and ``<name>.delta`` (θ − θ̄ there), plus the full head as ``head.<name>``. Its header names
the backbone, the number of labels, the search space, d and the layout's hash, so ``merge`` rebuilds the
fine-tuned model from a fresh load of the pretrained backbone (with the search space's added modules attached
again, seeded as before): θ_i = θ̄_i + δ_i on the mask, θ̄_i everywhere else (the same float addition stage 2
did, so predictions are identical). ``merge`` first checks that the file fits that backbone: d and layout hash,
tensor names, index ranges, dtypes and the head's shapes. Files of format ``/1`` (before d and the hash) are read
with every other check.

An *ensemble* of S deltas over one mask (``finetune.ensemble``) is one such file with ``members`` = S in its header,
each ``<name>.delta`` of shape (S, n) and each head tensor with a leading S; :meth:`SparseDelta.member` takes one out.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..artifacts import LAYOUT_HASH, MISSING, Reader
from ..io import DIGEST, save_tensors
from ..models.backbones import Backbone, load_backbone
from ..models.lifted import Layout, covered_layout
from ..registry import SEARCH_SPACES
from ..search_spaces.subset import Subset

FORMAT = "bayestune-sparse-delta/2"
LEGACY_FORMAT = "bayestune-sparse-delta/1"  # without d and the layout hash


@dataclass
class SparseDelta:
    """Per-tensor (indices, deltas) for covered parameters, and the head's tensors."""

    updates: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor]
    backbone: str
    num_labels: int
    seed: int = 0
    pretrained: bool = True
    search_space: dict | None = None  # {"name": ..., options}; None: the pretrained parameters only (subset)
    d: int | None = None  # the covered layout's d and hash (None: a file of the legacy format)
    layout_sha256: str | None = None
    members: int = 0  # an ensemble of this many deltas over the same indices (0: a single delta)

    @classmethod
    def from_flat(cls, layout: Layout, index: torch.Tensor, delta: torch.Tensor, head: dict[str, torch.Tensor],
                  backbone: str, num_labels: int, seed: int = 0, pretrained: bool = True,
                  search_space: dict | None = None) -> SparseDelta:
        """Split flat (sorted) mask indices and their deltas into per-tensor pieces."""
        updates = {}
        bounds = torch.tensor(layout.offsets + (layout.d,), device=index.device)
        cuts = torch.searchsorted(index, bounds).tolist()
        for i, name in enumerate(layout.names):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                local = index[lo:hi] - layout.offsets[i]
                updates[name] = (local.to(torch.int32 if layout.numels[i] < 2**31 else torch.int64),
                                 delta[lo:hi].detach().clone())
        return cls(updates, {k: v.detach().clone() for k, v in head.items()}, backbone, num_labels, seed, pretrained,
                   search_space, layout.d, layout.sha256)

    @classmethod
    def stack(cls, deltas: list[SparseDelta]) -> SparseDelta:
        """The ensemble of single ``deltas`` that share their indices (the members of one mask)."""
        first = deltas[0]
        if any(d.members or d.updates.keys() != first.updates.keys() or not all(
                torch.equal(d.updates[n][0], first.updates[n][0]) for n in first.updates) for d in deltas):
            raise ValueError("deltas: an ensemble stacks single deltas over the same indices")
        updates = {n: (index, torch.stack([d.updates[n][1] for d in deltas]))
                   for n, (index, _) in first.updates.items()}
        head = {n: torch.stack([d.head[n] for d in deltas]) for n in first.head}
        return cls(updates, head, first.backbone, first.num_labels, first.seed, first.pretrained, first.search_space,
                   first.d, first.layout_sha256, members=len(deltas))

    def member(self, s: int) -> SparseDelta:
        """Delta ``s`` of an ensemble, as a single delta."""
        if not self.members:
            raise ValueError("member: this is a single delta, not an ensemble")
        if not (isinstance(s, int) and 0 <= s < self.members):
            raise ValueError(f"member: {s!r} is not one of the ensemble's members 0..{self.members - 1}")
        return SparseDelta({n: (i, v[s]) for n, (i, v) in self.updates.items()},
                           {n: h[s] for n, h in self.head.items()}, self.backbone, self.num_labels, self.seed,
                           self.pretrained, self.search_space, self.d, self.layout_sha256)

    @property
    def n_updated(self) -> int:
        return sum(int(i.numel()) for i, _ in self.updates.values())

    def save(self, path: str | os.PathLike) -> None:
        if self.d is None or self.layout_sha256 is None:
            raise ValueError("delta: d and layout_sha256 are unknown; build the delta with SparseDelta.from_flat")
        tensors = {}
        for name, (index, delta) in self.updates.items():
            tensors[f"{name}.index"], tensors[f"{name}.delta"] = index, delta
        tensors.update({f"head.{k}": v for k, v in self.head.items()})
        meta = {"format": FORMAT, "backbone": self.backbone, "num_labels": str(self.num_labels),
                "seed": str(self.seed), "pretrained": str(self.pretrained).lower(), "d": str(self.d),
                LAYOUT_HASH: str(self.layout_sha256)}
        if self.members:
            meta["members"] = str(self.members)
        if self.search_space is not None:
            meta["search_space"] = json.dumps(self.search_space)
        save_tensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """The delta at ``path``, its header and tensors checked (sorted indices, paired deltas, dtypes); a one-line
        ValueError naming the file and the field otherwise. :func:`merge` checks it against the backbone."""
        reader = Reader("delta", path)
        meta, tensors = reader.tensors()
        if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise reader.error(f"is not a {FORMAT} file (format={meta.get('format')!r})")
        current = meta["format"] == FORMAT
        if current and DIGEST not in meta:
            raise reader.error(f"has no {DIGEST} in its header")
        backbone = reader.value(meta, "backbone", (str,))
        num_labels = _integer(reader, meta, "num_labels", 1)
        seed = _integer(reader, meta, "seed", 0, default=0)
        pretrained = meta.get("pretrained", "true")
        if pretrained not in ("true", "false"):
            raise reader.error(f"has pretrained={pretrained!r}, not 'true' or 'false'")
        space = None
        if "search_space" in meta:
            try:
                space = json.loads(meta["search_space"])
            except json.JSONDecodeError:
                space = None
            if not (isinstance(space, dict) and isinstance(space.get("name"), str)):
                raise reader.error(f"has search_space={meta['search_space'][:60]!r}, not a JSON object with a name")
        d = _integer(reader, meta, "d", 0) if current else None
        layout_hash = reader.value(meta, LAYOUT_HASH, (str,)) if current else None
        members = _integer(reader, meta, "members", 1, default=0)
        lead = (members,) if members else ()
        head = {k[len("head."):]: reader.tensor(tensors, k, "float", lead + tuple(v.shape[len(lead):]))
                for k, v in tensors.items() if k.startswith("head.")}
        names = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith("head.")})
        reader.only(tensors, {f"head.{k}" for k in head} | {f"{n}.{end}" for n in names for end in ("index", "delta")})
        updates = {}
        for name in names:
            index = reader.index(tensors, f"{name}.index", None)
            updates[name] = (tensors[f"{name}.index"],
                             reader.tensor(tensors, f"{name}.delta", "float", lead + (index.numel(),)))
        sparse = cls(updates, head, backbone, num_labels, seed, pretrained == "true", space, d, layout_hash, members)
        if d is not None and sparse.n_updated > d:
            raise reader.error(f"has {sparse.n_updated} updated coordinates, more than d={d}")
        return sparse

    def check(self, reader: Reader, model: nn.Module, layout: Layout, head_names: list[str]) -> None:
        """The delta fits ``model`` (its search space attached; ``layout`` the covered part): d and layout hash,
        covered tensor names, index ranges, dtypes, and the head's names, shapes and dtypes."""
        if self.d is not None:
            reader.agree("d", self.d, layout.d, "the backbone")
            reader.agree(LAYOUT_HASH, self.layout_sha256, layout.sha256, "the backbone")
        named, numels = dict(model.named_parameters()), dict(zip(layout.names, layout.numels))
        for name, (index, delta) in self.updates.items():
            if name not in numels:
                raise reader.error(f"has {name}.index, but the backbone covers no tensor {name!r}")
            if index.numel() and int(index[-1]) >= numels[name]:
                raise reader.error(f"has {name}.index up to {int(index[-1])}, beyond the tensor's {numels[name]} "
                                   "entries")
            reader.agree(f"{name}.delta dtype", delta.dtype, named[name].dtype, "the backbone")
        for name in sorted(set(head_names) | set(self.head)):
            if name not in self.head or name not in head_names:
                where = "the delta" if name not in self.head else "the backbone's head"
                raise reader.error(f"has a head that does not fit: head.{name} is missing from {where}")
            reader.agree(f"head.{name} shape", tuple(self.head[name].shape), tuple(named[name].shape), "the backbone")
            reader.agree(f"head.{name} dtype", self.head[name].dtype, named[name].dtype, "the backbone")

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> nn.Module:
        """Add the deltas to ``model``'s pretrained weights and load the head, in place."""
        named = dict(model.named_parameters())
        for name, (index, delta) in self.updates.items():
            flat = named[name].data.view(-1)
            flat.index_add_(0, index.to(flat.device, torch.int64), delta.to(flat.device, flat.dtype))
        for name, value in self.head.items():
            named[name].data.copy_(value)
        return model


def merge(path: str | os.PathLike, device: str | torch.device = "cpu", *, backbone: str | None = None,
          num_labels: int | None = None, member: int | None = None) -> Backbone:
    """A fresh pretrained backbone with the delta at ``path`` merged in (of an ensemble: its delta ``member``), once
    the delta is checked against it (and against ``backbone`` and ``num_labels`` when given); a one-line ValueError
    naming the file otherwise."""
    sparse, loaded, _ = checked(path, backbone=backbone, num_labels=num_labels, member=member)
    sparse.merge_into(loaded.model.to(device))
    return loaded


def checked(path: str | os.PathLike, *, backbone: str | None = None, num_labels: int | None = None,
            member: int | None = None) -> tuple[SparseDelta, Backbone, Callable[[], None]]:
    """The delta at ``path`` (of an ensemble: its ``member``), a fresh pretrained backbone with the delta's search
    space attached, and what detaches that space again, once the delta is checked against them (see :func:`merge`)."""
    sparse, reader = SparseDelta.load(path), Reader("delta", path)
    if sparse.members and member is None:
        raise reader.error(f"is an ensemble of {sparse.members} deltas; merge one: member=0..{sparse.members - 1}")
    if member is not None:
        try:
            sparse = sparse.member(member)
        except ValueError as err:
            raise reader.error(str(err)) from None
    if backbone is not None:
        reader.agree("backbone", sparse.backbone, backbone, "the caller")
    if num_labels is not None:
        reader.agree("num_labels", sparse.num_labels, num_labels, "the caller")
    try:
        loaded = load_backbone(sparse.backbone, sparse.num_labels, pretrained=sparse.pretrained, seed=sparse.seed)
        space = Subset()
        if sparse.search_space is not None:
            options = {k: v for k, v in sparse.search_space.items() if k != "name"}
            spec = SEARCH_SPACES.get(sparse.search_space["name"])
            space = spec.build(spec.options.from_values(options, f"search space {spec.name}"))
        detach = space.attach(loaded.model)
        layout = covered_layout(loaded.model, space, loaded.head_names)
    except ValueError as err:
        raise reader.error(f"names a backbone or search space that cannot be built ({err})") from None
    sparse.check(reader, loaded.model, layout, loaded.head_names)
    return sparse, loaded, detach


def _integer(reader: Reader, meta: dict, key: str, minimum: int, default=MISSING) -> int:
    """A header entry holding a decimal integer >= ``minimum``."""
    if key not in meta and default is not MISSING:
        return default
    text = reader.value(meta, key, (str,))
    if not (text.isascii() and text.lstrip("-").isdigit() and int(text) >= minimum):
        raise reader.error(f"has {key}={text[:40]!r}, not an integer >= {minimum}")
    return int(text)
