"""bayestune-map: BayesTune's model at its mode (the SGLD kernel with γ = 0: engine ``map``), top-k by λ."""
from . import Method, register
from .bayestune import BayesTuneOptions

register(Method("bayestune-map", "the same model at its mode (engine map)", BayesTuneOptions, posterior=True,
                engine="map"))
