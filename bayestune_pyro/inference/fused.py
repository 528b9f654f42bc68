"""Stage 1's elementwise work as single compiled passes: the prior's gradient, the pSGLD update, and at each kept
draw E[λ | θ] and the streaming moments.

``torch.compile`` (inductor) turns each into one loop: C++/OpenMP on CPU, Triton on a GPU. The pSGLD update reads
z, ĝ, v and ξ once and writes z and v once, where eager torch makes eight passes (~3 ms each over MiniLM's 22.7M
floats); the prior's gradient makes one pass instead of a dozen, E[λ | θ] one instead of nine, a Welford update
one instead of three (and no temporaries). Scalars travel as a small tensor, so a new step
size or bias correction reuses the compiled code. Sites below :data:`FUSE_FROM` elements keep the eager passes:
compiling costs seconds and a small site gains nothing. Where compiling fails (e.g. no C++ compiler), a warning
is given once and the eager passes are used; the two agree to float rounding (tested).
"""
from __future__ import annotations

import warnings

import torch

FUSE_FROM = 1 << 20


def _rmsprop_langevin(z, g, v, xi, scalars, adapt: bool, noisy: bool) -> None:
    rho, one_minus_rho, drift, diffusion, eps_c = scalars.unbind()
    if adapt:
        v.copy_(v * rho + g * g * one_minus_rho)
    precond = torch.reciprocal(torch.sqrt(v) + eps_c)
    step = precond * g * drift
    if noisy:
        step = step - torch.sqrt(precond) * xi * diffusion
    z.sub_(step)


def _prior_grad(theta, theta_bar, z_lambda, grad_theta, grad_lambda, scalars, log_space: bool) -> None:
    scale, alpha_minus_c, beta, floor = scalars.unbind()
    lam = torch.exp(z_lambda) if log_space else torch.clamp(z_lambda, min=floor)
    inv_lam = torch.reciprocal(lam)
    diff = theta - theta_bar
    grad_theta.add_(torch.sign(diff) * inv_lam * scale)
    scaled = diff.abs() * inv_lam
    if log_space:
        grad_lambda.copy_((scaled - beta * lam + alpha_minus_c) * -scale)
    else:
        grad_lambda.copy_(((alpha_minus_c + scaled) * inv_lam - beta) * -scale)


def _gig_mean(abs_delta, out, base, rise, scalars, flat_below: bool) -> None:
    offset, inv_step, lowest = scalars.unbind()
    t = torch.log(abs_delta) * inv_step + offset
    if flat_below:
        t = torch.maximum(t, lowest)
    segment = torch.nan_to_num(t, nan=0.0).clamp(0, rise.numel() - 1).to(torch.int64)
    t = t - segment
    out.copy_(torch.exp(t * rise[segment] + base[segment]))


def _welford(mean, m2, x, scalars) -> None:
    (inv_n,) = scalars.unbind()
    step = x - mean
    new_mean = mean + step * inv_n
    m2.copy_(m2 + step * (x - new_mean))
    mean.copy_(new_mean)


class _Compiled:
    functions: dict = {}
    failed = False


def _run(function, tensors: tuple[torch.Tensor, ...], values: list[float], *flags: bool) -> bool:
    """``function(*tensors, scalars, *flags)`` compiled; False, having changed nothing, if it does not apply."""
    like = tensors[0]
    if _Compiled.failed or like.numel() < FUSE_FROM:
        return False
    if like.device.type == "cuda":  # pinned, so the copy does not wait for the device
        scalars = torch.tensor(values, dtype=like.dtype, pin_memory=True).to(like.device, non_blocking=True)
    else:
        scalars = torch.tensor(values, dtype=like.dtype, device=like.device)
    try:
        if function not in _Compiled.functions:
            _Compiled.functions[function] = torch.compile(function, fullgraph=True, dynamic=False)
        _Compiled.functions[function](*tensors, scalars, *flags)
    except Exception as err:  # compiling failed before anything ran: any backend error means "use eager"
        _Compiled.failed = True
        warnings.warn(f"fused stage-1 passes unavailable ({type(err).__name__}: {str(err)[:200]}); "
                      "using the eager passes", RuntimeWarning, stacklevel=3)
        return False
    return True


def rmsprop_langevin_(z: torch.Tensor, g: torch.Tensor, v: torch.Tensor, xi: torch.Tensor | None, *, rho: float,
                      drift: float, diffusion: float, eps_c: float, adapt: bool) -> bool:
    """z ← z − drift·G·ĝ + diffusion·√G·ξ with G = 1/(√v + eps_c), v ← ρv + (1 − ρ)ĝ² first if ``adapt``.

    Returns False where the fused pass does not apply (small site, no compiler): the caller then takes the eager
    passes.
    """
    return _run(_rmsprop_langevin, (z, g, v, z if xi is None else xi), [rho, 1.0 - rho, drift, diffusion, eps_c],
                adapt, xi is not None)


def prior_grad_(theta: torch.Tensor, theta_bar: torch.Tensor, z_lambda: torch.Tensor, grad_theta: torch.Tensor,
                grad_lambda: torch.Tensor, *, scale: float, alpha_minus_c: float, beta: float, floor: float,
                log_space: bool) -> bool:
    """``models.gamma_laplace.prior_grad_`` in one pass (its formulas; ``alpha_minus_c`` is α − 1 or α − 2)."""
    return _run(_prior_grad, (theta, theta_bar, z_lambda, grad_theta, grad_lambda), [scale, alpha_minus_c, beta, floor],
                log_space)


def gig_mean_(abs_delta: torch.Tensor, out: torch.Tensor, base: torch.Tensor, rise: torch.Tensor, *, offset: float,
              inv_step: float, flat_below: bool) -> bool:
    """``models.lambda_conditional.LambdaConditional.mean`` in one pass (its table and formulas)."""
    return _run(_gig_mean, (abs_delta, out, base, rise), [offset, inv_step, torch.finfo(out.dtype).min], flat_below)


def welford_(mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor, *, n: int) -> bool:
    """The n-th sample x into the running mean and sum of squared deviations m2 (Welford), in one pass."""
    return _run(_welford, (mean, m2, x), [1.0 / n])
