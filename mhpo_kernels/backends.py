"""Backend registry: the one dispatch point of the package.

Every fused backend implements the same three launchers over a ``[N, V]`` logits
buffer. Per-row inputs are contiguous ``[N]`` tensors on the logits' device;
``target`` is int64 and already validated (each id in ``[0, V)`` or
``ignore_index``). All math is float32.

``fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature,
ignore_index, want_entropy, vocab_start=0) -> (logp, entropy, lse, loss, coef)``

* logits: [N, V] float32 / bfloat16 / float16, ``stride(1) == 1``, any row stride.
* old, adv, mask: [N] float32; ``ref``: [N] float32 or None (no KL term).
* mode: one of ``config.MODE_*``; params: 8 floats, the layout of that config's
  ``kernel_params()``; beta: KL weight (used only when ``ref`` is given).
* one read of each row: ``x = logits[n] / T`` (fp32), online max / sum-exp,
  ``lse[n] = logsumexp(x)``, ``logp[n] = x[y] - lse`` (0 where y == ignore_index),
  ``entropy[n] = lse - sum(softmax(x) * x)`` (0 where ignored; an empty [0]
  tensor when ``want_entropy`` is False).
* epilogue per row, ``active = y != ignore_index and mask != 0``;
  ``delta = logp - old``; ``loss[n]`` the mode's per-token loss (+ ``beta * k3``
  KL when ref is given) and ``coef[n] = d loss[n] / d logp[n]``; both exactly 0
  on inactive rows (never read old / adv / ref there: padding may hold inf/NaN).
  MODE_NONE leaves loss and coef at 0.

``bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0)``

* writes ``out[n, v] = (dlogp[n] * (1[v == y] - p) - dent[n] * p * (log p + H[n])) / T``
  with ``p = exp(x - lse)``, ``log p = x - lse``, ``H = entropy``; ``p * log p``
  counts as 0 where p == 0; rows with y == ignore_index are written as exact 0.
* ``dent`` / ``entropy`` may be None (no entropy term). ``out`` is [N, V] in
  the logits dtype and may be ``logits`` itself (in-place backward: each element
  is read before it is written, by the same program).

``bwd(..., scale=None)``: ``scale`` (one float32 value on the logits' device, or
None = 1) multiplies ``dlogp``: the loss's upstream gradient, taken as a tensor so
the backward is one launch with no autograd arithmetic around it.

``finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len,
mode, params, beta, seq_level, agg, ignore_index, num_classes, check)
-> (loss, dlogp, metrics, bad)``: the O(N) rest of the policy loss after ``fwd``
(``MODE_NONE``), one launch, deterministic (fixed reduction order):

* per-token inputs as in ``fwd`` (``entropy``, ``mask``, ``ref`` may be None;
  ``mask=None`` is all ones; rows with ``target == ignore_index`` count as masked);
  sequences are ``cu_seqlens`` (``[S+1]`` int32 / int64 offsets) or, without it,
  ``num_seqs`` rows of ``seq_len`` tokens.
* ``mode``: ``config.MODE_*`` or ``_finish.MODE_GSPO``; ``seq_level``: every active
  token's log-ratio is its sequence's masked mean; ``agg``: ``_finish.AGG_IDS``.
* ``loss`` (0-d) ``= sum_n w_n L_n``, ``dlogp[n] = w_n d L_n / d logp_n`` (0 on
  inactive rows), ``metrics``: the 13 slots of ``_finish.METRICS``; ``bad``: int64
  ``(kind, position)`` of the first target id outside ``[0, num_classes)`` that is
  not ``ignore_index`` (when ``check``) or of a bad ``cu_seqlens`` layout
  (``_finish.BAD_*``), read by the caller after the launch.
* Implementations: ``csrc/mhpo_finish.h`` (CPU, CUDA), ``triton_kernels/finish.py``.

``vocab_start`` (vocabulary-parallel shards, ``mhpo_kernels.distributed``): the
buffer holds vocabulary ids ``[vocab_start, vocab_start + V)``; target ids are
global. In ``fwd``, ``logp`` is the shard-local ``x[y - vocab_start] - lse`` for
targets in the shard and 0 otherwise (lse and entropy are shard-local; MODE_NONE).
In ``bwd``, the one-hot term applies only at ``y - vocab_start`` inside the
shard, and ``lse`` / ``entropy`` passed in are the global ones.

The reference (``"torch"``) is not a fused backend: it is plain autograd.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

from ._inputs import BACKENDS

_FUSED = ("triton", "cuda", "cpu")
_cache: dict = {}
_errors: dict = {}  # backend name -> the ImportError that made it unavailable


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import(name: str):
    """Import a backend's module (raises ImportError when it cannot load)."""
    if name == "triton":
        import triton_kernels

        return triton_kernels
    from . import _native

    return _native.backend(name)


def _load(name: str):
    """The backend module, or None when it cannot work in this process."""
    if name in _cache:
        return _cache[name]
    mod = None
    try:
        if name in _FUSED:
            mod = _import(name)
    except ImportError as e:  # an optional dependency or the extension is missing
        if os.environ.get("MHPO_VERBOSE"):
            warnings.warn(f"mhpo_kernels: backend {name!r} unavailable: {e}")
        _errors[name] = e
        mod = None
    _cache[name] = mod
    return mod


def _triton_interpreted(mod) -> bool:
    """Whether Triton built the kernels for its interpreter, i.e. TRITON_INTERPRET was set when
    they were first imported (Triton reads it then, not at launch)."""
    if "triton:interpreted" not in _cache:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # the interpreter itself cannot load (numpy missing): nothing was built for it
            found = False
        else:
            prefix = mod.__name__ + "."
            mods = [mod] + [m for n, m in list(sys.modules.items()) if n.startswith(prefix) and m is not None]
            found = any(isinstance(v, InterpretedFunction) for m in mods for v in vars(m).values())
        _cache["triton:interpreted"] = found
    return _cache["triton:interpreted"]


def unavailable_reason(name: str, device) -> str:
    """Why backend ``name`` cannot run tensors on ``device`` here ("" when it can)."""
    device = torch.device(device)
    if name == "torch" or _supports(name, device):
        return ""
    err = _errors.get(name)
    if name == "triton" and err is not None:
        missing = getattr(err, "name", None)
        if missing == "triton":
            return "Triton is not installed (pip install triton)"
        if missing == "numpy":
            return "Triton's interpreter needs numpy, which is not installed (pip install numpy)"
        return f"the Triton kernels failed to import: {type(err).__name__}: {err}"
    if err is not None:
        return f"the native extension is not built or does not load ({err}); see README"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device in this process"
    if name == "triton" and device.type == "cpu":
        if not triton_interpret():
            numpy = "" if importlib.util.find_spec("numpy") else " (and install numpy, which the interpreter needs)"
            return ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 in the environment "
                    f"before the first import of triton{numpy}; setting it later gives '0 active drivers'")
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported, so they were built for a GPU "
                "('0 active drivers' on CPU tensors): set it before the first import of triton")
    kinds = {"cuda": "CUDA tensors", "cpu": "CPU tensors", "triton": "CUDA tensors (CPU ones through its interpreter)"}
    return f"it runs {kinds.get(name, 'other tensors')}"


def _supports(name: str, device: torch.device) -> bool:
    if _load(name) is None:
        return False
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret()
                                         and _triton_interpreted(_load(name)))
    return device.type == name


def available_backends(device=None) -> list:
    """Backends that work in this process, for ``device`` (default: CUDA if present, else CPU).

    ``"torch"`` (the reference) always works. ``"triton"`` needs a CUDA device,
    or ``TRITON_INTERPRET=1`` for CPU tensors (slow; for tests).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in _FUSED if _supports(b, device)] + ["torch"]


def resolve(backend: str, device: torch.device) -> str:
    """The backend to run: ``"auto"`` picks the fastest available one for ``device``.

    ``MHPO_BACKEND`` in the environment overrides ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("MHPO_BACKEND", "auto")
    if backend == "auto":
        # The CUDA C++ kernels are compiled in CI but have not run on a GPU yet:
        # they are opt-in (backend="cuda") until a recorded GPU run verifies them.
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        return next((b for b in order if _supports(b, device)), "torch")
    if backend != "torch" and not _supports(backend, device):
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors ({unavailable_reason(backend, device)}); "
            f"available: {available_backends(device)}"
        )
    return backend


def get(name: str):
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available")
    return mod


# The native extensions load when the package is imported (a few milliseconds): loading them
# the first time inside a torch.compile trace would need importlib, which Dynamo cannot trace,
# so a fullgraph compile of the very first call would fail. Triton's kernels stay lazy (its
# import is heavier and traces fine).
for _name in ("cpu", "cuda"):
    _load(_name)
