"""Stage 2: fine-tune a budget of backbone coordinates and the head, with validation-based model selection.

A *tuner* owns what is trained and how one step updates it; :func:`fit` runs the steps, checks for NaNs,
evaluates on a validation split every ``eval_every`` steps and restores the best state. Every tuner trains the
head with AdamW at ``head_lr``; what differs is the backbone update:

- :class:`SparseFineTuner` (a fixed mask, every masked method): only a k-vector δ is trained and the network
  runs with θ = θ̄ + δ at the mask. Every unmasked coordinate is a copy of θ̄ — bitwise, whatever the optimiser
  does (decoupled weight decay acts on δ, i.e. pulls θ towards θ̄ on the mask only) — and the optimiser state is
  k-sized. By default (``backward="hooks"``, SIFT's memory-efficient update) the module holds one working copy
  of θ, written in place at the k masked coordinates after each step, and a post-accumulate hook gathers each
  parameter's gradient into δ's k-sized gradient, so no d-sized gradient outlives its tensor's backward node
  and tensors without a masked coordinate get no gradient at all. ``backward="functional"`` is the reference
  the tests hold it to: θ = θ̄ + scatter(δ) rebuilt every step and differentiated by autograd (d-sized work per
  step).
- ``dense.DenseFineTuner`` (full fine-tuning, L1-SP), ``lora.LoRATuner``, ``stochastic.StochasticTuner``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.lifted import LiftedBackbone
from .delta import SparseDelta

BACKWARDS = ("functional", "hooks")


@dataclass(frozen=True)
class Stage2Config:
    steps: int = 300
    lr: float = 1e-3
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    log_every: int = 20
    eval_every: int | None = None  # validate every this many steps (and at the end) when fit() gets a validator


class Tuner:
    """A stage-2 trainer. Subclasses set ``n_updated`` and define ``forward``, ``update`` and the trained state."""

    n_updated: int = 0

    def __init__(self, lifted: LiftedBackbone, loss_fn: Callable, config: Stage2Config):
        self.lifted, self.loss_fn, self.config = lifted, loss_fn, config
        self.device = lifted.theta_bar.device
        self.new_optimizers()

    def new_optimizers(self) -> None:
        """Fresh optimizers (no moments): the head's AdamW here, the backbone's in subclasses."""
        self.head_opt = torch.optim.AdamW(self.lifted.head_parameters(), lr=self.config.head_lr,
                                          weight_decay=self.config.weight_decay)

    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def update(self) -> None:
        """Apply the backbone update from the gradients of the last backward pass, then clear them."""
        raise NotImplementedError

    def trained(self) -> dict[str, torch.Tensor]:
        """The backbone's trained tensors (the head is added by :meth:`state`)."""
        raise NotImplementedError

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def n_changed(self) -> int | None:
        """How many coordinates left θ̄, where that differs from ``n_updated`` (None otherwise)."""
        return None

    def sparse_delta(self, backbone: str, num_labels: int, seed: int, pretrained: bool,
                     search_space: dict | None = None) -> SparseDelta | None:
        """The fine-tuned model as a sparse delta over θ̄ (None for tuners that train outside a fixed mask)."""
        return None

    def release(self) -> None:
        """Point the module's covered parameters back at θ̄, frozen (what the tuner trained stays in it)."""
        if self.lifted.bound is not None:
            self.lifted.unbind()

    def step(self, batch: dict) -> torch.Tensor:
        loss = self.loss_fn(self.forward(batch), batch["labels"])
        loss.backward()
        self.update()
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of everything trained (for keeping the best validation state)."""
        head = {f"head.{n}": p.detach().clone() for n, p in zip(self.lifted.head_names, self.lifted.head_parameters())}
        return {**{k: v.detach().clone() for k, v in self.trained().items()}, **head}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in zip(self.lifted.head_names, self.lifted.head_parameters()):
            p.copy_(state[f"head.{n}"])
        self.load_trained({k: v for k, v in state.items() if not k.startswith("head.")})


def fit(tuner: Tuner, batches: Iterator[dict], config: Stage2Config,
        validate: Callable[[Callable[[dict], torch.Tensor]], float] | None = None,
        progress: bool = True) -> dict:
    """Run ``config.steps`` steps; with ``validate`` (forward → score, higher is better) keep the best state.

    Returns the losses logged every ``log_every`` steps and, when validating, the (step, score) history and the
    step whose state was restored.
    """
    lifted = tuner.lifted
    losses, history, best = [], [], None
    bad = torch.zeros((), dtype=torch.bool, device=tuner.device)
    bar = tqdm(range(config.steps), desc="stage 2", disable=not progress, dynamic_ncols=True, leave=False)
    lifted.model.train()
    for step in bar:
        batch = {k: v.to(tuner.device, non_blocking=True) for k, v in next(batches).items()}
        loss = tuner.step(batch)
        bad |= ~torch.isfinite(loss)
        last = step == config.steps - 1
        if step % config.log_every == 0 or last:
            if bad.item():
                raise FloatingPointError(f"stage 2: loss became NaN/inf at or before step {step}; lower --stage2-lr")
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if validate is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            lifted.model.eval()
            score = validate(tuner.forward)
            lifted.model.train()
            history.append((step + 1, score))
            if best is None or score > best[1]:
                best = (step + 1, score, tuner.state())
    bar.close()
    lifted.model.eval()
    result = {"losses": losses}
    if best is not None:
        tuner.load_state(best[2])
        result.update(validation=history, best_step=best[0], best_score=best[1])
    return result


class SparseFineTuner(Tuner):
    """θ(δ) = θ̄ + δ on ``index`` (sorted flat indices), δ trained with AdamW together with the head."""

    def __init__(self, lifted: LiftedBackbone, index: torch.Tensor, loss_fn: Callable,
                 config: Stage2Config = Stage2Config(), backward: str = "hooks"):
        if backward not in BACKWARDS:
            raise ValueError(f"backward: unknown value {backward!r}; choose one of: {', '.join(BACKWARDS)}")
        self.index = index.to(lifted.theta_bar.device)
        self.n_updated = int(self.index.numel())
        self.delta = torch.zeros(self.n_updated, device=self.index.device, requires_grad=True)
        super().__init__(lifted, loss_fn, config)
        self.backward = backward
        if backward == "hooks":
            self._bind_hooks()

    def new_optimizers(self) -> None:
        super().new_optimizers()
        self.opt = torch.optim.AdamW([self.delta], lr=self.config.lr, weight_decay=self.config.weight_decay)

    def theta(self) -> torch.Tensor:
        return self.lifted.theta_bar.index_add(0, self.index, self.delta)

    def forward(self, batch: dict) -> torch.Tensor:
        if self.backward == "hooks":
            args, kwargs = self.lifted.backbone.inputs(batch)
            return self.lifted.backbone.logits(self.lifted.model(*args, **kwargs))
        return self.lifted(self.theta(), batch)

    @torch.no_grad()
    def _bind_hooks(self) -> None:
        """One working copy θ in the module; each covered tensor's gradient is gathered at its masked entries."""
        layout, lifted = self.lifted.layout, self.lifted
        self.work = lifted.theta_bar.clone()
        self.delta.grad = torch.zeros_like(self.delta)
        self.hooks = []
        bounds = torch.tensor(layout.offsets + (layout.d,), device=self.device)
        cuts = torch.searchsorted(self.index, bounds).tolist()
        for i, (param, view) in enumerate(zip(lifted.covered_parameters(), layout.split(self.work).values())):
            param.data = view
            lo, hi = cuts[i], cuts[i + 1]
            param.requires_grad_(hi > lo)  # no masked coordinate: no gradient computed at all
            if hi > lo:
                local = self.index[lo:hi] - layout.offsets[i]
                self.hooks.append(param.register_post_accumulate_grad_hook(self._gather(local, lo, hi)))

    def _gather(self, local: torch.Tensor, lo: int, hi: int):
        def hook(param: torch.Tensor) -> None:
            self.delta.grad[lo:hi] += param.grad.view(-1)[local]
            param.grad = None  # the tensor-sized gradient lives only inside its own backward node
        return hook

    @torch.no_grad()
    def _write_work(self) -> None:
        self.work[self.index] = self.lifted.theta_bar[self.index] + self.delta

    def update(self) -> None:
        self.opt.step()
        if self.backward == "hooks":
            self.delta.grad.zero_()
            self._write_work()
        else:
            self.opt.zero_grad(set_to_none=True)

    def trained(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}

    @torch.no_grad()
    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        self.delta.copy_(state["delta"])
        if self.backward == "hooks":
            self._write_work()

    @torch.no_grad()
    def release(self) -> None:
        if self.backward == "hooks":
            for hook in self.hooks:
                hook.remove()
            self.hooks = []
            self.lifted.unbind()

    def sparse_delta(self, backbone: str, num_labels: int, seed: int, pretrained: bool,
                     search_space: dict | None = None) -> SparseDelta:
        named = dict(self.lifted.model.named_parameters())
        head = {n: named[n] for n in self.lifted.head_names}
        return SparseDelta.from_flat(self.lifted.layout, self.index, self.delta, head, backbone, num_labels,
                                     seed, pretrained, search_space)

