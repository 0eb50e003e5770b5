"""Adapters for RL training stacks, each imported on its own (``import mhpo_kernels`` imports none):

* :mod:`mhpo_kernels.integrations.verl`: ``mhpo`` / ``mhpo_seq`` in verl's policy-loss registry.
* :mod:`mhpo_kernels.integrations.trl`: :class:`~mhpo_kernels.integrations.trl.MHPOGRPOTrainer`, TRL's
  ``GRPOTrainer`` with the loss computed by this package.
* :mod:`mhpo_kernels.integrations.rollout_correction`: verl's and TRL's rollout importance weights
  (truncated / masked, token / sequence) from log-probs, for ``importance_weights=`` (imports neither).
"""
