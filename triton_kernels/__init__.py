"""Triton kernels of mhpo-kernels (the ``"triton"`` backend).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. This folder installs as
``mhpo_kernels.triton_kernels`` (setup.py's ``package_dir``), never as a top-level ``triton_kernels``:
that name is triton-lang's kernel library (PyPI ``triton-kernels``).
"""
from .finish import finish
from .fused_grad import fwd_grad, scale_grad
from .fused_logprob import bwd, fwd

__all__ = ["fwd", "bwd", "finish", "fwd_grad", "scale_grad"]
