"""Input validation and normalisation shared by every backend.

Everything here runs before any kernel launch. Shape, dtype and device checks
are static (free under ``torch.compile``); the token-id range check reads the
data and is done by :func:`check_target_ids`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
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
    return t.detach().reshape(-1).to(dtype).contiguous()


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
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    if V < 1:
        raise ValueError("logits must have a vocabulary dimension V >= 1")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < V:
        raise ValueError(f"ignore_index={ignore_index} is a valid token id for V={V}; use a negative value")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (0 <= beta < float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")

    device = logits.device
    shape = tuple(logits.shape[:-1])
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    target = _flat("target_ids", target_ids, shape, device, torch.int64, allow=("int",))
    old = _flat("old_logprobs", old_logprobs, shape, device, compute_dtype)
    if (
        isinstance(advantages, torch.Tensor)
        and logits.dim() == 3
        and advantages.dim() == 1
        and advantages.shape[0] == shape[0]
    ):
        advantages = advantages[:, None].expand(shape)  # one advantage per sequence
    adv = _flat("advantages", advantages, shape, device, compute_dtype)
    if mask is None:
        m = None if raw_mask else torch.ones(shape, device=device, dtype=compute_dtype).reshape(-1)
    else:
        m = _flat("mask", mask, shape, device, compute_dtype, allow=("float", "bool", "int"))
    if not raw_mask:
        m = torch.where(target == ignore_index, torch.zeros_like(m), m)
    ref = None if ref_logprobs is None else _flat("ref_logprobs", ref_logprobs, shape, device, compute_dtype)

    logits2d = logits.reshape(-1, V)
    if logits2d.numel() and logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()  # kernels need unit stride along V; rows may be strided
    seq_shape = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    return Prepared(logits2d, target, old, adv, m, ref, shape, seq_shape)


def check_target_ids(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise ValueError naming the first id outside [0, V) that is not ignore_index."""
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if target.numel() and bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target_ids[{pos}] (flattened) = {int(target[pos])} is outside [0, {V}) "
            f"and is not ignore_index={ignore_index}"
        )


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (empty and fully masked batches give 0, not NaN)."""
    return a / torch.where(b == 0, torch.ones_like(b), b)


def aggregation_weights(mask, seq_shape, loss_agg_mode):
    """Per-token weights w with ``loss = sum(w * L)`` for each aggregation mode of docs/mhpo.md."""
    B, T = seq_shape
    m = mask.reshape(B, T)
    if loss_agg_mode == "token-mean":
        w = safe_div(m, m.sum())
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        w = m / max(B * T, 1)
    else:
        count = m.sum(-1, keepdim=True)
        n_seq = (count != 0).sum().to(m.dtype)  # fully masked sequences are not counted
        w = safe_div(safe_div(m, count) if loss_agg_mode == "seq-mean-token-mean" else m, n_seq)
    return w.reshape(-1)
