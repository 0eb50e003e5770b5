"""Fused drop-ins for verl's and TRL's log-prob / entropy helpers (checked against verl 0.9.1 and
trl 1.16.0; imports neither until a patch is applied).

Each replacement is :func:`mhpo_kernels.token_logprobs`: one pass over the logits with float32
accumulation and no ``[N, V]`` temporary (verl's ``entropy_from_logits`` builds ``softmax(logits)`` and
its product with the logits, the chunked one float32 copies of 2048 rows; TRL's torch fallbacks take
``log_softmax`` in chunks); the backward writes the one ``[N, V]`` gradient, in the logits' dtype. Logits
whose rows have no single stride (``logits[:, :-1]`` of a ``[B, T, V]`` tensor) are copied once, in their
dtype::

    from mhpo_kernels.integrations.fused_logits import patch_verl
    with patch_verl():          # or: handle = patch_verl(); ...; handle.undo()
        ...                     # verl's actor / engines call the fused functions

Same signatures, shapes, values (to float tolerance; theirs round to bf16 on bf16 logits), gradients
w.r.t. the logits:

* verl's ``logprobs_from_logits``: :func:`verl_logprobs_from_logits`, float32 (flash-attn's path), float64
  for float64 logits; ``entropy_from_logits``: :func:`verl_entropy_from_logits`, in the logits' dtype;
  ``entropy_from_logits_with_chunking``: :func:`verl_entropy_from_logits_with_chunking`, float32.
* TRL's ``selective_log_softmax`` / ``entropy_from_logits`` / ``selective_log_softmax_and_entropy``:
  :func:`trl_selective_log_softmax` / :func:`trl_entropy_from_logits` /
  :func:`trl_selective_log_softmax_and_entropy` (one pass), float32 as TRL's Triton kernel, 0 where
  ``row_mask`` is 0; an index of shape ``(..., K)`` goes to TRL's own function.

Token ids must be in ``[0, V)``, as verl and TRL require; they are not checked (no host sync).

One pass for both: while a patch with ``entropy=True`` is active (or inside :func:`share_entropy`), a
log-prob call (temperature 1, no ``row_mask``) also computes the entropy in its pass and keeps it, and
the next entropy call on the same logits returns it: same tensor object, unchanged ``_version`` (no
in-place edit since), same grad mode, outside a backward (checkpoint recomputation) and outside
``torch.compile`` tracing; else it computes afresh. The kept entropy goes when the log-prob output does.
Both then come from one autograd node, so one backward pass (and one ``backward()`` call) serves both,
as with TRL's fused kernel. So log-probs then entropy is one pass (verl's prefix grouper; its
automodel / torchtitan engines unless ``use_torch_compile``, on by default, compiles their entropy
function; TRL's ``selective_log_softmax`` then ``entropy_from_logits``); entropy then log-probs (verl's
FSDP engine) is two: the entropy call has no labels (and the entropy each log-prob call computes in its
pass goes unused: a few flops per logit, no extra memory traffic).

Not covered (they never reach these names): verl's ``use_fused_kernels`` (log-probs from the hidden
states), its Megatron engine (``vocab_parallel_*``) and its temperature division (per-token, before the
call). Patch before verl builds its engines (they keep ``entropy_from_logits``, maybe compiled, from
their ``__init__``), in every process that runs them: ``MHPO_VERL_FUSED_LOGPROBS=1`` with
``VERL_USE_EXTERNAL_MODULES=mhpo_kernels.integrations.verl`` does (:mod:`mhpo_kernels.integrations.verl`).

TRL's ``GRPOTrainer`` (1.16) never builds the logits: its fused LM head (``add_fused_lm_head``,
``model(..., fused_lm_head=True)``) runs tiles of ``hidden @ weight.T`` in ``_ChunkedLogProbFunction``.
:func:`fuse_trl_lm_head` reroutes one model's head to this package's tiles
(:func:`trl_chunked_logprobs`, ``fused_linear._LinearLogprobs``); ``MHPOGRPOConfig(mhpo_fused_lm_head=True)``
does it for the trainer's models.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import threading
import types
import weakref
from typing import Dict, Tuple

import torch

from .. import backends
from ..api import token_logprobs
from ..fused_linear import _LinearLogprobs, _TileOpts, default_chunk_sizes

__all__ = ["verl_logprobs_from_logits", "verl_entropy_from_logits", "verl_entropy_from_logits_with_chunking",
           "trl_selective_log_softmax", "trl_entropy_from_logits", "trl_selective_log_softmax_and_entropy",
           "patch_verl", "patch_trl", "share_entropy", "Patch", "trl_chunked_logprobs", "fuse_trl_lm_head"]

NO_IGNORE = -(2 ** 31)  # the ignore_index no token id equals: every row is scored (its entropy is real)
VERL_MODULE = "verl.utils.torch_functional"
TRL_MODULE = "trl.trainer.utils"


def _fused(logits, labels, temperature=1.0, entropy=True):
    """``token_logprobs`` on the rows of ``logits`` (any leading shape): ``(logp, entropy or None)``, float32
    (float64 for float64 logits, on the torch backend)."""
    V = logits.shape[-1]
    out = token_logprobs(logits.reshape(-1, V), labels.reshape(-1), temperature=temperature, ignore_index=NO_IGNORE,
                         return_entropy=entropy, backend="torch" if logits.dtype == torch.float64 else "auto",
                         check_ids=False)
    logp, ent = out if entropy else (out, None)
    shape = logits.shape[:-1]
    return logp.reshape(shape), None if ent is None else ent.reshape(shape)


# ------------------------------------------------------------------------ one pass for both


_sharing = [0]  # active share_entropy() scopes (patches with entropy=True among them), all threads
_kept = threading.local()  # .entry: the last log-prob call's entropy, for this thread's next entropy call


class _Kept:
    __slots__ = ("logits", "version", "grad", "entropy")

    def drop(self):
        self.entropy = None


@contextlib.contextmanager
def share_entropy():
    """Inside it, the log-prob replacements also compute the entropy in their pass, for the next entropy
    call on the same logits (the patches with ``entropy=True`` hold it while they are active)."""
    _sharing[0] += 1
    try:
        yield
    finally:
        _sharing[0] -= 1


def _eager_forward(logits) -> bool:
    """True outside tracing and outside a backward (checkpoint recomputation), on a version-tracked tensor."""
    if torch.compiler.is_compiling() or type(logits) is not torch.Tensor or logits.is_inference():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() == -1


def _key(logits):
    return logits._version, (torch.is_grad_enabled(), logits.requires_grad)


def _logprobs(logits, labels, temperature=1.0):
    """Log-probs of ``labels``; keeps the entropy of the same pass while sharing is on."""
    if not (_sharing[0] and temperature == 1.0 and _eager_forward(logits)):
        return _fused(logits, labels, temperature, entropy=False)[0]
    logp, ent = _fused(logits, labels)
    kept = _Kept()
    kept.logits, (kept.version, kept.grad), kept.entropy = weakref.ref(logits), _key(logits), ent
    weakref.finalize(logp, kept.drop)  # the entropy (and its graph) lives no longer than the log-probs
    _kept.entry = kept
    return logp


def _entropy(logits):
    """Entropy of each row (float32): the kept one of a log-prob call on this very tensor, else one pass."""
    kept = getattr(_kept, "entry", None)
    if (kept is not None and kept.entropy is not None and _eager_forward(logits) and kept.logits() is logits
            and (kept.version, kept.grad) == _key(logits)):
        _kept.entry = None
        return kept.entropy
    return _fused(logits, logits.new_zeros(logits.shape[:-1], dtype=torch.long))[1]


# ------------------------------------------------------------------------------------ verl


def verl_logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]``, float32 (float64 for float64
    logits). ``inplace_backward`` is accepted and ignored (the gradient gets its own buffer)."""
    return _logprobs(logits, labels)


def verl_entropy_from_logits(logits):
    """verl's ``entropy_from_logits``: the entropy of ``softmax(logits)`` per row, in the logits' dtype."""
    return _entropy(logits).to(logits.dtype)


def verl_entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """verl's ``entropy_from_logits_with_chunking`` (default dtype, float32, as verl's); no chunks needed."""
    return _entropy(logits).to(torch.get_default_dtype())


# ------------------------------------------------------------------------------------- TRL


_ORIGINALS: Dict[Tuple[str, str], object] = {}  # (module, name) -> the function a patch replaced there


def _original(module, name):
    fn = vars(importlib.import_module(module))[name]
    return _ORIGINALS.get((module, name), fn) if getattr(fn, "_mhpo_fused", False) else fn


def _trl_labels(logits, index, temperature, row_mask):
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if row_mask is not None:  # TRL: zero outputs (and gradient) on rows whose mask is 0
        index = torch.where(row_mask != 0, index, NO_IGNORE)
    return index


def trl_selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)[index]``, float32, 0 where
    ``row_mask`` is 0; an index of shape ``(..., K)`` goes to TRL's own function."""
    if index.dim() != logits.dim() - 1:
        return _original(TRL_MODULE, "selective_log_softmax")(logits, index, temperature, row_mask)
    labels = _trl_labels(logits, index, temperature, row_mask)
    if row_mask is not None:
        return _fused(logits, labels, temperature, entropy=False)[0]
    return _logprobs(logits, labels, temperature)


def trl_entropy_from_logits(logits, chunk_size=128):
    """TRL's ``entropy_from_logits``: the entropy of ``softmax(logits)`` per row, float32; no chunks needed."""
    return _entropy(logits)


def trl_selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
                                          row_mask=None):
    """TRL's ``selective_log_softmax_and_entropy``: both from one pass, float32, 0 where ``row_mask`` is 0."""
    if index.dim() != logits.dim() - 1:
        return _original(TRL_MODULE, "selective_log_softmax_and_entropy")(
            logits, index, entropy_requires_grad, temperature, row_mask)
    logp, ent = _fused(logits, _trl_labels(logits, index, temperature, row_mask), temperature)
    return logp, ent if entropy_requires_grad else ent.detach()


for _fn in (verl_logprobs_from_logits, verl_entropy_from_logits, verl_entropy_from_logits_with_chunking,
            trl_selective_log_softmax, trl_entropy_from_logits, trl_selective_log_softmax_and_entropy):
    _fn._mhpo_fused = True  # what a patch puts in place (an outer patch's, when nested)
del _fn

# ------------------------------------------------------------------------------------ patch


class Patch:
    """A patch's undo handle, also its context manager: :meth:`undo` (idempotent) puts each original back
    in every loaded module of the package that holds the replacement, including modules imported since."""

    def __init__(self, package, module, replacements, share):
        source = importlib.import_module(module)
        self.package, self.module, self._share, self._done = package, module, share, False
        self.replaced = {}  # name -> (original, replacement), the names this patch rebound
        for name, new in replacements.items():
            old = vars(source)[name]
            if getattr(old, "_mhpo_fused", False):
                continue  # an outer patch holds it
            _ORIGINALS[module, name] = old
            self.replaced[name] = (old, new)
        self._rebind(self.replaced)
        _sharing[0] += share

    def _rebind(self, pairs, undo=False):
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == self.package or mod_name.startswith(self.package + ".")):
                continue
            d = getattr(mod, "__dict__", None) or {}
            for name, (old, new) in pairs.items():
                if d.get(name) is (new if undo else old):
                    setattr(mod, name, old if undo else new)

    @property
    def active(self) -> bool:
        return not self._done

    def undo(self) -> None:
        if self._done:
            return
        self._done = True
        self._rebind(self.replaced, undo=True)
        _sharing[0] -= self._share

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def patch_verl(entropy=True) -> Patch:
    """Rebind verl's ``logprobs_from_logits`` (and, with ``entropy``, ``entropy_from_logits`` and
    ``entropy_from_logits_with_chunking``) to the fused ones in every loaded ``verl`` module holding them
    (modules imported later take them from ``verl.utils.torch_functional``). Returns the undo handle,
    also a context manager."""
    new = {"logprobs_from_logits": verl_logprobs_from_logits}
    if entropy:
        new.update(entropy_from_logits=verl_entropy_from_logits,
                   entropy_from_logits_with_chunking=verl_entropy_from_logits_with_chunking)
    return Patch("verl", VERL_MODULE, new, bool(entropy))


def patch_trl(entropy=True) -> Patch:
    """Rebind TRL's ``selective_log_softmax`` (and, with ``entropy``, ``entropy_from_logits`` and
    ``selective_log_softmax_and_entropy``) to the fused ones in every loaded ``trl`` module holding them
    (modules imported later take them from ``trl.trainer.utils``). Returns the undo handle, also a
    context manager."""
    new = {"selective_log_softmax": trl_selective_log_softmax}
    if entropy:
        new.update(entropy_from_logits=trl_entropy_from_logits,
                   selective_log_softmax_and_entropy=trl_selective_log_softmax_and_entropy)
    return Patch("trl", TRL_MODULE, new, bool(entropy))


# -------------------------------------------------------------------- TRL's fused LM head

TRL_HEAD = "_ChunkedLogProbFunction"  # what TRL's add_fused_lm_head forward calls: .apply(hidden, weight, ...)
_TRL_EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's fields the tiles here do not compute


def _trl_head():
    return vars(importlib.import_module(TRL_MODULE))[TRL_HEAD]


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # no transformers: no TRL model either
        return False
    return is_deepspeed_zero3_enabled()


def _head_plan(hidden, weight, bias, temperature, softcap, logit_scale, outputs, backend):
    """``(backend name, GEMM dtype)`` when this package's tiles compute TRL's head call exactly, else None."""
    if (softcap is not None or logit_scale != 1 or any(o in outputs for o in _TRL_EXTRA_OUTPUTS)
            or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf")
            or hidden.dim() != 2 or hidden.shape[0] == 0 or hidden.device != weight.device):
        return None
    name = backends.resolve(backend, hidden.device)
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype  # TRL's compute dtype
    if (name == backends.REFERENCE or dtype not in backends.FAST_DTYPES or dtype not in backends.REGISTRY[name].dtypes
            or weight.dtype != dtype or (bias is not None and bias.dtype != dtype) or _zero3()):
        return None
    return name, dtype


def trl_chunked_logprobs(hidden, weight, bias, targets, temperature=1.0, chunk_size=None,
                         final_logit_softcapping=None, logit_scale=1.0, outputs=("log_probs",), backend="auto"):
    """TRL's ``_ChunkedLogProbFunction.apply`` (its fused LM head): ``(log_probs, entropy, None, None, None)``
    of ``softmax((hidden @ weight.T + bias) / temperature)`` at ``targets``, float32, by this package's
    tiles (``fused_linear._LinearLogprobs``; ``entropy`` None unless in ``outputs``; ``chunk_size``, TRL's
    vocabulary tile, unused: the tiles size themselves). TRL's own function computes the call instead when
    ours would not be exact or cannot run: a softcap, ``logit_scale != 1``, other ``outputs``, no rows,
    ``backend`` resolving to "reference", a weight (or bias) not in the dtype TRL multiplies in (autocast's,
    else the hidden states'), float64, DeepSpeed ZeRO-3 (its backward re-gathers the weight)."""
    plan = _head_plan(hidden, weight, bias, temperature, final_logit_softcapping, logit_scale, outputs, backend)
    if plan is None:
        return _trl_head().apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                 logit_scale, outputs)
    name, dtype = plan
    h = hidden if hidden.dtype == dtype else hidden.to(dtype)
    h = h if h.stride(-1) == 1 else h.contiguous()
    N, (V, H) = h.shape[0], weight.shape
    want_ent = "entropy" in outputs
    rows, cols = default_chunk_sizes(N, V, H, dtype, h.device)
    opts = _TileOpts(backends.get(name), float(temperature), NO_IGNORE, want_ent, rows, cols)
    with torch.autocast(h.device.type, enabled=False):  # the tiles multiply in dtype, forward and backward
        logp, ent, _ = _LinearLogprobs.apply(opts, targets.reshape(-1).long(), h, weight, bias, None, None, None)
    return logp, ent if want_ent else None, None, None, None


class _TRLHead:
    """Stands in for ``_ChunkedLogProbFunction`` in a rerouted forward (:func:`fuse_trl_lm_head`)."""

    def __init__(self, backend):
        self.backend = backend

    def apply(self, *args):
        return trl_chunked_logprobs(*args, backend=self.backend)


def _wrapped(model):
    """``model`` and what it wraps: PEFT's base model, DDP / DeepSpeed's ``module``, FSDP1's wrapped module."""
    seen, todo = [], [model]
    while todo:
        m = todo.pop()
        if m is None or any(m is s for s in seen):
            continue
        seen.append(m)
        inner = vars(m).get("_modules", {})
        todo += [inner.get("module"), inner.get("_fsdp_wrapped_module"), inner.get("base_model")]
        if callable(getattr(type(m), "get_base_model", None)):
            todo.append(m.get_base_model())
    return seen


def fuse_trl_lm_head(model, backend="auto") -> int:
    """Route the fused LM head that TRL's ``add_fused_lm_head`` gave ``model`` (or a model it wraps) through
    :func:`trl_chunked_logprobs`: that model's ``forward`` becomes a copy of TRL's whose globals are a copy of
    ``trl.trainer.utils``'s with ``_ChunkedLogProbFunction`` ours. Nothing global changes: other models (and
    trainers) keep TRL's head. Returns how many such forwards ``model`` holds (0: none; calling it again
    only sets ``backend``)."""
    tU = importlib.import_module(TRL_MODULE)
    found = 0
    for m in _wrapped(model):
        fwd = vars(m).get("forward")
        fn = getattr(fwd, "__func__", None)
        if getattr(fn, "_mhpo_trl_head", None) is not None:
            fn._mhpo_trl_head.backend = backend
            found += 1
        elif fn is not None and fn.__globals__ is vars(tU) and fn.__code__.co_name == "_fused_forward":
            head = _TRLHead(backend)
            new = types.FunctionType(fn.__code__, {**vars(tU), TRL_HEAD: head}, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
            new.__dict__.update(fn.__dict__)  # functools.wraps's __wrapped__: generate() reads the signature
            for attr in ("__kwdefaults__", "__doc__", "__qualname__", "__module__", "__annotations__"):
                setattr(new, attr, copy.copy(getattr(fn, attr)))
            new._mhpo_trl_head = head
            m.forward = types.MethodType(new, m)
            found += 1
    return found
