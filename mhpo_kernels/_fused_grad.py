"""The forward that writes the gradient: one read and one write of the logits.

The loss is the root of the autograd graph, so its upstream gradient is one scalar: the
forward writes ``d loss / d logits`` for an upstream gradient of 1 while each row is still on
chip, and the backward hands that buffer back, scaled in place only when the upstream
gradient is not 1 (AMP loss scaling; the backend's ``scale_grad`` reads the scale on the
device and does nothing when it is 1: no host sync). Forward, three launches:

1. the aggregation weights ``w_n`` (:func:`weights`: one ``finish`` launch), and the
   bad-input record, read right there when ``check_ids`` (the call's one host sync): ids
   are checked before any gradient exists. For a token-level ratio control
   ``d loss / d logp_n = w_n d L_n / d logp_n`` and ``w_n`` depends only on the mask, the
   ignored rows, the sequences and the aggregation mode, never on the logits.
2. the backend's ``fwd_grad`` (optional launcher, :mod:`mhpo_kernels.backends`): the pass over
   the logits, the per-token epilogue, then the gradient row
   ``(w coef (1[v == y] - p) + entropy_coeff w p (log p + H)) / T``.
3. the backend's ``finish``, as in the two-kernel path: loss and metrics, the same bits.

The backward is then free (nothing, or one in-place scaling). Where the fused gradient does
not apply, :func:`policy_forward` runs the two-kernel path (``_ops.policy_forward``) by
itself, never a wrong gradient: see :func:`why_not` for the forward's cases. At backward
time, a gradient for the entropy output or the log-probs, or a second backward through the
same graph (``retain_graph``), recomputes the two-kernel backward from the saved log-sum-exp
into the same buffer; with ``inplace_backward=True`` the logits already hold the gradient
then, and that raises RuntimeError.

``entropy_coeff`` (verl's name): ``loss = pg_loss - entropy_coeff * sum_n w_n H_n``, the entropy
aggregated with the loss's own weights (verl's ``agg_loss(entropy, mask, loss_agg_mode)``).
"""
from __future__ import annotations

import torch

from . import backends
from ._constants import KL_ESTIMATORS
from ._finish import MODE_GSPO, raise_bad_input
from ._ops import FwdArgs, _eager, finish_launch
from ._ops import policy_forward as two_kernel_forward
from .config import MODE_CISPO, MODE_MHPO, MHPOConfig
from .sequences import NO_NORM, Sequences

# fused_gradient=None (the default) turns the path on for these device types only: the CPU
# backends are tested in CI; on CUDA it is opt-in (fused_gradient=True) until a GPU run records it.
AUTO_DEVICES = ("cpu",)

# MHPO without LFM and DHP: psi = delta, zeta = 0. At delta = 0 with advantage -1 its
# d L / d logp is exactly 1, so the finish launch's dlogp = w * 1 is the aggregation weight.
_UNIT = MHPOConfig(use_lfm=False, use_dhp=False)
_UNIT_PARAMS = [float(p) for p in _UNIT.kernel_params()]


def weights(kb, a: FwdArgs, check: bool, importance: bool = False):
    """``(w [N], bad)``: the aggregation weights of ``a`` (``loss = sum_n w_n L_n``; 0 on masked
    and ignored rows) and the finishing step's bad-input record (ids when ``check``, layout).
    ``importance``: times ``a.iw`` (where given), ``w_n iw_n``, 0 on inactive rows whatever ``iw`` holds there.

    One ``finish`` launch of backend ``kb`` at log-ratio 0 and advantage -1 of :data:`_UNIT`:
    its ``dlogp`` is ``w_n * 1`` (``w_n * iw_n * 1``), the very weights (same bits) its later finish
    launch uses. Under a tracer (torch.compile) the torch twin :class:`mhpo_kernels.sequences.Sequences`.
    """
    iw = a.iw if importance else None
    N, V = a.logits.shape
    dtype = a.old.dtype
    if not _eager(a.logits):
        m = torch.ones(N, dtype=dtype, device=a.target.device) if a.mask is None else a.mask.to(dtype)
        m = torch.where(a.target == a.ignore_index, torch.zeros_like(m), m)
        w = Sequences(a.num_seqs, a.seq_len, a.cu_seqlens, N, m.device).weights(m, a.agg, a.agg_norm or NO_NORM)
        return (w if iw is None else torch.where(w != 0, w * iw, torch.zeros_like(w))), None
    unit = torch.full((N,), -1.0, dtype=dtype, device=a.target.device)
    _, w, _, bad = kb.finish(unit, None, unit, unit, a.mask, None, a.target, a.cu_seqlens, a.num_seqs, a.seq_len,
                             MODE_MHPO, _UNIT_PARAMS, 0.0, False, a.agg, a.ignore_index, V, check, a.agg_norm, iw=iw)
    return w, bad


def entropy_bonus(loss, entropy, w, entropy_coeff: float):
    """``loss - entropy_coeff * sum(w * entropy)`` (differentiable through ``entropy``); a per-token
    ``loss`` (``reduce=False``) gets ``- entropy_coeff * w * entropy`` per token."""
    if loss.dim():
        return torch.addcmul(loss, w.to(entropy.dtype), entropy, value=-entropy_coeff)
    return torch.add(loss, torch.dot(w.to(entropy.dtype), entropy), alpha=-entropy_coeff)


def why_not(a: FwdArgs, fused_gradient, returns_entropy: bool = False, entropy_coeff: float = 0.0) -> str:
    """Why the forward of ``a`` does not write the gradient ("" when it does). ``returns_entropy``:
    the caller hands the entropy out (it may receive a gradient of its own).

    Vocabulary-parallel logits (``process_group``) never reach here: each rank's gradient needs
    the global log-sum-exp, which exists only after the all-reduce (two-kernel path).
    """
    if fused_gradient is False:
        return "fused_gradient=False"
    if not (torch.is_grad_enabled() and a.logits.requires_grad):
        return "no gradient is needed (grad mode off or logits do not require grad)"
    if not _eager(a.logits):
        return "traced (torch.compile / export): the registered two-kernel op runs"
    if a.old is None or a.seq_level or a.mode == MODE_GSPO:
        return ("sequence-level ratio (GSPO, importance_sampling_level='sequence'): each token's d loss / d logp "
                "depends on its whole sequence's log-probs, known only after the pass")
    if not a.reduce:
        return "reduce=False: the upstream gradient is per token, known only at backward time"
    if a.mode == MODE_CISPO:
        return "CISPO: the fused forward kernels have no CISPO epilogue (it runs in the finishing step only)"
    kl_in_loss = a.ref is not None and a.beta != 0
    if kl_in_loss and a.kl_est != KL_ESTIMATORS["k3"]:
        return "kl_estimator other than 'k3' with beta > 0: the fused forward kernels compute k3 only"
    if a.iw is not None and (kl_in_loss or entropy_coeff):
        return ("importance_weights with a KL term (beta > 0) or entropy_coeff: the fused forward folds the weights "
                "into the aggregation weights, which the KL and entropy terms must not see")
    if getattr(backends.get(a.backend), "fwd_grad", None) is None:
        return f"backend {a.backend!r} has no fwd_grad launcher"
    if fused_gradient is None and a.inplace_backward and returns_entropy:
        return ("inplace_backward=True with return_entropy=True: a gradient for the entropy would need the logits, "
                "which the fused forward overwrites (fused_gradient=True forces it: such a gradient then raises)")
    if fused_gradient is None and a.logits.device.type not in AUTO_DEVICES:
        return (f"fused_gradient=None turns it on for {', '.join(AUTO_DEVICES)} tensors only "
                "(pass fused_gradient=True on a GPU)")
    return ""


def policy_forward(a: FwdArgs, entropy_coeff: float = 0.0, fused_gradient=None, returns_entropy: bool = False):
    """``(loss, logp, entropy, metrics, tok)`` (``tok``: the (kl, flag) token rows when not ``a.reduce``, else
    None or empty) of the policy loss ``a`` (``- entropy_coeff * agg(H)``
    included; ``a.want_entropy`` must be set when ``entropy_coeff != 0``): the fused-gradient
    forward where it applies (:func:`why_not`), else the two-kernel path."""
    if not why_not(a, fused_gradient, returns_entropy, entropy_coeff):
        return _FusedGradPolicy.apply(a.logits, a, float(entropy_coeff)) + (None,)
    loss, logp, entropy, _, _, metrics, tok = two_kernel_forward(a)
    if entropy_coeff:
        w, _ = weights(backends.get(a.backend), a, False)
        loss = entropy_bonus(loss, entropy, w, entropy_coeff)
    return loss, logp, entropy, metrics, tok


def scale_grad_(kb, grad, scale) -> None:
    """``grad *= scale`` unless ``scale == 1``, decided on the device (the backend's ``scale_grad``;
    a backend without one gets an unconditional ``mul_``, exact when the scale is 1)."""
    scale = scale.detach().to(torch.float32 if grad.dtype != torch.float64 else torch.float64).reshape(())
    f = getattr(kb, "scale_grad", None)
    if f is None:
        grad.mul_(scale)
    else:
        f(grad, scale)


class _FusedGradPolicy(torch.autograd.Function):
    """Forward: weights, ``fwd_grad``, ``finish``. Backward: the forward's buffer, or the
    two-kernel backward when the loss is not the only output that receives a gradient."""

    @staticmethod
    def forward(ctx, logits, a, entropy_coeff):
        kb = backends.get(a.backend)
        N, V = logits.shape
        # importance weights (no KL term, no entropy bonus: why_not) fold into the weights: w_n iw_n
        w, bad = weights(kb, a, a.check_ids, importance=True)
        if a.check_ids and not (logits.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise_bad_input(bad, a.target, a.cu_seqlens, V, a.ignore_index)  # the one host sync: before any gradient
        inplace = a.inplace_backward
        grad = logits if inplace else torch.empty_like(logits)
        # beta = 0: the reference log-probs only feed the kl_ref metric (finish), never the gradient
        logp, entropy, lse, _, _ = kb.fwd_grad(
            logits, a.target, a.old, a.adv, a.ref if a.beta else None, w, a.mode, a.params, a.beta,
            a.temperature, a.ignore_index, a.want_entropy, entropy_coeff, grad)
        loss, dlogp, metrics, _, _ = finish_launch(kb, a, logp, entropy if a.want_entropy else None, V, False)
        if entropy_coeff:
            loss = entropy_bonus(loss, entropy, w, entropy_coeff)
        if inplace:
            # the logits hold the gradient from now on: anything else that saved them fails loudly
            torch.autograd.graph.increment_version(logits)
        else:
            ctx.save_for_backward(logits, a.target, lse, entropy, dlogp, w)
        ctx.grad, ctx.inplace, ctx.kb = grad, inplace, kb
        ctx.want_entropy, ctx.entropy_coeff = a.want_entropy, entropy_coeff
        ctx.temperature, ctx.ignore_index = a.temperature, a.ignore_index
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(metrics)
        return loss, logp, entropy, metrics

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent, g_metrics):
        none = (None, None)
        if g_ent is not None and not ctx.want_entropy:
            g_ent = None  # the [0] placeholder
        if g_loss is None and g_logp is None and g_ent is None:
            return (None,) + none
        grad, ctx.grad = ctx.grad, None  # handed out once
        if grad is not None and g_loss is not None and g_logp is None and g_ent is None:
            scale_grad_(ctx.kb, grad, g_loss)
            return (grad,) + none
        if ctx.inplace:
            raise RuntimeError(
                "mhpo_kernels: with inplace_backward=True the forward wrote d loss / d logits into the logits' "
                "storage (the fused gradient), so " + ("a second backward through the same graph"
                                                       if grad is None else "a gradient for the entropy / log-probs")
                + " cannot be computed from them. Pass inplace_backward=False (or fused_gradient=False), or put "
                "the entropy bonus in the op with entropy_coeff=.")
        logits, target, lse, entropy, dlogp, w = ctx.saved_tensors
        # the two-kernel backward (policy_bwd's formula): d / d logits of
        # g_loss * loss + sum(g_logp * logp) + sum(g_ent * entropy)
        scale = g_loss
        if g_logp is not None:
            dlogp = dlogp * g_loss + g_logp if g_loss is not None else g_logp
            scale = None
        elif g_loss is None:
            dlogp = torch.zeros_like(lse)
        dent = g_ent
        if ctx.entropy_coeff and g_loss is not None:
            bonus = w.to(lse.dtype) * (g_loss * -ctx.entropy_coeff)
            dent = bonus if dent is None else dent + bonus
        out = grad if grad is not None else torch.empty_like(logits)
        ctx.kb.bwd(logits, target, lse, entropy if dent is not None else None, dlogp,
                   None if dent is None else dent.to(lse.dtype).contiguous(), ctx.temperature, ctx.ignore_index,
                   out, scale=scale)
        return (out,) + none
