"""Measurement: FLOPs, accuracy (``evaluate``) and throughput (``bench.measure``)."""

from .flops import count_flops, model_cost

__all__ = ["count_flops", "model_cost"]
