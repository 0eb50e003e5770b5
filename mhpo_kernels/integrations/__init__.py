"""Adapters for RL training stacks, each imported on its own (``import mhpo_kernels`` imports none):

* :mod:`mhpo_kernels.integrations.verl`: ``mhpo`` / ``mhpo_seq`` in verl's policy-loss registry
  (``MHPO_VERL_FUSED_LOGPROBS=1``: verl's log-prob / entropy functions fused too).
* :mod:`mhpo_kernels.integrations.trl`: :class:`~mhpo_kernels.integrations.trl.MHPOGRPOTrainer`, TRL's
  ``GRPOTrainer`` with the loss computed by this package (``mhpo_fused_lm_head=True``: its fused LM head's
  tiles too).
* :mod:`mhpo_kernels.integrations.fused_logits`: verl's and TRL's log-prob / entropy helpers and TRL's
  fused LM head, computed by this package (imports neither until used).
* :mod:`mhpo_kernels.integrations.rollout_correction`: verl's and TRL's rollout importance weights
  (truncated / masked, token / sequence) from log-probs, for ``importance_weights=`` (imports neither).
"""
