"""The Triton forward's two chunk layouts against the float64 reference (interpreter or GPU).

The forward reads a row as [lanes, VEC] blocks, VEC = one 16-byte load, where Triton's launch
specialisation proves the rows 16-byte aligned (base % 16 bytes, row stride % 16 elements), and
as one element per lane otherwise. The grid in test_backends.py has no vocabulary that is a
multiple of 16, so it runs only the second: this file runs both on the same rows.
"""
import pytest
import torch

import mhpo_kernels as mk

from util import TOL, assert_close, backward_random, check_outputs, device_for, make_case

pytest.importorskip("triton")
from mhpo_kernels.triton_kernels import fused_logprob

pytestmark = pytest.mark.skipif("triton" not in mk.available_backends(device_for("triton")),
                                reason="triton backend not available")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layouts(logits, pad):
    """The same values in an aligned buffer (row stride a multiple of 16) and an unaligned one,
    each a leaf whose [:, :V] view is what the kernels get."""
    N, V = logits.shape
    out = {}
    for name, stride in (("aligned", -(-V // 16) * 16 + 16 * pad), ("unaligned", V + 1)):
        buf = torch.full((N, stride), float("nan"), dtype=logits.dtype, device=logits.device)
        buf[:, :V] = logits
        assert fused_logprob.rows_aligned(buf[:, :V]) == (name == "aligned")
        out[name] = buf.requires_grad_()
    return out


def run(buf, V, case, **kw):
    out = mk.mhpo_loss(buf[:, :V], *case[1:5], ref_logprobs=case[5], beta=0.1, return_entropy=True, **kw)
    backward_random(out, 3)
    return out, buf.grad[:, :V]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("V", [40, 4096 + 80])  # one masked block; whole blocks and a tail
def test_both_layouts_match_reference(dtype, V):
    case = make_case((6,), V, DTYPES[dtype], backend="triton", seed=V)
    logits = case[0]
    want, want_grad = run(logits.double().requires_grad_(), V, case, backend="reference", temperature=0.7)
    for buf in layouts(logits, pad=1).values():
        out, grad = run(buf, V, case, backend="triton", temperature=0.7)
        check_outputs(out, grad, want, want_grad, DTYPES[dtype])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_token_vocabulary_is_exact_in_both_layouts(temperature):
    case = make_case((7,), 1, torch.float32, backend="triton", seed=5, ignore_frac=0.2)
    ids = case[1]
    zero = torch.zeros(ids.shape, device=ids.device)
    for name, buf in layouts(case[0] * 40, pad=0).items():
        logp, ent = mk.token_logprobs(buf[:, :1], ids, temperature=temperature, return_entropy=True, backend="triton")
        assert torch.equal(logp, zero) and torch.equal(ent, zero), (name, logp, ent)
        (logp * 0.3 - ent * 1.7).sum().backward()
        assert torch.equal(buf.grad[:, :1], torch.zeros_like(logp)[:, None]), (name, buf.grad[:, :1])


def test_nan_and_inf_logits_in_both_layouts():
    """A NaN logit makes its row's log-prob and entropy NaN; -inf logits (a masked vocabulary, a
    row that is -inf but for its target) are weight 0."""
    V = 200
    logits = torch.randn(3, V, device=device_for("triton"))
    logits[1, 77] = float("nan")
    logits[0, 20:90] = float("-inf")
    logits[2, :7] = float("-inf")
    logits[2, 8:] = float("-inf")
    ids = torch.tensor([3, 5, 7], device=logits.device)
    want_logp, want_ent = mk.token_logprobs(logits.double(), ids, return_entropy=True, backend="reference")
    for name, buf in layouts(logits, pad=0).items():
        logp, ent = mk.token_logprobs(buf.detach()[:, :V], ids, return_entropy=True, backend="triton")
        assert logp[1].isnan() and ent[1].isnan(), name
        assert_close(logp[[0, 2]], want_logp[[0, 2]], *TOL[torch.float32], f"{name} logp")
        assert_close(ent[[0, 2]], want_ent[[0, 2]], *TOL[torch.float32], f"{name} entropy")
