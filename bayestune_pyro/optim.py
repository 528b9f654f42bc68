"""BayesTune's two stages as ``torch.optim`` optimizers, for a user's own training loop (or a transformers ``Trainer``).

- :class:`BayesTuneSGLD`: stage 1, the ``sgld`` engine's update of (θ, λ) on the given parameters, and the
  Rao-Blackwellised λ̂ that cuts the mask (:meth:`BayesTuneSGLD.mask`).
- :class:`MaskedAdamW`: stage 2, AdamW on the masked coordinates only, every other coordinate bitwise at its start.
- :class:`GaussianSGLD`: the Bayesian stage 2 (``finetune.ensemble``), the same SGLD kernel under a Gaussian prior.

The math is the package's: the prior gradient of ``models.gamma_laplace``, the kernel of ``inference.sgld``, E[λ | θ]
of ``models.lambda_conditional`` and the top-p cut of ``selection.masks``; here they run per parameter tensor.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import SimpleNamespace

import torch
from torch.optim.adam import adam

from .config import check_positive
from .inference.posterior import ESTIMATORS
from .inference.sgld import SGLD, SGLDConfig
from .models.gamma_laplace import prior_grad_
from .models.lambda_conditional import LambdaConditional
from .models.lifted import Layout
from .selection.masks import top_p


def _evaluate(closure) -> torch.Tensor | None:
    """The loss of an optimizer's ``closure`` (which re-runs the backward pass), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class BayesTuneSGLD(torch.optim.Optimizer):
    """Stage 1 on a model's parameters: λ_i ~ Gamma(α, β), θ_i ~ Laplace(θ̄_i, λ_i), θ̄ their values at construction.

    After ``loss.backward()`` of the mean per-example NLL, :meth:`step` adds the prior gradient (1/N̂)·∇(−log p(θ,
    λ)) to each ``.grad`` (making it ĝ = ∇(U/N̂)) and updates θ in place and log λ with the SGLD kernel: step sizes
    ``lr`` (θ) and ``lr_lambda`` (log λ) per param group, temperature γ², the preconditioner (rmsprop's ε defaults
    to 1/(λ₀·N̂), as in the engine). A param group with ``prior=False`` is the head: a point estimate trained by Adam
    at its ``lr`` (the kernel's adam mode at γ = 0, i.e. ``torch.optim.Adam``), as the engine trains it.

    The first ``warmup`` steps optimise θ on the likelihood alone (no prior, no noise, λ fixed), the next ``burnin``
    sample without collecting; then the preconditioner is frozen (``freeze_preconditioner``) and every ``thin``-th
    step adds E[λ | θ] (``estimator="rao-blackwell"``) or λ (``"draws"``) to the running mean λ̂. γ = 0 is the
    ``map`` engine: no noise, no Jacobian (the mode of the model's own density in λ), λ̂ from ``draws`` by default.
    Parameters without a ``.grad`` are skipped in that step (no data, no prior move). At γ > 0, a coordinate whose
    gradient was 0 at every step keeps its prior, so its λ̂ is the prior mean α/β exactly (``inference.posterior``).
    Build it after moving the
    model to its device; every parameter with a prior must share one device and dtype.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, lr_lambda: float = 1e-2, *, n_hat: float = 1e9,
                 gamma: float = 1.0, alpha: float = 0.01, beta: float = 100.0, lambda_init: float = 1e-4,
                 preconditioner: str = "rmsprop", rho: float = 0.9999, precond_eps: float | None = None,
                 clip_norm: float | None = None, freeze_preconditioner: bool = True, warmup: int = 0, burnin: int = 0,
                 thin: int = 1, estimator: str | None = None, seed: int = 0):
        self.n_hat, self.lambda_init, self.alpha, self.beta = n_hat, lambda_init, alpha, beta
        check_positive(self, "n_hat", "lambda_init")
        config = SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner=preconditioner, rho=rho,
                            eps=precond_eps or 1.0 / (lambda_init * n_hat), clip_norm=clip_norm,
                            freeze_preconditioner=freeze_preconditioner)
        for name, value, least in (("warmup", warmup, 0), ("burnin", burnin, 0), ("thin", thin, 1)):
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name}: must be an integer >= {least}, got {value!r}")
        self.estimator = estimator or ("rao-blackwell" if gamma > 0 else "draws")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: unknown value {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        self.warmup, self.burnin, self.thin = warmup, burnin, thin
        self.steps = self.draws = 0
        super().__init__(params, {"lr": lr, "lr_lambda": lr_lambda, "prior": True})
        self.prior = [p for g in self.param_groups if g["prior"] for p in g["params"]]
        self.head = [p for g in self.param_groups if not g["prior"] for p in g["params"]]
        if not self.prior:
            raise ValueError("params: BayesTuneSGLD needs at least one parameter with a prior (prior=True)")
        like = {(p.device, p.dtype) for p in self.prior}
        if len(like) != 1:
            raise ValueError(f"params: the parameters with a prior must share one device and dtype, got "
                             f"{sorted(map(str, like))}")
        (device, dtype), = like
        self.conditional = LambdaConditional(alpha, beta, device=device, dtype=dtype)
        self.jacobian = gamma > 0
        with torch.no_grad():
            for p in self.prior:
                self.state[p].update(theta_bar=p.detach().clone(), log_lambda=torch.full_like(p, math.log(lambda_init)),
                                     lambda_hat=torch.zeros_like(p), touched=torch.zeros_like(p, dtype=torch.bool))
        self.grad_lambda = [torch.zeros_like(p) for p in self.prior]
        largest = max(p.numel() for p in self.prior)
        self.work = [torch.empty(largest, device=device, dtype=dtype) for _ in range(3)]
        self.kernel = SGLD(config, self._sites(), torch.Generator(device=device).manual_seed(seed))
        self.head_kernel = SGLD(SGLDConfig(gamma=0.0, preconditioner="adam"), self._head_sites(),
                                torch.Generator(device=device)) if self.head else None  # noise-free: no draws

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "kernel"):
            raise ValueError("param_groups: BayesTuneSGLD takes all its parameters at construction")
        super().add_param_group(param_group)
        check_positive(SimpleNamespace(**param_group), "lr", "lr_lambda")
        if not isinstance(param_group["prior"], bool):
            raise ValueError(f"prior: must be True or False, got {param_group['prior']!r}")

    def _sites(self) -> dict[str, torch.Tensor]:
        sites = {}
        for i, p in enumerate(self.prior):
            sites[f"theta{i}"], sites[f"lambda{i}"] = p, self.state[p]["log_lambda"]
        return sites

    def _head_sites(self) -> dict[str, torch.Tensor]:
        return {f"head{j}": p for j, p in enumerate(self.head)}

    @torch.no_grad()
    def step(self, closure=None):
        """One transition from the gradients of the last backward pass (which it overwrites with ĝ)."""
        loss = _evaluate(closure)
        warm = self.steps < self.warmup
        if self.steps == self.warmup + self.burnin and self.kernel.config.freeze_preconditioner:
            self.kernel.freeze()
        grads, lrs = {}, {}
        for i, (p, group) in enumerate(self._with_groups(self.prior)):
            if p.grad is None:
                continue
            grads[f"theta{i}"], lrs[f"theta{i}"] = p.grad, group["lr"]
            state, n = self.state[p], p.numel()
            state["touched"].logical_or_(p.grad != 0)  # the likelihood's gradient, before the prior's is added
            if warm:
                continue
            prior_grad_(p, state["theta_bar"], state["log_lambda"], p.grad, self.grad_lambda[i], 1.0 / self.n_hat,
                        tuple(w[:n].view_as(p) for w in self.work), alpha=self.alpha, beta=self.beta,
                        jacobian=self.jacobian)
            grads[f"lambda{i}"], lrs[f"lambda{i}"] = self.grad_lambda[i], group["lr_lambda"]
        self.kernel.step(self._sites(), grads, lrs, noise=not warm)
        if self.head_kernel is not None:
            grads, lrs = {}, {}
            for j, (p, group) in enumerate(self._with_groups(self.head)):
                if p.grad is not None:
                    grads[f"head{j}"], lrs[f"head{j}"] = p.grad, group["lr"]
            self.head_kernel.step(self._head_sites(), grads, lrs, noise=False)
        self.steps += 1
        sampled = self.steps - self.warmup - self.burnin
        if sampled > 0 and sampled % self.thin == 0:
            self._collect()
        return loss

    def _with_groups(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return [(p, group_of[id(p)]) for p in params]

    def _collect(self) -> None:
        """Add the current E[λ | θ] (or λ) to the running mean λ̂."""
        self.draws += 1
        for p in self.prior:
            state = self.state[p]
            x = self.work[0][: p.numel()].view_as(p)
            if self.estimator == "rao-blackwell":
                self.conditional.mean(torch.sub(p, state["theta_bar"], out=x).abs_(), out=x)
            else:
                torch.exp(state["log_lambda"], out=x)
            state["lambda_hat"].lerp_(x, 1.0 / self.draws)

    def lambda_hat(self) -> dict[torch.Tensor, torch.Tensor]:
        """λ̂ per parameter with a prior: the mean of E[λ | θ] (or of λ) over the collected draws; at γ > 0, α/β on
        coordinates the data never touched."""
        if self.draws == 0:
            raise ValueError(f"lambda_hat: no draws collected yet; step() collects every thin={self.thin}-th step "
                             f"after warmup={self.warmup} + burnin={self.burnin} steps")
        if not self.jacobian:  # γ = 0: the mode, which the prior alone would pull to 0
            return {p: self.state[p]["lambda_hat"] for p in self.prior}
        return {p: torch.where(self.state[p]["touched"], self.state[p]["lambda_hat"], self.alpha / self.beta)
                for p in self.prior}

    def mask(self, p: float) -> dict[torch.Tensor, torch.Tensor]:
        """Per parameter with a prior, a boolean mask of its coordinates among the top ⌊p·d⌋ by λ̂ over all d of
        them (``selection.masks.top_p``: ties in parameter order, then flat index). Feed it to :class:`MaskedAdamW`."""
        hats = self.lambda_hat()
        layout = Layout.of([(str(i), q.shape) for i, q in enumerate(self.prior)])
        chosen = top_p(torch.cat([h.reshape(-1) for h in hats.values()]), p, layout).dense()
        return dict(zip(self.prior, layout.split(chosen).values()))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every parameter with a prior back at θ̄ (e.g. before stage 2; the head keeps its values)."""
        for p in self.prior:
            p.copy_(self.state[p]["theta_bar"])

    def state_dict(self) -> dict:
        state = super().state_dict()  # θ̄, log λ and λ̂ per parameter, the param groups
        state["bayestune"] = {"steps": self.steps, "draws": self.draws, "kernel": self.kernel.state_dict(),
                              "head_kernel": None if self.head_kernel is None else self.head_kernel.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        if "bayestune" not in state_dict:
            raise ValueError("state_dict: not a BayesTuneSGLD state (it has no 'bayestune' entry)")
        extra = state_dict.pop("bayestune")
        super().load_state_dict(state_dict)
        for p in self.prior:  # torch.optim casts every state tensor to its parameter's dtype; a state saved
            state = self.state[p]  # before touches were kept knows none: the chain's estimate everywhere
            state["touched"] = state["touched"].bool() if "touched" in state else torch.ones_like(p, dtype=torch.bool)
        self.steps, self.draws = extra["steps"], extra["draws"]
        for kernel, saved in ((self.kernel, extra["kernel"]), (self.head_kernel, extra["head_kernel"])):
            if kernel is not None:  # a generator state must be a CPU tensor, wherever the state was moved
                kernel.load_state_dict({**saved, "generator": saved["generator"].cpu()})


class MaskedAdamW(torch.optim.Optimizer):
    """Stage 2 on a model's parameters: AdamW on the coordinates ``masks`` marks; every other coordinate stays
    bitwise at its value at construction, weight decay included.

    ``masks`` maps a parameter to a boolean tensor of its shape (e.g. :meth:`BayesTuneSGLD.mask`); a parameter
    without one (the head) is trained whole by plain AdamW. A masked parameter is θ = θ₀ + scatter(δ), θ₀ its start:
    AdamW updates the k-vector δ (its moments are k-sized too), so decoupled weight decay pulls δ to 0, i.e. θ to θ₀
    on the mask only, and only the masked coordinates are written, as θ₀ + δ: the float addition of stage 2's
    :class:`~bayestune_pyro.finetune.stage2.SparseFineTuner` and of ``merge``.
    """

    def __init__(self, params: Iterable, masks: Mapping[torch.Tensor, torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        check_positive(SimpleNamespace(lr=lr, eps=eps), "lr", "eps")
        if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < math.inf):
            raise ValueError(f"weight_decay: must be a number >= 0, got {weight_decay!r}")
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas: must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        known = {id(p) for g in self.param_groups for p in g["params"]}
        # masked parameter → its flat masked indices: configuration like the masks, not state (load_state_dict would
        # cast them to the parameter's dtype, as it does every state tensor)
        self.index = {}
        with torch.no_grad():
            for q, mask in masks.items():
                if id(q) not in known:
                    raise ValueError(f"masks: a mask of shape {tuple(mask.shape)} is for a tensor that is not one of "
                                     "params")
                if mask.dtype != torch.bool or mask.shape != q.shape or not q.is_contiguous():
                    raise ValueError(f"masks: expected a boolean mask of a contiguous parameter's shape "
                                     f"{tuple(q.shape)}, got a {mask.dtype} mask of shape {tuple(mask.shape)}")
                index = self.index[q] = mask.to(q.device).reshape(-1).nonzero().squeeze(1)
                self.state[q].update(start=q.reshape(-1)[index], delta=q.new_zeros(index.numel()),
                                     exp_avg=q.new_zeros(index.numel()), exp_avg_sq=q.new_zeros(index.numel()),
                                     step=torch.tensor(0.0))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on δ of each masked parameter (then θ = θ₀ + δ on its mask) and on each unmasked one."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            tensors, grads, avgs, squares, steps, masked = [], [], [], [], [], []
            for q in group["params"]:
                state, index = self.state[q], self.index.get(q)
                if q.grad is None or (index is not None and not index.numel()):
                    continue
                if index is not None:
                    tensors.append(state["delta"])
                    grads.append(q.grad.reshape(-1)[index])
                    masked.append(q)
                else:
                    if not state:
                        state.update(exp_avg=torch.zeros_like(q), exp_avg_sq=torch.zeros_like(q),
                                     step=torch.tensor(0.0))
                    tensors.append(q)
                    grads.append(q.grad)
                avgs.append(state["exp_avg"])
                squares.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if tensors:
                beta1, beta2 = group["betas"]
                adam(tensors, grads, avgs, squares, [], steps, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                     beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for q in masked:
                q.view(-1).index_copy_(0, self.index[q], self.state[q]["start"] + self.state[q]["delta"])
        return loss


class GaussianSGLD(torch.optim.Optimizer):
    """SGLD (the kernel of ``inference.sgld``) on parameters under independent priors N(0, σ²), σ = ``prior_sd`` per
    param group: after ``loss.backward()`` of the mean per-example NLL, :meth:`step` adds p/(σ²·N̂) to each ``.grad``
    (making it ĝ = ∇(U/N̂)) and takes one Langevin step at temperature γ².

    With the rmsprop preconditioner, G adapts until :meth:`freeze` (call it when burn-in ends: the kernel is then
    exact SGLD with a constant G), and G ≤ 1/ε with ε = lr/(σ²·N̂) of the tightest group, which keeps the prior's
    own step lr·G/(σ²·N̂) ≤ 1, i.e. stable. Parameters without a ``.grad`` are skipped in that step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, *, n_hat: float, prior_sd: float = 1.0,
                 gamma: float = 1.0, preconditioner: str = "rmsprop", seed: int = 0):
        check_positive(SimpleNamespace(lr=lr, n_hat=n_hat, prior_sd=prior_sd), "lr", "n_hat", "prior_sd")
        super().__init__(params, {"lr": lr, "prior_sd": prior_sd})
        self.params = [p for g in self.param_groups for p in g["params"]]
        tightest = min(g["lr"] / (g["prior_sd"] ** 2 * n_hat) for g in self.param_groups)
        config = SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner=preconditioner, eps=tightest)
        device = self.params[0].device
        self.kernel = SGLD(config, {str(i): p for i, p in enumerate(self.params)},
                           torch.Generator(device=device).manual_seed(seed))

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "kernel"):
            raise ValueError("param_groups: GaussianSGLD takes all its parameters at construction")
        super().add_param_group(param_group)
        check_positive(SimpleNamespace(**param_group), "lr", "prior_sd")

    def freeze(self) -> None:
        """Stop adapting the preconditioner (the end of burn-in)."""
        self.kernel.freeze()

    @torch.no_grad()
    def step(self, closure=None):
        """One Langevin step from the gradients of the last backward pass (which it overwrites with ĝ)."""
        loss = _evaluate(closure)
        n_hat, grads, lrs, sites = self.kernel.config.n_hat, {}, {}, {}
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[str(i)] = p.grad.add_(p, alpha=1.0 / (group["prior_sd"] ** 2 * n_hat))
                    lrs[str(i)], sites[str(i)] = group["lr"], p
                i += 1
        self.kernel.step(sites, grads, lrs)
        return loss
