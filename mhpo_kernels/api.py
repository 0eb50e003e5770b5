"""The public entry points: the MHPO loss and the policy-loss family from logits, the fused
log-probs, and the same losses from log-probs you already have.

Every entry point reads the same way: validate once (:mod:`._inputs`), pick the
backend (:mod:`.backends`), assemble. From logits, one forward + backward is three
launches whatever the ratio control: the backend's pass over the logits, its O(N)
finishing step (sequence sums, the ratio control at the token or sequence
log-ratio, aggregation weights, loss, per-token ``d loss / d logp``, every metric)
and one backward pass (:mod:`._ops`). ``backend="reference"`` runs the plain-PyTorch
ground truth instead (:mod:`.reference`, loaded on first use).
"""
from __future__ import annotations

import functools

import torch

from . import _fused_grad, backends
from ._finish import AGG_IDS, finish_mode, metric_names, metrics_dict, token_metrics
from ._inputs import (
    MHPOOutput, agg_norm, check_cu_seqlens_static, check_entropy_coeff, check_logits, check_loss_args, check_reduce,
    kl_estimator_id, prepare, prepare_rows, prepare_targets, prepare_weights, seq_shape_of,
)
from ._ops import FinishedLoss, FwdArgs, policy_forward
from .config import KERNEL_PARAMS, MODE_NONE, MHPOConfig, resolve_ratio_control

__all__ = ["mhpo_loss", "policy_loss", "policy_loss_from_logprobs", "token_logprobs"]


_DEFAULT_CONFIG = MHPOConfig()  # frozen: one validated instance, not one per call


@functools.lru_cache(maxsize=64)
def _packed_params(cfg) -> tuple:
    return tuple(cfg.kernel_params())


def _kernel_params(cfg) -> list:
    """``list(cfg.kernel_params())``, packed once per (frozen, hashable) config."""
    try:
        return list(_packed_params(cfg))
    except TypeError:  # an unhashable config: pack it each call
        return list(cfg.kernel_params())


def _rows_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_packed(cu_seqlens, logits):
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"cu_seqlens needs packed [N, V] logits, got shape {tuple(logits.shape)}")
        check_cu_seqlens_static(cu_seqlens, logits.device)  # the data checks run in the finishing step


def mhpo_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, config=None,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto", inplace_backward=False,
    process_group=None, vocab_start_index=None, check_ids=True, entropy_coeff=0.0, fused_gradient=None,
    loss_scale_factor=None, global_batch_size=None, global_num_tokens=None, dp_size=1, importance_weights=None,
    kl_estimator="k3", reduce=True,
) -> MHPOOutput:
    """MHPO policy loss from logits, fused: no [N, V] float32 temporary.

    Args:
        logits: [B, T, V] or [N, V]; float32 / bfloat16 / float16 (float64 with
            ``backend="torch"`` or ``"reference"``); CPU or CUDA. Rows may be strided; V must be unit-stride.
        target_ids: [B, T] or [N] integer ids in [0, V), or ``ignore_index``.
        old_logprobs: rollout-policy log-probs, shape of target_ids.
        advantages: shape of target_ids, or [B] for [B, T, V] logits.
        mask: shape of target_ids, bool or float (0 = padding); None = all ones.
        config: :class:`MHPOConfig` (None = paper defaults).
        temperature: logits are divided by it.
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
            "seq-mean-token-sum-norm" | "token-sum" (verl's names and math; [N, V]
            counts as one sequence).
        loss_scale_factor, global_batch_size, global_num_tokens, dp_size: the
            aggregation's normalisers, verl 0.9.1's ``agg_loss`` (docs/mhpo.md,
            "From token losses to one number"): ``global_num_tokens`` (verl's
            ``batch_num_tokens``) replaces the mask sum of ``token-mean``,
            ``global_batch_size`` the non-empty sequence count of the
            ``seq-mean-*`` modes, ``loss_scale_factor`` the ``T`` of
            ``seq-mean-token-sum-norm`` (None: T of ``[B, T]`` input, packed
            the longest sequence), and every mode's loss is multiplied by
            ``dp_size`` (data-parallel ranks average their gradients). With the
            global counts of a batch split into micro-batches over ``dp_size``
            ranks, the micro-batch losses summed (and averaged over ranks) are
            the whole batch's loss. ``dp_size > 1`` needs the mode's global count.
        ref_logprobs, beta: optional KL to a reference policy, ``+ beta * kl`` per token.
        kl_estimator: the KL's estimator at ``d = ref - logp``: "k3" (default,
            ``e^d - d - 1``, unclamped: GRPO's and TRL's), "k1" (``logp - ref``), "k2"
            (``(logp - ref)^2 / 2``) or "low_var_kl" (k3 with ``d`` clamped to
            ±20 and the value to ±10: verl's ``kl_penalty`` "low_var_kl", which is
            also what verl calls "k3"). Also the ``kl_ref`` metric's.
        importance_weights: per-token weights, shape of target_ids (detached;
            never read where the mask is 0 or the id is ignored): each token's
            ratio-control loss is multiplied by its weight, the KL term and the
            entropy bonus are not (verl's ``rollout_is_weights``, TRL's vLLM
            ``importance_sampling_ratio``; build them with
            :mod:`mhpo_kernels.integrations.rollout_correction`). Read in the
            finishing launch's per-token loop.
        reduce: False returns per-token terms: ``loss`` has the shape of
            target_ids, token n holding ``w_n L_n`` (``w_n``: the weight
            ``loss_agg_mode`` and its normalisers give the token, so
            ``loss.sum()`` is the reduced loss; ``loss_agg_mode="token-sum"``
            gives ``mask * L_n``), minus ``entropy_coeff * w_n H_n``;
            differentiable with a per-token upstream gradient. ``metrics``
            then adds per-token ``token_kl`` (with ``ref_logprobs``) and
            ``token_clipped`` (clip, GSPO, CISPO) or ``token_low_survival``
            (MHPO), 0 on inactive tokens. The gradient then takes the
            two-kernel path (``fused_gradient`` does not apply).
        return_entropy: also return the per-token entropy (differentiable).
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (portable: any device,
            float64 too) | "reference" (the plain-PyTorch ground truth);
            ``MHPO_BACKEND`` overrides "auto". Rows of ``mhpo_kernels.backends.REGISTRY``.
        inplace_backward: write the gradient into the logits' storage instead of
            a new buffer (saves one [N, V] allocation). The logits hold the
            gradient after backward: do not read them again, nor backpropagate
            through anything else that saved them. Ignored under torch.compile.
        process_group, vocab_start_index: vocabulary-parallel logits (see
            :mod:`mhpo_kernels.distributed`): this rank's logits hold vocabulary
            ids ``[vocab_start_index, vocab_start_index + V_local)``; target ids
            are global. Default start: the sum of the shard sizes of lower ranks.
        check_ids: True: an id outside ``[0, V)`` that is not ``ignore_index``
            raises ValueError (recorded by the finishing kernel, read with the
            call's one host sync). False: no host sync (CUDA-graph capturable),
            for ids validated upstream.
        entropy_coeff: verl's entropy bonus inside the op: ``loss = pg_loss -
            entropy_coeff * agg(entropy)``, the entropy aggregated with the
            loss's own ``loss_agg_mode`` weights (``entropy_mean`` joins the metrics).
        fused_gradient: the forward writes ``d loss / d logits`` while each
            row is on chip (1 read + 1 write of the logits instead of 2 reads +
            1 write; the backward only hands the buffer back). None (default):
            on for CPU tensors where it applies; True: wherever it applies
            (GPU backends: not yet run on a GPU); False: never. It does not
            apply (the two-kernel path runs, same results) without a gradient,
            under torch.compile, for sequence-level ratios, vocabulary-parallel
            logits or a backend without it, and by default (None) with
            ``inplace_backward=True`` and ``return_entropy=True``. With
            ``inplace_backward=True`` the logits hold the gradient as soon as
            the forward returns, and a gradient for the returned entropy then
            raises RuntimeError.

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs, entropy, metrics)``.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> ids = torch.randint(0, 11, (2, 5))
        >>> old = torch.randn(2, 5).clamp(max=0) - 2.0
        >>> out = mk.mhpo_loss(logits, ids, old, torch.tensor([1.0, -1.0]))
        >>> out.loss.backward()
    """
    config = _DEFAULT_CONFIG if config is None else config
    if not isinstance(config, MHPOConfig):
        raise TypeError(f"config must be an MHPOConfig, got {type(config).__name__}")
    return policy_loss(
        logits, target_ids, old_logprobs, advantages, mask, ratio_control=config,
        importance_sampling_level="token", temperature=temperature, loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
        backend=backend, inplace_backward=inplace_backward, process_group=process_group,
        vocab_start_index=vocab_start_index, check_ids=check_ids, entropy_coeff=entropy_coeff,
        fused_gradient=fused_gradient, loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
        global_num_tokens=global_num_tokens, dp_size=dp_size, importance_weights=importance_weights,
        kl_estimator=kl_estimator, reduce=reduce,
    )


def policy_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, ratio_control=None,
    importance_sampling_level=None, cu_seqlens=None, temperature=1.0, loss_agg_mode="token-mean",
    ignore_index=-100, ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto",
    inplace_backward=False, process_group=None, vocab_start_index=None, check_ids=True, entropy_coeff=0.0,
    fused_gradient=None, loss_scale_factor=None, global_batch_size=None, global_num_tokens=None, dp_size=1,
    importance_weights=None, kl_estimator="k3", reduce=True,
) -> MHPOOutput:
    """Policy loss of any ratio control from logits, fused: no [N, V] float32 temporary.

    Args:
        logits, target_ids, old_logprobs, advantages, mask, temperature,
        loss_agg_mode, ignore_index, ref_logprobs, beta, return_entropy,
        backend, inplace_backward, entropy_coeff, fused_gradient,
        loss_scale_factor, global_batch_size, global_num_tokens, dp_size,
        importance_weights, kl_estimator, reduce: as in
        :func:`mhpo_kernels.mhpo_loss`.
        ratio_control: :class:`MHPOConfig` (None = paper defaults, including
            the ablations ``use_lfm`` / ``use_dhp``), :class:`ClipConfig`
            (GRPO, DAPO clip-higher, dual-clip, TRL two-sided ``delta``),
            :class:`SAPOConfig`, :class:`GSPOConfig` or :class:`CISPOConfig`.
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
            sequence-level ratio. ``seq-mean-token-sum-norm``'s default
            ``loss_scale_factor`` is then the longest sequence, so packed and
            ``[B, T]`` padded to the longest sequence give the same loss.
            Without it, ``[B, T, V]`` logits are B sequences and ``[N, V]``
            one sequence.
        process_group, vocab_start_index: vocabulary-parallel logits (tensor
            parallelism, :mod:`mhpo_kernels.distributed`): this rank's logits
            hold vocabulary ids ``[vocab_start_index, vocab_start_index + V_local)``
            (default: after the shards of lower ranks); target ids are global.
            Only O(N) statistics are all-gathered; every rank gets the same loss,
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
    check_logits(logits)
    name = backends.resolve(backend, logits.device)
    if name == backends.REFERENCE:
        if process_group is not None:
            raise ValueError("backend='reference' has no vocabulary-parallel form; use backend='torch'")
        return backends.reference().policy_loss(
            logits, target_ids, old_logprobs, advantages, mask, ratio_control=cfg,
            importance_sampling_level=level, cu_seqlens=cu_seqlens, temperature=temperature,
            loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta,
            return_entropy=return_entropy, entropy_coeff=entropy_coeff, loss_scale_factor=loss_scale_factor,
            global_batch_size=global_batch_size, global_num_tokens=global_num_tokens, dp_size=dp_size,
            importance_weights=importance_weights, kl_estimator=kl_estimator, reduce=reduce,
        )
    backends.check_dtype(name, logits.dtype)
    check_entropy_coeff(entropy_coeff)
    kl_est = kl_estimator_id(kl_estimator)
    check_reduce(reduce)
    if fused_gradient not in (None, True, False):
        raise ValueError(f"fused_gradient must be None, True or False, got {fused_gradient!r}")
    want_entropy = bool(return_entropy) or entropy_coeff != 0  # the bonus needs the entropy
    x = prepare(
        logits, target_ids, old_logprobs, advantages, mask, temperature=temperature,
        loss_agg_mode=loss_agg_mode, ignore_index=ignore_index, ref_logprobs=ref_logprobs,
        beta=beta, compute_dtype=_rows_dtype(logits.dtype), raw_mask=True,
    )
    _check_packed(cu_seqlens, logits)
    norm = agg_norm(loss_agg_mode, loss_scale_factor, global_batch_size, global_num_tokens, dp_size)
    iw = prepare_weights(importance_weights, x.shape, logits.device, x.old.dtype)
    B, T = x.seq_shape
    a = FwdArgs(x.logits, x.target, x.old, x.adv, x.mask, x.ref, cu_seqlens, B, T, finish_mode(cfg),
                _kernel_params(cfg), float(beta), level == "sequence", AGG_IDS[loss_agg_mode],
                float(temperature), int(ignore_index), want_entropy, bool(check_ids), bool(inplace_backward),
                name, norm, iw, kl_est, reduce)
    if process_group is not None:
        from .distributed import vocab_parallel_policy

        loss, logp, entropy, metrics, tok = vocab_parallel_policy(a, group=process_group,
                                                                  vocab_start_index=vocab_start_index)
        if entropy_coeff:
            loss = _fused_grad.entropy_bonus(loss, entropy, _fused_grad.weights(backends.get(name), a, False)[0],
                                             entropy_coeff)
    else:
        if inplace_backward and x.logits.shape[0] > 1 and x.logits.stride(0) < x.logits.shape[1]:
            raise ValueError("inplace_backward=True needs logits whose rows do not overlap (stride(0) >= V); "
                             f"got stride {x.logits.stride(0)} for V = {x.logits.shape[1]}")
        loss, logp, entropy, metrics, tok = _fused_grad.policy_forward(a, entropy_coeff, fused_gradient,
                                                                       bool(return_entropy))
    metrics = metrics_dict(metrics, metric_names(cfg, want_entropy, x.ref is not None))
    if not reduce:
        loss = loss.reshape(x.shape)
        metrics.update(token_metrics(cfg, tok, x.shape, x.ref is not None))
    if len(x.shape) != 1:  # [B, T]; [N] log-probs already have the token shape
        logp, entropy = logp.reshape(x.shape), entropy.reshape(x.shape) if return_entropy else entropy
    return MHPOOutput(loss, logp.detach(), entropy if return_entropy else None, metrics)


def policy_loss_from_logprobs(
    logprobs, old_logprobs, advantages, mask=None, *, ratio_control=None, importance_sampling_level=None,
    cu_seqlens=None, loss_agg_mode="token-mean", ref_logprobs=None, beta=0.0, backend="auto", check_ids=True,
    loss_scale_factor=None, global_batch_size=None, global_num_tokens=None, dp_size=1, importance_weights=None,
    kl_estimator="k3", reduce=True,
) -> MHPOOutput:
    """The same policy loss from per-token log-probs you already have: O(N), one launch.

    Same math and conventions as :func:`policy_loss`: the backend's finishing
    step alone (no pass over logits); the gradient reaches ``logprobs`` through
    its analytic ``d loss / d logp``.

    Args:
        logprobs: [B, T] or [N] log-probs of the sampled tokens, differentiable,
            any float dtype (math in float32, float64 for float64 input).
        old_logprobs, mask, ref_logprobs: shape of logprobs (masked positions
            may hold anything, inf / NaN included).
        advantages: shape of logprobs, or [B] for [B, T] log-probs.
        ratio_control, importance_sampling_level, cu_seqlens (with [N]
        log-probs), loss_agg_mode, beta, loss_scale_factor, global_batch_size,
        global_num_tokens, dp_size, importance_weights, kl_estimator, reduce:
        as in :func:`policy_loss` (shapes: of logprobs).
        backend: as in :func:`policy_loss`; float64 log-probs run on "torch"
            (or "reference") whatever the choice, to keep their precision.
        check_ids: with ``cu_seqlens``, a bad layout raises ValueError (one
            host sync); False skips that read.

    Returns:
        :class:`MHPOOutput` ``(loss, logprobs.detach(), None, metrics)``.

    Example::

        >>> import torch, mhpo_kernels as mk
        >>> logp = (torch.randn(2, 6) - 2).requires_grad_()
        >>> out = mk.policy_loss_from_logprobs(logp, logp.detach() + 0.1, torch.tensor([1.0, -1.0]),
        ...                                    ratio_control=mk.MHPOConfig(), importance_sampling_level="sequence")
        >>> out.loss.backward()
        >>> logp = torch.full((1, 3), -1.0)  # r = 1, A = 1: the loss is -exp(-zeta(0)) (docs/mhpo.md's sanity table)
        >>> mk.policy_loss_from_logprobs(logp, logp, torch.ones(1)).loss
        tensor(-0.2651)
    """
    cfg, level = resolve_ratio_control(ratio_control, importance_sampling_level)
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"logprobs must have a float dtype, got {logprobs.dtype}")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [N] or [B, T], got shape {tuple(logprobs.shape)}")
    check_loss_args(loss_agg_mode, beta, ref_logprobs is not None)
    kl_est = kl_estimator_id(kl_estimator)
    check_reduce(reduce)
    norm = agg_norm(loss_agg_mode, loss_scale_factor, global_batch_size, global_num_tokens, dp_size)
    shape, device = tuple(logprobs.shape), logprobs.device
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError(f"cu_seqlens needs packed [N] log-probs, got shape {shape}")
        check_cu_seqlens_static(cu_seqlens, device)
    name = backends.resolve(backend, device)
    if name == backends.REFERENCE:
        return backends.reference().policy_loss_from_logprobs(
            logprobs, old_logprobs, advantages, mask, ratio_control=cfg, importance_sampling_level=level,
            cu_seqlens=cu_seqlens, loss_agg_mode=loss_agg_mode, ref_logprobs=ref_logprobs, beta=beta,
            loss_scale_factor=loss_scale_factor, global_batch_size=global_batch_size,
            global_num_tokens=global_num_tokens, dp_size=dp_size, importance_weights=importance_weights,
            kl_estimator=kl_estimator, reduce=reduce)
    if logprobs.dtype == torch.float64 and torch.float64 not in backends.REGISTRY[name].dtypes:
        name = "torch"  # O(N) work: float64 log-probs keep their precision on the torch backend
    dtype = _rows_dtype(logprobs.dtype)
    old, adv, m, ref = prepare_rows(shape, device, old_logprobs, advantages, mask, ref_logprobs, dtype)
    iw = prepare_weights(importance_weights, shape, device, dtype)
    logp = logprobs.reshape(-1)
    N = logp.shape[0]
    B, T = seq_shape_of(shape)
    no_ignored = torch.zeros(N, dtype=torch.int64, device=device)  # the finishing step's ids: none is ignored
    loss, metrics, tok = FinishedLoss.apply(
        logp.to(dtype), None, old, adv, m, ref, no_ignored, cu_seqlens, B, T, finish_mode(cfg),
        list(cfg.kernel_params()), float(beta), level == "sequence", AGG_IDS[loss_agg_mode], -1, 1,
        bool(check_ids) and cu_seqlens is not None, name, norm, iw, kl_est, reduce)
    metrics = metrics_dict(metrics, metric_names(cfg, False, ref is not None))
    if not reduce:
        loss = loss.reshape(shape)
        metrics.update(token_metrics(cfg, tok, shape, ref is not None))
    return MHPOOutput(loss, logprobs.detach(), None, metrics)


def token_logprobs(logits, target_ids, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend="auto",
                   process_group=None, vocab_start_index=None, check_ids=True):
    """Log-probs of the targets (and the entropy), fused: one pass over the logits, no [N, V] temporary.

    ``logp = z[y]/T - logsumexp(z/T)``, ``H = -sum_v p log p`` with
    ``p = softmax(z/T)``, both 0 at ``ignore_index`` positions, both
    differentiable (the backward is one more pass, fused with the entropy term).

    Args:
        logits: [B, T, V] or [N, V]; float32 / bfloat16 / float16 (float64 with
            ``backend="torch"`` or ``"reference"``); rows may be strided, V must be unit-stride.
        target_ids: [B, T] or [N] integer ids in [0, V), or ``ignore_index``.
        temperature: logits are divided by it.
        return_entropy: also return the entropy, from the same pass.
        backend: as in :func:`mhpo_loss` ("reference": ``log_softmax``).
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
        >>> mk.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))  # uniform over 4 tokens: log(1/4)
        tensor([-1.3863, -1.3863])
    """
    check_logits(logits)
    name = backends.resolve(backend, logits.device)
    if name == backends.REFERENCE:
        if process_group is not None:
            raise ValueError("backend='reference' has no vocabulary-parallel form; use backend='torch'")
        return backends.reference().token_logprobs(logits, target_ids, temperature=temperature,
                                                   ignore_index=ignore_index, return_entropy=return_entropy)
    backends.check_dtype(name, logits.dtype)
    logits2d, target = prepare_targets(logits, target_ids, temperature=temperature, ignore_index=ignore_index)
    shape = logits.shape[:-1]
    if process_group is not None:
        from .distributed import vocab_parallel_logprobs

        logp, entropy, _, _ = vocab_parallel_logprobs(
            logits2d, target, group=process_group, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, backend=name, vocab_start_index=vocab_start_index)
    else:
        B, T = seq_shape_of(shape)
        _, logp, entropy, _, _, _, _ = policy_forward(FwdArgs(
            logits2d, target, None, None, None, None, None, B, T, MODE_NONE, [0.0] * KERNEL_PARAMS, 0.0, False, 0,
            float(temperature), int(ignore_index), bool(return_entropy), bool(check_ids), False, name))
    logp = logp.reshape(shape)
    return (logp, entropy.reshape(shape)) if return_entropy else logp
