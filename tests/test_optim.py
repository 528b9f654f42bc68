"""The optimizer-style stages (``bayestune_pyro.optim``) against the engine and stage 2, and inside a ``Trainer``."""
import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bayestune_pyro.engines.sgld import MAPOptions, map_kernel
from bayestune_pyro.finetune.stage2 import SparseFineTuner, Stage2Config
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.models.backbones import Backbone, load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.optim import BayesTuneSGLD, MaskedAdamW
from bayestune_pyro.testing.toy import Logistic, logistic_data

# N̂ and the batch are powers of 2, so Pyro's plate scale N̂/|B| and the division by N̂ are exact
TOY = {"alpha": 4.0, "beta": 4.0, "n_hat": 256.0, "lambda_init": 0.5, "lr_lambda": 0.05, "head_lr": 0.05}


def _toy_optimizer(model, lr, **kwargs):
    return BayesTuneSGLD([{"params": [model.w]}, {"params": [model.b], "prior": False, "lr": TOY["head_lr"]}],
                         lr=lr, lr_lambda=TOY["lr_lambda"], n_hat=TOY["n_hat"], alpha=TOY["alpha"],
                         beta=TOY["beta"], lambda_init=TOY["lambda_init"], **kwargs)


def _toy_step(model, optimizer, data):
    F.cross_entropy(model(data["x"])[0], data["labels"]).backward()  # the mean per-example NLL
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("preconditioner,lr", [("none", 0.05), ("rmsprop", 0.01)])
def test_gamma_zero_is_the_map_engines_update(preconditioner, lr):
    """The ``map`` engine's kernel (Pyro potential, no Jacobian, head by Adam) and BayesTuneSGLD(γ = 0) on the same
    logistic toy: the same θ, λ, head and λ̂ (mean of the λ path) through warm-up, burn-in and thinned sampling."""
    data = logistic_data(n=64, d=6, seed=0)
    warmup, burnin, thin, steps = 3, 3, 2, 15
    lifted = LiftedBackbone(Backbone(Logistic(1, 6), head_names=["b"], kind="tensor", source="toy"))
    model = GammaLaplaceModel(lifted, alpha=TOY["alpha"], beta=TOY["beta"], n_hat=TOY["n_hat"])
    setup = SimpleNamespace(lifted=lifted, model=model, config=SimpleNamespace(head_lr=TOY["head_lr"]))
    options = SimpleNamespace(lambda_init=TOY["lambda_init"], lr=lr, lr_lambda=TOY["lr_lambda"], n_hat=TOY["n_hat"])
    kernel = map_kernel(setup, options, MAPOptions(preconditioner=preconditioner), seed=0)
    posterior = StreamingPosterior(lifted.layout, estimator="draws", n_tracked=4)
    ours = Logistic(1, 6)
    optimizer = _toy_optimizer(ours, lr, gamma=0.0, preconditioner=preconditioner, warmup=warmup, burnin=burnin,
                               thin=thin)
    for step in range(steps):
        phase = "warmup" if step < warmup else "burnin" if step < warmup + burnin else "sampling"
        if step == warmup + burnin:
            kernel.start_sampling()
        loss = kernel.step(data, phase)
        if phase == "sampling" and (step - warmup - burnin + 1) % thin == 0:
            kernel.collect(posterior, 0, data, loss)
        _toy_step(ours, optimizer, data)
    z = kernel.z
    assert not torch.equal(z["theta"], lifted.theta_bar)  # the check is not vacuous
    close = {"rtol": 1e-5, "atol": 1e-7}  # Pyro's Categorical vs F.cross_entropy: the gradients differ in rounding
    assert torch.allclose(ours.w.detach().view(-1), z["theta"], **close)
    assert torch.allclose(optimizer.state[ours.w]["log_lambda"].view(-1), z["lambda"], **close)
    assert torch.allclose(ours.b.detach(), lifted.head_parameters()[0].detach(), **close)
    assert optimizer.draws == posterior.counts[0] == 4
    assert torch.allclose(optimizer.lambda_hat()[ours.w].view(-1), posterior.lambda_mean, **close)
    kernel.release()


def test_noise_has_the_formula_variance():
    """At θ = θ̄ with no data gradient the prior's subgradient is 0, so one plain step is γ·√(2·lr/N̂)·ξ."""
    gamma, lr, n_hat = 0.5, 1e-3, 1e4
    theta = torch.nn.Parameter(torch.zeros(200_000))
    optimizer = BayesTuneSGLD([theta], lr=lr, n_hat=n_hat, gamma=gamma, preconditioner="none")
    theta.grad = torch.zeros_like(theta)
    optimizer.step()
    assert theta.detach().var().item() == pytest.approx(gamma**2 * 2 * lr / n_hat, rel=0.02)
    assert optimizer.draws == 1 and optimizer.lambda_hat()[theta].shape == theta.shape


def test_state_dict_resumes_bitwise():
    """3 steps, torch.save / torch.load into a fresh optimizer on a copy of the model, 3 more: the same as 6."""
    data = logistic_data(n=64, d=6, seed=1)
    straight, resumed = Logistic(1, 6), Logistic(1, 6)
    opt_straight = _toy_optimizer(straight, 0.01, burnin=2)
    opt_resumed = _toy_optimizer(resumed, 0.01, burnin=2)
    for _ in range(3):
        _toy_step(straight, opt_straight, data)
        _toy_step(resumed, opt_resumed, data)
    buffer = io.BytesIO()
    torch.save(opt_resumed.state_dict(), buffer)
    resumed = copy.deepcopy(resumed)
    opt_resumed = _toy_optimizer(resumed, 0.01, burnin=2, seed=7)  # another seed: the noise comes from the state
    buffer.seek(0)
    opt_resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for _ in range(3):
        _toy_step(straight, opt_straight, data)
        _toy_step(resumed, opt_resumed, data)
    assert torch.equal(straight.w, resumed.w) and torch.equal(straight.b, resumed.b)
    assert torch.equal(opt_straight.lambda_hat()[straight.w], opt_resumed.lambda_hat()[resumed.w])


def test_mask_holds_exactly_the_budget_and_bad_input_is_named():
    params = [torch.nn.Parameter(torch.randn(30, 7)), torch.nn.Parameter(torch.randn(11))]
    optimizer = BayesTuneSGLD(params, lr=1e-3, n_hat=100.0)
    with pytest.raises(ValueError, match="lambda_hat: no draws"):
        optimizer.mask(0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in (0.01, 0.1, 0.5, 1.0):
        masks = optimizer.mask(p)
        assert [m.shape for m in masks.values()] == [q.shape for q in params]
        assert sum(int(m.sum()) for m in masks.values()) == math.floor(p * 221)
    with pytest.raises(ValueError, match="^p: "):
        optimizer.mask(0.0)
    with pytest.raises(ValueError, match="^lr: must be a positive number, got -1"):
        BayesTuneSGLD(params, lr=-1)
    with pytest.raises(ValueError, match="^gamma: "):
        BayesTuneSGLD(params, gamma=-0.5)
    with pytest.raises(ValueError, match="^thin: must be an integer >= 1, got 0"):
        BayesTuneSGLD(params, thin=0)
    with pytest.raises(ValueError, match="^masks: expected a boolean mask"):
        MaskedAdamW(params, {params[0]: torch.ones(30, 7)})
    with pytest.raises(ValueError, match="^masks: a mask of shape"):
        MaskedAdamW(params[:1], {params[1]: torch.ones(11, dtype=torch.bool)})


def test_masked_adamw_is_stage_2(tiny_lifted, text_batch):
    """MaskedAdamW on the model's parameters and SparseFineTuner on θ̄ + scatter(δ), same mask, batches, lr and
    weight decay: bitwise the same backbone and head."""
    lr, weight_decay, steps = 1e-2, 0.1, 3
    layout = tiny_lifted.layout
    index = torch.randperm(layout.d, generator=torch.Generator().manual_seed(0))[:3000].sort().values
    tiny_lifted.model.eval()
    tuner = SparseFineTuner(tiny_lifted, index, F.cross_entropy,
                            Stage2Config(lr=lr, head_lr=lr, weight_decay=weight_decay))
    model = load_backbone("tiny-bert", 3, seed=0).model.eval()
    named = dict(model.named_parameters())
    dense = torch.zeros(layout.d, dtype=torch.bool)
    dense[index] = True
    masks = {named[n]: m for n, m in layout.split(dense).items()}
    optimizer = MaskedAdamW(model.parameters(), masks, lr=lr, weight_decay=weight_decay)
    inputs = {k: v for k, v in text_batch.items() if k != "labels"}
    for _ in range(steps):
        tuner.step(text_batch)
        F.cross_entropy(model(**inputs).logits, text_batch["labels"]).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    theta = torch.cat([named[n].detach().reshape(-1) for n in layout.names])
    assert torch.equal(theta, tuner.theta().detach())
    assert not torch.equal(theta, tiny_lifted.theta_bar)
    for name, p in zip(tiny_lifted.head_names, tiny_lifted.head_parameters()):
        assert torch.equal(named[name], p), name
    assert all(optimizer.state[q]["exp_avg"].numel() == int(m.sum()) for q, m in masks.items())  # k-sized state


def _dataset(tokenizer, n=8):
    texts = ["the cat sat", "a dog barked at the moon", "hello there", "markets fell sharply today"] * (n // 4)
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": i % 2} for i in range(n)]


def test_both_stages_in_a_transformers_trainer(tmp_path):
    """Stage 1 with BayesTuneSGLD, the mask, θ̄ restored, stage 2 with MaskedAdamW (weight decay on), each as
    ``Trainer(optimizers=(opt, None))``: exactly ⌊p·d⌋ coordinates move, every other stays bitwise θ̄."""
    from transformers import Trainer, TrainingArguments

    backbone = load_backbone("tiny-bert", 2, seed=0)
    model, data = backbone.model, _dataset(backbone.tokenizer)
    head = [p for n, p in model.named_parameters() if n in backbone.head_names]
    body = {n: p for n, p in model.named_parameters() if n not in backbone.head_names}
    theta_bar = {n: p.detach().clone() for n, p in body.items()}

    def train(optimizer, name):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                 use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                                 lr_scheduler_type="constant", max_grad_norm=0.0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()

    sgld = BayesTuneSGLD([{"params": list(body.values())}, {"params": head, "prior": False, "lr": 1e-2}], lr=1e-3,
                         n_hat=1e4, burnin=1)
    head_start = [p.detach().clone() for p in head]
    train(sgld, "stage1")
    assert sgld.steps == 3 and sgld.draws == 2
    assert any(not torch.equal(p, theta_bar[n]) for n, p in body.items())
    assert not torch.equal(head[0], head_start[0])
    p = 0.01
    masks = sgld.mask(p)
    d = sum(q.numel() for q in body.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(p * d)
    sgld.restore()
    assert all(torch.equal(q, theta_bar[n]) for n, q in body.items())
    head_start = [p.detach().clone() for p in head]
    train(MaskedAdamW(model.parameters(), masks, lr=1e-2, weight_decay=0.1), "stage2")
    moved = 0
    for n, q in body.items():
        changed = q != theta_bar[n]
        assert not changed[~masks[q]].any(), n  # unmasked: bitwise θ̄
        moved += int(changed[masks[q]].sum())
    assert moved > 0  # (not all: a masked embedding row of a token absent from the batches has no gradient)
    assert not torch.equal(head[0], head_start[0])
