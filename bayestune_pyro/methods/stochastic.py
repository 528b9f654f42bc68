"""stochastic (Stochastic Tuning): no fixed mask; every stage-2 step updates a fresh mask of k coordinates."""
from ..finetune.stochastic import StochasticTuner
from . import Method, register


def tuner(s, options, mask):
    return StochasticTuner(s.lifted, s.nll, s.stage2_config(), s.k, seed=s.config.seed)


register(Method("stochastic", "a fresh mask of k coordinates per step (masked Adam)", tuner=tuner))
