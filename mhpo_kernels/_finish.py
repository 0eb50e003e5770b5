"""The finishing step's layouts and host side (the ops themselves: :mod:`mhpo_kernels._ops`).

``mhpo_kernels::policy_fwd`` runs the backend's ``fwd`` (log-probs, entropy,
log-sum-exp; ``MODE_NONE``) and its ``finish`` (the O(N) rest: sequence sums,
the ratio control at the token or sequence log-ratio, aggregation weights,
loss, per-token ``d loss / d logp``, every metric, the bad-input record), then
reads the bad-input record once (the only host sync; none with
``check_ids=False`` or under CUDA-graph capture). Its backward is one
``mhpo_kernels::policy_bwd`` launch that takes the loss's upstream gradient as
a tensor (``scale``) and the entropy's per-token gradient, with no autograd
arithmetic around it and no zeros for outputs nobody differentiates.

The mode ids, aggregation ids, metric slots and bad-input kinds it shares with
``csrc/mhpo_finish.h`` and ``triton_kernels/finish.py`` are defined in
:mod:`mhpo_kernels._constants`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._constants import AGG_IDS, BAD_CU_SEQLENS, BAD_NONE, BAD_TARGET, METRICS, MODE_GSPO, TOKEN_OUT  # noqa: F401
from .config import CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig


def finish_mode(cfg) -> int:
    return MODE_GSPO if isinstance(cfg, GSPOConfig) else cfg.kernel_mode


def metric_names(cfg, has_entropy: bool, has_ref: bool) -> tuple:
    """The metrics a call reports (the keys of :func:`metrics.policy_metrics` for that call)."""
    names = ["kl_old", "ratio_max", "ratio_min"]
    if isinstance(cfg, MHPOConfig):
        names += ["psi_mean", "zeta_mean", "survival_mean", "low_survival_frac"]
    elif isinstance(cfg, (ClipConfig, GSPOConfig, CISPOConfig)):
        names += ["clipfrac_low", "clipfrac_high", "clipfrac"]
        if isinstance(cfg, ClipConfig) and cfg.dual_clip_c is not None:
            names.append("dual_clipfrac")
    if has_entropy:
        names.append("entropy_mean")
    if has_ref:
        names.append("kl_ref")
    return tuple(names)


def metrics_dict(metrics: Tensor, names) -> dict:
    """0-d views into the one metrics tensor (no kernel per metric)."""
    return {k: metrics[METRICS.index(k)] for k in names}


def token_metrics(cfg, tok, shape, has_ref: bool) -> dict:
    """``reduce=False``'s per-token metrics from the finishing step's (kl, flag) rows, shape ``shape``."""
    kl, flag = tok[TOKEN_OUT.index("kl") - 1], tok[TOKEN_OUT.index("flag") - 1]
    out = {"token_kl": kl.reshape(shape)} if has_ref else {}
    if isinstance(cfg, MHPOConfig):
        out["token_low_survival"] = flag.reshape(shape)
    elif isinstance(cfg, (ClipConfig, GSPOConfig, CISPOConfig)):
        out["token_clipped"] = flag.reshape(shape)
    return out


def raise_bad_input(bad: Tensor, target: Tensor, cu_seqlens: Optional[Tensor], num_classes: int,
                    ignore_index: int) -> None:
    """Read the finish kernel's bad-input record (one host sync) and raise ValueError on a bad id or layout."""
    kind = int(bad[0])
    if kind == BAD_NONE:
        return
    if kind == BAD_TARGET:
        pos = int(bad[1])
        raise ValueError(
            f"target_ids[{pos}] (flattened) = {int(target[pos])} is outside [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )
    from ._inputs import check_cu_seqlens

    check_cu_seqlens(cu_seqlens, target.numel(), target.device)  # raises with the offending offsets
    raise ValueError("cu_seqlens must start at 0, end at N and never decrease")
