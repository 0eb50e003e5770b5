"""Backends: one registry table, the one dispatch point of the package.

A backend is a row of :data:`REGISTRY` (a :class:`Backend`) whose loader returns an
object with three launchers over a ``[N, V]`` logits buffer. Everything else
(``available_backends``, ``backend="auto"``, the error messages, the tests' backend
lists) is derived from the table. Adding a backend is one module with the three
launchers plus one :func:`register` call (README, "Adding a backend").

Per-row inputs are contiguous ``[N]`` tensors on the logits' device; ``target`` is
int64. All math is float32 (the ``torch`` backend: float64 for float64 logits).

``fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature,
ignore_index, want_entropy, vocab_start=0) -> (logp, entropy, lse, loss, coef)``

* logits: [N, V] float32 / bfloat16 / float16, ``stride(1) == 1``, any row stride.
* old, adv, mask: [N] float32; ``ref``: [N] float32 or None (no KL term).
* mode: one of ``config.MODE_*``; params: the 8 floats of that config's
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

``bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0, scale=None)``

* writes ``out[n, v] = (s * dlogp[n] * (1[v == y] - p) - dent[n] * p * (log p + H[n])) / T``
  with ``p = exp(x - lse)``, ``log p = x - lse``, ``H = entropy``, ``s = scale`` (one
  float32 value on the logits' device: the loss's upstream gradient, or None = 1);
  ``p * log p`` counts as 0 where p == 0; rows with y == ignore_index are exact 0.
* ``dent`` / ``entropy`` may be None (no entropy term). ``out`` is [N, V] in
  the logits dtype and may be ``logits`` itself (in-place backward: each element
  is read before it is written, by the same program).

Optional (the forward that writes the gradient, :mod:`mhpo_kernels._fused_grad`; a backend
without them runs the two-kernel path, e.g. ``tests/toy_backend.py``):
``fwd_grad(logits, target, old, adv, ref, weight, mode, params, beta, temperature,
ignore_index, want_entropy, ent_coef, grad) -> (logp, entropy, lse, loss, coef)``

* ``fwd`` (``mode != MODE_NONE``, ``vocab_start = 0``) with ``weight`` ([N] float32, the
  aggregation weight ``w``) in place of the mask: rows with ``w == 0`` are inactive;
  the entropy is computed whenever ``ent_coef != 0`` (returned when ``want_entropy``).
* writes ``grad[n, v]``, what ``bwd`` writes for ``dlogp = w * coef``,
  ``dent = -ent_coef * w`` and no scale: the gradient of ``w * (loss - ent_coef * H)``.
  ``grad`` is [N, V] in the logits dtype and may be ``logits`` itself.

``scale_grad(grad, scale)``: ``grad *= scale`` unless the one float32 value ``scale`` (on
the device) is 1, decided on the device (no host sync). Without it: an unconditional ``mul_``.

``finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len,
mode, params, beta, seq_level, agg, ignore_index, num_classes, check, agg_norm=None,
iw=None, kl_est=0, token_out=None) -> (loss, dlogp, metrics, bad)``: the O(N) rest of the
policy loss after ``fwd`` (``MODE_NONE``), one launch, deterministic (fixed reduction order):

* per-token inputs as in ``fwd`` (``entropy``, ``mask``, ``ref`` may be None;
  ``mask=None`` is all ones; rows with ``target == ignore_index`` count as masked);
  sequences are ``cu_seqlens`` (``[S+1]`` int32 / int64 offsets) or, without it,
  ``num_seqs`` rows of ``seq_len`` tokens.
* ``mode``: ``config.MODE_*`` or ``_finish.MODE_GSPO``; ``seq_level``: every active
  token's log-ratio is its sequence's masked mean; ``agg``: ``_finish.AGG_IDS``;
  ``agg_norm``: the 3 floats of ``_constants.AGG_NORM`` (None: ``AGG_NORM_DEFAULT``), the
  weights' normalisers of :class:`mhpo_kernels.sequences.Sequences` ``weights``.
* ``loss`` (0-d) ``= sum_n w_n L_n``, ``dlogp[n] = w_n d L_n / d logp_n`` (0 on
  inactive rows), ``metrics``: the 13 slots of ``_finish.METRICS``; ``bad``: int64
  ``(kind, position)`` of the first target id outside ``[0, num_classes)`` that is
  not ``ignore_index`` (when ``check``) or of a bad ``cu_seqlens`` layout
  (``_finish.BAD_*``), read by the caller after the launch.
* ``mode`` may also be ``MODE_CISPO`` (finish only, token-level): ``L = -sg(clip(r, ratio_low,
  ratio_high)) A logp`` with ``r = exp(clamp(delta, -20, 20))``; its clip fractions have no sign
  condition on A.
* ``iw`` ([N], logp's dtype, or None): importance weights; an active token's loss is
  ``iw L_pg + beta KL`` and its coefficient ``iw c_pg + beta dKL/dlogp`` (the ratio control's part
  only; inactive rows never read it).
* ``kl_est``: ``_constants.KL_ESTIMATORS`` id of the beta term and of ``kl_ref``, at
  ``d = ref - logp``: k3 ``e^d - d - 1``, k1 ``-d``, k2 ``d^2 / 2``, low_var_kl k3 with ``d``
  clamped to ±20 and the value to ±10 (derivative 0 where a clamp bites).
* ``token_out`` (``[3, N]``, logp's dtype, or None): written entirely, rows
  ``_constants.TOKEN_OUT``: ``w_n L_n``; the KL estimate; 1.0 where the mode's fraction metric
  counts the token (clip / GSPO / CISPO: clipped; MHPO: survival < 0.5), else 0; 0 on inactive rows.

``vocab_start`` (vocabulary-parallel shards, :mod:`mhpo_kernels.distributed`): the
buffer holds vocabulary ids ``[vocab_start, vocab_start + V)``; target ids are
global. In ``fwd``, ``logp`` is the shard-local ``x[y - vocab_start] - lse`` for
targets in the shard and 0 otherwise (lse and entropy are shard-local; MODE_NONE).
In ``bwd``, the one-hot term applies only at ``y - vocab_start`` inside the
shard, and ``lse`` / ``entropy`` passed in are the global ones.

Optional ``combine(stats, target, starts, sizes, ignore_index) -> (logp, entropy, lse)``
(one launch; a backend without it gets :func:`mhpo_kernels.distributed.combine_torch`):
``stats`` ``[P, k, N]`` holds, per vocabulary partition ``p`` (ids ``[starts[p],
starts[p] + sizes[p])``: the ranks of a vocabulary-parallel group, the vocabulary
slices of the fused lm_head), the ``fwd`` outputs ``lse``, ``logp`` and (``k == 3``)
``entropy`` on that partition. Returns the union's ``lse = M + log s``, ``logp =
logp_q + (lse_q - lse)`` for the partition ``q`` holding the target (0 where none
does) and ``entropy = C / s + log s`` (``[0]`` when ``k == 2``), with ``M = max_p lse_p``,
``s = sum_p e^(lse_p - M)``, ``C = sum_p e^(lse_p - M) (H_p + M - lse_p)``; logp and entropy
0 on ignore_index rows: the ``vocab_start`` conventions of ``fwd``, so results nest.

Implementations: ``mhpo_kernels.triton_kernels`` (``triton``), ``csrc/`` through
:mod:`.native` (``cpu``, ``cuda``), :mod:`.pytorch` (``torch``). ``backend="reference"``
is not a launcher backend: it runs :mod:`mhpo_kernels.reference` (plain autograd).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch

ANY_DEVICE = "*"
REFERENCE = "reference"
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    """One row of the registry.

    name: what ``backend=`` takes. load: returns the launcher object (``fwd``,
    ``bwd``, ``finish``) or raises ImportError when it cannot work in this process.
    devices: the device types whose tensors it runs (``ANY_DEVICE``: all).
    auto: the device types for which ``backend="auto"`` may pick it; rows earlier
    in the table win. dtypes: the logits dtypes it takes. hint: what to do when it
    is unavailable (``{error}`` stands for the import error). ready: an extra check
    ``(launchers, device) -> reason`` ("" when ready), for a backend whose availability
    depends on more than loading.
    """

    name: str
    load: Callable[[], object]
    devices: Tuple[str, ...]
    auto: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = FAST_DTYPES
    hint: object = ""  # a str ("{error}" is filled in) or a callable returning one
    ready: Callable[[object, torch.device], str] = field(default=lambda launchers, device: "")

    def runs_on(self, device: torch.device) -> bool:
        return ANY_DEVICE in self.devices or device.type in self.devices


REGISTRY: dict = {}
_cache: dict = {}
_errors: dict = {}  # backend name -> the ImportError that made it unavailable


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a row to the registry (``replace=True`` overwrites a row of the same name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register() takes a Backend row, got {type(backend).__name__}")
    if backend.name in ("auto", REFERENCE) or (backend.name in REGISTRY and not replace):
        raise ValueError(f"backend name {backend.name!r} is taken")
    REGISTRY[backend.name] = backend
    _cache.pop(backend.name, None)
    _errors.pop(backend.name, None)
    return backend


def unregister(name: str) -> None:
    REGISTRY.pop(name)
    _cache.pop(name, None)
    _errors.pop(name, None)


def names() -> tuple:
    """Every name ``backend=`` accepts."""
    return ("auto",) + tuple(REGISTRY) + (REFERENCE,)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load(name: str):
    """The backend's launchers, or None when it cannot load in this process."""
    if name in _cache:
        return _cache[name]
    try:
        mod = REGISTRY[name].load()
    except ImportError as e:  # an optional dependency or the extension is missing
        if os.environ.get("MHPO_VERBOSE"):
            warnings.warn(f"mhpo_kernels: backend {name!r} unavailable: {e}", stacklevel=2)
        _errors[name] = e
        mod = None
    _cache[name] = mod
    return mod


def _reason(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run tensors on ``device`` here ("" when it can)."""
    row = REGISTRY[name]
    mod = _load(name)
    if mod is None:
        err = _errors.get(name)
        hint = row.hint() if callable(row.hint) else row.hint
        return hint.format(error=f"{type(err).__name__}: {err}") if hint else f"it failed to load ({err})"
    if not row.runs_on(device):
        return f"it runs {', '.join(row.devices)} tensors"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device in this process"
    return row.ready(mod, device)


def unavailable_reason(name: str, device) -> str:
    """Why backend ``name`` cannot run tensors on ``device`` here ("" when it can)."""
    if name == REFERENCE:
        return ""
    if name not in REGISTRY:
        return f"no backend is registered as {name!r}"
    return _reason(name, torch.device(device))


def available_backends(device=None) -> list:
    """Backends that work in this process for ``device`` (default: CUDA if present, else CPU),
    in registry order, then ``"reference"`` (the plain-PyTorch ground truth, always there).

    ``"torch"`` works on every device. ``"triton"`` needs a CUDA device, or
    ``TRITON_INTERPRET=1`` for CPU tensors (slow; for tests).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in REGISTRY if not _reason(b, device)] + [REFERENCE]


def resolve(backend: str, device) -> str:
    """The backend to run: ``"auto"`` picks the first row of the table that lists ``device``'s
    type in its ``auto`` and is available (``MHPO_BACKEND`` in the environment overrides "auto")."""
    if backend not in names():
        raise ValueError(f"backend must be one of {names()}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("MHPO_BACKEND", "auto")
        if backend not in names():
            raise ValueError(f"MHPO_BACKEND must be one of {names()}, got {backend!r}")
    if backend == "auto":
        for name, row in REGISTRY.items():
            if (ANY_DEVICE in row.auto or device.type in row.auto) and not _reason(name, device):
                return name
        return REFERENCE
    if backend != REFERENCE:
        reason = _reason(backend, device)
        if reason:
            raise RuntimeError(f"backend {backend!r} is not available for {device.type} tensors ({reason}); "
                               f"available: {available_backends(device)}")
    return backend


def check_dtype(name: str, dtype: torch.dtype, what: str = "logits") -> None:
    """TypeError unless backend ``name`` takes ``dtype`` inputs."""
    if name == REFERENCE or dtype in REGISTRY[name].dtypes:
        return
    takes = " / ".join(str(d).replace("torch.", "") for d in REGISTRY[name].dtypes)
    others = [b for b, row in REGISTRY.items() if dtype in row.dtypes]
    short = str(dtype).replace("torch.", "")
    raise TypeError(f"backend {name!r} takes {takes} {what}, got {dtype}; "
                    f"use backend={(others + [REFERENCE])[0]!r} for {short} (or backend='reference')")


def get(name: str):
    """The launchers (``fwd``, ``bwd``, ``finish``) of backend ``name``."""
    mod = _load(name) if name in REGISTRY else None
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available")
    return mod


def reference():
    """The plain-PyTorch ground truth (``backend="reference"``). The public package imports it
    (``mk.reference``); the fast path never does, it looks the module up by name (a lookup that
    ``torch.compile`` traces)."""
    return sys.modules[__name__.rpartition(".")[0] + ".reference"]


# ---------------------------------------------------------------------------- the table

def _triton():
    # an import statement, not importlib: Dynamo traces it (a first call may be compiled). The source
    # folder triton_kernels/ installs as mhpo_kernels.triton_kernels (setup.py): never import it as a
    # top-level triton_kernels, the name of triton-lang's kernel library
    from .. import triton_kernels

    return triton_kernels


def _pytorch():
    from . import pytorch

    return pytorch


def _native(name: str) -> Callable[[], object]:
    def load():
        from . import native

        return native.backend(name)
    return load


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


def _triton_ready(mod, device) -> str:
    if device.type != "cpu":
        return ""
    if not triton_interpret():
        numpy = "" if importlib.util.find_spec("numpy") else " (and install numpy, which the interpreter needs)"
        return ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 in the environment "
                f"before the first import of triton{numpy}; setting it later gives '0 active drivers'")
    if not _triton_interpreted(mod):
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported, so they were built for a GPU "
                "('0 active drivers' on CPU tensors): set it before the first import of triton")
    return ""


def _triton_hint() -> str:
    err = _errors.get("triton")
    missing = getattr(err, "name", None)
    if missing == "triton":
        return "Triton is not installed (pip install triton)"
    if missing == "numpy":
        return "Triton's interpreter needs numpy, which is not installed (pip install numpy)"
    return "the Triton kernels failed to import: {error}"


NATIVE_HINT = "the native extension is not built or does not load ({error}); see README"

# Rows in priority order for backend="auto". The CUDA C++ kernels are opt-in (backend="cuda")
# until a recorded GPU run of this tree verifies them.
for _row in (
    Backend("triton", _triton, devices=("cuda", "cpu"), auto=("cuda",),
            hint=_triton_hint, ready=_triton_ready),
    Backend("cuda", _native("cuda"), devices=("cuda",), hint=NATIVE_HINT),
    Backend("cpu", _native("cpu"), devices=("cpu",), auto=("cpu",), hint=NATIVE_HINT),
    Backend("torch", _pytorch, devices=(ANY_DEVICE,), auto=(ANY_DEVICE,),
            dtypes=FAST_DTYPES + (torch.float64,)),
):
    register(_row)

# The native extensions load when the package is imported (a few milliseconds): loading them
# the first time inside a torch.compile trace would need importlib, which Dynamo cannot trace,
# so a fullgraph compile of the very first call would fail. Triton's kernels stay lazy (its
# import is heavier and traces fine).
for _name in ("cpu", "cuda", "torch"):
    _load(_name)
