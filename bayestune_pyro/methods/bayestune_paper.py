"""bayestune-paper: the original algorithm (engine ``noisy-adam``: λ in linear space clamped at 1e-8, Adam on
noisy gradients, the likelihood gradient clipped at norm 1), top-k by the mean of the λ draws."""
from . import Method, register
from .bayestune import BayesTuneOptions

register(Method("bayestune-paper", "the original code: Adam on noisy gradients, λ linear (engine noisy-adam)",
                BayesTuneOptions, posterior=True, engine="noisy-adam"))
