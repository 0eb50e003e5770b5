"""Public entry point of the MHPO loss (the policy-loss family is in :mod:`policy`)."""
from __future__ import annotations

from ._inputs import MHPOOutput
from .config import MHPOConfig
from .policy import policy_loss


def mhpo_loss(
    logits, target_ids, old_logprobs, advantages, mask=None, *, config=None,
    temperature=1.0, loss_agg_mode="token-mean", ignore_index=-100,
    ref_logprobs=None, beta=0.0, return_entropy=False, backend="auto", inplace_backward=False,
    process_group=None, vocab_start_index=None, check_ids=True,
) -> MHPOOutput:
    """MHPO policy loss from logits, fused: no [N, V] float32 temporary.

    Args:
        logits: [B, T, V] or [N, V]; float32 / bfloat16 / float16 (float64 with
            ``backend="torch"``); CPU or CUDA. Rows may be strided; V must be unit-stride.
        target_ids: [B, T] or [N] integer ids in [0, V), or ``ignore_index``.
        old_logprobs: rollout-policy log-probs, shape of target_ids.
        advantages: shape of target_ids, or [B] for [B, T, V] logits.
        mask: shape of target_ids, bool or float (0 = padding); None = all ones.
        config: :class:`MHPOConfig` (None = paper defaults).
        temperature: logits are divided by it.
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
            "seq-mean-token-sum-norm" (verl's names; [N, V] counts as one sequence).
        ref_logprobs, beta: optional k3 KL to a reference policy, ``+ beta * kl``.
        return_entropy: also return the per-token entropy (differentiable).
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (the reference);
            ``MHPO_BACKEND`` overrides "auto".
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
    config = MHPOConfig() if config is None else config
    if not isinstance(config, MHPOConfig):
        raise TypeError(f"config must be an MHPOConfig, got {type(config).__name__}")
    return policy_loss(
        logits, target_ids, old_logprobs, advantages, mask, ratio_control=config,
        importance_sampling_level="token", temperature=temperature, loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index, ref_logprobs=ref_logprobs, beta=beta, return_entropy=return_entropy,
        backend=backend, inplace_backward=inplace_backward, process_group=process_group,
        vocab_start_index=vocab_start_index, check_ids=check_ids,
    )
