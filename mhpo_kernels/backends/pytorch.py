"""The ``torch`` backend: the launcher contract (:mod:`mhpo_kernels.backends`) in plain PyTorch.

Any device, float32 / bfloat16 / float16 / float64 logits (math in float32,
float64 for float64 logits). It runs the same three steps as the fused
backends, so every entry point (vocabulary-parallel shards, the fused lm_head
tiles, ``policy_loss_from_logprobs``) works on any device, and a new backend
can borrow any launcher it does not implement yet (``finish`` in particular).
``fwd`` and ``bwd`` materialise float32 ``[N, V]`` temporaries: this is the
portable backend, not the fast one.
"""
from __future__ import annotations

import torch

from .._finish import BAD_CU_SEQLENS, BAD_NONE, BAD_TARGET, METRICS, MODE_GSPO
from ..config import MODE_NONE, CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig, from_kernel_params
from ..epilogue import _clip, cispo_ratio, clip_limits, mhpo_parts, token_epilogue
from ..sequences import NO_NORM, Sequences

_SLOT = {name: i for i, name in enumerate(METRICS)}


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy,
        vocab_start=0):
    """-> (logp, entropy, lse, loss, coef), [N] each (entropy [0] when not wanted)."""
    z = logits.to(_compute_dtype(logits)) / temperature
    N, V = z.shape
    lse = torch.logsumexp(z, -1) if V else z.new_full((N,), float("-inf"))
    y = target - vocab_start
    valid = target != ignore_index
    owned = valid & (y >= 0) & (y < V)
    logp = torch.where(owned, z.gather(1, torch.where(owned, y, 0)[:, None])[:, 0] - lse, 0.0)
    entropy = z.new_empty(0)
    if want_entropy:
        logp_all = z - lse[:, None]
        p = logp_all.exp()
        entropy = torch.where(valid, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1), 0.0)
    loss = coef = torch.zeros_like(lse)
    if mode != MODE_NONE:
        active = valid & (mask != 0)
        zero = torch.zeros_like(lse)
        d = torch.where(active, ref - logp, zero) if ref is not None else None
        loss, coef, _ = token_epilogue(from_kernel_params(mode, params), torch.where(active, logp - old, zero),
                                       torch.where(active, adv, zero), d, beta, active)
    return logp, entropy, lse, loss, coef


def bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0, scale=None):
    """Writes ``d / d logits`` of ``scale * sum(dlogp * logp) + sum(dent * entropy)`` into ``out``."""
    logp_all = logits.to(lse.dtype) / temperature - lse[:, None]
    p = logp_all.exp()
    if scale is not None:
        dlogp = dlogp * scale.to(dlogp.dtype)
    cols = torch.arange(logits.shape[1], device=logits.device) + vocab_start
    grad = (cols[None, :] == target[:, None]).to(p.dtype) * dlogp[:, None] - dlogp[:, None] * p
    if dent is not None:
        grad = grad - dent[:, None] * p * torch.where(p > 0, logp_all + entropy[:, None], 0.0)
    out.copy_(torch.where((target != ignore_index)[:, None], grad / temperature, 0.0))
    return out


def fwd_grad(logits, target, old, adv, ref, weight, mode, params, beta, temperature, ignore_index, want_entropy,
             ent_coef, grad):
    """``fwd`` (rows with ``weight == 0`` inactive) and the gradient of ``weight * (loss - ent_coef * entropy)``
    written into ``grad``: the contract's optional launcher, as ``fwd`` then ``bwd``."""
    need_h = bool(want_entropy) or ent_coef != 0
    logp, entropy, lse, loss, coef = fwd(logits, target, old, adv, weight, ref, mode, params, beta, temperature,
                                         ignore_index, need_h)
    dent = weight * -ent_coef if ent_coef != 0 else None
    bwd(logits, target, lse, entropy if dent is not None else None, weight * coef, dent, temperature, ignore_index,
        grad)
    return logp, entropy if want_entropy else entropy.new_empty(0), lse, loss, coef


def scale_grad(grad, scale):
    """``grad *= scale`` (unconditional here: multiplying by 1 is exact)."""
    grad.mul_(scale)


def _config(mode, params):
    if mode == MODE_NONE:
        return None
    if mode == MODE_GSPO:
        return GSPOConfig(float(params[0]), float(params[1]))
    return from_kernel_params(mode, params)


def _bad(target, cu_seqlens, N, num_classes, ignore_index, check):
    """``(kind, position)`` of the first bad input, as the kernels record it (no host sync)."""
    kind = torch.full((), BAD_NONE, dtype=torch.int64, device=target.device)
    pos = torch.full((), -1, dtype=torch.int64, device=target.device)
    if check:
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        any_bad = bad.any()
        kind = torch.where(any_bad, BAD_TARGET, kind)
        pos = torch.where(any_bad, bad.to(torch.int8).argmax() if N else pos, pos)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        layout_bad = (cu[0] != 0) | (cu[-1] != N) | (cu.diff() < 0).any()
        kind = torch.where(layout_bad, BAD_CU_SEQLENS, kind)
        pos = torch.where(layout_bad, -1, pos)
    return torch.stack([kind, pos])


def finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, beta,
           seq_level, agg, ignore_index, num_classes, check, agg_norm=None, iw=None, kl_est=0, token_out=None):
    """-> (loss 0-d, dlogp [N], metrics [13], bad [2] int64): the O(N) finishing step in torch
    (``token_out``, when given, is filled: the contract's per-token rows)."""
    N = logp.shape[0]
    dt = logp.dtype
    zero = torch.zeros_like(logp)
    m = torch.ones_like(logp) if mask is None else mask.to(dt)
    m = torch.where(target == ignore_index, zero, m)
    active = m != 0
    seqs = Sequences(num_seqs, seq_len, cu_seqlens, N, logp.device)
    delta = torch.where(active, logp - old, zero)  # where() first: padding may hold inf / NaN
    if seq_level:
        delta = torch.where(active, seqs.mean_log_ratio(m, delta), zero)
    a = torch.where(active, adv, zero)
    d = torch.where(active, ref - logp, zero) if ref is not None else None
    cfg = _config(mode, params)  # None (MODE_NONE): the KL term alone (FinishedLoss's d loss / d ref launch)
    value, coef, kl = token_epilogue(cfg, delta, a, d, beta, active, iw, kl_est, torch.where(active, logp, zero))
    w = seqs.weights(m, agg, NO_NORM if agg_norm is None else agg_norm)
    loss = (w * value).sum()
    dlogp = w * coef
    metrics, flag = _metrics(cfg, delta, a, active, entropy, kl, dt)
    if token_out is not None:
        token_out[0] = w * value
        token_out[1] = zero if kl is None else torch.where(active, kl, zero)
        token_out[2] = torch.where(active, flag, zero)
    return loss, dlogp, metrics, _bad(target, cu_seqlens, N, num_classes, ignore_index, check)


def _clip_flags(cfg, delta, adv):
    """``(low, high)``: the tokens clipfrac_low / clipfrac_high count (CISPO: whatever the sign of A)."""
    if isinstance(cfg, CISPOConfig):
        r = cispo_ratio(delta, cfg)[0]
        return r < cfg.ratio_low, r > cfg.ratio_high
    lo, hi = clip_limits(cfg)
    r = torch.exp(delta.clamp(lo, hi))
    return (r < 1 - cfg.eps_low) & (adv < 0), (r > 1 + cfg.eps_high) & (adv > 0)


def _metrics(cfg, delta, adv, active, entropy, kl, dt):
    """``(metrics, flag)``: the 13 metric slots of ``_finish.METRICS`` (means over active tokens, ``ratio_*`` =
    exp of the extreme log-ratio, 1 with no active token; slots the call does not report are 0) and
    token_out's flag row, the tokens the mode's fraction metric counts (clip, GSPO, CISPO: clipped; MHPO:
    survival < 0.5; else 0)."""
    flag = torch.zeros_like(delta)
    n = active.sum().clamp(min=1).to(dt)
    mean = lambda x: (torch.where(active, x, 0.0)).sum() / n
    vals = {"kl_old": mean(-delta)}
    neg_inf = torch.full_like(delta, float("-inf"))
    if delta.numel():
        any_active = active.any()
        vals["ratio_max"] = torch.where(any_active, torch.where(active, delta, neg_inf).max(), 0.0).exp()
        vals["ratio_min"] = torch.where(any_active, -torch.where(active, -delta, neg_inf).max(), 0.0).exp()
    else:
        vals["ratio_max"] = vals["ratio_min"] = delta.new_ones(())
    if isinstance(cfg, MHPOConfig):
        psi, _, zeta = mhpo_parts(delta, cfg)
        survival = torch.exp(-zeta)
        flag = (survival < 0.5).to(dt)
        vals.update(psi_mean=mean(psi), zeta_mean=mean(zeta), survival_mean=mean(survival),
                    low_survival_frac=mean(flag))
    elif isinstance(cfg, (ClipConfig, GSPOConfig, CISPOConfig)):
        low, high = (f.to(dt) for f in _clip_flags(cfg, delta, adv))
        flag = low + high  # exclusive: r cannot be below the low bound and above the high one
        vals.update(clipfrac_low=mean(low), clipfrac_high=mean(high), clipfrac=mean(flag))
        if isinstance(cfg, ClipConfig) and cfg.dual_clip_c is not None:
            unclipped = _clip(delta, adv, cfg)[2]
            vals["dual_clipfrac"] = mean(((adv < 0) & (unclipped > -cfg.dual_clip_c * adv)).to(dt))
    if entropy is not None:
        vals["entropy_mean"] = mean(entropy.to(dt))
    if kl is not None:
        vals["kl_ref"] = mean(kl)
    zero = delta.new_zeros(())
    return torch.stack([vals.get(name, zero) for name in METRICS]), flag
