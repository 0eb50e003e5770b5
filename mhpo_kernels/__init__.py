"""mhpo-kernels: fused kernels for the MHPO policy loss (arXiv 2603.16929).

>>> import mhpo_kernels as mk
>>> out = mk.mhpo_loss(logits, target_ids, old_logprobs, advantages, mask)   # doctest: +SKIP
>>> out.loss.backward()                                                      # doctest: +SKIP
"""
from . import _checkout  # noqa: F401
from . import reference
from ._inputs import MHPOOutput
from .api import mhpo_loss, policy_loss, policy_loss_from_logprobs, token_logprobs
from .backends import available_backends
from .config import CISPOConfig, ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig
from .fused_linear import MHPOLinearLoss, fused_linear_mhpo_loss

__version__ = "0.1.0"
__all__ = ["MHPOConfig", "ClipConfig", "SAPOConfig", "GSPOConfig", "CISPOConfig", "MHPOOutput", "mhpo_loss",
           "policy_loss", "policy_loss_from_logprobs", "token_logprobs", "fused_linear_mhpo_loss", "MHPOLinearLoss",
           "available_backends", "reference"]
