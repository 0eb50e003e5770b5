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
               seq_level, agg, ignore_index, num_classes, check):
        """-> (loss 0-d, dlogp [N], metrics [13], bad [2] int64): the O(N) finishing step."""
        return torch.ops.mhpo_kernels_C.finish(
            logp, entropy, old, adv, mask, ref, target, cu_seqlens, int(num_seqs), int(seq_len), int(mode),
            [float(p) for p in params], float(beta), bool(seq_level), int(agg), int(ignore_index), int(num_classes),
            bool(check),
        )


def backend(name: str) -> _Backend:
    """The native backend ``"cpu"`` or ``"cuda"``; ImportError when its extension is not built."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"native backends are 'cpu' and 'cuda', got {name!r}")
    _load("cpu")  # the op schemas live in _C_cpu
    if name == "cuda":
        _load("cuda")
    return _Backend(name)


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here (``MHPO_CPU_ISA`` forces one)."""
    _load("cpu")
    return torch.ops.mhpo_kernels_C.cpu_isa()
