"""Ratio-control configurations.

Each config is a frozen, validated dataclass. Every token-level config maps to
one kernel epilogue: ``kernel_mode`` names the branch compiled into the fused
kernels and ``kernel_params()`` packs its scalars into a fixed-length tuple
(``_constants.PARAM_LAYOUT`` names its slots; every backend reads that layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# the epilogue ids, the parameter layout and the limits every backend shares (the limits: re-exported)
from ._constants import (
    CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, KERNEL_PARAMS, MODE_CISPO, MODE_CLIP, MODE_GSPO, MODE_MHPO,  # noqa: F401
    MODE_NONE, MODE_SAPO, PARAM_LAYOUT,
)

__all__ = [
    "MHPOConfig", "ClipConfig", "SAPOConfig", "GSPOConfig", "CISPOConfig", "RATIO_CONTROLS", "IS_LEVELS",
    "resolve_ratio_control",
    "KERNEL_PARAMS", "MODE_NONE", "MODE_MHPO", "MODE_CLIP", "MODE_SAPO",
]

IS_LEVELS = ("token", "sequence")  # importance_sampling_level, TRL's name


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _pack(mode: int, **named) -> tuple:
    """The KERNEL_PARAMS floats of ``mode``, each value in its slot of ``PARAM_LAYOUT[mode]``."""
    layout = PARAM_LAYOUT[mode]
    assert set(named) == set(layout), (sorted(named), layout)
    return tuple(float(named[k]) for k in layout) + (0.0,) * (KERNEL_PARAMS - len(layout))


def _unpack(mode: int, params) -> dict:
    return dict(zip(PARAM_LAYOUT[mode], (float(v) for v in params)))


@dataclass(frozen=True)
class MHPOConfig:
    """MHPO ratio control (arXiv 2603.16929; defaults from its section 4.1).

    ``c`` bounds the Log-Fidelity Modulator ``psi = c * tanh(delta / c)``;
    ``(k_pos, lam_pos)`` and ``(k_neg, lam_neg)`` are the Weibull shape and
    scale of the Decoupled Hazard Penalty for positive and negative shifts.
    Ablations: ``use_dhp=False`` is "LFM only" (zeta = 0), ``use_lfm=False`` is
    "DHP only" (psi = delta); symmetric DHP is ``k_neg=k_pos, lam_neg=lam_pos``.
    """

    c: float = 1.5
    k_pos: float = 1.5
    lam_pos: float = 1.0
    k_neg: float = 2.0
    lam_neg: float = 0.8
    use_lfm: bool = True
    use_dhp: bool = True

    def __post_init__(self):
        for name in ("c", "k_pos", "lam_pos", "k_neg", "lam_neg"):
            _positive(name, getattr(self, name))
        for name in ("use_lfm", "use_dhp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.use_dhp and not self.use_lfm and self.k_pos <= 1:
            # DHP only: exp(delta - (softplus(delta)/lam_pos)^k_pos) grows without bound for k_pos <= 1
            raise ValueError(f"DHP only (use_lfm=False) needs k_pos > 1 for a bounded surrogate, got {self.k_pos}")

    kernel_mode = MODE_MHPO

    def kernel_params(self) -> tuple:
        """(c, k_pos, lam_pos, k_neg, lam_neg, use_lfm, use_dhp, 0): ``PARAM_LAYOUT[MODE_MHPO]``."""
        return _pack(MODE_MHPO, c=self.c, k_pos=self.k_pos, lam_pos=self.lam_pos, k_neg=self.k_neg,
                     lam_neg=self.lam_neg, use_lfm=self.use_lfm, use_dhp=self.use_dhp)


@dataclass(frozen=True)
class ClipConfig:
    """PPO / GRPO clipped surrogate, verl's convention.

    ``loss = max(-r*A, -clip(r, 1-eps_low, 1+eps_high)*A)`` with
    ``r = exp(clamp(delta, -20, 20))`` (verl clamps the log-ratio). DAPO
    "clip-higher" is ``eps_high > eps_low`` (0.2 / 0.28). ``dual_clip_c``
    (verl's ``clip_ratio_c``, > 1) caps the loss of negative-advantage tokens at
    ``-dual_clip_c * A``. ``delta`` (TRL's two-sided clipping) caps the
    unclipped ratio at ``delta`` (> 1) before the min.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    delta: float | None = None

    def __post_init__(self):
        for name in ("eps_low", "eps_high"):
            _positive(name, getattr(self, name))
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1, got {self.eps_low}")
        for name in ("dual_clip_c", "delta"):
            v = getattr(self, name)
            if v is not None:
                _positive(name, v)
                if v <= 1:
                    raise ValueError(f"{name} must be > 1, got {v}")

    kernel_mode = MODE_CLIP

    def kernel_params(self) -> tuple:
        """(eps_low, eps_high, dual_clip_c or 0, delta or 0): ``PARAM_LAYOUT[MODE_CLIP]``
        (``delta``'s slot is named ``ratio_cap`` there)."""
        return _pack(MODE_CLIP, eps_low=self.eps_low, eps_high=self.eps_high, dual_clip_c=self.dual_clip_c or 0.0,
                     ratio_cap=self.delta or 0.0)


@dataclass(frozen=True)
class SAPOConfig:
    """SAPO soft gate: ``loss = -(4/tau) * sigmoid(tau * (r - 1)) * A`` with
    ``tau = tau_pos`` if ``A > 0`` else ``tau_neg`` (TRL / Liger-Kernel defaults)."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        _positive("tau_pos", self.tau_pos)
        _positive("tau_neg", self.tau_neg)

    kernel_mode = MODE_SAPO

    def kernel_params(self) -> tuple:
        """(tau_pos, tau_neg): ``PARAM_LAYOUT[MODE_SAPO]``."""
        return _pack(MODE_SAPO, tau_pos=self.tau_pos, tau_neg=self.tau_neg)


@dataclass(frozen=True)
class GSPOConfig:
    """GSPO (Zheng et al., arXiv 2507.18071): PPO clip of the sequence-level ratio.

    ``s_i = exp(sum_t m_t delta_t / sum_t m_t)`` over the masked tokens of
    sequence i; every token of sequence i gets
    ``loss_t = max(-s_i*A_t, -clip(s_i, 1-eps_low, 1+eps_high)*A_t)``.
    Defaults 3e-4 / 4e-4 are the paper's. Follows verl's
    ``compute_policy_loss_gspo``: the log-ratio is clamped at ``max=10`` and the
    gradient uses the token-level form ``s_i,t = sg(s_i) * exp(logp_t - sg(logp_t))``
    (for a 0/1 mask this is also the gradient of the paper and of TRL's
    ``importance_sampling_level="sequence"``). verl aggregates GSPO with
    ``loss_agg_mode="seq-mean-token-mean"``; pass it to match.
    Always sequence-level: there is no per-token epilogue (``MODE_NONE`` pass
    over the logits, then the O(N) sequence step).
    """

    eps_low: float = 3e-4
    eps_high: float = 4e-4

    def __post_init__(self):
        _positive("eps_low", self.eps_low)
        _positive("eps_high", self.eps_high)
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1, got {self.eps_low}")

    kernel_mode = MODE_NONE

    def kernel_params(self) -> tuple:
        """(eps_low, eps_high): ``PARAM_LAYOUT[MODE_GSPO]``, read by the finishing kernels only
        (GSPO has no per-token epilogue in the pass over the logits)."""
        return _pack(MODE_GSPO, eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(frozen=True)
class CISPOConfig:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update.

    ``loss = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp`` with
    ``r = exp(clamp(delta, -20, 20))``: every token keeps its gradient
    ``-clip(r) * A`` (verl's ``compute_policy_loss_cispo``). ``eps_low=None``
    drops the lower bound (TRL's ``loss_type="cispo"``, which clamps at
    ``max=1 + eps_high`` only; its ``epsilon_high`` is our ``1 + eps_high``,
    ScaleRL recommends ``epsilon_high=5.0``, i.e. ``eps_high=4.0``). Defaults:
    verl's ``clip_ratio=0.2`` on both sides. ``importance_sampling_level="sequence"``
    clips the sequence ratio instead (TRL's ``cispo`` at that level), each token keeping its
    own ``logp``. Metrics:
    ``clipfrac_low`` (r below the lower bound), ``clipfrac_high`` (above the
    upper), ``clipfrac`` (either: verl's ``pg_clipfrac``), whatever the sign of A.
    """

    eps_low: float | None = 0.2
    eps_high: float = 0.2

    def __post_init__(self):
        _positive("eps_high", self.eps_high)
        if self.eps_low is not None:
            _positive("eps_low", self.eps_low)
            if self.eps_low >= 1:
                raise ValueError(f"eps_low must be < 1, got {self.eps_low}")

    kernel_mode = MODE_CISPO

    @property
    def ratio_low(self) -> float:
        return 0.0 if self.eps_low is None else 1.0 - self.eps_low

    @property
    def ratio_high(self) -> float:
        return 1.0 + self.eps_high

    def kernel_params(self) -> tuple:
        """(ratio_low, ratio_high) = (1 - eps_low or 0, 1 + eps_high): ``PARAM_LAYOUT[MODE_CISPO]``,
        read by the finishing kernels only (CISPO has no per-token epilogue in the pass over the logits)."""
        return _pack(MODE_CISPO, ratio_low=self.ratio_low, ratio_high=self.ratio_high)


RATIO_CONTROLS = (MHPOConfig, ClipConfig, SAPOConfig, GSPOConfig, CISPOConfig)


def resolve_ratio_control(ratio_control, importance_sampling_level):
    """Validated ``(config, level)``: None means ``MHPOConfig()``; level None means
    "sequence" for :class:`GSPOConfig` and "token" for the others."""
    cfg = MHPOConfig() if ratio_control is None else ratio_control
    if not isinstance(cfg, RATIO_CONTROLS):
        names = ", ".join(c.__name__ for c in RATIO_CONTROLS)
        raise TypeError(f"ratio_control must be one of {names}, got {type(cfg).__name__}")
    level = importance_sampling_level
    if level is None:
        level = "sequence" if isinstance(cfg, GSPOConfig) else "token"
    if level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")
    if isinstance(cfg, GSPOConfig) and level != "sequence":
        raise ValueError("GSPOConfig is sequence-level by definition; use ClipConfig for a token-level clip")
    return cfg, level


def from_kernel_params(mode: int, params) -> "MHPOConfig | ClipConfig | SAPOConfig":
    """The token-level config whose ``(kernel_mode, kernel_params())`` is ``(mode, params)``."""
    if mode == MODE_MHPO:
        q = _unpack(mode, params)
        return MHPOConfig(q["c"], q["k_pos"], q["lam_pos"], q["k_neg"], q["lam_neg"], use_lfm=q["use_lfm"] != 0,
                          use_dhp=q["use_dhp"] != 0)
    if mode == MODE_CLIP:
        q = _unpack(mode, params)
        return ClipConfig(q["eps_low"], q["eps_high"], dual_clip_c=q["dual_clip_c"] or None,
                          delta=q["ratio_cap"] or None)
    if mode == MODE_SAPO:
        q = _unpack(mode, params)
        return SAPOConfig(q["tau_pos"], q["tau_neg"])
    if mode == MODE_CISPO:
        q = _unpack(mode, params)
        return CISPOConfig(None if q["ratio_low"] == 0 else 1.0 - q["ratio_low"], q["ratio_high"] - 1.0)
    raise ValueError(f"no token-level config for kernel mode {mode}")
