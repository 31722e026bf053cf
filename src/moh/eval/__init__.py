"""Evaluation: metrics, benchmarks (``moh bench`` lives in ``moh.eval.bench``)."""
