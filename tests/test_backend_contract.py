"""The launcher contract (mhpo_kernels.backends): every registered backend, launcher by launcher,
against the float64 reference, plus a toy backend that registers itself with one row.

The parameter is named ``launcher`` (not ``backend``): these tests call the launchers directly,
so the device audit of tests/conftest.py, which stops at the public entry points, leaves them out.
"""
import pytest
import toy_backend
import torch
from util import TOL, assert_close, device_for

import mhpo_kernels as mk
from mhpo_kernels import backends, reference
from mhpo_kernels._finish import AGG_IDS, BAD_CU_SEQLENS, BAD_NONE, BAD_TARGET, METRICS, finish_mode, metric_names
from mhpo_kernels.config import MODE_NONE, ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig

F32 = TOL[torch.float32]


@pytest.fixture(autouse=True, scope="module")
def toy():
    backends.register(toy_backend.ROW)
    yield
    backends.unregister("toy")


def _launchers():
    have = set()
    for dev in ("cpu", "cuda"):
        have |= {b for b in mk.available_backends(dev) if b != backends.REFERENCE}
    return [b for b in backends.REGISTRY if b in have] + ["toy"]


LAUNCHERS = _launchers()


def _device(name):
    return device_for("torch" if name == "toy" else name)


def _case(name, N=13, V=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[3] = -100
    old = torch.randn(N, generator=g) - 3
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, generator=g) > 0.2).float()
    ref = torch.randn(N, generator=g) - 3
    old[mask == 0], adv[mask == 0] = float("inf"), float("nan")  # padding garbage nobody may read
    dev = _device(name)
    return [t.to(dev) for t in (logits, target, old, adv, mask, ref)]


def test_registry_is_the_one_table():
    assert backends.names() == ("auto", *backends.REGISTRY, "reference")
    assert "toy" in backends.REGISTRY and "toy" in mk.available_backends("cpu")
    assert backends.resolve("auto", torch.device("cpu")) != "toy", "a row without auto= is opt-in"
    with pytest.raises(ValueError, match="is taken"):
        backends.register(toy_backend.ROW)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("nope", torch.device("cpu"))


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("vocab_start", [0, 5])
def test_fwd_log_probs(launcher, vocab_start):
    logits, target, old, adv, mask, _ = _case(launcher)
    kb = backends.get(launcher)
    shard_target = torch.where(target >= 0, target + vocab_start, target)  # global ids of a shard at vocab_start
    logp, ent, lse, loss, coef = kb.fwd(logits, shard_target, old, adv, mask, None, MODE_NONE, [0.0] * 8, 0.0, 0.7,
                                        -100, True, vocab_start=vocab_start)
    want_lp, want_ent = reference.token_logprobs_entropy(logits.double(), target, 0.7, -100, torch.float64)
    assert_close(logp, want_lp, *F32, "logp")
    assert_close(ent, want_ent, *F32, "entropy")
    assert_close(lse, torch.logsumexp(logits.double() / 0.7, -1), *F32, "lse")
    assert torch.equal(loss.cpu(), torch.zeros(13)) and torch.equal(coef.cpu(), torch.zeros(13))


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("cfg", [MHPOConfig(), ClipConfig(0.2, 0.28, dual_clip_c=3.0), SAPOConfig()],
                         ids=["mhpo", "clip-dual", "sapo"])
def test_fwd_epilogue(launcher, cfg):
    """Per-token loss and d loss / d logp in the forward's epilogue (+ beta * k3 KL)."""
    logits, target, old, adv, mask, ref = _case(launcher, seed=1)
    kb = backends.get(launcher)
    logp, _, _, loss, coef = kb.fwd(logits, target, old, adv, mask, ref, cfg.kernel_mode, list(cfg.kernel_params()),
                                    0.1, 1.0, -100, False)
    lp = reference.token_logprobs_entropy(logits.double(), target, 1.0, -100, torch.float64)[0].requires_grad_()
    active = (mask != 0) & (target != -100)
    zero = torch.zeros_like(lp)
    delta = torch.where(active, lp - old.double(), zero)
    d = torch.where(active, ref.double() - lp, zero)
    want = torch.where(active, reference.token_loss(delta, torch.where(active, adv.double(), zero), cfg)
                       + 0.1 * (torch.exp(d) - d - 1), zero)
    (want_coef,) = torch.autograd.grad(want.sum(), lp)
    assert_close(loss, want.detach(), *F32, "loss")
    assert_close(coef, want_coef, *F32, "coef")


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_bwd(launcher, inplace):
    logits, target, *_ = _case(launcher, seed=2)
    kb = backends.get(launcher)
    dev = logits.device
    z = logits.double().requires_grad_()
    lp, ent = reference.token_logprobs_entropy(z, target, 0.9, -100, torch.float64)
    g = torch.Generator().manual_seed(3)
    dlogp, dent = torch.randn(13, generator=g), torch.randn(13, generator=g)
    scale = torch.tensor(1.7)
    ((lp * dlogp.double().to(dev)).sum() * 1.7 + (ent * dent.double().to(dev)).sum()).backward()
    lse = torch.logsumexp(logits.double() / 0.9, -1).float()
    out = logits.clone() if inplace else torch.empty_like(logits)
    src = out if inplace else logits
    kb.bwd(src, target, lse, ent.detach().float(), dlogp.to(dev), dent.to(dev), 0.9, -100, out,
           scale=scale.to(dev))
    assert_close(out, z.grad, *F32, "grad")
    assert torch.equal(out[3].cpu(), torch.zeros(37)), "ignored rows get exact zeros"


FINISH_CASES = [
    (MHPOConfig(), "token", "token-mean", False), (MHPOConfig(), "sequence", "seq-mean-token-mean", True),
    (ClipConfig(dual_clip_c=3.0), "token", "seq-mean-token-sum", False),
    (ClipConfig(0.2, 0.28), "token", "seq-mean-token-sum-norm", True),
    (SAPOConfig(), "token", "seq-mean-token-mean", False), (GSPOConfig(), "sequence", "seq-mean-token-mean", True),
]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("cfg,level,agg,packed", FINISH_CASES,
                         ids=[f"{type(c).__name__}-{lv}-{a}-{'packed' if p else 'padded'}"
                              for c, lv, a, p in FINISH_CASES])
def test_finish(launcher, cfg, level, agg, packed):
    """loss, d loss / d logp and every metric of the O(N) step against reference.policy_loss_from_logprobs."""
    logits, target, old, adv, mask, ref = _case(launcher, N=12, seed=4)
    dev = logits.device
    logp = reference.token_logprobs_entropy(logits.double(), target, 1.0, -100, torch.float64)[0]
    ent = torch.rand(12, generator=torch.Generator().manual_seed(5)).to(dev) * 3
    cu = torch.tensor([0, 5, 5, 12], device=dev) if packed else None
    S, T = (1, 12) if packed else (3, 4)
    kb = backends.get(launcher)
    loss, dlogp, metrics, bad = kb.finish(
        logp.float(), ent, old, adv, mask, ref, target, cu, S, T, finish_mode(cfg), list(cfg.kernel_params()), 0.1,
        level == "sequence", AGG_IDS[agg], -100, 37, True)
    assert bad.tolist()[0] == BAD_NONE
    m = torch.where(target == -100, 0.0, mask).double()
    lp = logp.clone().requires_grad_()
    shape = (12,) if packed else (3, 4)
    want = reference.policy_loss_from_logprobs(
        lp.reshape(shape), old.double().reshape(shape), adv.double().reshape(shape), m.reshape(shape),
        ratio_control=cfg, importance_sampling_level=level, cu_seqlens=cu, loss_agg_mode=agg,
        ref_logprobs=ref.double().reshape(shape), beta=0.1)
    want.loss.backward()
    assert_close(loss, want.loss.detach(), *F32, "loss")
    assert_close(dlogp, lp.grad, *F32, "dlogp")
    active = m != 0
    want_ent = (ent.double() * active).sum() / active.sum()
    for name in metric_names(cfg, False, True):
        assert_close(metrics[METRICS.index(name)], want.metrics[name].double(), *F32, name)
    assert_close(metrics[METRICS.index("entropy_mean")], want_ent, *F32, "entropy_mean")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_finish_records_bad_input(launcher):
    logits, target, old, adv, mask, ref = _case(launcher, N=12, seed=6)
    dev = logits.device
    kb = backends.get(launcher)
    lp = torch.zeros(12, device=dev)
    args = (MODE_NONE, [0.0] * 8, 0.0, False, 0, -100, 37)
    bad_ids = target.clone()
    bad_ids[7], bad_ids[9] = 37, -5
    *_, bad = kb.finish(lp, None, old, adv, mask, None, bad_ids, None, 3, 4, *args, True)
    assert bad.tolist() == [BAD_TARGET, 7]
    *_, bad = kb.finish(lp, None, old, adv, mask, None, bad_ids, None, 3, 4, *args, False)
    assert bad.tolist()[0] == BAD_NONE, "check=False reads no id"
    cu = torch.tensor([0, 6, 4, 12], device=dev)
    *_, bad = kb.finish(lp, None, old, adv, mask, None, target, cu, 3, 4, *args, True)
    assert bad.tolist()[0] == BAD_CU_SEQLENS


@pytest.mark.parametrize("entry", ["policy_loss", "token_logprobs", "from_logprobs", "fused_linear"])
def test_toy_backend_through_the_entry_points(entry):
    """A registered backend is reachable by name from every entry point and matches the reference."""
    logits, target, old, adv, mask, ref = _case("toy", N=12, seed=7)
    cfg = ClipConfig(0.2, 0.28)

    def run(backend):
        z = logits.clone().requires_grad_()
        if entry == "policy_loss":
            out = mk.policy_loss(z, target, old, adv, mask, ratio_control=cfg, ref_logprobs=ref, beta=0.1,
                                 backend=backend, return_entropy=True)
            (out.loss + 0.01 * out.entropy.sum()).backward()
            return out.loss, z.grad
        if entry == "token_logprobs":
            logp, ent = mk.token_logprobs(z, target, return_entropy=True, backend=backend)
            (logp.sum() + ent.sum()).backward()
            return logp, z.grad
        if entry == "from_logprobs":
            lp = torch.log_softmax(z.double(), -1).gather(1, target.clamp(min=0)[:, None])[:, 0].float()
            out = mk.policy_loss_from_logprobs(lp, old, adv, mask * (target >= 0), ratio_control=cfg, backend=backend)
            out.loss.backward()
            return out.loss, z.grad
        w = torch.randn(37, 8, generator=torch.Generator().manual_seed(8)).requires_grad_()
        h = (torch.randn(12, 8, generator=torch.Generator().manual_seed(9)) / 3).requires_grad_()
        out = mk.fused_linear_mhpo_loss(h, w, target, old, adv, mask, ratio_control=cfg, backend=backend)
        out.loss.backward()
        return out.loss, w.grad

    got, g_got = run("toy")
    want, g_want = run("reference")
    assert_close(got, want.detach(), *F32, "value")
    assert_close(g_got, g_want, *F32, "grad")
