"""The policy-loss family through the fused kernels: MHPO (and its ablations),
GRPO / DAPO clip, dual-clip, SAPO, GSPO; token- or sequence-level importance
sampling; padded ``[B, T]`` or packed (``cu_seqlens``) input.

One pass over the ``[N, V]`` logits forward and one backward, whatever the mode:

* token-level ratio controls run their per-token epilogue inside the fused
  forward kernel (``loss``, ``coef = dloss/dlogp`` per token);
* sequence-level modes (GSPO, MHPO with ``importance_sampling_level="sequence"``)
  need the sum over a sequence before any token's loss is known: the fused
  pass computes log-probs only (``MODE_NONE``), an O(N) torch step does the
  per-sequence reductions and the surrogate, and autograd hands ``dloss/dlogp``
  to the same fused backward. No second pass over the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, reference
from ._inputs import LOSS_AGG_MODES, MHPOOutput, _flat, aggregation_weights, prepare, safe_div
from ._finish import AGG_IDS, finish_mode, metric_names, metrics_dict
from ._ops import policy_forward
from .config import (
    CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, KERNEL_PARAMS, MODE_NONE, ClipConfig, GSPOConfig, MHPOConfig,
    SAPOConfig, resolve_ratio_control,
)
from .metrics import metrics_from_logprobs, policy_metrics

__all__ = ["policy_loss", "policy_loss_from_logprobs", "token_logprobs", "surrogate"]


class Sequences:
    """Which sequence each of the N flattened tokens belongs to.

    Padded: ``seq_shape = (B, T)`` (an ``[N]`` input is one sequence). Packed:
    ``cu_seqlens`` ``[S+1]``; ``t_max`` is the longest sequence, so
    ``seq-mean-token-sum-norm`` divides by ``S * t_max``, as the ``[B, T]``
    form of the same data padded to its longest sequence does.
    """

    def __init__(self, seq_shape, cu_seqlens, N, device):
        self.cu = cu_seqlens
        if cu_seqlens is None:
            self.B, self.T = seq_shape
            return
        lengths = cu_seqlens.long().diff()
        self.num = lengths.numel()
        self.t_max = lengths.max() if self.num else lengths.new_zeros(())
        self.seg = torch.repeat_interleave(torch.arange(self.num, device=device), lengths, output_size=N)

    def sum(self, x):
        """[N] -> [S] per-sequence sums."""
        if self.cu is None:
            return x.reshape(self.B, self.T).sum(-1)
        return x.new_zeros(self.num).index_add_(0, self.seg, x)

    def expand(self, y):
        """[S] -> [N]: each token gets its sequence's value."""
        if self.cu is None:
            return y[:, None].expand(self.B, self.T).reshape(-1)
        return y[self.seg]

    def weights(self, m, loss_agg_mode):
        """Per-token w with ``loss = sum(w * L)`` (fully masked sequences are not counted)."""
        if self.cu is None:
            return aggregation_weights(m, (self.B, self.T), loss_agg_mode)
        if loss_agg_mode == "token-mean":
            return safe_div(m, m.sum())
        if loss_agg_mode == "seq-mean-token-sum-norm":
            return safe_div(m, (self.t_max * self.num).to(m.dtype))
        count = self.sum(m)
        n_seq = (count != 0).sum().to(m.dtype)
        ones = torch.ones_like(count)
        per_seq = safe_div(ones, count) if loss_agg_mode == "seq-mean-token-mean" else ones
        return safe_div(m * self.expand(per_seq), n_seq)


def _sequences(x, cu_seqlens, logits):
    """Sequences of prepared inputs, validating cu_seqlens before any launch."""
    N = x.target.numel()
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"cu_seqlens needs packed [N, V] logits, got shape {tuple(logits.shape)}")
        reference.check_cu_seqlens(cu_seqlens, N, logits.device)
    return Sequences(x.seq_shape, cu_seqlens, N, logits.device)


def surrogate(delta, adv, cfg):
    """Per-token ``(loss, d loss / d logp)`` of a ratio control at log-ratio ``delta``.

    The fused kernels' epilogue (``triton_kernels/epilogue.py``) in torch, with
    the same conventions; for GSPO ``delta`` is the sequence log-ratio.
    """
    if isinstance(cfg, MHPOConfig):
        u = delta / cfg.c
        t = torch.exp(-2 * u.abs())
        psi = cfg.c * torch.tanh(u) if cfg.use_lfm else delta
        dpsi = 4 * t / (1 + t) ** 2 if cfg.use_lfm else torch.ones_like(delta)  # sech^2(u), no 1 - tanh^2 cancellation
        zeta = 0.0
        if cfg.use_dhp:  # a stop-gradient factor: it never enters the coefficient's derivative
            zeta = (F.softplus(psi) / cfg.lam_pos) ** cfg.k_pos + (F.softplus(-psi) / cfg.lam_neg) ** cfg.k_neg
        w = torch.exp(psi - zeta)
        return -w * adv, -adv * w * dpsi
    if isinstance(cfg, (ClipConfig, GSPOConfig)):
        if isinstance(cfg, GSPOConfig):  # verl clamps log s_i at max=10
            lo, hi, cap, dual_c = float("-inf"), GSPO_LOG_RATIO_LIMIT, None, None
        else:
            lo, hi, cap, dual_c = -CLIP_LOG_RATIO_LIMIT, CLIP_LOG_RATIO_LIMIT, cfg.delta, cfg.dual_clip_c
        r = torch.exp(delta.clamp(lo, hi))
        dr = torch.where((delta >= lo) & (delta <= hi), r, torch.zeros_like(r))  # dr / dlogp
        r1, dr1 = r, dr
        if cap is not None:  # TRL two-sided clipping caps the unclipped ratio
            r1, dr1 = r.clamp(max=cap), torch.where(r > cap, torch.zeros_like(dr), dr)
        r_lo, r_hi = 1 - cfg.eps_low, 1 + cfg.eps_high
        r2 = r.clamp(r_lo, r_hi)
        dr2 = torch.where((r >= r_lo) & (r <= r_hi), dr, torch.zeros_like(dr))
        l1, l2, c1, c2 = -r1 * adv, -r2 * adv, -dr1 * adv, -dr2 * adv
        # max / min split the gradient evenly on an exact tie, as torch.maximum / minimum do
        loss = torch.maximum(l1, l2)
        coef = torch.where(l1 > l2, c1, torch.where(l1 < l2, c2, 0.5 * (c1 + c2)))
        if dual_c is not None:
            cap = -dual_c * adv
            dual = adv < 0
            coef = torch.where(dual & (loss > cap), torch.zeros_like(coef),
                               torch.where(dual & (loss == cap), 0.5 * coef, coef))
            loss = torch.where(dual, torch.minimum(loss, cap), loss)
        return loss, coef
    if isinstance(cfg, SAPOConfig):
        r = torch.exp(delta.clamp(max=CLIP_LOG_RATIO_LIMIT))
        dr = torch.where(delta <= CLIP_LOG_RATIO_LIMIT, r, torch.zeros_like(r))
        tau = torch.full_like(adv, cfg.tau_neg).masked_fill(adv > 0, cfg.tau_pos)
        s, s_neg = torch.sigmoid(tau * (r - 1)), torch.sigmoid(-tau * (r - 1))
        return -(4 / tau) * s * adv, -adv * 4 * s * s_neg * dr
    raise TypeError(f"unsupported ratio control {type(cfg).__name__}")


def token_epilogue(cfg, delta, adv, ref_minus_logp, beta, active):
    """The fused kernels' per-token epilogue in torch: ``(loss, coef, kl)``.

    ``loss`` is the ratio control's surrogate at ``delta`` plus ``beta * k3`` KL,
    ``coef = d loss / d logp``; both exactly 0 where ``active`` is False.
    ``ref_minus_logp`` (0 on inactive rows) or None: no KL; ``kl`` is None then.
    """
    zero = torch.zeros_like(delta)
    value, coef = surrogate(delta, adv, cfg)
    kl = None
    if ref_minus_logp is not None:
        em1 = torch.expm1(ref_minus_logp)
        kl = em1 - ref_minus_logp  # k3, accurate near d = 0; d kl / d logp = 1 - e^d
        if beta:  # with beta = 0, ref only feeds the kl_ref metric (0 * inf would be NaN)
            value, coef = value + beta * kl, coef - beta * em1
    return torch.where(active, value, zero), torch.where(active, coef, zero), kl


def _loss_from_flat(logp, old, adv, mask, ref, beta, cfg, level, seqs, loss_agg_mode, entropy=None):
    """Loss and metrics from flat [N] tensors; only ``logp`` carries a gradient.

    ``loss = sum_n w_n * (L_n + coef_n * (logp_n - sg(logp_n)))``: the value is
    ``sum w L``, the gradient ``w * coef``, the analytic ``dL/dlogp`` (no
    autograd through the surrogate, as in the kernels). For sequence-level
    modes ``L_n`` and ``coef_n`` are evaluated at the sequence log-ratio: the
    token-level form ``delta_i,t = sg(delta_i) + logp_t - sg(logp_t)``.
    """
    active = mask != 0
    zero = torch.zeros_like(old)
    lp = logp.detach()
    # where() before the math: padding may hold inf / NaN old log-probs
    delta = torch.where(active, lp - old, zero)
    if level == "sequence":
        seq_delta = safe_div(seqs.sum(mask * delta), seqs.sum(mask))
        delta = torch.where(active, seqs.expand(seq_delta), zero)
    adv = torch.where(active, adv, zero)
    d = None if ref is None else torch.where(active, ref - lp, zero)
    value, coef, kl = token_epilogue(cfg, delta, adv, d, beta, active)
    w = seqs.weights(mask, loss_agg_mode)
    tangent = torch.where(active, logp - lp, zero)  # 0 in value; d/dlogp = 1 on active tokens
    loss = (w * value).sum() + (w * coef * tangent).sum()
    return loss, policy_metrics(cfg, delta, active, entropy, kl, adv=adv)


def policy_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, ratio_control=None,
    importance_sampling_level=None, cu_seqlens=None, temperature=1.0, loss_agg_mode="token-mean",
    ignore_index=-100, ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto",
    inplace_backward=False, process_group=None, vocab_start_index=None, check_ids=True,
) -> MHPOOutput:
    """Policy loss of any ratio control from logits, fused: no [N, V] float32 temporary.

    Args:
        logits, target_ids, old_logprobs, advantages, mask, temperature,
        loss_agg_mode, ignore_index, ref_logprobs, beta, return_entropy,
        backend, inplace_backward: as in :func:`mhpo_kernels.mhpo_loss`.
        ratio_control: :class:`MHPOConfig` (None = paper defaults, including
            the ablations ``use_lfm`` / ``use_dhp``), :class:`ClipConfig`
            (GRPO, DAPO clip-higher, dual-clip, TRL two-sided ``delta``),
            :class:`SAPOConfig` or :class:`GSPOConfig`.
        importance_sampling_level: "token" or "sequence" (TRL's name); None =
            "sequence" for GSPOConfig, else "token". "sequence" replaces each
            token's log-ratio by its sequence's masked mean
            ``delta_i = sum_t m delta / sum_t m`` (0 for a fully masked
            sequence), in the token-level form
            ``delta_i,t = sg(delta_i) + logp_t - sg(logp_t)`` of verl's
            ``compute_policy_loss_gspo``: every token's loss is the surrogate
            at the sequence ratio, each token's gradient goes through its own
            log-prob. For a 0/1 mask this equals the gradient of the
            sequence-ratio objective (GSPO paper, TRL). With MHPOConfig,
            psi / zeta act on ``delta_i`` (sequence-level MHPO).
        cu_seqlens: packed input, int32 / int64 offsets ``[S+1]`` into the N
            rows of ``[N, V]`` logits (flash-attn varlen, verl remove-padding):
            starts at 0, non-decreasing, ends at N, on the logits' device.
            Defines the sequences of the ``seq-*`` aggregation modes and of the
            sequence-level ratio. ``seq-mean-token-sum-norm`` divides by
            ``S * T_max`` with T_max the longest sequence, so packed and
            ``[B, T]`` padded to the longest sequence give the same loss.
            Without it, ``[B, T, V]`` logits are B sequences and ``[N, V]``
            one sequence.
        process_group, vocab_start_index: vocabulary-parallel logits (tensor
            parallelism, :mod:`mhpo_kernels.distributed`): this rank's logits
            hold vocabulary ids ``[vocab_start_index, vocab_start_index + V_local)``
            (default: after the shards of lower ranks); target ids are global.
            Only O(N) statistics are all-reduced; every rank gets the same loss,
            log-probs, entropy and metrics, and the gradient of its own shard.
            ``inplace_backward`` is not used in this mode. With an NCCL
            group, the layout check travels on the current CUDA device.
        check_ids: True (default): the finishing kernel records the first
            target id outside ``[0, V)`` that is not ``ignore_index`` (and a bad
            ``cu_seqlens`` layout), and one host sync after the launches raises
            ValueError about it. False: no host sync at all (one forward +
            backward can be captured in a CUDA graph); for callers that
            validate ids upstream (an out-of-range id then just gets log-prob 0).

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs, entropy, metrics)``. metrics:
        ``kl_old``, ``ratio_max``, ``ratio_min``; MHPO: ``psi_mean``,
        ``zeta_mean``, ``survival_mean``, ``low_survival_frac``; clip and GSPO:
        ``clipfrac_low``, ``clipfrac_high``, ``clipfrac`` (+ ``dual_clipfrac``
        with dual-clip); ``entropy_mean`` / ``kl_ref`` when computed. For
        sequence-level modes the ratio metrics are over the sequence ratios.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logits = torch.randn(7, 11, requires_grad=True)      # two packed sequences: 3 + 4 tokens
        >>> ids, old = torch.randint(0, 11, (7,)), torch.full((7,), -2.5)
        >>> adv = torch.tensor([1.0] * 3 + [-1.0] * 4)
        >>> out = mk.policy_loss(logits, ids, old, adv, ratio_control=mk.GSPOConfig(),
        ...                      cu_seqlens=torch.tensor([0, 3, 7]), loss_agg_mode="seq-mean-token-mean")
        >>> out.loss.backward()
    """
    cfg, level = resolve_ratio_control(ratio_control, importance_sampling_level)
    name = backends.resolve(backend, logits.device) if isinstance(logits, torch.Tensor) else "torch"
    if process_group is not None:
        return _vocab_parallel_policy_loss(
            logits, target_ids, old_logprobs, advantages, mask, cfg, level, cu_seqlens, temperature, loss_agg_mode,
            ignore_index, ref_logprobs, beta, return_entropy, name, process_group, vocab_start_index, check_ids)
    if name == "torch":
        return reference.policy_loss(
            logits, target_ids, old_logprobs, advantages, mask, ratio_control=cfg,
            importance_sampling_level=level, cu_seqlens=cu_seqlens, temperature=temperature,
            loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta,
            return_entropy=return_entropy,
        )
    if logits.dtype == torch.float64:
        raise TypeError(f"backend {name!r} takes float32 / bfloat16 / float16 logits; use backend='torch' for float64")
    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
        beta=beta, compute_dtype=torch.float32, raw_mask=True,
    )
    if cu_seqlens is not None:
        _check_cu_seqlens_static(cu_seqlens, logits)  # the data checks run in the finishing kernel
    if inplace_backward and x.logits.shape[0] > 1 and x.logits.stride(0) < x.logits.shape[1]:
        raise ValueError("inplace_backward=True needs logits whose rows do not overlap (stride(0) >= V); "
                         f"got stride {x.logits.stride(0)} for V = {x.logits.shape[1]}")
    B, T = x.seq_shape
    loss, logp, entropy, _, _, metrics = policy_forward(
        x.logits, x.target, x.old, x.adv, x.mask, x.ref, cu_seqlens, B, T, finish_mode(cfg),
        list(cfg.kernel_params()), float(beta), level == "sequence", AGG_IDS[loss_agg_mode], float(temperature),
        int(ignore_index), bool(return_entropy), bool(check_ids), bool(inplace_backward), name,
    )
    metrics = metrics_dict(metrics, metric_names(cfg, return_entropy, x.ref is not None))
    return MHPOOutput(loss, logp.detach().reshape(x.shape), entropy.reshape(x.shape) if return_entropy else None,
                      metrics)


def _check_cu_seqlens_static(cu_seqlens, logits):
    """The checks of cu_seqlens that read no data (the finishing kernel checks the offsets themselves)."""
    if logits.dim() != 2:
        raise ValueError(f"cu_seqlens needs packed [N, V] logits, got shape {tuple(logits.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D [S+1] tensor of offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != logits.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits are on {logits.device}")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")


def _vocab_parallel_policy_loss(logits, target_ids, old_logprobs, advantages, mask, cfg, level, cu_seqlens,
                                temperature, loss_agg_mode, ignore_index, ref_logprobs, beta, return_entropy, name,
                                group, vocab_start_index, check_ids):
    """policy_loss on a vocabulary shard: global log-probs, then the O(N) loss on every rank."""
    if name != "torch":  # the fused backends: the finishing launch on the global log-probs
        from .distributed import vocab_parallel_policy

        if logits.dtype == torch.float64:
            raise TypeError(f"backend {name!r} takes float32 / bfloat16 / float16 logits; use backend='torch' for "
                            "float64")
        x = prepare(
            logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
            loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
            beta=beta, compute_dtype=torch.float32, raw_mask=True,
        )
        if cu_seqlens is not None:
            _check_cu_seqlens_static(cu_seqlens, logits)
        B, T = x.seq_shape
        finish_args = (B, T, finish_mode(cfg), list(cfg.kernel_params()), float(beta), level == "sequence",
                       AGG_IDS[loss_agg_mode], float(temperature), int(ignore_index), bool(return_entropy))
        loss, logp, ent, metrics = vocab_parallel_policy(
            x.logits, x.target, x.old, x.adv, x.mask, x.ref, cu_seqlens, finish_args, group=group,
            check_ids=check_ids, backend=name, vocab_start_index=vocab_start_index)
        metrics = metrics_dict(metrics, metric_names(cfg, return_entropy, x.ref is not None))
        return MHPOOutput(loss, logp.reshape(x.shape), ent.reshape(x.shape) if return_entropy else None, metrics)

    from .distributed import vocab_parallel_logprobs

    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
        beta=beta, compute_dtype=torch.float32,
    )
    seqs = _sequences(x, cu_seqlens, logits)
    logp, ent, _, _ = vocab_parallel_logprobs(
        x.logits, x.target, group=group, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, backend=name, vocab_start_index=vocab_start_index)
    loss, metrics = _loss_from_flat(logp, x.old, x.adv, x.mask, x.ref, beta, cfg, level, seqs, loss_agg_mode, ent)
    return MHPOOutput(loss, logp.detach().reshape(x.shape), ent.reshape(x.shape) if return_entropy else None,
                      metrics)


def policy_loss_from_logprobs(
    logprobs, old_logprobs, advantages, mask=None, *, ratio_control=None, importance_sampling_level=None,
    cu_seqlens=None, loss_agg_mode="token-mean", ref_logprobs=None, beta=0.0,
) -> MHPOOutput:
    """The same policy loss from per-token log-probs you already have: pure torch, O(N).

    Same math and conventions as :func:`policy_loss` (which uses it for the
    sequence-level modes after a fused log-prob pass); the gradient reaches
    ``logprobs`` through the analytic ``dloss/dlogp`` of the fused epilogue.

    Args:
        logprobs: [B, T] or [N] log-probs of the sampled tokens, differentiable,
            any float dtype (math in float32, float64 for float64 input).
        old_logprobs, mask, ref_logprobs: shape of logprobs (masked positions
            may hold anything, inf / NaN included).
        advantages: shape of logprobs, or [B] for [B, T] log-probs.
        ratio_control, importance_sampling_level, cu_seqlens (with [N]
        log-probs), loss_agg_mode, beta: as in :func:`policy_loss`.

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs.detach(), None, metrics)``.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logp = (torch.randn(2, 6) - 2).requires_grad_()
        >>> out = mk.policy_loss_from_logprobs(logp, logp.detach() + 0.1, torch.tensor([1.0, -1.0]),
        ...                                    ratio_control=mk.MHPOConfig(), importance_sampling_level="sequence")
        >>> out.loss.backward()
    """
    cfg, level = resolve_ratio_control(ratio_control, importance_sampling_level)
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"logprobs must have a float dtype, got {logprobs.dtype}")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [N] or [B, T], got shape {tuple(logprobs.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (0 <= beta < float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    shape, device = tuple(logprobs.shape), logprobs.device
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    old = _flat("old_logprobs", old_logprobs, shape, device, dtype)
    if isinstance(advantages, torch.Tensor) and len(shape) == 2 and tuple(advantages.shape) == shape[:1]:
        advantages = advantages[:, None].expand(shape)  # one advantage per sequence
    adv = _flat("advantages", advantages, shape, device, dtype)
    if mask is None:
        m = torch.ones(old.shape, device=device, dtype=dtype)
    else:
        m = _flat("mask", mask, shape, device, dtype, allow=("float", "bool", "int"))
    ref = None if ref_logprobs is None else _flat("ref_logprobs", ref_logprobs, shape, device, dtype)
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError(f"cu_seqlens needs packed [N] log-probs, got shape {shape}")
        reference.check_cu_seqlens(cu_seqlens, shape[0], device)
    seqs = Sequences(shape if len(shape) == 2 else (1, shape[0]), cu_seqlens, old.numel(), device)
    loss, metrics = _loss_from_flat(logprobs.reshape(-1).to(dtype), old, adv, m, ref, beta, cfg, level, seqs,
                                    loss_agg_mode)
    return MHPOOutput(loss, logprobs.detach(), None, metrics)


def token_logprobs(logits, target_ids, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend="auto",
                   process_group=None, vocab_start_index=None, check_ids=True):
    """Log-probs of the targets (and the entropy), fused: one pass over the logits, no [N, V] temporary.

    ``logp = z[y]/T - logsumexp(z/T)``, ``H = -sum_v p log p`` with
    ``p = softmax(z/T)``, both 0 at ``ignore_index`` positions, both
    differentiable (the backward is one more pass, fused with the entropy term).

    Args:
        logits: [B, T, V] or [N, V]; float32 / bfloat16 / float16 (float64 with
            ``backend="torch"``); rows may be strided, V must be unit-stride.
        target_ids: [B, T] or [N] integer ids in [0, V), or ``ignore_index``.
        temperature: logits are divided by it.
        return_entropy: also return the entropy, from the same pass.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (``log_softmax``).
        process_group, vocab_start_index: vocabulary-parallel logits, as in
            :func:`policy_loss` (O(N) communication).
        check_ids: as in :func:`policy_loss` (False: no host sync).

    Returns:
        logprobs, shape of target_ids, float32 (float64 for float64 logits);
        ``(logprobs, entropy)`` when ``return_entropy``.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> logp, ent = mk.token_logprobs(logits, torch.randint(0, 11, (2, 5)), return_entropy=True)
        >>> (logp.sum() + 0.01 * ent.sum()).backward()
    """
    name = backends.resolve(backend, logits.device) if isinstance(logits, torch.Tensor) else "torch"
    if process_group is not None:
        from .distributed import vocab_parallel_logprobs

        x = reference.prepare_targets(logits, target_ids, temperature, ignore_index)
        logp, entropy, _, _ = vocab_parallel_logprobs(
            x.logits, x.target, group=process_group, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, backend=name, vocab_start_index=vocab_start_index)
        return (logp.reshape(x.shape), entropy.reshape(x.shape)) if return_entropy else logp.reshape(x.shape)
    if name == "torch":
        return reference.token_logprobs(logits, target_ids, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    if logits.dtype == torch.float64:
        raise TypeError(f"backend {name!r} takes float32 / bfloat16 / float16 logits; use backend='torch' for float64")
    # old / adv are placeholders: with MODE_NONE they only feed metrics nobody reads
    unused = torch.empty(logits.shape[:-1], device=logits.device) if logits.dim() in (2, 3) else None
    x = prepare(logits, target_ids, unused, unused, None, temperature=temperature, loss_agg_mode="token-mean",
                ignore_index=ignore_index, ref_logprobs=None, beta=0.0, compute_dtype=torch.float32, raw_mask=True)
    B, T = x.seq_shape
    _, logp, entropy, _, _, _ = policy_forward(
        x.logits, x.target, x.old, x.adv, None, None, None, B, T, MODE_NONE, [0.0] * KERNEL_PARAMS, 0.0, False, 0,
        float(temperature), int(ignore_index), bool(return_entropy), bool(check_ids), False, name,
    )
    logp = logp.reshape(x.shape)
    return (logp, entropy.reshape(x.shape)) if return_entropy else logp
