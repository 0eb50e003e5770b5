"""The fused ops, registered with ``torch.library`` so ``torch.compile`` captures them.

``mhpo_kernels::policy_fwd``: the backend's pass over the logits (log-probs,
entropy, log-sum-exp) and its one finishing launch (sequence sums, the ratio
control, aggregation weights, loss, per-token ``d loss / d logp``, metrics, the
bad-input record: :mod:`mhpo_kernels._finish`), then one read of that record
(the call's only host sync; none with ``check_ids=False`` or under CUDA-graph
capture). Returns ``(loss, logp, entropy, lse, dlogp, metrics)``; ``loss``,
``logp`` and ``entropy`` are differentiable w.r.t. the logits.

``mhpo_kernels::policy_bwd`` (or ``policy_bwd_``, which overwrites the logits):
the one backward launch. It takes the loss's upstream gradient as a tensor
(``scale``) and the entropy's per-token gradient: no autograd arithmetic around
it, no zeros for outputs nobody differentiates.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._constants import TOKEN_OUT
from ._finish import METRICS, raise_bad_input
from .config import MODE_NONE


class FwdArgs(NamedTuple):
    """The arguments of ``policy_fwd``, by name (the op itself takes them positionally)."""

    logits: Tensor  # [N, V], unit stride along V
    target: Tensor  # [N] int64
    old: Optional[Tensor]  # [N] float32; None: log-probs only (MODE_NONE, no loss)
    adv: Optional[Tensor]
    mask: Optional[Tensor]
    ref: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    num_seqs: int
    seq_len: int
    mode: int  # the finishing step's ratio control (config.MODE_* or _finish.MODE_GSPO)
    params: List[float]
    beta: float
    seq_level: bool
    agg: int
    temperature: float
    ignore_index: int
    want_entropy: bool
    check_ids: bool
    inplace_backward: bool
    backend: str
    agg_norm: Optional[List[float]] = None  # the finishing step's (global_count, loss_scale_factor, dp_size)
    iw: Optional[Tensor] = None  # [N] importance weights on the ratio control's loss
    kl_est: int = 0  # _constants.KL_ESTIMATORS id
    reduce: bool = True  # False: the loss is per token ([N]) and finish writes the token rows


def finish_launch(kb, a: FwdArgs, logp: Tensor, entropy: Optional[Tensor], num_classes: int, check: bool):
    """The backend's ``finish`` for the call ``a`` -> ``(loss, dlogp, metrics, bad, tok)``: with
    ``a.reduce`` False, ``loss`` is the per-token row ``w_n L_n`` ([N]) and ``tok`` the ``[2, N]``
    (kl, flag) rows of ``_constants.TOKEN_OUT``; else ``tok`` is None."""
    tok = None if a.reduce else logp.new_empty(len(TOKEN_OUT), logp.shape[0])
    loss, dlogp, metrics, bad = kb.finish(
        logp, entropy, a.old, a.adv, a.mask, a.ref, a.target, a.cu_seqlens, a.num_seqs, a.seq_len, a.mode, a.params,
        a.beta, a.seq_level, a.agg, a.ignore_index, num_classes, check, a.agg_norm, iw=a.iw, kl_est=a.kl_est,
        token_out=tok)
    if tok is not None:
        loss, tok = tok[0], tok[1:]
    return loss, dlogp, metrics, bad, tok


def upstream(dlogp: Tensor, g_loss: Optional[Tensor]):
    """``(dlogp, scale)`` for a backward launch: a 0-d upstream gradient of the loss stays the
    kernel's ``scale``; a per-token one (``reduce=False``) multiplies ``dlogp`` here."""
    if g_loss is not None and g_loss.dim():
        return dlogp * g_loss.reshape(-1).to(dlogp.dtype), None
    return dlogp, g_loss


def _forward(a: FwdArgs):
    kb = backends.get(a.backend)
    N, V = a.logits.shape
    old = adv = a.old
    if old is None:  # log-probs only: the pass never reads old / adv / mask, any [N] float32 stands in
        old = adv = a.logits.new_empty(N, dtype=torch.float32)
    else:
        adv = a.adv
    logp, entropy, lse, _, _ = kb.fwd(a.logits, a.target, old, adv, a.mask if a.mask is not None else old, None,
                                      MODE_NONE, a.params, 0.0, a.temperature, a.ignore_index, a.want_entropy)
    if a.old is None:
        a = a._replace(old=logp, adv=logp)  # delta = 0: the finishing step only checks the ids
    loss, dlogp, metrics, bad, tok = finish_launch(kb, a, logp, entropy if a.want_entropy else None, V, a.check_ids)
    if a.check_ids and not (a.target.is_cuda and torch.cuda.is_current_stream_capturing()):
        raise_bad_input(bad, a.target, a.cu_seqlens, V, a.ignore_index)  # the one host sync, after both launches
    return loss, logp, entropy, lse, dlogp, metrics, (logp.new_empty(0, N) if tok is None else tok)


@torch.library.custom_op("mhpo_kernels::policy_fwd", mutates_args=())
def policy_fwd(
    logits: Tensor, target: Tensor, old: Optional[Tensor], adv: Optional[Tensor], mask: Optional[Tensor],
    ref: Optional[Tensor],
    cu_seqlens: Optional[Tensor], num_seqs: int, seq_len: int, mode: int, params: List[float], beta: float,
    seq_level: bool, agg: int, temperature: float, ignore_index: int, want_entropy: bool, check_ids: bool,
    inplace_backward: bool, backend: str, agg_norm: Optional[List[float]] = None, iw: Optional[Tensor] = None,
    kl_est: int = 0, reduce: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss 0-d ([N] when not ``reduce``), logp [N], entropy [N] or [0], lse [N], dlogp [N] = d loss / d logp,
    metrics [13], tok: the (kl, flag) token rows [2, N] when not ``reduce``, else [0, N])."""
    out = _forward(FwdArgs(logits, target, old, adv, mask, ref, cu_seqlens, num_seqs, seq_len, mode, params, beta,
                           seq_level, agg, temperature, ignore_index, want_entropy, check_ids, inplace_backward,
                           backend, agg_norm, iw, kl_est, reduce))
    return out if reduce else (out[0].clone(),) + out[1:-1] + (out[-1].clone(),)  # no output aliases another


@policy_fwd.register_fake
def _(logits, target, old, adv, mask, ref, cu_seqlens, num_seqs, seq_len, mode, params, beta, seq_level, agg,
      temperature, ignore_index, want_entropy, check_ids, inplace_backward, backend, agg_norm=None, iw=None, kl_est=0,
      reduce=True):
    N = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the torch backend keeps float64
    new = lambda *n: logits.new_empty(n, dtype=dtype)
    return (new() if reduce else new(N), new(N), new(N if want_entropy else 0), new(N), new(N), new(len(METRICS)),
            new(0 if reduce else len(TOKEN_OUT) - 1, N))


@torch.library.custom_op("mhpo_kernels::policy_bwd", mutates_args=())
def policy_bwd(
    logits: Tensor, target: Tensor, lse: Tensor, entropy: Optional[Tensor], dlogp: Tensor, scale: Optional[Tensor],
    dent: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    """d / d logits of ``scale * sum(dlogp * logp) + sum(dent * entropy)``: one backward launch."""
    out = torch.empty_like(logits)
    backends.get(backend).bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, scale=scale)
    return out


@policy_bwd.register_fake
def _(logits, target, lse, entropy, dlogp, scale, dent, temperature, ignore_index, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("mhpo_kernels::policy_bwd_", mutates_args=("logits",))
def policy_bwd_(
    logits: Tensor, target: Tensor, lse: Tensor, entropy: Optional[Tensor], dlogp: Tensor, scale: Optional[Tensor],
    dent: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> None:
    """:func:`policy_bwd` written into the logits' own storage."""
    backends.get(backend).bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, logits,
                              scale=scale)


@policy_bwd_.register_fake
def _(logits, target, lse, entropy, dlogp, scale, dent, temperature, ignore_index, backend):
    return None


def _eager(t: Tensor) -> bool:
    """True when ``t`` is a real tensor in an eager call, False while any tracer runs.

    ``torch.compiler.is_compiling()`` alone does not tell: torch 2.11 sets it only
    inside code Dynamo traces, and AOTAutograd traces this op's autograd formula
    afterwards with the flag off. A tracer (AOTAutograd, ``make_fx``, export)
    always hands the formula fake / functional tensor subclasses, on every torch.
    """
    if torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    return not torch._is_functional_tensor(t)


def _setup_context(ctx, inputs, output):
    a = FwdArgs(*inputs)
    loss, logp, entropy, lse, dlogp, metrics, tok = output
    ctx.want_entropy, ctx.backend = a.want_entropy, a.backend
    # in-place is decided where the forward is traced: a compiled graph gets the out-of-place
    # backward (it must not write into a saved graph input)
    ctx.inplace = a.inplace_backward and _eager(a.logits)
    ctx.temperature, ctx.ignore_index = a.temperature, a.ignore_index
    ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates
    ctx.mark_non_differentiable(lse, dlogp, metrics, tok)
    ctx.save_for_backward(a.logits, a.target, lse, entropy, dlogp)


def _bwd_args(ctx, g_loss, g_logp, g_ent):
    logits, target, lse, entropy, dlogp = ctx.saved_tensors
    if g_loss is not None and g_loss.dim():  # reduce=False: one upstream gradient per token
        dlogp, g_loss = upstream(dlogp, g_loss)
        if g_logp is not None:
            dlogp = dlogp + g_logp
    elif g_logp is not None:  # the public entry points hand out detached log-probs; kept for completeness
        # g_logp of logp.sum() is an expanded (stride-0) tensor: the kernels take contiguous rows
        dlogp = dlogp * g_loss + g_logp if g_loss is not None else g_logp.contiguous()
        g_loss = None
    elif g_loss is None:
        dlogp = torch.zeros_like(lse)
    has_dent = ctx.want_entropy and g_ent is not None
    return logits, (target, lse, entropy if has_dent else None, dlogp, g_loss,
                    g_ent.contiguous() if has_dent else None, ctx.temperature, ctx.ignore_index, ctx.backend)


def _backward(ctx, g_loss, g_logp, g_ent, g_lse, g_dlogp, g_metrics, g_tok):
    logits, args = _bwd_args(ctx, g_loss, g_logp, g_ent)
    if ctx.inplace and _eager(logits):
        policy_bwd_(logits, *args)
        grad = logits
    else:  # traced (torch.compile, export): the gradient gets its own buffer
        grad = policy_bwd(logits, *args)
    return (grad,) + (None,) * (len(FwdArgs._fields) - 1)


policy_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerPolicy(torch.autograd.Function):
    """The same forward and backward as the ops above, for eager calls: a plain autograd.Function
    costs a fraction of a custom op's per-call Python overhead (which only torch.compile needs).
    Its inputs are the logits (the one differentiable tensor) and the :class:`FwdArgs` as one
    object, its outputs ``(loss, logp, entropy, metrics, tok)``: autograd handles 2 inputs and 5
    outputs per call, not 23 and 7 (lse and dlogp stay saved for the backward)."""

    @staticmethod
    def forward(ctx, logits, a):
        loss, logp, entropy, lse, dlogp, metrics, tok = _forward(a)
        ctx.want_entropy, ctx.backend = a.want_entropy, a.backend
        ctx.inplace = a.inplace_backward and _eager(logits)
        ctx.temperature, ctx.ignore_index = a.temperature, a.ignore_index
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(metrics, tok)
        ctx.save_for_backward(logits, a.target, lse, entropy, dlogp)
        return loss, logp, entropy, metrics, tok

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_ent, g_metrics, g_tok):
        logits, (target, lse, entropy, dlogp, scale, dent, temperature, ignore_index, backend) = _bwd_args(
            ctx, g_loss, g_logp, g_ent)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        backends.get(backend).bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, grad,
                                  scale=scale)
        return grad, None


def policy_forward(a: FwdArgs):
    """:func:`policy_fwd`'s ``(loss, logp, entropy, lse, dlogp, metrics, tok)``: the registered op under
    torch.compile; in eager mode a plain autograd.Function, which returns None for lse and dlogp."""
    if torch.compiler.is_compiling():
        return policy_fwd(*a)
    loss, logp, entropy, metrics, tok = _EagerPolicy.apply(a.logits, a)
    return loss, logp, entropy, None, None, metrics, tok


class FinishedLoss(torch.autograd.Function):
    """The finishing step as a differentiable function of the log-probs, for callers that already
    have them (``policy_loss_from_logprobs``, the fused lm_head): one ``finish`` launch forward,
    ``grad_logp = g * dlogp`` backward (the analytic ``d loss / d logp``, no autograd through the
    ratio control). Returns ``(loss, metrics, tok)`` (``tok``: the (kl, flag) token rows when not
    ``reduce``, else ``[0, N]``); ``metrics`` and ``tok`` are not differentiable.

    Reference log-probs that require grad (a reference lm_head being trained) get
    ``d loss / d ref = -w * beta * d kl / d logp`` (every estimator is a function of ``ref - logp``):
    a second finish launch with the ratio control off (``MODE_NONE``) returns exactly ``-`` that as its ``dlogp``.
    """

    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, beta,
                seq_level, agg, ignore_index, num_classes, check_ids, backend, agg_norm=None, iw=None, kl_est=0,
                reduce=True):
        ctx.set_materialize_grads(False)
        kb = backends.get(backend)
        a = FwdArgs(None, target, old, adv, mask, ref, cu_seqlens, num_seqs, seq_len, mode, params, beta, seq_level,
                    agg, 1.0, ignore_index, False, check_ids, False, backend, agg_norm, iw, kl_est, reduce)
        loss, dlogp, metrics, bad, tok = finish_launch(kb, a, logp.detach(), entropy, num_classes, check_ids)
        if check_ids and not (target.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise_bad_input(bad, target, cu_seqlens, num_classes, ignore_index)
        dref = None
        if ctx.needs_input_grad[5] and beta:
            _, minus_dref, _, _ = kb.finish(
                logp.detach(), None, old, adv, mask, ref.detach(), target, cu_seqlens, num_seqs, seq_len, MODE_NONE,
                params, beta, seq_level, agg, ignore_index, num_classes, False, agg_norm, kl_est=kl_est)
            dref = minus_dref.neg_()
        tok = logp.new_empty(0, logp.shape[0]) if tok is None else tok
        ctx.mark_non_differentiable(metrics, tok)
        ctx.save_for_backward(dlogp, dref)
        ctx.dtypes = logp.dtype, None if ref is None else ref.dtype
        return loss, metrics, tok

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_tok):
        if g_loss is None:
            return (None,) * 23
        dlogp, dref = ctx.saved_tensors
        g_ref = None if dref is None else (dref * g_loss).to(ctx.dtypes[1])
        return ((dlogp * g_loss).to(ctx.dtypes[0]), None, None, None, None, g_ref) + (None,) * 17
