"""mhpo_kernels.integrations.rollout_correction against the code it reproduces: verl 0.9.1's own
``compute_rollout_correction_weights`` (imported; skips without verl) and trl 1.16.0's vLLM
importance-sampling lines (copied below), on random log-probs with an empty response."""
import importlib.util
import math

import pytest
import torch

from mhpo_kernels.integrations.rollout_correction import (
    parse_verl_threshold,
    trl_importance_sampling_ratio,
    verl_rollout_is_weights,
)

HAVE_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="verl is not installed (bash .ci/peers.sh installs it)")

LENGTHS = [9, 4, 7, 0, 6, 1]  # one empty response


def case(seed, dtype=torch.float64, mask_dtype=torch.bool, spread=0.6):
    """(old, rollout, mask): a spread that puts token and sequence ratios on both sides of every
    threshold below, and NaN rollout log-probs off the response (which must not leak)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    old = torch.randn(B, T, generator=g, dtype=torch.float64).clamp(max=0) - 1.0
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    return old.to(dtype), rollout.to(dtype), mask.to(mask_dtype)


def test_parse_verl_threshold():
    assert parse_verl_threshold(2.0) == (2.0, None)
    assert parse_verl_threshold(3) == (3.0, None)
    assert parse_verl_threshold(" 1.5 ") == (1.5, None)
    assert parse_verl_threshold("0.5_2.0") == (2.0, 0.5)
    for bad, err in [("0", ValueError), ("2_1", ValueError), ("0_1", ValueError), ("a_b", ValueError),
                     ("", ValueError), (True, TypeError), (None, TypeError), (-1.0, ValueError)]:
        with pytest.raises(err):
            parse_verl_threshold(bad)


@pytest.mark.slow  # verl's import (~11 s)
@needs_verl
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "batch_normalize"])
@pytest.mark.parametrize("threshold", [2.0, "1.5", "0.5_2.0", "0.8_1.25"], ids=["tis", "tis_str", "icepop", "narrow"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float64, torch.bool), (torch.float32, torch.float32),
                                              (torch.float64, torch.int64)], ids=["f64_bool", "f32_float", "f64_long"])
def test_verl_weights_equal_verl(level, threshold, normalize, dtype, mask_dtype):
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    old, rollout, mask = case(seed=len(str(threshold)) + 7 * normalize, dtype=dtype, mask_dtype=mask_dtype)
    want, _ = compute_rollout_correction_weights(old - rollout, mask, rollout_is=level,
                                                 rollout_is_threshold=threshold,
                                                 rollout_is_batch_normalize=normalize)
    off = ~mask.bool()
    got = verl_rollout_is_weights(old, rollout.masked_fill(off, math.nan), mask, rollout_is=level,
                                  rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize)
    assert got.shape == want.shape and got.dtype == want.dtype and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[off].eq(0).all()
    if not normalize:  # the case reaches the bounds: truncation and masking both act
        upper, lower = parse_verl_threshold(threshold)
        w = want[mask.bool()]
        assert (w == 0).any() if lower is not None else (w == upper).any()


@pytest.mark.slow
@needs_verl
def test_verl_weights_with_big_log_ratios():
    """|log-ratio| > 20: verl's exp clamp, per token and on the sequence sum."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    old, rollout, mask = case(seed=3, spread=15.0)
    for level in ("token", "sequence"):
        for threshold in (1e12, "1e-12_1e12"):
            want, _ = compute_rollout_correction_weights(old - rollout, mask, level, threshold)
            got = verl_rollout_is_weights(old, rollout, mask, level, threshold)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert (want == math.exp(20)).any()


def test_verl_weights_bad_input():
    old, rollout, mask = case(seed=0)
    with pytest.raises(ValueError, match="Invalid rollout_is"):
        verl_rollout_is_weights(old, rollout, mask, rollout_is="geometric")
    with pytest.raises(ValueError, match="lower bound"):
        verl_rollout_is_weights(old, rollout, mask, rollout_is_threshold="3_2")


def trl_1_16_importance_sampling_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask, tool_mask,
                                       vllm_importance_sampling_mode, vllm_importance_sampling_clip_min,
                                       vllm_importance_sampling_clip_max):
    """trl 1.16.0, trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (lines
    2660-2708), verbatim but for ``self.`` dropped from the attributes and the error text shortened."""
    if True:  # if self.use_vllm and self.vllm_importance_sampling_correction:
        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
        # Tokens whose sampling logprob was NaN (unavailable from vLLM) get a zero difference, so their
        # importance ratio is exactly 1 (no correction) rather than propagating NaN through the loss.
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)

        sequence_level_is = vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]
        if sequence_level_is:
            per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
            logps_diff = per_sequence_logps_diff
        else:
            logps_diff = per_token_logps_diff

        vllm_importance_sampling_ratio = torch.exp(logps_diff)

        # vllm_importance_sampling_ratio.shape:
        #   token_* modes:     (B, T)  (per-token ratio)
        #   sequence_* modes:  (B, 1)  (per-sequence ratio)

        if vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
            vllm_importance_sampling_ratio = torch.clamp(
                vllm_importance_sampling_ratio,
                min=vllm_importance_sampling_clip_min,
                max=vllm_importance_sampling_clip_max,
            )
        elif vllm_importance_sampling_mode in ["sequence_mask", "token_mask"]:
            min_val = (
                vllm_importance_sampling_clip_min
                if vllm_importance_sampling_clip_min is not None
                else -math.inf
            )
            max_val = (
                vllm_importance_sampling_clip_max
                if vllm_importance_sampling_clip_max is not None
                else math.inf
            )

            invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (
                vllm_importance_sampling_ratio > max_val
            )
            vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(
                invalid_mis_mask, value=0.0
            )
        else:
            raise ValueError(f"Unknown vLLM importance sampling level: {vllm_importance_sampling_mode}.")
    return vllm_importance_sampling_ratio


@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.7, None)], ids=["max", "both", "min"])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trl_ratio_equals_trl(mode, clip_min, clip_max, dtype):
    old, rollout, mask = case(seed=11, dtype=dtype, mask_dtype=torch.int64, spread=1.0)
    rollout[0, 2] = math.nan  # a token vLLM did not score
    tool_mask = torch.ones_like(mask)
    tool_mask[2, 1:3] = 0
    want = trl_1_16_importance_sampling_ratio(old, rollout, mask, tool_mask, mode, clip_min, clip_max)
    got = trl_importance_sampling_ratio(old, rollout, mask * tool_mask, mode, clip_max=clip_max, clip_min=clip_min)
    assert got.shape == mask.shape and got.dtype == dtype and not got.requires_grad
    torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=0)
    active = got[(mask * tool_mask).bool()]  # the case reaches every bound given
    for bound in (clip_min, clip_max):
        assert bound is None or (active == (0 if mode.endswith("mask") else bound)).any(), bound


def test_trl_ratio_bad_mode():
    old, rollout, mask = case(seed=0)
    with pytest.raises(ValueError, match="Unknown vLLM importance sampling mode"):
        trl_importance_sampling_ratio(old, rollout, mask, "token_clip")
