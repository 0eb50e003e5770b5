"""The fused op, registered with ``torch.library`` so ``torch.compile`` captures it.

``mhpo_kernels::fused_fwd`` returns per-token ``(logp, entropy, lse, loss, coef)``;
``logp``, ``entropy`` and ``loss`` are differentiable w.r.t. the logits, through
``mhpo_kernels::fused_bwd`` (or ``fused_bwd_`` which overwrites the logits).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._inputs import check_target_ids


@torch.library.custom_op("mhpo_kernels::fused_fwd", mutates_args=())
def fused_fwd(
    logits: Tensor, target: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor],
    mode: int, params: List[float], beta: float, temperature: float, ignore_index: int,
    want_entropy: bool, inplace_backward: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not (target.is_cuda and torch.cuda.is_current_stream_capturing()):  # a host sync cannot be captured
        check_target_ids(target, logits.shape[1], ignore_index)  # before any launch, also under compile
    return backends.get(backend).fwd(
        logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy
    )


@fused_fwd.register_fake
def _(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index,
      want_entropy, inplace_backward, backend):
    N = logits.shape[0]
    new = lambda n: logits.new_empty(n, dtype=torch.float32)  # noqa: E731
    return new(N), new(N if want_entropy else 0), new(N), new(N), new(N)


@torch.library.custom_op("mhpo_kernels::fused_bwd", mutates_args=())
def fused_bwd(
    logits: Tensor, target: Tensor, lse: Tensor, entropy: Optional[Tensor], dlogp: Tensor,
    dent: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    out = torch.empty_like(logits)
    backends.get(backend).bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out)
    return out


@fused_bwd.register_fake
def _(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("mhpo_kernels::fused_bwd_", mutates_args=("logits",))
def fused_bwd_(
    logits: Tensor, target: Tensor, lse: Tensor, entropy: Optional[Tensor], dlogp: Tensor,
    dent: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> None:
    backends.get(backend).bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, logits)


@fused_bwd_.register_fake
def _(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, backend):
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
    logits, target = inputs[0], inputs[1]
    _, entropy, lse, _, coef = output
    ctx.want_entropy, ctx.backend = inputs[11], inputs[13]
    # In-place is decided here, where the forward is traced: a compiled graph gets the
    # out-of-place backward (it must not write into a saved graph input).
    ctx.inplace = inputs[12] and _eager(logits)
    ctx.temperature, ctx.ignore_index = inputs[9], inputs[10]
    ctx.save_for_backward(logits, target, lse, entropy, coef)


def _backward(ctx, g_logp, g_ent, g_lse, g_loss, g_coef):
    logits, target, lse, entropy, coef = ctx.saved_tensors
    dlogp = torch.zeros_like(lse)
    if g_loss is not None:
        dlogp = dlogp + g_loss * coef
    if g_logp is not None:
        dlogp = dlogp + g_logp
    has_dent = ctx.want_entropy and g_ent is not None
    args = (target, lse, entropy if has_dent else None, dlogp.contiguous(),
            g_ent.contiguous() if has_dent else None, ctx.temperature, ctx.ignore_index, ctx.backend)
    if ctx.inplace and _eager(logits):
        fused_bwd_(logits, *args)
        grad = logits
    else:  # traced (torch.compile, export): the gradient gets its own buffer
        grad = fused_bwd(logits, *args)
    return (grad,) + (None,) * 13


fused_fwd.register_autograd(_backward, setup_context=_setup_context)
