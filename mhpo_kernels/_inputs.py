"""Input validation and normalisation, shared by the fast path and the reference.

This module and :mod:`mhpo_kernels.config` are the common layer: the fast path
and :mod:`mhpo_kernels.reference` both import them, and they import neither.
Everything here runs before any kernel launch. Shape, dtype and device checks
are static (free under ``torch.compile``); the token-id range check reads the
data and is done by :func:`check_target_ids`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._constants import KL_ESTIMATORS

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
SEQ_MODES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")  # normalised by sequences
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class MHPOOutput(NamedTuple):
    """What :func:`mhpo_kernels.mhpo_loss` returns.

    loss:     0-d tensor, differentiable w.r.t. the logits.
    logprobs: per-token log-probs of the targets, detached, shape of target_ids
              (0 at ignore_index positions).
    entropy:  per-token entropy of softmax(logits / T), shape of target_ids
              (0 at ignore_index positions), differentiable, or None.
    metrics:  dict of detached 0-d tensors over the masked tokens.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    metrics: dict


class Prepared(NamedTuple):
    logits: torch.Tensor  # [N, V], stride(-1) == 1
    target: torch.Tensor  # [N] int64
    old: torch.Tensor  # [N] compute dtype
    adv: torch.Tensor  # [N]
    mask: Optional[torch.Tensor]  # [N] mask values with ignore_index rows zeroed (raw_mask: as given, or None)
    ref: Optional[torch.Tensor]  # [N] or None
    shape: tuple  # target_ids.shape
    seq_shape: tuple  # (B, T) for the seq-* aggregation modes


def _flat(name: str, t, shape, device, dtype, allow=("float",)) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")
    kind_ok = (
        ("float" in allow and t.dtype.is_floating_point)
        or ("bool" in allow and t.dtype == torch.bool)
        or ("int" in allow and not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool)
    )
    if not kind_ok:
        raise TypeError(f"{name} must have a {' / '.join(allow)} dtype, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dim() == 1 and t.dtype == dtype and not t.requires_grad and t.is_contiguous():
        return t  # already what the kernels take: no detach / reshape / cast dispatches (per-call overhead)
    return t.detach().reshape(-1).to(dtype).contiguous()


def check_loss_args(loss_agg_mode, beta, has_ref: bool) -> None:
    """The scalar arguments of every policy loss (``has_ref``: reference log-probs are given)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (0 <= beta < float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and not has_ref:
        raise ValueError("beta > 0 needs ref_logprobs")


def _count(name, value, minimum, integer=False):
    """A Python number (a 0-d tensor is read: one host sync) >= ``minimum``, as float; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number (or a one-element tensor), got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (minimum <= value < float("inf")) \
            or (integer and value != int(value)):
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} >= {minimum}, got {value!r}")
    return float(value)


def agg_norm(loss_agg_mode, loss_scale_factor=None, global_batch_size=None, global_num_tokens=None, dp_size=1):
    """The finishing step's ``agg_norm`` floats ``(global_count, loss_scale_factor, dp_size)``
    (``_constants.AGG_NORM``; 0 means the local default) from the public arguments, verl 0.9.1's
    ``agg_loss`` normalisers:

    * ``global_num_tokens`` (verl's ``batch_num_tokens``): the ``token-mean`` denominator, the mask
      sum over the whole global batch (every micro-batch of every rank); None: this call's.
    * ``global_batch_size``: the ``seq-mean-*`` denominator, the number of sequences of the global
      batch; None: this call's sequences with a non-zero mask.
    * ``loss_scale_factor``: ``seq-mean-token-sum-norm``'s second divisor; None: T of ``[B, T]``
      input, packed the longest sequence.
    * ``dp_size``: every mode's loss is multiplied by it (DDP / FSDP average the ranks' gradients).

    Each mode reads only its own denominator (the others are accepted and ignored, as verl does);
    with ``dp_size > 1`` the mode's global denominator is required (verl raises too).
    """
    dp = _count("dp_size", dp_size, 1, integer=True)
    lsf = _count("loss_scale_factor", loss_scale_factor, 0)
    if lsf == 0:
        raise ValueError("loss_scale_factor must be > 0 (None: the sequence length)")
    tokens = _count("global_num_tokens", global_num_tokens, 0)
    seqs = _count("global_batch_size", global_batch_size, 0)
    count = need = None
    if loss_agg_mode == "token-mean":
        count, need = tokens, "global_num_tokens"
    elif loss_agg_mode in SEQ_MODES:
        count, need = seqs, "global_batch_size"
    if count is None and dp > 1 and need is not None:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs {need} (the global batch's)")
    # a global count of 0 means an empty global batch: every local mask is 0 too, and the local count (0) gives 0
    return [count or 0.0, lsf or 0.0, dp]


def check_temperature(temperature) -> None:
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not (0 < temperature < float("inf"))):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_logits(logits, what="logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{what} must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")


def check_ignore_index(ignore_index, V) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < V:
        raise ValueError(f"ignore_index={ignore_index} is a valid token id for V={V}; use a negative value")


def prepare_targets(logits, target_ids, *, temperature, ignore_index, V=None):
    """Validate logits ``[N, V]`` / ``[B, T, V]`` and their target ids: ``(logits2d, target [N] int64)``.

    ``V``: the vocabulary size the ids index (default: the logits' last dimension; a
    vocabulary shard passes the global one).
    """
    check_logits(logits)
    if logits.shape[-1] < 1:
        raise ValueError("logits must have a vocabulary dimension V >= 1")
    check_temperature(temperature)
    check_ignore_index(ignore_index, logits.shape[-1] if V is None else V)
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    target = _flat("target_ids", target_ids, logits.shape[:-1], logits.device, torch.int64, allow=("int",))
    logits2d = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    if logits2d.numel() and logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()  # kernels need unit stride along V; rows may be strided
    return logits2d, target


def prepare_rows(shape, device, old_logprobs, advantages, mask, ref_logprobs, dtype):
    """The per-token inputs flattened to ``[N]`` ``dtype`` (mask: any float / bool / int dtype, None stays
    None); ``advantages`` may be ``[B]`` for a ``[B, T]`` token shape."""
    old = _flat("old_logprobs", old_logprobs, shape, device, dtype)
    if isinstance(advantages, torch.Tensor) and len(shape) == 2 and tuple(advantages.shape) == tuple(shape[:1]):
        advantages = advantages[:, None].expand(shape)  # one advantage per sequence
    adv = _flat("advantages", advantages, shape, device, dtype)
    m = None if mask is None else _flat("mask", mask, shape, device, dtype, allow=("float", "bool", "int"))
    ref = None if ref_logprobs is None else _flat("ref_logprobs", ref_logprobs, shape, device, dtype)
    return old, adv, m, ref


def seq_shape_of(shape) -> tuple:
    """(B, T) of a token shape: ``[B, T]`` is B sequences, ``[N]`` one."""
    return (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])


def prepare(
    logits,
    target_ids,
    old_logprobs,
    advantages,
    mask,
    *,
    temperature,
    loss_agg_mode,
    ignore_index,
    ref_logprobs,
    beta,
    compute_dtype=None,
    raw_mask=False,
) -> Prepared:
    """Validate every argument and flatten the per-token ones to [N].

    ``raw_mask=True`` (the fused finishing step, which zeroes ignore_index rows
    itself): ``mask`` stays None when not given and ignored rows are not zeroed.
    """
    check_logits(logits)
    check_loss_args(loss_agg_mode, beta, ref_logprobs is not None)
    logits2d, target = prepare_targets(logits, target_ids, temperature=temperature, ignore_index=ignore_index)
    shape = tuple(logits.shape[:-1])
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    old, adv, m, ref = prepare_rows(shape, logits.device, old_logprobs, advantages, mask, ref_logprobs, compute_dtype)
    if not raw_mask:
        if m is None:
            m = torch.ones_like(old)
        m = torch.where(target == ignore_index, torch.zeros_like(m), m)
    return Prepared(logits2d, target, old, adv, m, ref, shape, seq_shape_of(shape))


def check_target_ids(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise ValueError naming the first id outside [0, V) that is not ignore_index."""
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if target.numel() and bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target_ids[{pos}] (flattened) = {int(target[pos])} is outside [0, {V}) "
            f"and is not ignore_index={ignore_index}"
        )


def check_cu_seqlens_static(cu_seqlens, device) -> None:
    """The checks of packed-sequence offsets that read no data."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D [S+1] tensor of offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits are on {device}")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")


def check_cu_seqlens(cu_seqlens, N, device) -> None:
    """Validate packed-sequence offsets ``[S+1]`` (flash-attn varlen / verl remove-padding).

    Static checks always; the data checks (starts at 0, ends at N, monotone)
    read the tensor (one host sync) and are skipped under ``torch.compile``.
    """
    check_cu_seqlens_static(cu_seqlens, device)
    if torch.compiler.is_compiling():
        return
    cu = cu_seqlens.long()
    decreasing = cu.diff() < 0
    first, last, n_bad = torch.stack([cu[0], cu[-1], decreasing.sum()]).tolist()  # one sync
    if first != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {first}")
    if n_bad:
        i = int(decreasing.nonzero()[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing: cu_seqlens[{i + 1}]={int(cu[i + 1])} < cu_seqlens[{i}]={int(cu[i])}"
        )
    if last != N:
        raise ValueError(f"cu_seqlens[-1] must be the token count N={N}, got {last}")


def kl_estimator_id(kl_estimator) -> int:
    """The kernels' id of a KL estimator name (verl's ``kl_penalty`` names: k3, k1, k2, low_var_kl)."""
    if not isinstance(kl_estimator, str) or kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {kl_estimator!r}")
    return KL_ESTIMATORS[kl_estimator]


def check_reduce(reduce) -> None:
    if not isinstance(reduce, bool):
        raise TypeError(f"reduce must be a bool, got {reduce!r}")


def prepare_weights(importance_weights, shape, device, dtype):
    """Per-token importance weights (shape of the tokens) as ``[N]`` ``dtype``, detached; None stays None."""
    if importance_weights is None:
        return None
    return _flat("importance_weights", importance_weights, shape, device, dtype)


def check_entropy_coeff(entropy_coeff) -> None:
    """verl's ``entropy_coeff``: loss = pg_loss - entropy_coeff * agg(entropy); any finite number."""
    if isinstance(entropy_coeff, bool) or not isinstance(entropy_coeff, (int, float)) \
            or not abs(entropy_coeff) < float("inf"):
        raise ValueError(f"entropy_coeff must be a finite number, got {entropy_coeff!r}")
