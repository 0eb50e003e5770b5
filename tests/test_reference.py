"""The reference against docs/mhpo.md: gradcheck, the sanity table, the M(r) bound, ablations."""
import math

import pytest
import torch

import mhpo_kernels as mk
from mhpo_kernels import reference as R
from mhpo_kernels._inputs import LOSS_AGG_MODES

from util import make_case

# docs/mhpo.md's sanity table at the defaults: r -> (psi, zeta, exp(-zeta), weight, mult)
SANITY = {
    0.05: (-1.4457, 4.3888, 0.0124, 0.0029, 0.0002),
    0.5: (-0.6477, 2.0570, 0.1278, 0.0669, 0.0544),
    1.0: (0.0000, 1.3278, 0.2651, 0.2651, 0.2651),
    2.0: (0.6477, 1.3813, 0.2513, 0.4802, 0.3907),
    20.0: (1.4457, 2.2034, 0.1104, 0.4688, 0.0333),
}


def multiplier(delta, cfg):
    """M(r) = d loss / d logp at A = -1, by autograd through the reference."""
    delta = delta.clone().requires_grad_()
    R.token_loss(delta, -torch.ones_like(delta), cfg).sum().backward()
    return delta.grad


@pytest.mark.parametrize("r", sorted(SANITY))
def test_sanity_table(r):
    cfg = mk.MHPOConfig()
    delta = torch.tensor([math.log(r)], dtype=torch.float64)
    psi = R.lfm(delta, cfg)
    zeta = R.dhp(psi, cfg)
    weight = -R.token_loss(delta, torch.ones_like(delta), cfg)
    got = (psi.item(), zeta.item(), math.exp(-zeta.item()), weight.item(), multiplier(delta, cfg).item())
    for name, g, want in zip(("psi", "zeta", "exp(-zeta)", "weight", "mult"), got, SANITY[r]):
        assert round(g, 4) == pytest.approx(want, abs=1e-12), f"r={r} {name}: {g:.6f} vs {want}"


@pytest.mark.parametrize("c", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_multiplier_bound(c):
    cfg = mk.MHPOConfig(c=c)
    delta = torch.linspace(math.log(1e-30), math.log(1e30), 20001, dtype=torch.float64)
    M = multiplier(delta, cfg)
    assert torch.isfinite(M).all()
    assert M.abs().max().item() <= math.exp(c)
    psi = R.lfm(delta, cfg)  # the closed form of the spec, to make sure autograd saw the stop-gradient
    closed = torch.exp(psi - R.dhp(psi, cfg)) / torch.cosh(delta / c) ** 2
    torch.testing.assert_close(M, closed, rtol=1e-9, atol=1e-15)


def test_stop_gradient_on_zeta():
    # Without sg(zeta) the gradient picks up -dzeta/dpsi and flips sign at r = 2.
    cfg = mk.MHPOConfig()
    delta = torch.tensor([math.log(2.0), math.log(0.5)], dtype=torch.float64)
    M = multiplier(delta, cfg)
    psi = R.lfm(delta, cfg)
    expected = torch.exp(psi - R.dhp(psi, cfg)) * (1 - torch.tanh(delta / cfg.c) ** 2)
    torch.testing.assert_close(M, expected)
    assert (M > 0).all()


def test_ablations():
    delta = torch.linspace(-5, 5, 101, dtype=torch.float64)
    lfm_only, dhp_only = mk.MHPOConfig(use_dhp=False), mk.MHPOConfig(use_lfm=False)
    assert torch.equal(R.dhp(R.lfm(delta, lfm_only), lfm_only), torch.zeros_like(delta))
    torch.testing.assert_close(-R.token_loss(delta, torch.ones_like(delta), lfm_only),
                               torch.exp(1.5 * torch.tanh(delta / 1.5)))
    assert torch.equal(R.lfm(delta, dhp_only), delta)
    sym = mk.MHPOConfig(k_neg=1.5, lam_neg=1.0)
    z = R.dhp(delta, sym)
    torch.testing.assert_close(z, z.flip(0))  # symmetric hazard is even in psi


def test_clip_and_sapo_formulas():
    r = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 3.0], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 1.0, -2.0, 1.0, -1.0], dtype=torch.float64)
    clip = mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    want = -torch.minimum(r * A, r.clamp(0.8, 1.28) * A)
    want = torch.where(A < 0, torch.minimum(want, -3.0 * A), want)
    torch.testing.assert_close(R.token_loss(r.log(), A, clip), want)
    sapo = mk.SAPOConfig()
    delta = r.log().requires_grad_()
    R.token_loss(delta, A, sapo).sum().backward()
    tau = torch.where(A > 0, 1.0, 1.05)
    sig = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(delta.grad, -A * 4 * sig * (1 - sig) * r)


# gradcheck differentiates everything numerically, so it can only see functions
# without a stop-gradient: LFM-only MHPO (zeta = 0) and SAPO. The stop-gradient
# on zeta is checked against the closed form in test_multiplier_bound.
@pytest.mark.slow
@pytest.mark.parametrize("cfg", [mk.MHPOConfig(use_dhp=False), mk.SAPOConfig()], ids=["lfm", "sapo"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_gradcheck_float64(agg, cfg):
    logits, ids, old, adv, mask, ref = make_case((3, 5), 7, torch.float64, seed=1)
    logits.requires_grad_()

    def f(z):
        out = R.policy_loss(z, ids, old, adv, mask, ratio_control=cfg, loss_agg_mode=agg,
                            temperature=0.7, ref_logprobs=ref, beta=0.05, return_entropy=True)
        return out.loss, out.entropy

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8)


def test_aggregation_by_hand():
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert R.aggregate(L, m, "token-mean").item() == pytest.approx((1 + 2 + 7 + 8 + 9) / 5)
    assert R.aggregate(L, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 8) / 2)
    assert R.aggregate(L, m, "seq-mean-token-sum").item() == pytest.approx((3 + 24) / 2)
    # verl 0.9.1: the token sums / non-empty sequences / T; the previous 27 / (B * T) is global_batch_size=B
    assert R.aggregate(L, m, "seq-mean-token-sum-norm").item() == pytest.approx(27 / (2 * 3))
    assert R.aggregate(L, m, "seq-mean-token-sum-norm", global_batch_size=3).item() == pytest.approx(27 / 9)
    assert R.aggregate(L, m, "token-sum").item() == pytest.approx(27)
    # global normalisers: global counts replace the local ones, dp_size multiplies
    assert R.aggregate(L, m, "token-mean", global_num_tokens=10, dp_size=2).item() == pytest.approx(27 / 10 * 2)
    assert R.aggregate(L, m, "seq-mean-token-sum-norm", global_batch_size=4, loss_scale_factor=5,
                       dp_size=2).item() == pytest.approx(27 / 4 / 5 * 2)
    for agg in LOSS_AGG_MODES:
        assert R.aggregate(L, torch.zeros_like(m), agg).item() == 0.0


def test_reference_logprobs_and_entropy():
    logits, ids, *_ = make_case((11,), 13, torch.float64, seed=2, ignore_frac=0.3)
    logp, ent = R.token_logprobs_entropy(logits, ids, 1.3, -100, torch.float64)
    ls = torch.log_softmax(logits / 1.3, -1)
    valid = ids != -100
    torch.testing.assert_close(logp[valid], ls[valid].gather(1, ids[valid][:, None])[:, 0])
    torch.testing.assert_close(ent[valid], -(ls.exp() * ls).sum(-1)[valid])
    assert (logp[~valid] == 0).all() and (ent[~valid] == 0).all()
