"""Triton kernels for samhq-fast, installed as ``samhq_fast.kernels``.

One module per kernel family (attention with decomposed rel-pos bias, fused MLP) lands here
with the fused backend; the eager reference in ``samhq_fast.modeling`` does not depend on it.
"""
