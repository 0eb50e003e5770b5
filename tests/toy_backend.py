"""A toy backend, as README's "Adding a backend" shows: one module with the launchers, one registry row.

Its ``fwd`` and ``bwd`` are the contract written out in float64 torch (``log_softmax`` and the
closed-form gradient); ``finish`` is borrowed from the ``torch`` backend, as a new backend may
do until it has its own. tests/test_backend_contract.py registers it and runs it through the
launcher-contract tests and the public entry points.
"""
import sys

import torch

from mhpo_kernels import backends
from mhpo_kernels.backends import pytorch
from mhpo_kernels.config import MODE_NONE


def fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy,
        vocab_start=0):
    if mode != MODE_NONE:  # the per-token epilogue: the torch backend's
        return pytorch.fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index,
                           want_entropy, vocab_start)
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    lse = torch.logsumexp(logits.double() / temperature, -1)
    y = target - vocab_start
    owned = (target != ignore_index) & (y >= 0) & (y < logits.shape[1])
    logp = torch.where(owned, logp_all.gather(1, y.clamp(0, logits.shape[1] - 1)[:, None])[:, 0], 0.0)
    p = logp_all.exp()
    ent = torch.where(target != ignore_index, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1), 0.0)
    zero = torch.zeros_like(lse)
    return (logp.float(), ent.float() if want_entropy else lse.new_empty(0).float(), lse.float(), zero.float(),
            zero.float())


def bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0, scale=None):
    lp = logits.double() / temperature - lse.double()[:, None]
    p = lp.exp()
    g = dlogp.double() * (1.0 if scale is None else scale.double())
    onehot = (torch.arange(logits.shape[1], device=logits.device)[None, :] + vocab_start) == target[:, None]
    grad = g[:, None] * (onehot.double() - p)
    if dent is not None:
        grad = grad - dent.double()[:, None] * p * torch.where(p > 0, lp + entropy.double()[:, None], 0.0)
    out.copy_(torch.where((target != ignore_index)[:, None], grad / temperature, 0.0))
    return out


finish = pytorch.finish

ROW = backends.Backend("toy", lambda: sys.modules[__name__], devices=(backends.ANY_DEVICE,))
