"""Posteriors with exact answers, to check the samplers against (used by benchmarks/ and tests/)."""
