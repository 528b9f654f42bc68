"""``Setup``: everything a stage needs (task, lifted backbone, model, batches, budget), built from a RunConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import RunConfig, values_of
from .data import TaskData, infinite_batches, load_task, make_loader
from .data.images import ImageExample
from .finetune.ensemble import EnsembleConfig
from .finetune.evaluate import evaluate
from .finetune.stage2 import Stage2Config
from .models.backbones import load_backbone
from .models.gamma_laplace import GammaLaplaceModel
from .models.lifted import LiftedBackbone
from .registry import SEARCH_SPACES
from .selection.masks import budget

_BACKBONES = {"text": "minilm-l6, tiny-bert or hf:<hub id or dir>", "image": "tiny-vit or timm:<name>"}


@dataclass
class Setup:
    """The run's task, its lifted backbone and the Gamma–Laplace model over it."""

    config: RunConfig
    task: TaskData
    lifted: LiftedBackbone
    model: GammaLaplaceModel

    @property
    def k(self) -> int:
        """The budget k = ⌊p·d⌋ (0 when a threshold replaces p)."""
        p = self.config.budget_p()
        return budget(p, self.lifted.d) if p is not None else 0

    def stage2_config(self) -> Stage2Config:
        c = self.config
        return Stage2Config(c.stage2_steps, c.stage2_lr, c.stage2_head_lr or c.head_lr, c.weight_decay,
                            eval_every=c.eval_every)

    def ensemble_configs(self, kind: str) -> list[EnsembleConfig]:
        """The ensemble of ``kind``'s settings: one per (γ, prior scale) of the sgld grid (``deep`` has one)."""
        c = self.config
        common = (kind, c.ensemble_size, c.ensemble_burnin, c.ensemble_thin, c.ensemble_lr)
        if kind != "sgld":
            return [EnsembleConfig(*common)]
        return [EnsembleConfig(*common, gamma, c.ensemble_n_hat, c.ensemble_prior_sd, c.ensemble_head_prior_sd, scale)
                for gamma in values_of(c.ensemble_gamma) for scale in values_of(c.ensemble_prior_scale)]

    def train_batches(self, seed: int | None = None):
        """Shuffled training batches, epoch after epoch (order seeded by ``seed``, default the run's seed)."""
        backbone = self.lifted.backbone
        loader = make_loader(self.task.train, backbone.tokenizer, batch_size=self.config.batch_size,
                             max_length=self.config.max_length, shuffle=True,
                             seed=self.config.seed if seed is None else seed,
                             regression=self.task.spec.is_regression, image_input=backbone.image_input)
        return infinite_batches(loader)

    def test_loader(self):
        return self._eval_loader(self.task.test)

    def validation_loader(self):
        return self._eval_loader(self.task.validation)

    def _eval_loader(self, examples):
        backbone = self.lifted.backbone
        return make_loader(examples, backbone.tokenizer, batch_size=self.config.eval_batch_size,
                           max_length=self.config.max_length, shuffle=False,
                           regression=self.task.spec.is_regression, image_input=backbone.image_input)

    def validator(self):
        """forward → the task metric on the validation split (None without one), for stage-2 model selection."""
        if not self.task.validation:
            return None
        loader, spec, device = self.validation_loader(), self.task.spec, self.lifted.theta_bar.device
        return lambda forward: evaluate(forward, loader, spec, device)[spec.metric]

    def nll(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of a batch: the stage-2 loss, the same p(y|·) as stage 1."""
        return -self.model.observation(out).log_prob(labels).mean()


def setup(config: RunConfig) -> Setup:
    """Load the task and a fresh backbone (same seed → same head initialisation), lift it and build the model.

    Methods without a posterior get the model too, for its likelihood p(y|·) (their loss).
    """
    check_available(config.device)
    task = load_task(config.task, config.data_dir, seed=config.data_seed, train_size=config.train_size,
                     validation_fraction=config.validation_fraction, shots_per_class=config.shots_per_class)
    backbone = load_backbone(config.backbone, task.spec.num_labels, pretrained=config.pretrained, seed=config.seed,
                             target_mean=task.target_mean)
    wanted = "image" if isinstance(task.train[0], ImageExample) else "text"
    if backbone.kind != wanted:
        raise ValueError(f"backbone: {config.backbone!r} takes {backbone.kind} input, but task {config.task!r} has "
                         f"{wanted} examples; use {_BACKBONES[wanted]}")
    if config.image_size is not None and backbone.image_input is not None:
        size = (config.image_size, config.image_size)
        if backbone.image_input.fixed and size != backbone.image_input.size:
            raise ValueError(f"image_size: {config.image_size} does not fit backbone {config.backbone!r}, which takes "
                             f"only {backbone.image_input.size[0]}×{backbone.image_input.size[1]} images; unset it")
        backbone.image_input = dataclasses.replace(backbone.image_input, size=size)
    space = SEARCH_SPACES.get(config.search_space).build(config.search_space_options)
    lifted = LiftedBackbone(backbone, space, config.device)
    likelihood = "normal" if task.spec.is_regression else "categorical"
    prior = {name: getattr(config.options, name) for name in ("alpha", "beta", "n_hat")
             if hasattr(config.options, name)}
    model = GammaLaplaceModel(lifted, likelihood=likelihood, sigma=config.sigma, **prior)
    return Setup(config, task, lifted, model)


def check_available(device: str) -> None:
    """This machine has ``device`` (one-line ValueError otherwise), before any data or backbone is loaded."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device: {device!r} is not available on this machine ({str(err).splitlines()[0][:80]}); "
                         "use --device cpu") from None
