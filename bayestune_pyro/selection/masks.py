"""Stage-2 masks: which covered coordinates are fine-tuned, chosen from a score per coordinate (λ̂ for BayesTune).

A mask is the sorted flat indices of the chosen coordinates in θ's layout. Top-p keeps exactly ⌊p·d⌋ coordinates,
ties broken towards the lower flat index (a stable sort), so the same scores always give the same mask; a
threshold keeps every coordinate with score > λ_th. File: ``mask.safetensors``, the indices and in its header their
record (p, λ_th, d, count per parameter tensor, the layout and its hash, the backbone), with ``mask.json`` a readable
copy of the record (see ``artifacts``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import LAYOUT_HASH, TENSORS_HASH, Reader, save_paired
from ..io import DIGEST
from ..models.lifted import Layout

FORMAT = "bayestune-mask/2"
FIELDS = ("format", "method", "p", "threshold", "d", "k", "counts", "layout", LAYOUT_HASH, "backbone", TENSORS_HASH,
          DIGEST)  # mask.json's own fields; any other is the selection's ``info``


@dataclass
class Mask:
    """Sorted flat indices of the fine-tuned coordinates of θ, with how they were chosen."""

    index: torch.Tensor
    layout: Layout
    p: float | None = None
    threshold: float | None = None
    method: str = "bayestune"
    info: dict = field(default_factory=dict)
    backbone: str | None = None  # the backbone it was chosen on (None: not recorded)

    @property
    def k(self) -> int:
        return int(self.index.numel())

    def counts(self) -> dict[str, int]:
        return self.layout.counts(self.index)

    def dense(self) -> torch.Tensor:
        """The mask as a boolean vector of length d."""
        out = torch.zeros(self.layout.d, dtype=torch.bool, device=self.index.device)
        out[self.index] = True
        return out

    def save(self, run_dir: str | os.PathLike) -> None:
        """``mask.safetensors`` with its record, then the record's readable copy ``mask.json``."""
        save_paired(Path(run_dir) / "mask.safetensors", {"index": self.index.to(torch.int64)}, {
            "method": self.method, "p": self.p, "threshold": self.threshold, "d": self.layout.d, "k": self.k,
            "counts": self.counts(), "layout": self.layout.to_json(), LAYOUT_HASH: self.layout.sha256,
            "backbone": self.backbone, **self.info,
        }, FORMAT)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", *, layout: Layout | None = None,
             backbone: str | None = None) -> Mask:
        """The mask of ``run_dir``, every field checked, and made for ``layout`` and ``backbone`` if given (the
        run's); a one-line ValueError naming the file and the field otherwise."""
        tensor_file = Reader("mask", Path(run_dir) / "mask.safetensors")
        record_file, meta, tensors = tensor_file.paired(FORMAT)
        stored = record_file.layout(meta)
        method = record_file.value(meta, "method", (str,))
        p = record_file.value(meta, "p", (float, None))
        threshold = record_file.value(meta, "threshold", (float, None))
        k = record_file.count(meta, "k")
        counts = record_file.value(meta, "counts", (dict,))
        mask_backbone = record_file.value(meta, "backbone", (str, None), None)
        tensor_file.only(tensors, {"index"})
        index = tensor_file.index(tensors, "index", stored.d)
        record_file.agree("k", k, index.numel(), "its index")
        record_file.agree("counts", counts, stored.counts(index), "its index")
        info = {key: v for key, v in meta.items() if key not in FIELDS}
        mask = cls(index.to(device), stored, p, threshold, method, info, mask_backbone)
        if layout is not None:
            mask.expect(run_dir, layout, backbone)
        return mask

    def expect(self, run_dir: str | os.PathLike, layout: Layout, backbone: str | None) -> None:
        """The mask (read from ``run_dir``) was made for ``layout`` and ``backbone``: d, layout hash and backbone."""
        Reader("mask", Path(run_dir) / "mask.safetensors").expect(layout, self.layout, backbone, self.backbone,
                                                           "the backbone")


def budget(p: float, d: int) -> int:
    """⌊p·d⌋, the number of coordinates a top-p mask holds."""
    check_fraction(p)
    return math.floor(p * d)


def check_fraction(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"p: must be a fraction in (0, 1], got {p!r}")


def top_p(scores: torch.Tensor, p: float, layout: Layout, method: str = "bayestune") -> Mask:
    """The ⌊p·d⌋ highest-scoring coordinates; equal scores are taken in flat-index order."""
    return top_k(scores, budget(p, scores.numel()), layout, method, p=p)


def top_k(scores: torch.Tensor, k: int, layout: Layout, method: str, p: float | None = None, **info) -> Mask:
    """The k highest-scoring coordinates (ties in flat-index order) as a mask; p defaults to k / d."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k: must be in [0, {scores.numel()}], got {k!r}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores: {int(torch.isnan(scores).sum())} of {scores.numel()} are NaN; a mask needs finite "
                         "or infinite scores (inspect the posterior's diagnostics)")
    return Mask(_top_index(scores.reshape(-1), k), layout, p=k / layout.d if p is None else p, method=method,
                info=info)


SAMPLE = 1 << 20  # scores read to guess the cut; the guess only decides speed, never the result


def _top_index(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest scores, ties towards the lower index (the stable-sort rule).

    A strided sample guesses a cut just below the k-th largest score; only the ≈k coordinates above it are
    examined, so the cost is two passes over d instead of a sort of d. A guess that keeps too few is replaced by
    the exact k-th value.
    """
    d = flat.numel()
    if k in (0, d):
        return torch.arange(k, device=flat.device)
    sample = flat[:: max(1, d // SAMPLE)]
    m = sample.numel()
    f = k / d
    f = min(1.0, f + 5 * math.sqrt(f * (1 - f) / m) + 2 / m)  # ~5 sd above the target fraction
    cut = torch.kthvalue(sample, max(1, m - math.ceil(f * m) + 1)).values
    index = torch.nonzero(flat >= cut).flatten()
    if index.numel() < k:
        index = torch.nonzero(flat >= torch.kthvalue(flat, d - k + 1).values).flatten()
    values = flat[index]
    kth = torch.kthvalue(values, values.numel() - k + 1).values
    above = index[values > kth]
    tied = index[values == kth][: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def above_threshold(scores: torch.Tensor, threshold: float, layout: Layout, method: str = "bayestune") -> Mask:
    """Every coordinate whose score exceeds λ_th."""
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold: must be a positive number, got {threshold!r}")
    index = torch.nonzero(scores > threshold).flatten()
    return Mask(index, layout, p=index.numel() / scores.numel(), threshold=threshold, method=method)
