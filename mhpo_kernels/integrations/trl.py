"""TRL's ``GRPOTrainer`` with the policy loss computed by this package (checked against trl 1.16.0).

Switch a TRL script to MHPO::

    from mhpo_kernels.integrations.trl import MHPOGRPOConfig, MHPOGRPOTrainer
    args = MHPOGRPOConfig(output_dir="out", loss_type="grpo", mhpo_c=1.5)    # was GRPOConfig(...)
    trainer = MHPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)  # was GRPOTrainer

What stays TRL's: everything but the per-token surrogate. ``loss_type`` picks TRL's aggregation
("grpo", "sapo": per-sequence token means averaged over all completions; "bnpo": local token mean;
"dr_grpo": token sum / (B * max_completion_length); "dapo", "cispo", "luspo": as TRL), scaled for
gradient accumulation as TRL scales it; ``importance_sampling_level`` ("sequence": sequence-level
MHPO); the k3 KL to the reference model (``beta``, with ``use_bias_correction_kl``), the vLLM
importance sampling correction, ``top_entropy_quantile`` and ``off_policy_mask_threshold``: their
per-token factors on the surrogate go in as ``importance_weights`` (TRL's ``per_token_loss * ...``,
the KL term untouched). What is ours: the surrogate, from ``MHPOGRPOConfig.ratio_control`` ("mhpo",
the default, with the ``mhpo_*`` parameters, or "trl": TRL's own clip / SAPO / CISPO surrogate for
``loss_type``), or any :class:`~mhpo_kernels.MHPOConfig` / :class:`~mhpo_kernels.ClipConfig` /
:class:`~mhpo_kernels.SAPOConfig` / :class:`~mhpo_kernels.GSPOConfig` / :class:`~mhpo_kernels.CISPOConfig`
passed as ``MHPOGRPOTrainer(..., ratio_control=...)``. Not supported yet (NotImplementedError):
``loss_type`` "vespo", the entropy bonus
(``entropy_coef``, adaptive entropy) and MoE aux losses. Metrics: TRL's ``entropy``, ``kl`` and, for
clip controls, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``; for
CISPO ``cispo_clip_ratio``; for MHPO ``mhpo/psi_mean``, ``mhpo/zeta_mean``, ``mhpo/survival_mean``,
``mhpo/low_survival_frac`` (per-process means, averaged over processes).

``MHPOGRPOConfig(mhpo_fused_lm_head=True)`` also computes the log-probs and entropies of TRL's fused LM
head (``add_fused_lm_head``: policy and reference model) with this package's tiles
(:func:`~mhpo_kernels.integrations.fused_logits.fuse_trl_lm_head`, this trainer's models only); TRL's
own head where ours would not be exact (softcapping, ``logit_scale != 1``, a weight not in the dtype
TRL multiplies in, DeepSpeed ZeRO-3). Off by default: on GPU, where TRL's head runs Triton kernels,
the two are not compared yet; on a 2-core CPU ours took 1.8 s vs TRL's 3.3 s (float32) and 0.9 s vs
3.4 s (bfloat16) for forward + backward at N = 1024, H = 512, V = 32768.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..api import policy_loss_from_logprobs
from ..config import CISPOConfig, ClipConfig, MHPOConfig, SAPOConfig, resolve_ratio_control
from .fused_logits import fuse_trl_lm_head

__all__ = ["MHPOGRPOConfig", "MHPOGRPOTrainer", "trl_ratio_control", "mhpo_config_from_args"]

_DEFAULT = MHPOConfig()
_CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_AGGREGATIONS = _CLIP_LOSSES + ("sapo", "cispo")


@dataclass
class MHPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the surrogate's choice (``ratio_control``) and MHPO's parameters."""

    ratio_control: str = field(default="mhpo", metadata={
        "help": "'mhpo': MHPO with the mhpo_* parameters; 'trl': TRL's own surrogate for loss_type (clip with "
                "epsilon / epsilon_high / delta, SAPO's gate or CISPO's clamp), computed by mhpo-kernels."})
    mhpo_c: float = field(default=_DEFAULT.c, metadata={"help": "MHPO: LFM bound c."})
    mhpo_k_pos: float = field(default=_DEFAULT.k_pos, metadata={"help": "MHPO: Weibull shape, positive shifts."})
    mhpo_lam_pos: float = field(default=_DEFAULT.lam_pos, metadata={"help": "MHPO: Weibull scale, positive shifts."})
    mhpo_k_neg: float = field(default=_DEFAULT.k_neg, metadata={"help": "MHPO: Weibull shape, negative shifts."})
    mhpo_lam_neg: float = field(default=_DEFAULT.lam_neg, metadata={"help": "MHPO: Weibull scale, negative shifts."})
    mhpo_use_lfm: bool = field(default=_DEFAULT.use_lfm, metadata={"help": "MHPO: use the LFM (ablation)."})
    mhpo_use_dhp: bool = field(default=_DEFAULT.use_dhp, metadata={"help": "MHPO: use the DHP (ablation)."})
    mhpo_fused_lm_head: bool = field(default=False, metadata={
        "help": "Compute the fused LM head's log-probs and entropies with mhpo-kernels' tiles instead of TRL's "
                "(this trainer's models; TRL's where ours would not be exact)."})

    def __post_init__(self):
        super().__post_init__()
        if self.ratio_control not in ("mhpo", "trl"):
            raise ValueError(f"ratio_control must be 'mhpo' or 'trl', got {self.ratio_control!r}")
        mhpo_config_from_args(self)  # validates the mhpo_* values now, not at the first step


def mhpo_config_from_args(args) -> MHPOConfig:
    """MHPOConfig from ``args.mhpo_*`` (paper defaults for a plain ``GRPOConfig``)."""
    return MHPOConfig(**{f: getattr(args, f"mhpo_{f}", getattr(_DEFAULT, f))
                         for f in ("c", "k_pos", "lam_pos", "k_neg", "lam_neg", "use_lfm", "use_dhp")})


def trl_ratio_control(args):
    """Our config for TRL's own surrogate of ``args.loss_type``: the clip (epsilon, epsilon_high,
    two-sided ``delta``), SAPO's gate (sapo_temperature_pos / _neg) or CISPO's clamp of the ratio at
    ``epsilon_high`` (``CISPOConfig(eps_low=None, eps_high=epsilon_high - 1)``; at
    ``importance_sampling_level="sequence"`` the sequence ratio is clamped, as in TRL)."""
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.loss_type in _CLIP_LOSSES:
        return ClipConfig(args.epsilon, high, delta=args.delta)
    if args.loss_type == "sapo":
        return SAPOConfig(args.sapo_temperature_pos, args.sapo_temperature_neg)
    if args.loss_type == "cispo":
        if not high > 1:
            raise ValueError(f"loss_type='cispo' clamps the ratio at epsilon_high (ScaleRL: 5.0), which must be > 1 "
                             f"here; got {high}")
        return CISPOConfig(eps_low=None, eps_high=high - 1)
    raise NotImplementedError(f"loss_type={args.loss_type!r} has no mhpo-kernels surrogate yet")


class MHPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose policy loss is :func:`mhpo_kernels.policy_loss_from_logprobs` (see the module).

    Args:
        ratio_control: None: from ``args`` (``MHPOGRPOConfig.ratio_control``; MHPO at the paper's
            defaults for a plain ``GRPOConfig``); else one of this package's ratio-control configs.
        backend: as in :func:`mhpo_kernels.policy_loss_from_logprobs`; also the fused LM head's
            (``mhpo_fused_lm_head``; "reference" leaves it TRL's).
        Everything else: as ``GRPOTrainer``.
    """

    def __init__(self, *a, ratio_control=None, backend="auto", **kw):
        super().__init__(*a, **kw)
        if ratio_control is None:
            ratio_control = (trl_ratio_control(self.args) if getattr(self.args, "ratio_control", "mhpo") == "trl"
                             else mhpo_config_from_args(self.args))
        resolve_ratio_control(ratio_control, self.importance_sampling_level)  # a bad type or level raises now
        unsupported = [what for what, on in (
            (f"loss_type={self.loss_type!r}", self.loss_type not in _AGGREGATIONS),
            ("the entropy bonus (entropy_coef / adaptive entropy)", self._entropy_bonus_enabled),
            ("MoE aux losses (output_router_logits)", self.aux_loss_enabled)) if on]
        if unsupported:
            raise NotImplementedError(f"MHPOGRPOTrainer does not support {', '.join(unsupported)} yet")
        self.ratio_control = ratio_control
        self.mhpo_backend = backend
        self.mhpo_fused_lm_head = bool(getattr(self.args, "mhpo_fused_lm_head", False))
        if self.mhpo_fused_lm_head:
            if not fuse_trl_lm_head(self.model, backend):
                raise RuntimeError("mhpo_fused_lm_head: the model has no fused LM head of TRL's add_fused_lm_head "
                                   "(a TRL version this adapter does not know?)")
            if self.ref_model is not None:
                fuse_trl_lm_head(self.ref_model, backend)

    def _aggregation(self, mask, mode, inputs):
        """(our aggregation arguments, factor): ``factor * our loss`` is TRL's aggregation for ``self.loss_type``."""
        B = mask.shape[0]  # TRL's sequence means run over every completion, empty ones included
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "sapo"):
            return dict(loss_agg_mode="seq-mean-token-mean", global_batch_size=B), 1.0 / accumulation
        if self.loss_type == "luspo":
            return dict(loss_agg_mode="seq-mean-token-sum", global_batch_size=B), 1.0 / accumulation
        if self.loss_type == "bnpo":
            return dict(loss_agg_mode="token-mean"), 1.0 / accumulation
        if self.loss_type == "dr_grpo":  # token sum / (B * max_completion_length)
            return dict(loss_agg_mode="seq-mean-token-sum-norm", global_batch_size=B,
                        loss_scale_factor=self.max_completion_length), 1.0 / accumulation
        # dapo, cispo: token sum / a normaliser held in a tensor
        return dict(loss_agg_mode="token-sum"), 1.0 / self._dapo_normalizer(mode, inputs)

    def _dapo_normalizer(self, mode, inputs):  # TRL's: num_items_in_batch spans the generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _trl_aggregate(self, per_token, mask, mode, inputs):
        """TRL's aggregation of a per-token term (the KL), in plain PyTorch."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "sapo"):
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "luspo":
            return (per_token * mask).sum(-1).mean() / accumulation
        if self.loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (per_token * mask).sum() / (mask.shape[0] * self.max_completion_length) / accumulation
        return (per_token * mask).sum() / self._dapo_normalizer(mode, inputs)  # dapo, cispo

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        multimodal = {k: inputs.get(k) for k in (
            "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")}
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True, **multimodal)
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        adv = inputs["advantages"]  # [B] or [B, T]
        advantages = adv.unsqueeze(1) if adv.dim() == 1 else adv
        # TRL's per-token factors on the surrogate (per_token_loss * factor, before the KL is added)
        factors = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            factors.append(self.get_off_policy_mask(advantages, per_token_logps, sampling, mask,
                                                    self.off_policy_mask_threshold))
        if self.top_entropy_quantile < 1.0:
            factors.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"])  # [B, T], or [B, 1] in the sequence modes
        weights = None
        for f in factors:
            weights = f if weights is None else weights * f
        if weights is not None:  # the masks alone are TRL's integer / bool masks
            weights = (weights if weights.is_floating_point() else weights.float()).expand(per_token_logps.shape)

        mode = "train" if self.model.training else "eval"
        agg, scale = self._aggregation(mask, mode, inputs)
        out = policy_loss_from_logprobs(per_token_logps, old, adv, mask, ratio_control=self.ratio_control,
                                        importance_sampling_level=self.importance_sampling_level,
                                        importance_weights=weights, backend=self.mhpo_backend, **agg)
        loss = out.loss * scale
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:  # TRL weights the KL by its (token or sequence) ratio
                log_ratio = per_token_logps - old
                if self.importance_sampling_level == "sequence":
                    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                per_token_kl = per_token_kl * torch.exp(log_ratio)
            loss = loss + self.beta * self._trl_aggregate(per_token_kl, mask, mode, inputs)
        cispo_clipped = None
        if isinstance(self.ratio_control, CISPOConfig):  # TRL's cispo_clip_ratio: above the clamp where A > 0
            with torch.no_grad():
                log_ratio = per_token_logps - old
                if self.importance_sampling_level == "sequence":
                    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                cispo_clipped = (log_ratio.exp() > self.ratio_control.ratio_high) & (advantages > 0)
        self._log_mhpo_metrics(mode, out.metrics, entropies, per_token_kl if self.beta != 0.0 else None, mask,
                               cispo_clipped)
        return loss

    def _log_mhpo_metrics(self, mode, metrics, entropies, per_token_kl, mask, cispo_clipped=None):
        def global_masked_mean(x):  # TRL's token-weighted mean over every process
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if per_token_kl is not None:
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl.detach()))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies.detach()))
        if cispo_clipped is not None:
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(cispo_clipped.float()))
            return
        names = {"clipfrac_low": "clip_ratio/low_mean", "clipfrac_high": "clip_ratio/high_mean",
                 "clipfrac": "clip_ratio/region_mean"}
        if isinstance(self.ratio_control, MHPOConfig):
            names = {k: f"mhpo/{k}" for k in ("psi_mean", "zeta_mean", "survival_mean", "low_survival_frac")}
        names = {k: v for k, v in names.items() if k in metrics}
        if names:
            values = self.accelerator.gather(torch.stack([metrics[k].float() for k in names])[None]).mean(0)
            for name, value in zip(names.values(), values.tolist()):
                self._metrics[mode][name].append(value)
