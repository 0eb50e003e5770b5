"""MHPO in verl's policy-loss registry (checked against verl 0.9.1).

Importing this module imports verl and registers, in ``verl.trainer.ppo.core_algos``'s
registry, policy losses with verl's signature
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (loss, metrics)``, computed by :func:`mhpo_kernels.policy_loss_from_logprobs`:

============  ==========================================================================
name          loss
============  ==========================================================================
``mhpo``      MHPO, token-level ratio (:class:`~mhpo_kernels.MHPOConfig`)
``mhpo_seq``  MHPO of the sequence log-ratio (``importance_sampling_level="sequence"``)
``mk_vanilla`` / ``mk_gspo`` / ``mk_sapo`` / ``mk_cispo``  verl's ``vanilla`` / ``gspo`` / ``sapo`` /
              ``cispo`` (same config keys, same loss, gradient and metrics), computed by this
              package: an A/B baseline
============  ==========================================================================

Switch a verl run to MHPO (every Ray worker imports the module through verl's own hook)::

    export VERL_USE_EXTERNAL_MODULES=mhpo_kernels.integrations.verl
    python -m verl.trainer.main_ppo ... actor_rollout_ref.actor.policy_loss.loss_mode=mhpo

MHPO's parameters come from the actor's ``policy_loss`` sub-config, paper defaults where absent.
verl's ``PolicyLossConfig`` rejects unknown keys, so name this module's subclass to set them::

    actor_rollout_ref.actor.policy_loss._target_=mhpo_kernels.integrations.verl.MHPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.mhpo_c=1.5   # mhpo_k_pos=1.5 mhpo_lam_pos=1.0 mhpo_k_neg=2.0
                                                      # mhpo_lam_neg=0.8 mhpo_use_lfm=true mhpo_use_dhp=true

Conventions (all verl's): ``loss_agg_mode`` is the actor's, with verl's ``token-sum`` and its
global normalisers ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``) applied exactly as ``agg_loss`` applies them, so
micro-batch losses add up to verl's mini-batch loss. ``rollout_is_weights`` (verl's rollout
correction) go in as ``importance_weights``: each token's policy loss times its weight, as verl's
``pg_losses * rollout_is_weights`` (any sign). The metrics are verl's ``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (the clip fractions are 0 for MHPO and SAPO, as verl
reports them for SAPO; the lower one 0 for CISPO, as verl's) plus, for MHPO,
``actor/mhpo_psi_mean``, ``actor/mhpo_zeta_mean``, ``actor/mhpo_survival_mean``,
``actor/mhpo_low_survival_frac``.

verl adds its KL loss (``use_kl_loss``, ``kl_loss_type``) outside the policy loss; for a KL term
computed by this package, :data:`KL_ESTIMATORS` maps verl's ``kl_loss_type`` to ``kl_estimator``.

Fused log-probs and entropy in verl's actor (verl's ``logprobs_from_logits``, ``entropy_from_logits``
and ``entropy_from_logits_with_chunking`` rebound to
:mod:`~mhpo_kernels.integrations.fused_logits`' in every worker, before its engines are built; see there
for what they cover)::

    export MHPO_VERL_FUSED_LOGPROBS=1   # read when this module is imported; 0 / unset: verl's own

:data:`FUSED_LOGPROBS_PATCH` holds the patch's undo handle (None when off).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from .._inputs import LOSS_AGG_MODES, SEQ_MODES
from ..api import policy_loss_from_logprobs
from ..config import CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig
from .fused_logits import Patch, patch_verl

__all__ = [
    "MHPOPolicyLossConfig", "MHPO_KEYS", "KL_ESTIMATORS", "mhpo_config_from_verl", "clip_config_from_verl",
    "gspo_config_from_verl", "sapo_config_from_verl", "cispo_config_from_verl", "make_policy_loss", "register",
    "FUSED_LOGPROBS_ENV", "FUSED_LOGPROBS_PATCH", "patch_from_env",
]

# policy_loss sub-config key -> MHPOConfig field
MHPO_KEYS = {"mhpo_c": "c", "mhpo_k_pos": "k_pos", "mhpo_lam_pos": "lam_pos", "mhpo_k_neg": "k_neg",
             "mhpo_lam_neg": "lam_neg", "mhpo_use_lfm": "use_lfm", "mhpo_use_dhp": "use_dhp"}
_DEFAULT = MHPOConfig()
# verl's kl_penalty / kl_loss_type name -> our kl_estimator (same value and gradient; verl's "k3" is
# its clamped low_var_kl; "abs", "full" and the straight-through "k1+" / "k3+" have no equivalent)
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k3": "low_var_kl", "low_var_kl": "low_var_kl"}


@dataclass
class MHPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus MHPO's parameters (``mhpo_*``, defaults from the paper)."""

    mhpo_c: float = _DEFAULT.c
    mhpo_k_pos: float = _DEFAULT.k_pos
    mhpo_lam_pos: float = _DEFAULT.lam_pos
    mhpo_k_neg: float = _DEFAULT.k_neg
    mhpo_lam_neg: float = _DEFAULT.lam_neg
    mhpo_use_lfm: bool = _DEFAULT.use_lfm
    mhpo_use_dhp: bool = _DEFAULT.use_dhp


def _get(cfg, key, default=None):
    """``cfg.get(key, default)`` for verl's dataclass configs, DictConfig and dict alike."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _need(config, what):
    if config is None:
        raise ValueError(f"the {what} policy loss reads its parameters from verl's actor config; got config=None")


def mhpo_config_from_verl(config) -> MHPOConfig:
    """MHPOConfig from ``config.policy_loss.mhpo_*`` (:data:`MHPO_KEYS`), paper defaults where absent."""
    _need(config, "MHPO")
    pl = _get(config, "policy_loss")
    return MHPOConfig(**{field: _get(pl, key, getattr(_DEFAULT, field)) for key, field in MHPO_KEYS.items()})


def _clip_range(config):
    ratio = _get(config, "clip_ratio", 0.2)
    low, high = _get(config, "clip_ratio_low"), _get(config, "clip_ratio_high")
    return (ratio if low is None else low), (ratio if high is None else high)


def clip_config_from_verl(config) -> ClipConfig:
    """verl ``vanilla``: clip_ratio_low / clip_ratio_high (default clip_ratio), dual clip at clip_ratio_c (3.0)."""
    _need(config, "vanilla")
    low, high = _clip_range(config)
    return ClipConfig(low, high, dual_clip_c=_get(config, "clip_ratio_c", 3.0))


def gspo_config_from_verl(config) -> GSPOConfig:
    """verl ``gspo``: the sequence ratio clipped at clip_ratio_low / clip_ratio_high."""
    _need(config, "gspo")
    return GSPOConfig(*_clip_range(config))


def sapo_config_from_verl(config) -> SAPOConfig:
    """verl ``sapo``: tau_pos / tau_neg."""
    _need(config, "sapo")
    return SAPOConfig(_get(config, "tau_pos", 1.0), _get(config, "tau_neg", 1.05))


def cispo_config_from_verl(config) -> CISPOConfig:
    """verl ``cispo``: the ratio clamped to [1 - clip_ratio_low, 1 + clip_ratio_high] (default clip_ratio);
    clip_ratio_low >= 1 bounds nothing (the ratio is > 0): ``eps_low=None``."""
    _need(config, "cispo")
    low, high = _clip_range(config)
    return CISPOConfig(low if low < 1 else None, high)


def _aggregation(loss_agg_mode, info) -> dict:
    """verl 0.9.1's ``agg_loss`` normalisers from ``global_batch_info``, as this package's keyword
    arguments: the same modes and the same math (``loss_scale_factor`` None is T in both)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    dp = _get(info, "dp_size", 1) or 1
    tokens, seqs = _get(info, "batch_num_tokens"), _get(info, "global_batch_size")
    if dp > 1 and loss_agg_mode == "token-mean" and tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp > 1 and loss_agg_mode in SEQ_MODES and seqs is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    return dict(loss_agg_mode=loss_agg_mode, global_num_tokens=tokens, global_batch_size=seqs,
                loss_scale_factor=_get(info, "loss_scale_factor"), dp_size=int(dp))


def _metric_names(cfg):
    """verl metric name -> our metric name (None: verl's constant 0 for this loss)."""
    names = {"actor/pg_clipfrac": None, "actor/ppo_kl": "kl_old", "actor/pg_clipfrac_lower": None}
    if isinstance(cfg, (ClipConfig, GSPOConfig, CISPOConfig)):
        names["actor/pg_clipfrac"] = "clipfrac"  # clip / GSPO: verl's gt(pg_losses2, pg_losses1); CISPO: ratio != clip
    if isinstance(cfg, ClipConfig) and cfg.dual_clip_c is not None:
        names["actor/pg_clipfrac_lower"] = "dual_clipfrac"
    if isinstance(cfg, MHPOConfig):
        names.update({f"actor/mhpo_{k}": k for k in ("psi_mean", "zeta_mean", "survival_mean", "low_survival_frac")})
    return names


def make_policy_loss(ratio_control: Callable, importance_sampling_level: str = "token", *,
                     loss_agg_mode: Optional[str] = None, backend: str = "auto"):
    """A verl policy-loss function computing ``ratio_control(actor_config)`` with this package.

    Args:
        ratio_control: actor config -> :class:`MHPOConfig` / :class:`ClipConfig` / :class:`SAPOConfig` /
            :class:`GSPOConfig` / :class:`CISPOConfig` (e.g. :func:`mhpo_config_from_verl`), or one fixed config.
        importance_sampling_level: "token" or "sequence", as in :func:`mhpo_kernels.policy_loss`.
        loss_agg_mode: None: the caller's; a name: always that one (verl's ``sapo`` forces
            "seq-mean-token-mean").
        backend: as in :func:`mhpo_kernels.policy_loss_from_logprobs`.
    """
    build = ratio_control if callable(ratio_control) else (lambda config: ratio_control)
    fixed_mode = loss_agg_mode

    def policy_loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                       config=None, rollout_is_weights: Optional[torch.Tensor] = None):
        cfg = build(config)
        mode = loss_agg_mode if fixed_mode is None else fixed_mode
        agg = _aggregation(mode, _get(config, "global_batch_info", None))
        if rollout_is_weights is not None and rollout_is_weights.shape != log_prob.shape:
            raise ValueError(f"rollout_is_weights has shape {tuple(rollout_is_weights.shape)}, "
                             f"expected {tuple(log_prob.shape)}")
        out = policy_loss_from_logprobs(log_prob, old_log_prob, advantages, response_mask, ratio_control=cfg,
                                        importance_sampling_level=importance_sampling_level, backend=backend,
                                        importance_weights=rollout_is_weights, **agg)
        names = _metric_names(cfg)
        zero = out.loss.new_zeros(())
        stats = [out.metrics[k].float() if k else zero.float() for k in names.values()]
        values = torch.stack(stats).tolist()  # one host sync for every metric (verl wants floats)
        return out.loss, dict(zip(names, values))

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = "mhpo_kernels_policy_loss"
    return policy_loss_fn


_OURS = set()


def register(name: str, ratio_control: Callable = mhpo_config_from_verl, importance_sampling_level: str = "token",
             **kw):
    """Register :func:`make_policy_loss` ``(ratio_control, importance_sampling_level, **kw)`` under
    ``name`` in verl's policy-loss registry; a name verl (or anyone else) registered raises ValueError."""
    if name in core_algos.POLICY_LOSS_REGISTRY and name not in _OURS:
        raise ValueError(f"verl already has a policy loss named {name!r}")
    fn = make_policy_loss(ratio_control, importance_sampling_level, **kw)
    core_algos.register_policy_loss(name)(fn)
    _OURS.add(name)
    return fn


register("mhpo")
register("mhpo_seq", importance_sampling_level="sequence")
register("mk_vanilla", clip_config_from_verl)
register("mk_gspo", gspo_config_from_verl, "sequence")
register("mk_sapo", sapo_config_from_verl, loss_agg_mode="seq-mean-token-mean")
register("mk_cispo", cispo_config_from_verl)


FUSED_LOGPROBS_ENV = "MHPO_VERL_FUSED_LOGPROBS"


def patch_from_env(value: Optional[str] = None) -> Optional[Patch]:
    """:func:`~mhpo_kernels.integrations.fused_logits.patch_verl` when ``value`` (None: the environment's
    ``MHPO_VERL_FUSED_LOGPROBS``) is 1 / true / yes / on; None for 0 / false / no / off / empty."""
    raw = os.environ.get(FUSED_LOGPROBS_ENV, "") if value is None else value
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return patch_verl()
    if v in ("", "0", "false", "no", "off"):
        return None
    raise ValueError(f"{FUSED_LOGPROBS_ENV} must be 1 / true / yes / on or 0 / false / no / off, got {raw!r}")


FUSED_LOGPROBS_PATCH = patch_from_env()
