"""Triton kernels of mhpo-kernels (the ``"triton"`` backend).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from .finish import finish
from .fused_logprob import bwd, fwd

__all__ = ["fwd", "bwd", "finish"]
