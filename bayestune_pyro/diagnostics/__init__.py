"""Posterior diagnostics of a run: ArviZ InferenceData, convergence checks, figures and an HTML report.

- ``inference_data``  the streaming posterior as ``arviz.InferenceData`` (``trace.nc``)
- ``convergence``     R-hat / ESS / MCSE checks with actionable warnings, per-tensor moments, chain agreement
- ``modules``         parameter name → module type and layer index
- ``figures``         matplotlib figures (λ̂ curve, traces, ranks, histograms, module/layer shares, budget sweeps)
- ``report``          ``report.html``: one self-contained page with a verdict at the top
"""
