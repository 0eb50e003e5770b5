"""Switching a verl / TRL policy loss to mhpo-kernels: each function below is one switch, the stack's
loss (named in its docstring) in one call, <= 10 lines. tests/test_integrations.py checks each against
verl 0.9.1's / trl 1.16.0's own code (value and gradient). ``python examples/switch.py`` runs them
on random CPU tensors in seconds.

The trainers switch without code (verl) or with two names (TRL): README.md, "Switching from verl / TRL".
"""
import torch

import mhpo_kernels as mk
from mhpo_kernels.integrations.rollout_correction import trl_importance_sampling_ratio, verl_rollout_is_weights


def verl_ppo_loss(logp, old, rollout, ref, adv, mask):
    """verl's actor loss (``ppo_loss``: policy loss + kl_loss_coef * KL loss) with policy_loss.loss_mode=cispo,
    clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=token-mean, use_kl_loss, kl_loss_type=low_var_kl,
    kl_loss_coef=0.001, algorithm.rollout_correction.rollout_is=token (TIS, rollout_is_threshold=2.0)."""
    w = verl_rollout_is_weights(old, rollout, mask, rollout_is="token", rollout_is_threshold=2.0)
    return mk.policy_loss_from_logprobs(
        logp, old, adv, mask, ratio_control=mk.CISPOConfig(eps_low=0.2, eps_high=0.28), importance_weights=w,
        ref_logprobs=ref, beta=0.001, kl_estimator="low_var_kl", loss_agg_mode="token-mean").loss


def trl_grpo_loss(logp, old, rollout, ref, adv, mask):
    """TRL's GRPOTrainer loss, loss_type="grpo" (epsilon=0.2), vLLM importance sampling
    vllm_importance_sampling_mode="sequence_mask" (clip_max 3.0), beta=0, no gradient accumulation."""
    w = trl_importance_sampling_ratio(old, rollout, mask, "sequence_mask", clip_max=3.0)
    return mk.policy_loss_from_logprobs(
        logp, old, adv, mask, ratio_control=mk.ClipConfig(eps_low=0.2, eps_high=0.2), importance_weights=w,
        loss_agg_mode="seq-mean-token-mean", global_batch_size=logp.shape[0]).loss  # empty completions count


def trl_dr_grpo_loss(logp, old, rollout, ref, adv, mask, max_completion_length=32):
    """loss_type="dr_grpo": the masked token sum over B * max_completion_length."""
    return mk.policy_loss_from_logprobs(
        logp, old, adv, mask, ratio_control=mk.ClipConfig(eps_low=0.2, eps_high=0.2),
        loss_agg_mode="seq-mean-token-sum-norm", global_batch_size=logp.shape[0],
        loss_scale_factor=max_completion_length).loss


def trl_cispo_loss(logp, old, rollout, ref, adv, mask, normalizer):
    """loss_type="cispo", epsilon_high=5.0 (TRL clamps the ratio at epsilon_high: our eps_high is 4.0):
    the masked token sum over TRL's normaliser (num_items_in_batch, rescaled to one accumulation window)."""
    out = mk.policy_loss_from_logprobs(logp, old, adv, mask, ratio_control=mk.CISPOConfig(eps_low=None, eps_high=4.0),
                                       loss_agg_mode="token-sum")
    return out.loss / normalizer


def batch(seed=0, B=8, T=32):
    """Random (logp, old, rollout, ref, adv, mask): [B, T] log-probs, [B] advantages, ragged responses."""
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, T, generator=g).clamp(max=0) - 1).requires_grad_()
    old, rollout, ref = (logp.detach() + s * torch.randn(B, T, generator=g) for s in (0.3, 0.2, 0.5))
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
    return logp, old, rollout, ref, torch.randn(B, generator=g), mask


SWITCHES = [verl_ppo_loss, trl_grpo_loss, trl_dr_grpo_loss, trl_cispo_loss]

if __name__ == "__main__":
    for switch in SWITCHES:
        x = batch()
        extra = (x[-1].sum(),) if switch is trl_cispo_loss else ()
        loss = switch(*x, *extra)
        loss.backward()
        print(f"{switch.__name__:18s} loss {loss.item():+.6f}  |grad| {x[0].grad.norm().item():.6f}")
