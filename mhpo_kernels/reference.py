"""Plain-PyTorch reference: the ground truth every backend is tested against.

It mirrors ``docs/mhpo.md`` (the package's math) line by line and is also
``backend="reference"``: any device, any float dtype (math in float32, or float64
for float64 logits), plain autograd through the formulas. It materialises
``log_softmax`` over ``[N, V]``, which is exactly the memory the fused backends avoid.

A leaf: it imports only the common layer (:mod:`.config`, :mod:`._inputs`), and no
module of the fast path imports it (``tests/test_layout.py`` checks both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._inputs import (
    MHPOOutput, agg_norm, check_cu_seqlens, check_entropy_coeff, check_reduce, check_target_ids, kl_estimator_id,
    prepare, prepare_targets, prepare_weights,
)
from .config import (
    CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig,
    resolve_ratio_control,
)

__all__ = [
    "mhpo_loss", "token_logprobs_entropy", "lfm", "dhp", "token_loss", "aggregate",
    "policy_loss", "policy_loss_from_logprobs", "token_logprobs", "gspo_token_loss", "sequence_token_loss",
    "sequence_log_ratio", "check_cu_seqlens", "policy_metrics", "kl_estimate", "token_weights",
]


def safe_div(a, b):
    """a / b with 0 where b == 0 (empty and fully masked batches give 0, not NaN)."""
    return a / torch.where(b == 0, torch.ones_like(b), b)


def token_logprobs_entropy(logits2d, target, temperature, ignore_index, dtype=torch.float32, want_entropy=True):
    """logp_n = z_n[y_n]/T - logsumexp(z_n/T) and H_n = -sum_v p log p; 0 on ignored rows.

    The entropy is None when not wanted (it costs three more [N, V] passes here).
    """
    z = logits2d.to(dtype) / temperature
    valid = target != ignore_index
    logp_all = F.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    zero = torch.zeros_like(logp)
    entropy = None
    if want_entropy:
        p = logp_all.exp()
        entropy = torch.where(valid, -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1), zero)
    return torch.where(valid, logp, zero), entropy


def lfm(delta, cfg: MHPOConfig):
    """Log-Fidelity Modulator: psi = c * tanh(delta / c) (psi = delta for "DHP only")."""
    return cfg.c * torch.tanh(delta / cfg.c) if cfg.use_lfm else delta


def dhp(psi, cfg: MHPOConfig):
    """Decoupled Hazard Penalty on a stop-gradient psi (zeta = 0 for "LFM only")."""
    psi = psi.detach()
    if not cfg.use_dhp:
        return torch.zeros_like(psi)
    return (F.softplus(psi) / cfg.lam_pos) ** cfg.k_pos + (F.softplus(-psi) / cfg.lam_neg) ** cfg.k_neg


def token_loss(delta, adv, cfg, logp=None):
    """Per-token surrogate loss of one ratio control, differentiable w.r.t. delta (CISPO: w.r.t. ``logp``)."""
    if isinstance(cfg, CISPOConfig):  # verl's compute_policy_loss_cispo: -sg(clip(r)) * A * logp
        ratio = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        return -ratio.clamp(cfg.ratio_low, cfg.ratio_high).detach() * adv * logp
    if isinstance(cfg, MHPOConfig):
        psi = lfm(delta, cfg)
        zeta = dhp(psi, cfg)
        return -torch.exp(psi - zeta.detach()) * adv
    if isinstance(cfg, ClipConfig):  # verl's compute_policy_loss convention
        ratio = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        loss = torch.maximum(-unclipped * adv, -ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
        if cfg.dual_clip_c is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip_c * adv), loss)
        return loss
    if isinstance(cfg, SAPOConfig):
        # r is capped at exp(20), where sigmoid(tau*(r-1)) is already 1 in fp32
        ratio = torch.exp(delta.clamp(max=CLIP_LOG_RATIO_LIMIT))
        tau = torch.full_like(adv, cfg.tau_neg).masked_fill(adv > 0, cfg.tau_pos)
        return -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
    raise TypeError(f"unsupported ratio control {type(cfg).__name__}")


def kl_estimate(logp, ref, kl_estimator="k3"):
    """verl's ``kl_penalty(logp, ref, kl_estimator)``, differentiable w.r.t. ``logp``: k1 ``logp - ref``,
    k2 ``(logp - ref)^2 / 2``, k3 ``e^d - d - 1`` with ``d = ref - logp``, low_var_kl the same with ``d``
    clamped to [-20, 20] and the value to [-10, 10]."""
    kl_estimator_id(kl_estimator)  # validates
    if kl_estimator == "k1":
        return logp - ref
    if kl_estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    d = ref - logp
    if kl_estimator == "low_var_kl":
        d = d.clamp(-20, 20)
        return (torch.exp(d) - d - 1).clamp(-10, 10)
    return torch.exp(d) - d - 1


def token_weights(m, loss_agg_mode, *, loss_scale_factor=None, global_batch_size=None, global_num_tokens=None,
                  dp_size=1):
    """The per-token weights w over [B, T] with ``aggregate(L, m, mode) == (w * L).sum()`` (docs/mhpo.md's
    aggregation table written per token): what ``reduce=False`` multiplies each token's loss by."""
    agg_norm(loss_agg_mode, loss_scale_factor, global_batch_size, global_num_tokens, dp_size)  # validates
    if loss_agg_mode == "token-sum":
        return m * dp_size
    if loss_agg_mode == "token-mean":
        n_tokens = m.sum() if global_num_tokens is None else torch.as_tensor(float(global_num_tokens), dtype=m.dtype)
        return safe_div(m, n_tokens) * dp_size
    seq_count = m.sum(-1, keepdim=True)
    n_seq = (seq_count != 0).sum().to(m.dtype)
    if global_batch_size is not None:
        n_seq = torch.as_tensor(float(global_batch_size), dtype=m.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        return safe_div(safe_div(m, seq_count), n_seq) * dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        return safe_div(m, n_seq) * dp_size
    scale = max(m.shape[-1], 1) if loss_scale_factor is None else float(loss_scale_factor)
    return safe_div(m, n_seq) / scale * dp_size


def aggregate(L, m, loss_agg_mode, *, loss_scale_factor=None, global_batch_size=None, global_num_tokens=None,
              dp_size=1):
    """docs/mhpo.md's aggregation table over [B, T] (verl 0.9.1's ``agg_loss``; fully masked
    sequences are not counted). The global normalisers replace this batch's own counts."""
    agg_norm(loss_agg_mode, loss_scale_factor, global_batch_size, global_num_tokens, dp_size)  # validates
    token_sum = (m * L).sum()
    if loss_agg_mode == "token-sum":
        return token_sum * dp_size
    if loss_agg_mode == "token-mean":
        n_tokens = m.sum() if global_num_tokens is None else torch.as_tensor(float(global_num_tokens), dtype=L.dtype)
        return safe_div(token_sum, n_tokens) * dp_size
    seq_sum, seq_count = (m * L).sum(-1), m.sum(-1)
    n_seq = (seq_count != 0).sum().to(L.dtype)
    if global_batch_size is not None:
        n_seq = torch.as_tensor(float(global_batch_size), dtype=L.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        return safe_div(safe_div(seq_sum, seq_count).sum(), n_seq) * dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        return safe_div(seq_sum.sum(), n_seq) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":  # T: the padded length (packed: the longest sequence)
        scale = max(L.shape[-1], 1) if loss_scale_factor is None else float(loss_scale_factor)
        return safe_div(seq_sum.sum(), n_seq) / scale * dp_size
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def mhpo_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, config=None,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="reference", inplace_backward=False,
    entropy_coeff=0.0, fused_gradient=None, loss_scale_factor=None, global_batch_size=None, global_num_tokens=None,
    dp_size=1, importance_weights=None, kl_estimator="k3", reduce=True,
):
    """Reference MHPO loss; same signature and output as :func:`mhpo_kernels.mhpo_loss`.

    ``backend``, ``inplace_backward`` and ``fused_gradient`` are accepted for signature parity and ignored.
    """
    config = MHPOConfig() if config is None else config
    if not isinstance(config, MHPOConfig):
        raise TypeError(f"config must be an MHPOConfig, got {type(config).__name__}")
    return policy_loss(
        logits, target_ids, old_logprobs, advantages, mask, ratio_control=config,
        importance_sampling_level="token", temperature=temperature, loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
        entropy_coeff=entropy_coeff, loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
        global_num_tokens=global_num_tokens, dp_size=dp_size, importance_weights=importance_weights,
        kl_estimator=kl_estimator, reduce=reduce,
    )


# ---------------------------------------------------------------------------
# The general policy loss: every ratio control, token- or sequence-level
# importance sampling, packed input. Plain autograd over a padded [B, T]
# layout; packed input is padded first (the fused path never pads).


def _pad_index(cu_seqlens):
    """idx [S, T_max] with the flat token index of each padded position, -1 for padding."""
    lengths = cu_seqlens.long().diff().tolist()
    S, T_max = len(lengths), max(lengths, default=0)
    idx = torch.full((S, T_max), -1, dtype=torch.long, device=cu_seqlens.device)
    for s, (start, n) in enumerate(zip(cu_seqlens.long().tolist(), lengths)):
        idx[s, :n] = torch.arange(start, start + n, device=cu_seqlens.device)
    return idx


def _to_padded(x, idx, fill=0.0):
    """[N] -> [S, T_max] (padding = fill), differentiable."""
    if x is None:
        return None
    return torch.where(idx >= 0, x[idx.clamp(min=0)], fill)


def sequence_log_ratio(delta, m):
    """delta_i = sum_t m delta / sum_t m over [B, T] (0 for a fully masked sequence)."""
    return safe_div((m * delta).sum(-1), m.sum(-1))


def gspo_token_loss(logp, old, adv, m, cfg: GSPOConfig):
    """GSPO, verl's compute_policy_loss_gspo, over [B, T]:
    log s_i,t = sg(log s_i) + logp_t - sg(logp_t), clamped at max=10;
    loss_t = max(-A s_i,t, -A clip(s_i,t, 1 - eps_low, 1 + eps_high))."""
    active = m != 0
    zero = torch.zeros_like(old)
    delta = torch.where(active, logp.detach() - old, zero)
    log_s = sequence_log_ratio(delta, m)[:, None]
    log_st = (torch.where(active, logp - logp.detach(), zero) + log_s).clamp(max=GSPO_LOG_RATIO_LIMIT)
    s = torch.exp(log_st)
    return torch.maximum(-adv * s, -adv * s.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))


def sequence_token_loss(logp, old, adv, m, cfg):
    """Sequence-level importance sampling for a token-level ratio control over [B, T]:
    delta_i,t = sg(delta_i) + logp_t - sg(logp_t) (value: the sequence log-ratio;
    gradient: each token through its own log-prob), then the token surrogate."""
    active = m != 0
    zero = torch.zeros_like(old)
    delta = torch.where(active, logp.detach() - old, zero)
    seq = sequence_log_ratio(delta, m)[:, None]
    return token_loss(torch.where(active, logp - logp.detach() + seq, zero), adv, cfg, torch.where(active, logp, zero))


def _policy_loss_padded(logp, old, adv, m, ref, beta, cfg, level, loss_agg_mode, entropy, entropy_coeff=0.0,
                        norm=None, iw=None, kl_estimator="k3", reduce=True):
    """Loss and metrics over [B, T]; logp (and entropy) differentiable, the rest detached.
    ``entropy_coeff``: verl's bonus, ``loss - entropy_coeff * aggregate(entropy)`` (same weights).
    ``norm``: :func:`aggregate`'s global normalisers, by name. ``iw``: per-token importance weights
    on the ratio control's loss (not the KL). ``reduce=False``: the loss is per token,
    ``token_weights * L`` (its sum is the reduced loss), and a third value holds the per-token metrics."""
    norm = norm or {}
    active = m != 0
    zero = torch.zeros_like(old)
    delta = torch.where(active, logp - old, zero)
    adv = torch.where(active, adv, zero)
    if level == "sequence":
        L = (gspo_token_loss if isinstance(cfg, GSPOConfig) else sequence_token_loss)(logp, old, adv, m, cfg)
        metric_delta = torch.where(active, sequence_log_ratio(delta.detach(), m)[:, None], zero)
    else:
        L = token_loss(delta, adv, cfg, torch.where(active, logp, zero))
        metric_delta = delta
    if iw is not None:  # verl: pg_losses * rollout_is_weights, before the KL term
        L = L * torch.where(active, iw, zero)
    kl = None
    if ref is not None:
        # where() first: masked positions may hold inf / NaN (their gradient too)
        kl = torch.where(active, kl_estimate(torch.where(active, logp, zero), torch.where(active, ref, zero),
                                             kl_estimator), zero)
        if beta:  # with beta = 0, ref only feeds the kl_ref metric
            L = L + beta * kl
    if reduce:
        loss = aggregate(L, m, loss_agg_mode, **norm)
        if entropy_coeff:
            loss = loss - entropy_coeff * aggregate(entropy, m, loss_agg_mode, **norm)
    else:
        w = token_weights(m, loss_agg_mode, **norm)
        loss = w * torch.where(active, L, zero)
        if entropy_coeff:
            loss = loss - entropy_coeff * w * entropy
    flat = lambda t: None if t is None else t.reshape(-1)
    metrics = policy_metrics(cfg, flat(metric_delta), flat(active), flat(entropy), flat(kl), adv=flat(adv))
    if reduce:
        return loss, metrics, None
    return loss, metrics, token_metrics(cfg, metric_delta, active, adv, kl)


@torch.no_grad()
def token_metrics(cfg, delta, active, adv, kl) -> dict:
    """``reduce=False``'s per-token metrics (0 on inactive tokens): ``token_kl`` (with a reference),
    ``token_clipped`` (clip, GSPO, CISPO: the tokens ``clipfrac`` counts) or ``token_low_survival``
    (MHPO: ``exp(-zeta) < 0.5``)."""
    zero = torch.zeros_like(delta)
    out = {}
    if kl is not None:
        out["token_kl"] = torch.where(active, kl.detach(), zero)
    if isinstance(cfg, MHPOConfig):
        out["token_low_survival"] = torch.where(active, (torch.exp(-dhp(lfm(delta, cfg), cfg)) < 0.5).to(zero.dtype),
                                                zero)
    elif isinstance(cfg, (ClipConfig, GSPOConfig, CISPOConfig)):
        low, high = _clip_flags(cfg, delta, adv)
        out["token_clipped"] = torch.where(active, (low | high).to(zero.dtype), zero)
    return out


def _policy_loss_flat(logp, old, adv, m, ref, beta, cfg, level, loss_agg_mode, seq_shape, cu_seqlens, entropy,
                      entropy_coeff=0.0, norm=None, iw=None, kl_estimator="k3", reduce=True):
    """Flat [N] per-token tensors -> loss, metrics (and reduce=False's per-token metrics), through the padded
    [B, T] form; per-token results come back flat [N]."""
    if cu_seqlens is None:
        pad = lambda t: None if t is None else t.reshape(seq_shape)
        unpad = lambda t: t.reshape(-1)
    else:
        idx = _pad_index(cu_seqlens)
        pad = lambda t: _to_padded(t, idx)
        keep = idx >= 0
        unpad = lambda t: t.new_zeros(logp.shape[0]).index_put((idx[keep],), t[keep])
    loss, metrics, per_token = _policy_loss_padded(
        pad(logp), pad(old), pad(adv), pad(m), pad(ref), beta, cfg, level, loss_agg_mode, pad(entropy),
        entropy_coeff, norm, pad(iw), kl_estimator, reduce,
    )
    if reduce:
        return loss, metrics
    metrics.update({k: unpad(v) for k, v in per_token.items()})
    return unpad(loss), metrics


def policy_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, ratio_control=None,
    importance_sampling_level=None, cu_seqlens=None, temperature=1.0, loss_agg_mode="token-mean",
    ignore_index=-100, ref_logprobs=None, beta=0.0, return_entropy=False, backend="reference",
    inplace_backward=False, entropy_coeff=0.0, fused_gradient=None, loss_scale_factor=None, global_batch_size=None,
    global_num_tokens=None, dp_size=1, importance_weights=None, kl_estimator="k3", reduce=True,
):
    """Reference of :func:`mhpo_kernels.policy_loss` (same signature and output).

    Materialises ``log_softmax`` and, for packed input, pads to ``[S, T_max]``
    (T_max = the longest sequence). ``backend`` / ``inplace_backward`` / ``fused_gradient`` are ignored.
    ``entropy_coeff``: ``loss - entropy_coeff * aggregate(entropy)`` (the entropy is then computed and
    ``entropy_mean`` reported, as when ``return_entropy``). ``ref_logprobs`` that require grad (a
    reference head being trained) get the KL term's gradient, as on the fused path.
    """
    cfg, level = resolve_ratio_control(ratio_control, importance_sampling_level)
    check_entropy_coeff(entropy_coeff)
    kl_estimator_id(kl_estimator)
    check_reduce(reduce)
    want_entropy = bool(return_entropy) or entropy_coeff != 0
    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta,
    )
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"cu_seqlens needs packed [N, V] logits, got shape {tuple(logits.shape)}")
        check_cu_seqlens(cu_seqlens, x.target.numel(), logits.device)
    if not torch.compiler.is_compiling():
        check_target_ids(x.target, x.logits.shape[-1], ignore_index)
    logp, entropy = token_logprobs_entropy(x.logits, x.target, temperature, ignore_index, x.old.dtype,
                                           want_entropy=want_entropy)
    norm = dict(loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
                global_num_tokens=global_num_tokens, dp_size=dp_size)
    iw = prepare_weights(importance_weights, x.shape, logits.device, x.old.dtype)
    ref = x.ref
    if ref is not None and ref_logprobs.requires_grad:  # a reference head being trained: the KL's gradient reaches it
        ref = ref_logprobs.reshape(-1).to(x.old.dtype)
    loss, metrics = _policy_loss_flat(
        logp, x.old, x.adv, x.mask, ref, beta, cfg, level, loss_agg_mode, x.seq_shape, cu_seqlens,
        entropy, entropy_coeff, norm, iw, kl_estimator, reduce,
    )
    if not reduce:
        loss = loss.reshape(x.shape)
        metrics = {k: v.reshape(x.shape) if k.startswith("token_") else v for k, v in metrics.items()}
    return MHPOOutput(
        loss, logp.detach().reshape(x.shape), entropy.reshape(x.shape) if return_entropy else None, metrics
    )


def policy_loss_from_logprobs(
    logprobs, old_logprobs, advantages, mask=None, *, ratio_control=None, importance_sampling_level=None,
    cu_seqlens=None, loss_agg_mode="token-mean", ref_logprobs=None, beta=0.0, loss_scale_factor=None,
    global_batch_size=None, global_num_tokens=None, dp_size=1, importance_weights=None, kl_estimator="k3", reduce=True,
):
    """Reference of :func:`mhpo_kernels.policy_loss_from_logprobs` (autograd through the formulas)."""
    cfg, level = resolve_ratio_control(ratio_control, importance_sampling_level)
    kl_estimator_id(kl_estimator)
    check_reduce(reduce)
    shape = tuple(logprobs.shape)
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if advantages.dim() == 1 and len(shape) == 2 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)
    flat = lambda t: None if t is None else t.detach().reshape(-1).to(dtype)
    m = flat(torch.ones(shape, device=logprobs.device) if mask is None else mask)
    seq_shape = shape if len(shape) == 2 else (1, shape[0])
    ref = flat(ref_logprobs)
    if ref is not None and ref_logprobs.requires_grad:  # differentiable reference log-probs get the KL's gradient
        ref = ref_logprobs.reshape(-1).to(dtype)
    loss, metrics = _policy_loss_flat(
        logprobs.reshape(-1).to(dtype), flat(old_logprobs), flat(advantages), m, ref, beta,
        cfg, level, loss_agg_mode, seq_shape, cu_seqlens, None,
        norm=dict(loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
                  global_num_tokens=global_num_tokens, dp_size=dp_size),
        iw=flat(importance_weights), kl_estimator=kl_estimator, reduce=reduce,
    )
    if not reduce:
        loss = loss.reshape(shape)
        metrics = {k: v.reshape(shape) if k.startswith("token_") else v for k, v in metrics.items()}
    return MHPOOutput(loss, logprobs.detach(), None, metrics)


def token_logprobs(logits, target_ids, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   backend="reference"):
    """Reference of :func:`mhpo_kernels.token_logprobs`: ``log_softmax(logits / T).gather``
    and ``-sum(p log p)``, differentiable; 0 at ``ignore_index`` positions."""
    logits2d, target = prepare_targets(logits, target_ids, temperature=temperature, ignore_index=ignore_index)
    if not torch.compiler.is_compiling():
        check_target_ids(target, logits2d.shape[-1], ignore_index)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp, entropy = token_logprobs_entropy(logits2d, target, temperature, ignore_index, dtype,
                                           want_entropy=return_entropy)
    shape = logits.shape[:-1]
    return (logp.reshape(shape), entropy.reshape(shape)) if return_entropy else logp.reshape(shape)


# ---------------------------------------------------------------------------
# Trainer metrics over the masked tokens, from per-token log-ratios.

def _mean(x, active, n):
    return torch.where(active, x, torch.zeros_like(x)).sum() / n


def _clip_flags(cfg, delta, adv):
    """The tokens ``clipfrac_low`` / ``clipfrac_high`` count (see :func:`policy_metrics`)."""
    if isinstance(cfg, CISPOConfig):  # verl's pg_clipfrac: ratio != clipped ratio, whatever the sign of A
        r = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        return r < cfg.ratio_low, r > cfg.ratio_high
    limit = GSPO_LOG_RATIO_LIMIT if isinstance(cfg, GSPOConfig) else CLIP_LOG_RATIO_LIMIT
    r = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT if isinstance(cfg, ClipConfig) else None, limit))
    low, high = r < 1 - cfg.eps_low, r > 1 + cfg.eps_high
    if adv is not None:
        low, high = low & (adv < 0), high & (adv > 0)
    return low, high


def _clip_fractions(cfg, delta, adv, active, n):
    low, high = _clip_flags(cfg, delta, adv)
    low, high = low.float(), high.float()
    return {"clipfrac_low": _mean(low, active, n), "clipfrac_high": _mean(high, active, n),
            "clipfrac": _mean(low + high, active, n)}


@torch.no_grad()
def policy_metrics(cfg, delta, active, entropy=None, kl=None, adv=None) -> dict:
    """delta: [N] log-ratios (0 where inactive); active: [N] bool; adv: [N] or None.

    Means are over active tokens (0 when there are none); ratio_max / ratio_min
    are exp of the extreme log-ratios (1.0 when there are no active tokens).
    For sequence-level importance sampling, ``delta`` is each token's sequence
    log-ratio, so every ratio metric is about the sequence ratios.

    Clip modes (TRL's ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``):
    ``clipfrac_low`` counts tokens with ``r < 1 - eps_low`` and ``A < 0``,
    ``clipfrac_high`` those with ``r > 1 + eps_high`` and ``A > 0`` (where the
    clip is active and the token's gradient is cut), ``clipfrac`` either; without
    ``adv`` the sign condition is dropped (and always for CISPO, whose bounds are
    ``ratio_low`` / ``ratio_high``: verl's ``pg_clipfrac``). With ``dual_clip_c`` and ``adv``,
    ``dual_clipfrac`` is verl's ``pg_clipfrac_lower`` (A < 0 tokens whose loss
    is capped at ``-dual_clip_c * A``).
    """
    delta = delta.detach().float()
    n = active.sum().clamp(min=1).float()
    out = {"kl_old": _mean(-delta, active, n)}
    neg_inf = torch.full_like(delta, float("-inf"))
    any_active = active.any()
    dmax = torch.where(active, delta, neg_inf).max() if delta.numel() else delta.new_zeros(())
    dmin = (-torch.where(active, -delta, neg_inf).max()) if delta.numel() else delta.new_zeros(())
    out["ratio_max"] = torch.where(any_active, dmax, torch.zeros_like(dmax)).exp()
    out["ratio_min"] = torch.where(any_active, dmin, torch.zeros_like(dmin)).exp()
    if isinstance(cfg, MHPOConfig):
        psi = lfm(delta, cfg)
        zeta = dhp(psi, cfg)
        survival = torch.exp(-zeta)
        out["psi_mean"] = _mean(psi, active, n)
        out["zeta_mean"] = _mean(zeta, active, n)
        out["survival_mean"] = _mean(survival, active, n)
        out["low_survival_frac"] = _mean((survival < 0.5).float(), active, n)
    elif isinstance(cfg, ClipConfig):
        r = torch.exp(delta.clamp(-CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT))
        out.update(_clip_fractions(cfg, delta, adv, active, n))
        if cfg.dual_clip_c is not None and adv is not None:
            adv = adv.detach().float()
            unclipped = r if cfg.delta is None else r.clamp(max=cfg.delta)
            loss = torch.maximum(-unclipped * adv, -r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
            out["dual_clipfrac"] = _mean(((adv < 0) & (loss > -cfg.dual_clip_c * adv)).float(), active, n)
    elif isinstance(cfg, (GSPOConfig, CISPOConfig)):
        out.update(_clip_fractions(cfg, delta, adv, active, n))
    if entropy is not None:
        out["entropy_mean"] = _mean(entropy.detach().float(), active, n)
    if kl is not None:
        out["kl_ref"] = _mean(kl.detach().float(), active, n)
    return out
