"""Rollout importance weights (the rollout engine's sampling policy vs the trainer's), built the way
verl 0.9.1 and trl 1.16.0 build them, to pass as ``importance_weights=`` (imports neither)::

    w = verl_rollout_is_weights(old_log_prob, rollout_log_prob, mask, rollout_is="token", rollout_is_threshold=2.0)
    out = mk.policy_loss_from_logprobs(log_prob, old_log_prob, adv, mask, importance_weights=w)

Both return detached ``[B, T]`` weights. The ratio is ``exp(old - rollout)``, per token or per sequence
(``exp`` of the sequence's summed log-ratio, repeated on its tokens); "truncate" clamps it, "mask"
zeroes it outside ``[lower, upper]``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = ["verl_rollout_is_weights", "trl_importance_sampling_ratio", "parse_verl_threshold"]

SAFETY_BOUND = 20.0  # verl's clamp of the log-ratio before exp
TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def parse_verl_threshold(spec: Union[float, str]) -> tuple:
    """verl's ``rollout_is_threshold`` -> ``(upper, lower)``: a number or ``"2.0"`` is TIS's upper bound
    (lower None), ``"0.5_2.0"`` IcePop's bounds. Both > 0, lower <= upper (ValueError otherwise)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {spec!r}")
    lower = None
    try:
        if isinstance(spec, str) and "_" in spec.strip():
            lower, upper = (float(s) for s in spec.strip().split("_", 1))
        else:
            upper = float(spec)
    except ValueError as exc:
        raise ValueError(f"Invalid rollout_is_threshold {spec!r}") from exc
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}")
    if lower is not None and not 0 < lower <= upper:
        raise ValueError(f"rollout_is_threshold lower bound must be in (0, upper], got {lower}")
    return upper, lower


def _masked_mean(x, response_mask, dim=None):  # verl_F.masked_mean: sum / (count + 1e-8), count in the mask's dtype
    return torch.where(response_mask.bool(), x, 0).sum(dim) / (response_mask.sum(dim) + 1e-8)


def verl_rollout_is_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor,
                            rollout_is: str = "token", rollout_is_threshold: Union[float, str] = 2.0,
                            rollout_is_batch_normalize: bool = False) -> torch.Tensor:
    """verl's ``rollout_is_weights`` (``rollout_corr_helper.compute_rollout_correction_weights`` at
    ``log_ratio = old_log_prob - rollout_log_prob``; same argument names as verl's
    ``algorithm.rollout_correction``).

    Args:
        old_log_prob, rollout_log_prob: [B, T] log-probs of the trainer (before the update) and of the
            rollout engine.
        response_mask: [B, T], nonzero on response tokens.
        rollout_is: "token" (``exp(clamp(log_ratio, -20, 20))``) or "sequence" (``exp`` of the
            clamped sum of the sequence's log-ratios, on each of its tokens).
        rollout_is_threshold: see :func:`parse_verl_threshold`: TIS clamps at ``upper``; IcePop
            (``"lower_upper"``) zeroes the weights outside ``[lower, upper]``.
        rollout_is_batch_normalize: divide by the weights' mean over the response tokens ("token")
            or over the non-empty sequences ("sequence"), when that mean is > 1e-8. The mean is this
            call's: verl all-reduces it when ``torch.distributed`` is initialised.

    Returns:
        Detached [B, T] weights, 0 off the response (NaN there is not read).
    """
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is!r}. Must be 'token' or 'sequence'")
    upper, lower = parse_verl_threshold(rollout_is_threshold)
    mask = response_mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(mask, old_log_prob - rollout_log_prob, 0)
        if rollout_is == "sequence":
            log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
        w = torch.where(mask, log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp(), 0)
        if lower is None:
            w = w.clamp(max=upper)
        else:
            w = torch.where((w >= lower) & (w <= upper), w, 0)
        if rollout_is_batch_normalize:
            if rollout_is == "token":
                mean = _masked_mean(w, response_mask)
            else:
                seqs = (mask.sum(-1) > 0).to(w.dtype)
                mean = (_masked_mean(w, response_mask, -1) * seqs).sum() / seqs.sum().clamp_min(1e-8)
            w = torch.where(mean > 1e-8, w / mean, w)
    return w.detach()


def trl_importance_sampling_ratio(old_per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor,
                                  completion_mask: torch.Tensor, mode: str = "sequence_mask",
                                  clip_max: Optional[float] = 3.0, clip_min: Optional[float] = None) -> torch.Tensor:
    """TRL's vLLM ``importance_sampling_ratio`` (``GRPOTrainer._generate_and_score_completions`` with
    ``vllm_importance_sampling_mode=mode`` and ``vllm_importance_sampling_clip_max / _min``).

    The log-ratio ``(old - sampling) * completion_mask`` (NaN, a token vLLM did not score, -> 0) is
    exponentiated per token or as its sequence sum, unclamped; "*_truncate" clamps the ratio to
    ``[clip_min, clip_max]``, "*_mask" zeroes it outside (a None bound: none on that side). Pass
    ``completion_mask * tool_mask`` where TRL masks tool tokens.

    Returns:
        Detached [B, T] ratios: the sequence modes' [B, 1] ratio repeated on every token; off the
        completion the token modes hold TRL's ratio of a zero log-ratio.
    """
    if mode not in TRL_MODES:
        raise ValueError(f"Unknown vLLM importance sampling mode: {mode!r}. Possible values are {TRL_MODES}")
    with torch.no_grad():
        diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * completion_mask, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = diff.exp()
        if mode.endswith("truncate"):
            ratio = ratio.clamp(min=clip_min, max=clip_max)
        else:
            low = -math.inf if clip_min is None else clip_min
            high = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
        ratio = ratio.expand(diff.shape[0], completion_mask.shape[-1])
    return ratio.detach()
