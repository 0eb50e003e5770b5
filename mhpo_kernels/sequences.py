"""Sequences and the aggregation weights of the fast path, in torch (O(N), no host sync).

The kernels' finishing step (``csrc/mhpo_finish.h``, ``triton_kernels/finish.py``)
computes the same weights; this is their torch twin, used by the ``torch``
backend. The ground truth is ``reference.aggregate``.

Every aggregation mode is a per-token weight ``w`` with ``loss = sum_n w_n L_n``
(``m`` the 0/1 or float mask, ``n_seq`` the sequences with ``sum m != 0``; ``agg_norm`` =
``(G, F, dp)``, :func:`mhpo_kernels._inputs.agg_norm`, where ``G`` replaces the local
count ``sum(m)`` / ``n_seq`` when it is not 0 and ``F`` replaces ``T``):

* ``token-mean``: ``dp * m / sum(m)``
* ``token-sum``: ``dp * m``
* ``seq-mean-token-mean``: ``dp * m / (count_s * n_seq)``
* ``seq-mean-token-sum``: ``dp * m / n_seq``
* ``seq-mean-token-sum-norm``: ``dp * m / (n_seq * T)`` (packed: ``T`` = the longest sequence)
"""
from __future__ import annotations

import torch

from ._constants import AGG_NORM_DEFAULT
from ._finish import AGG_IDS

AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM, AGG_TOKEN_SUM = (
    AGG_IDS["token-mean"], AGG_IDS["seq-mean-token-mean"], AGG_IDS["seq-mean-token-sum"],
    AGG_IDS["seq-mean-token-sum-norm"], AGG_IDS["token-sum"])
NO_NORM = AGG_NORM_DEFAULT  # agg_norm: local counts, T, one rank


def safe_div(a, b):
    """a / b with 0 where b == 0 (empty and fully masked batches give 0, not NaN)."""
    return a / torch.where(b == 0, torch.ones_like(b), b)


class Sequences:
    """Which sequence each of the N flattened tokens belongs to.

    Padded: ``num_seqs`` rows of ``seq_len`` tokens. Packed: ``cu_seqlens``
    ``[S+1]`` offsets; a layout that is not monotone is not an error here (the
    finishing step reports it), every token still lands in some sequence.
    """

    def __init__(self, num_seqs: int, seq_len: int, cu_seqlens, N: int, device):
        self.cu = cu_seqlens
        if cu_seqlens is None:
            self.num, self.T = num_seqs, seq_len
            self.t_norm = float(seq_len)  # seq-mean-token-sum-norm's default loss_scale_factor
            return
        cu = cu_seqlens.long()
        self.num = cu.numel() - 1
        tokens = torch.arange(N, device=device)
        # sequence of token n: the last s with cu[s] <= n (clamped, so bad layouts stay in range)
        self.seg = (torch.searchsorted(cu[1:], tokens, right=True)).clamp(max=max(self.num - 1, 0))
        self.t_norm = cu.diff().max() if self.num else cu.new_zeros(())  # the longest sequence

    def sum(self, x):
        """[N] -> [S] per-sequence sums."""
        if self.cu is None:
            return x.reshape(self.num, self.T).sum(-1)
        return x.new_zeros(self.num).index_add_(0, self.seg, x)

    def expand(self, y):
        """[S] -> [N]: each token gets its sequence's value."""
        if self.cu is None:
            return y[:, None].expand(self.num, self.T).reshape(-1)
        return y[self.seg]

    def mean_log_ratio(self, m, delta):
        """Each token's sequence log-ratio ``sum_t m delta / sum_t m`` (0 for a fully masked sequence)."""
        return self.expand(safe_div(self.sum(m * delta), self.sum(m)))

    def weights(self, m, agg: int, agg_norm=NO_NORM):
        """Per-token ``w`` with ``loss = sum(w * L)`` for aggregation id ``agg`` (``constants.AGG_IDS``)
        and the normalisers ``agg_norm`` (``constants.AGG_NORM``)."""
        g_count, scale_factor, dp = (float(v) for v in agg_norm)
        m_dp = m * dp
        if agg == AGG_TOKEN_SUM:
            return m_dp
        if agg == AGG_TOKEN_MEAN:
            return safe_div(m_dp, m.sum() if g_count == 0 else m.new_tensor(g_count))
        count = self.sum(m)
        n_seq = (count != 0).sum().to(m.dtype) if g_count == 0 else m.new_tensor(g_count)
        if agg == AGG_SEQ_MEAN_TOKEN_MEAN:
            return safe_div(m_dp * self.expand(safe_div(torch.ones_like(count), count)), n_seq)
        if agg == AGG_SEQ_MEAN_TOKEN_SUM:
            return safe_div(m_dp, n_seq)
        if agg == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
            t = self.t_norm if scale_factor == 0 else scale_factor
            t = t.to(m.dtype) if isinstance(t, torch.Tensor) else m.new_tensor(t)
            return safe_div(m_dp, n_seq * t)
        raise ValueError(f"unknown aggregation id {agg}")
