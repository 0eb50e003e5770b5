"""The native backends (``csrc/``): thin launchers over the ``mhpo_kernels_C`` ops.

``backend("cpu")`` / ``backend("cuda")`` return an object with the two
launchers of the contract in :mod:`mhpo_kernels.backends`, or raise
ImportError when that extension is not built (``pip install -e .`` builds
``_C_cpu`` always and ``_C_cuda`` when a CUDA toolkit is found).

The ops are plain ``torch.ops.mhpo_kernels_C.{fwd, bwd}`` with CPU, CUDA and
Meta kernels, usable on their own::

    logp, entropy, lse, loss, coef = torch.ops.mhpo_kernels_C.fwd(
        logits, target, old, adv, mask, None, 1, [1.5, 1.5, 1.0, 2.0, 0.8, 1, 1, 0],
        0.0, 1.0, -100, True)
"""
from __future__ import annotations

import importlib

import torch

from .._constants import AGG_NORM_DEFAULT

_NO_NORM = list(AGG_NORM_DEFAULT)  # finish's agg_norm default: local counts, T, one rank
_loaded: dict = {}


def _load(name: str) -> None:
    """Import ``mhpo_kernels._C_<name>`` once; its import registers the ops."""
    if name not in _loaded:
        try:
            importlib.import_module(f"mhpo_kernels._C_{name}")
            _loaded[name] = None
        except ImportError as e:
            _loaded[name] = e
        except OSError as e:  # a .so that cannot load (ABI, missing libcudart, ...)
            _loaded[name] = ImportError(f"mhpo_kernels._C_{name} failed to load: {e}")
    if _loaded[name] is not None:
        raise ImportError(f"mhpo_kernels._C_{name} is not available: {_loaded[name]}")


class _Backend:
    """The ``fwd`` / ``bwd`` launchers of one native backend (see mhpo_kernels.backends)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<mhpo_kernels native backend {self.name!r}>"

    @staticmethod
    def fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy,
            vocab_start=0):
        """-> (logp, entropy, lse, loss, coef), [N] float32 each (entropy [0] when not wanted)."""
        return torch.ops.mhpo_kernels_C.fwd(
            logits, target, old, adv, mask, ref, int(mode), [float(p) for p in params], float(beta),
            float(temperature), int(ignore_index), bool(want_entropy), int(vocab_start),
        )

    @staticmethod
    def bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0, scale=None):
        """Writes d loss / d logits into ``out`` ([N, V], logits dtype; may be ``logits``) and returns it;
        ``scale`` (one float32 value, or None) multiplies ``dlogp``."""
        torch.ops.mhpo_kernels_C.bwd(
            logits, target, lse, entropy if dent is not None else None, dlogp, dent,
            float(temperature), int(ignore_index), out, int(vocab_start), scale,
        )
        return out

    @staticmethod
    def finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, beta,
               seq_level, agg, ignore_index, num_classes, check, agg_norm=None, iw=None, kl_est=0, token_out=None):
        """-> (loss 0-d, dlogp [N], metrics [13], bad [2] int64): the O(N) finishing step; writes
        ``token_out`` ([3, N] float32) when given."""
        return torch.ops.mhpo_kernels_C.finish(
            logp, entropy, old, adv, mask, ref, target, cu_seqlens, int(num_seqs), int(seq_len), int(mode),
            [float(p) for p in params], float(beta), bool(seq_level), int(agg), int(ignore_index), int(num_classes),
            bool(check), _NO_NORM if agg_norm is None else [float(v) for v in agg_norm], iw, int(kl_est), token_out,
        )


class _FusedGradLaunchers:
    """The optional launchers of the fused-gradient forward: ``fwd_grad`` and ``scale_grad``."""

    @staticmethod
    def fwd_grad(logits, target, old, adv, ref, weight, mode, params, beta, temperature, ignore_index, want_entropy,
                 ent_coef, grad):
        """``fwd`` plus the gradient rows written into ``grad`` (may be ``logits``): see mhpo_kernels.backends."""
        return torch.ops.mhpo_kernels_C.fwd_grad(
            logits, target, old, adv, ref, weight, int(mode), [float(p) for p in params], float(beta),
            float(temperature), int(ignore_index), bool(want_entropy), float(ent_coef), grad,
        )

    @staticmethod
    def scale_grad(grad, scale):
        """``grad *= scale`` unless the one float32 value ``scale`` is 1 (read by the kernel: no host sync)."""
        torch.ops.mhpo_kernels_C.scale_grad(grad, scale)


class _CudaBackend(_FusedGradLaunchers, _Backend):
    """The ``cuda`` backend with the fused-gradient launchers (csrc/mhpo_fused_grad.cu: the sm_90
    thread-block-cluster kernel, else the two-read kernel). Opt-in for CUDA tensors
    (``fused_gradient=True``, ``mhpo_kernels._fused_grad.AUTO_DEVICES``) until a GPU run records it."""


class _CpuBackend(_FusedGradLaunchers, _Backend):
    """The ``cpu`` backend also has the optional launchers of the fused-gradient forward."""

    @staticmethod
    def combine(stats, target, starts, sizes, ignore_index):
        """-> (logp, entropy or [0], lse), [N] float32 each: the vocabulary partitions' statistics merged
        (the optional ``combine`` launcher; the CUDA backend's shards use ``distributed.combine_torch``)."""
        return torch.ops.mhpo_kernels_C.combine(stats, target, [int(s) for s in starts], [int(s) for s in sizes],
                                                int(ignore_index))


def backend(name: str) -> _Backend:
    """The native backend ``"cpu"`` or ``"cuda"``; ImportError when its extension is not built."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"native backends are 'cpu' and 'cuda', got {name!r}")
    _load("cpu")  # the op schemas live in _C_cpu
    if name == "cuda":
        _load("cuda")
        # an extension built before the fused-gradient kernels has no CUDA fwd_grad: the two-kernel path
        has = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mhpo_kernels_C::{op}", "CUDA")
                  for op in ("fwd_grad", "scale_grad"))
        return _CudaBackend(name) if has else _Backend(name)
    return _CpuBackend(name)


FUSED_GRAD_KINDS = ("two-read warp", "two-read block", "cluster")  # csrc/mhpo_fused_grad_plan.h FusedGradKind


def fused_grad_plan(V: int, dtype: torch.dtype, max_shared: int = 0, clusters: bool = True) -> dict:
    """How the CUDA ``fwd_grad`` covers a row of ``V`` logits (csrc/mhpo_fused_grad_plan.h, the
    functions its launcher and kernel use; computed here by the CPU extension): ``kind`` (one of
    :data:`FUSED_GRAD_KINDS`), ``cluster`` (CTAs per row), ``chunk`` (columns per CTA),
    ``smem_bytes`` (dynamic shared memory per CTA) and ``slices``, the ``(begin, end)`` columns
    of each CTA. ``max_shared``: the device's shared memory per block (0: an H100's);
    ``clusters``: the device has thread-block clusters (sm_90+)."""
    _load("cpu")
    out = torch.ops.mhpo_kernels_C.fused_grad_plan(int(V), dtype, int(max_shared), bool(clusters))
    kind, cluster, chunk, smem = out[:4]
    return dict(kind=FUSED_GRAD_KINDS[kind], cluster=cluster, chunk=chunk, smem_bytes=smem,
                slices=[(out[4 + 2 * r], out[5 + 2 * r]) for r in range(cluster)])


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here (``MHPO_CPU_ISA`` forces one)."""
    _load("cpu")
    return torch.ops.mhpo_kernels_C.cpu_isa()
