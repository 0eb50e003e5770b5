"""mhpo_kernels.integrations.fused_logits: verl's and TRL's log-prob / entropy helpers, fused.

Quick (no peer package): the drop-ins against float64 ``log_softmax`` (values, gradients, dtypes),
the one pass that serves log-probs and entropy (counted backend launches) and where it must not,
the patch mechanics on a stand-in package, CPU peak memory. Slow (``bash .ci/peers.sh`` installs
verl 0.9.1 and trl 1.16.0; without them these skip): against verl's and TRL's own functions,
``patch_verl`` / ``patch_trl`` on the real modules, their peak memory, ``torch.compile`` as verl's
engines wrap the entropy.
"""
import collections
import contextlib
import gc
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mhpo_kernels import backends
from mhpo_kernels.integrations import fused_logits as fl
from mhpo_kernels.tools.bench_utils import PeakMemory, cpu_peak_method

HAVE_VERL = importlib.util.find_spec("verl") is not None
HAVE_TRL = importlib.util.find_spec("trl") is not None
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="verl is not installed (bash .ci/peers.sh installs it)")
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="trl is not installed (bash .ci/peers.sh installs it)")
BF16_GRAD = dict(rtol=1.6e-2, atol=1e-3)  # one bf16 rounding of the gradient


def logits_case(shape, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(*shape, V, generator=g)).to(dtype)
    return z, torch.randint(0, V, shape, generator=g)


def ref(z, y, temperature=1.0):
    """float64 ``(log_softmax(z / T)[y], entropy of softmax(z))``: verl's and TRL's math."""
    zz = z.double()
    lp = F.log_softmax(zz / temperature, -1)
    h = -(lp.exp() * lp).sum(-1) if temperature == 1.0 else None
    return lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), h


def grads(fn, z, seed=1):
    """``(outputs, d sum(w * outputs) / d z)`` for random weights w, outputs upcast to float64."""
    x = z.detach().clone().requires_grad_()
    outs = fn(x)
    g = torch.Generator().manual_seed(seed)
    total = sum((torch.randn(o.shape, generator=g, dtype=torch.float64) * o.double()).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], x.grad


def close(actual, expected, what, **tol):
    tol = tol or dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.double(), expected.double(), msg=lambda m: f"{what}: {m}", **tol)


@pytest.fixture
def launches(monkeypatch):
    """Counter of backend forward / backward launches (``fwd``, ``bwd``)."""
    counts, real = collections.Counter(), backends.get

    class Counting:
        def __init__(self, kb):
            self.kb = kb

        def __getattr__(self, name):
            attr = getattr(self.kb, name)
            if name not in ("fwd", "bwd"):
                return attr

            def counted(*a, **k):
                counts[name] += 1
                return attr(*a, **k)
            return counted

    monkeypatch.setattr(backends, "get", lambda name: Counting(real(name)))
    return counts


# ---------------------------------------------------------------------- the drop-ins, no peer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((3, 7), 131), ((10,), 1009)])  # V prime; [B, T, V] and [N, V]
def test_verl_dropins_match_log_softmax(dtype, shape, V):
    z, y = logits_case(shape, V, dtype)
    want_lp, want_h = ref(z, y)
    fns = {"logprobs": (lambda x: fl.verl_logprobs_from_logits(x, y), 0, torch.float32),
           "entropy": (fl.verl_entropy_from_logits, 1, dtype),  # verl's: the logits' dtype
           "entropy_chunking": (lambda x: fl.verl_entropy_from_logits_with_chunking(x, chunk_size=4), 1,
                                torch.float32)}
    for what, (fn, k, out_dtype) in fns.items():
        (out,), grad = grads(lambda x, fn=fn: [fn(x)], z)
        (want,), want_grad = grads(lambda x, k=k: [ref(x, y)[k]], z)
        assert out.shape == shape and out.dtype == out_dtype, (what, out.shape, out.dtype)
        close(out, want, what, **({} if out_dtype != torch.bfloat16 else dict(rtol=8e-3, atol=1e-2)))
        assert grad.dtype == dtype
        close(grad, want_grad, f"{what} grad", **({} if dtype == torch.float32 else BF16_GRAD))


def test_verl_dropins_float64():
    z, y = logits_case((5,), 37, torch.float64)
    want_lp, want_h = ref(z, y)
    lp, h = fl.verl_logprobs_from_logits(z, y), fl.verl_entropy_from_logits(z)
    assert lp.dtype == h.dtype == torch.float64
    close(lp, want_lp, "logprobs", rtol=1e-12, atol=1e-12)
    close(h, want_h, "entropy", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_dropins_match_log_softmax(dtype):
    z, y = logits_case((3, 6), 97, dtype)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    T = 0.7
    want_lp, _ = ref(z, y, T)
    _, want_h = ref(z, y)
    tol = {} if dtype == torch.float32 else BF16_GRAD
    (lp,), grad = grads(lambda x: [fl.trl_selective_log_softmax(x, y, temperature=T)], z)
    _, want_grad = grads(lambda x: [ref(x, y, T)[0]], z)
    assert lp.dtype == torch.float32
    close(lp, want_lp, "selective_log_softmax")
    close(grad, want_grad, "selective_log_softmax grad", **tol)
    (h,), grad = grads(lambda x: [fl.trl_entropy_from_logits(x)], z)
    _, want_grad = grads(lambda x: [ref(x, y)[1]], z)
    assert h.dtype == torch.float32
    close(h, want_h, "entropy_from_logits")
    close(grad, want_grad, "entropy_from_logits grad", **tol)
    for m in (mask, mask.bool()):  # TRL's row_mask: zero outputs and gradient on rows whose mask is 0
        (lp, h), grad = grads(lambda x, m=m: list(fl.trl_selective_log_softmax_and_entropy(x, y, row_mask=m)), z)
        _, want_grad = grads(lambda x, m=m: [r * m for r in ref(x, y)], z)
        close(lp, ref(z, y)[0] * m, "and_entropy logp")
        close(h, want_h * m, "and_entropy entropy")
        close(grad, want_grad, "and_entropy grad", **tol)
        assert (grad[mask == 0] == 0).all()
        close(fl.trl_selective_log_softmax(z, y, row_mask=m), ref(z, y)[0] * m, "masked selective_log_softmax")
    _, h = fl.trl_selective_log_softmax_and_entropy(z.clone().requires_grad_(), y, entropy_requires_grad=False)
    assert h.grad_fn is None
    with pytest.raises(ValueError, match="temperature"):
        fl.trl_selective_log_softmax(z, y, temperature=0.0)


# ---------------------------------------------------------------------- one pass for both


def test_log_probs_then_entropy_is_one_pass(launches):
    z, y = logits_case((4, 5), 53, torch.bfloat16)
    (lp0, h0), grad0 = grads(lambda x: [fl.verl_logprobs_from_logits(x, y), fl.verl_entropy_from_logits(x)], z)
    assert launches == {"fwd": 2, "bwd": 2}  # not sharing: a pass each
    launches.clear()
    with fl.share_entropy():
        (lp, h), grad = grads(lambda x: [fl.verl_logprobs_from_logits(x, y), fl.verl_entropy_from_logits(x)], z)
    assert launches == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(lp, lp0, rtol=0, atol=0)
    torch.testing.assert_close(h, h0, rtol=0, atol=0)
    close(grad, grad0, "grad", **BF16_GRAD)
    launches.clear()
    with fl.share_entropy():  # TRL's names, and the chunked verl entropy, the same way
        grads(lambda x: [fl.trl_selective_log_softmax(x, y), fl.trl_entropy_from_logits(x)], z)
        grads(lambda x: [fl.verl_logprobs_from_logits(x, y), fl.verl_entropy_from_logits_with_chunking(x)], z)
    assert launches == {"fwd": 2, "bwd": 2}
    launches.clear()
    with fl.share_entropy():  # entropy first (verl's engines): the entropy call has no labels
        grads(lambda x: [fl.verl_entropy_from_logits(x), fl.verl_logprobs_from_logits(x, y)], z)
    assert launches == {"fwd": 2, "bwd": 2}


def _no_grad_logprobs(x, y):
    with torch.no_grad():
        return fl.verl_logprobs_from_logits(x, y)


def _edited(x, y):
    lp = fl.verl_logprobs_from_logits(x, y)
    with torch.no_grad():
        x.mul_(0.5)  # verl's in-place temperature division, after the log-probs
    return lp


REFUSED = {  # log-prob call, then the entropy call: each must compute the entropy afresh
    "other tensor": lambda x, y: fl.verl_logprobs_from_logits(x * 1, y),
    "in-place edit": _edited,
    "grad mode": _no_grad_logprobs,
    "temperature": lambda x, y: fl.trl_selective_log_softmax(x, y, temperature=2.0),
    "row_mask": lambda x, y: fl.trl_selective_log_softmax(x, y, row_mask=torch.ones_like(y)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_entropy_is_not_shared_when_unsafe(case, launches):
    logp_fn = REFUSED[case]
    z, y = logits_case((3, 4), 29, torch.float32)
    x = z.clone().requires_grad_()
    with fl.share_entropy():
        xx = x * 1  # a non-leaf, so the in-place edit is allowed
        lp = logp_fn(xx, y)
        h = fl.verl_entropy_from_logits(xx)
    assert launches["fwd"] == 2, case
    close(h, ref(xx.detach(), y)[1], case)
    assert h.grad_fn is not None and lp is not None


def test_kept_entropy_goes_with_the_log_probs(launches):
    z, y = logits_case((3, 4), 29, torch.float32)
    x = z.clone().requires_grad_()
    with fl.share_entropy():
        fl.verl_logprobs_from_logits(x, y)  # dropped at once: so is the kept entropy (and its graph)
        gc.collect()
        h = fl.verl_entropy_from_logits(x)
    assert launches["fwd"] == 2
    close(h, ref(z, y)[1], "entropy")


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_entropy_under_checkpoint(reentrant, launches):
    """verl's entropy_checkpointing, entropy first: the log-prob call keeps its entropy of the same logits,
    but the checkpoint's recomputation runs inside the backward, which never takes it."""
    z, y = logits_case((4, 6), 41, torch.float32)

    def fn(x):
        h = checkpoint(fl.verl_entropy_from_logits, x, use_reentrant=reentrant)
        return [fl.verl_logprobs_from_logits(x, y), h]

    (lp0, h0), grad0 = grads(fn, z)
    with fl.share_entropy():
        (lp, h), grad = grads(fn, z)
    assert launches["fwd"] == 2 * 3  # per run: entropy, log-probs, the recomputed entropy
    close(h, h0, "entropy", rtol=0, atol=0)
    close(grad, grad0, "grad", rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- patch mechanics


def _stand_in(monkeypatch):
    """A package ``mkfake`` with a source module and one module holding its functions by name."""
    src = types.ModuleType("mkfake.tf")

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        return "original"

    def entropy_from_logits(logits):
        return "original"

    src.logprobs_from_logits, src.entropy_from_logits = logprobs_from_logits, entropy_from_logits
    src.entropy_from_logits_with_chunking = entropy_from_logits
    user = types.ModuleType("mkfake.user")  # from mkfake.tf import logprobs_from_logits
    user.logprobs_from_logits = logprobs_from_logits
    other = types.ModuleType("elsewhere")  # not in the package: left alone
    other.logprobs_from_logits = logprobs_from_logits
    for m in (types.ModuleType("mkfake"), src, user, other):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    return src, user, other, logprobs_from_logits


def test_patch_rebinds_and_undo_restores(monkeypatch):
    src, user, other, orig = _stand_in(monkeypatch)
    new = {"logprobs_from_logits": fl.verl_logprobs_from_logits}
    handle = fl.Patch("mkfake", "mkfake.tf", new, True)
    assert handle.active and fl._sharing[0] == 1
    assert src.logprobs_from_logits is user.logprobs_from_logits is fl.verl_logprobs_from_logits
    assert other.logprobs_from_logits is orig and src.entropy_from_logits is not fl.verl_entropy_from_logits
    late = types.ModuleType("mkfake.late")  # imported while patched: binds the replacement
    late.logprobs_from_logits = src.logprobs_from_logits
    monkeypatch.setitem(sys.modules, "mkfake.late", late)
    with fl.Patch("mkfake", "mkfake.tf", new, True) as inner:  # nested: the outer one holds the name
        assert inner.replaced == {} and fl._sharing[0] == 2
    assert src.logprobs_from_logits is fl.verl_logprobs_from_logits and fl._sharing[0] == 1
    handle.undo()
    handle.undo()  # idempotent
    assert not handle.active and fl._sharing[0] == 0
    assert src.logprobs_from_logits is user.logprobs_from_logits is late.logprobs_from_logits is orig
    with fl.Patch("mkfake", "mkfake.tf", new, False):
        assert user.logprobs_from_logits is fl.verl_logprobs_from_logits and fl._sharing[0] == 0
    assert user.logprobs_from_logits is orig


# ---------------------------------------------------------------------- TRL's fused LM head, no peer


def head_case(N, H, V, dtype, seed=0, bias=True):
    """``(hidden, weight, bias, targets)`` of an lm_head with logits of a few units."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (0.4 * torch.randn(V, H, generator=g)).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    return h, w, b, torch.randint(0, V, (N,), generator=g)


def head_grads(fn, h, w, b, seed=1):
    """``(outputs that are not None, grads of sum(r * outputs) w.r.t. hidden, weight, bias)``, r random."""
    xs = [None if t is None else t.detach().clone().requires_grad_() for t in (h, w, b)]
    outs = [o for o in fn(*xs) if o is not None]
    g = torch.Generator().manual_seed(seed)
    sum((torch.randn(o.shape, generator=g, dtype=torch.float64) * o.double()).sum() for o in outs).backward()
    return [o.detach() for o in outs], [x.grad for x in xs if x is not None]


def head_ref(h, w, b, y, T):
    """float64 ``(log_softmax(z / T)[y], entropy of softmax(z / T))`` of ``z = h @ w.T + b``: TRL's math."""
    lp = F.log_softmax(F.linear(h.double(), w.double(), None if b is None else b.double()) / T, -1)
    return lp.gather(-1, y[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def close_grads(got, want, what, rtol):
    for name, g, e in zip(("hidden", "weight", "bias"), got, want):
        close(g, e, f"{what}: grad {name}", rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_head_matches_float64(dtype, bias):
    """The tiles behind a rerouted TRL head: log-probs and entropy at temperature 0.7, and their
    gradients w.r.t. hidden, weight and bias, against float64 (bf16: its logits' rounding)."""
    h, w, b, y = head_case(23, 16, 1009, dtype, bias=bias)
    outs, got = head_grads(lambda *x: fl.trl_chunked_logprobs(*x, y, 0.7, 32768, None, 1.0, ("log_probs", "entropy")),
                           h, w, b)
    want, exact = head_grads(lambda *x: head_ref(*x, y, 0.7), h, w, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for o, e, what in zip(outs, want, ("log_probs", "entropy")):
        assert o.dtype == torch.float32 and o.shape == (23,)
        close(o, e, what, **tol)
    close_grads(got, exact, "fused head", 1e-5 if dtype == torch.float32 else 3e-2)
    lp, ent, *rest = fl.trl_chunked_logprobs(h, w, b, y, 0.7, 32768, None, 1.0, ("log_probs",))
    assert ent is None and rest == [None, None, None]
    close(lp, want[0], "log_probs only", **tol)


# ---------------------------------------------------------------------- peak memory


N_MEM, V_MEM = 512, 16384  # bf16 logits 16 MiB; an [N, V] float32 tensor 32 MiB


def _peak(fn):
    with PeakMemory("cpu") as pm:
        out = fn()
        del out
    return pm.bytes


def _fwd_bwd(lp_fn, ent_fn, z, y):
    def run():
        x = z.detach().requires_grad_()
        lp, h = lp_fn(x, y), ent_fn(x)
        (lp.float().sum() + h.float().sum()).backward()
        return x.grad
    return run


def memory_case():
    if cpu_peak_method() != "vmhwm":
        pytest.skip("no resettable resident-set peak (/proc/self/clear_refs) here")
    if backends.resolve("auto", torch.device("cpu")) != "cpu":
        pytest.skip("the cpu backend is not built")
    z, y = logits_case((N_MEM,), V_MEM, torch.bfloat16)
    fl.verl_logprobs_from_logits(z[:8], y[:8])  # thread pools and first-call buffers: not the op's memory
    return z, y


def test_fused_path_allocates_no_float32_logits():
    z, y = memory_case()
    fp32 = N_MEM * V_MEM * 4
    with fl.share_entropy():
        fwd = _peak(lambda: (fl.verl_logprobs_from_logits(z, y), fl.verl_entropy_from_logits(z)))
        both = _peak(_fwd_bwd(fl.verl_logprobs_from_logits, fl.verl_entropy_from_logits, z, y))
    assert fwd < fp32 / 8, fwd  # O(N): no [N, V] anything
    assert both < 0.75 * fp32, both  # the one bf16 gradient (fp32 / 2), not a second one nor a float32 temporary


# ---------------------------------------------------------------------- against verl / TRL (slow)


@pytest.mark.slow
@needs_verl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((3, 7), 131), ((12,), 1009)])
def test_matches_verl(dtype, shape, V):
    import verl.utils.torch_functional as vF

    z, y = logits_case(shape, V, dtype, seed=3)
    pairs = {"logprobs": (lambda x: [fl.verl_logprobs_from_logits(x, y)], lambda x: [vF.logprobs_from_logits(x, y)]),
             "entropy": (lambda x: [fl.verl_entropy_from_logits(x)], lambda x: [vF.entropy_from_logits(x)])}
    if len(shape) == 1:  # verl's chunked entropy takes [N, V] only
        pairs["entropy_chunking"] = (lambda x: [fl.verl_entropy_from_logits_with_chunking(x, chunk_size=5)],
                                     lambda x: [vF.entropy_from_logits_with_chunking(x, chunk_size=5)])
    for what, (ours, theirs) in pairs.items():
        (out,), grad = grads(ours, z)
        (exact,), exact_grad = grads(theirs, z.float())  # verl's on the same values, in float32
        (own,), _ = grads(theirs, z)  # verl's in the logits' dtype
        assert out.shape == own.shape == shape
        if what == "entropy":
            assert out.dtype == own.dtype == dtype  # float32 log-probs: verl's flash-attn path (CUDA)
        elif what == "entropy_chunking":
            assert out.dtype == own.dtype == torch.float32
        close(out, exact, what, **({} if out.dtype != torch.bfloat16 else dict(rtol=8e-3, atol=1e-2)))
        close(out, own, f"{what} vs verl's {dtype}", **({} if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)))
        close(grad, exact_grad, f"{what} grad", **({} if dtype == torch.float32 else BF16_GRAD))


@pytest.mark.slow
@needs_trl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_trl(dtype):
    import trl.trainer.utils as tU

    z, y = logits_case((3, 8), 113, dtype, seed=4)
    mask = (torch.rand(3, 8, generator=torch.Generator().manual_seed(5)) > 0.3).long()
    pairs = {
        "selective_log_softmax": (lambda x: [fl.trl_selective_log_softmax(x, y, temperature=0.8)],
                                  lambda x: [tU.selective_log_softmax(x, y, temperature=0.8)]),
        "masked": (lambda x: [fl.trl_selective_log_softmax(x, y, row_mask=mask)],
                   lambda x: [tU.selective_log_softmax(x, y, row_mask=mask)]),
        "entropy_from_logits": (lambda x: [fl.trl_entropy_from_logits(x)], lambda x: [tU.entropy_from_logits(x)]),
        "and_entropy": (lambda x: list(fl.trl_selective_log_softmax_and_entropy(x, y, temperature=0.8,
                                                                                row_mask=mask)),
                        lambda x: list(tU.selective_log_softmax_and_entropy(x, y, temperature=0.8, row_mask=mask))),
    }
    for what, (ours, theirs) in pairs.items():
        outs, grad = grads(ours, z)
        exact, exact_grad = grads(theirs, z.float())
        own, _ = grads(theirs, z)
        for o, e, w in zip(outs, exact, own):
            assert o.shape == w.shape and o.dtype == torch.float32, (what, o.dtype)
            close(o, e, what)
            close(o, w, f"{what} vs TRL's {dtype}", **({} if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)))
        close(grad, exact_grad, f"{what} grad", **({} if dtype == torch.float32 else BF16_GRAD))
    topk = torch.topk(z.float(), 3, dim=-1).indices  # index [..., K]: TRL's own function, patched or not
    with fl.patch_trl():
        close(fl.trl_selective_log_softmax(z, topk), tU.selective_log_softmax(z, topk), "top-K")
        assert tU.selective_log_softmax is fl.trl_selective_log_softmax


@pytest.mark.slow
@needs_verl
def test_patch_verl(launches):
    import verl.utils.torch_functional as vF
    import verl.workers.rollout.naive.naive_rollout as naive  # binds logprobs_from_logits by name

    names = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
    originals = [getattr(vF, n) for n in names]
    orig_naive = naive.logprobs_from_logits
    assert orig_naive is originals[0]
    z, y = logits_case((6,), 37, torch.float32)
    with fl.patch_verl() as handle:
        assert [getattr(vF, n) for n in names] == [fl.verl_logprobs_from_logits, fl.verl_entropy_from_logits,
                                                   fl.verl_entropy_from_logits_with_chunking]
        assert naive.logprobs_from_logits is fl.verl_logprobs_from_logits
        lp, h = naive.logprobs_from_logits(z, y), vF.entropy_from_logits(z)
        assert launches["fwd"] == 1  # one shared pass, through verl's own names
        close(lp, ref(z, y)[0], "logprobs")
        close(h, ref(z, y)[1], "entropy")
    assert not handle.active
    assert [getattr(vF, n) for n in names] == originals and naive.logprobs_from_logits is orig_naive
    handle = fl.patch_verl(entropy=False)  # a plain call; log-probs only
    try:
        assert vF.logprobs_from_logits is fl.verl_logprobs_from_logits and vF.entropy_from_logits is originals[1]
    finally:
        handle.undo()
    assert vF.logprobs_from_logits is originals[0]


@pytest.mark.slow
@needs_trl
def test_patch_trl():
    import trl.experimental.cpo.cpo_trainer as cpo  # binds selective_log_softmax by name
    import trl.experimental.tpo.tpo_trainer as tpo  # binds selective_log_softmax_and_entropy by name
    import trl.trainer.utils as tU

    names = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
    originals = [getattr(tU, n) for n in names]
    held = (cpo.selective_log_softmax, tpo.selective_log_softmax_and_entropy)
    assert held == (originals[0], originals[2])
    handle = fl.patch_trl()
    try:
        assert [getattr(tU, n) for n in names] == [fl.trl_selective_log_softmax, fl.trl_entropy_from_logits,
                                                   fl.trl_selective_log_softmax_and_entropy]
        assert cpo.selective_log_softmax is fl.trl_selective_log_softmax
        assert tpo.selective_log_softmax_and_entropy is fl.trl_selective_log_softmax_and_entropy
    finally:
        handle.undo()
    assert [getattr(tU, n) for n in names] == originals
    assert (cpo.selective_log_softmax, tpo.selective_log_softmax_and_entropy) == held


@pytest.mark.slow
@needs_verl
def test_verl_allocates_float32_logits_where_fused_does_not():
    import verl.utils.torch_functional as vF

    z, y = memory_case()
    fp32 = N_MEM * V_MEM * 4
    theirs = {"entropy_from_logits": _peak(lambda: vF.entropy_from_logits(z)),
              "entropy_from_logits_with_chunking": _peak(lambda: vF.entropy_from_logits_with_chunking(z))}
    ours = {"entropy_from_logits": _peak(lambda: fl.verl_entropy_from_logits(z)),
            "entropy_from_logits_with_chunking": _peak(lambda: fl.verl_entropy_from_logits_with_chunking(z))}
    for name in theirs:
        assert theirs[name] >= 0.9 * fp32, (name, theirs[name])
        assert ours[name] < fp32 / 8, (name, ours[name])
    with fl.share_entropy():
        ours_both = _peak(_fwd_bwd(fl.verl_logprobs_from_logits, fl.verl_entropy_from_logits, z, y))
    theirs_both = _peak(_fwd_bwd(vF.logprobs_from_logits, vF.entropy_from_logits, z, y))
    assert ours_both < 0.75 * fp32 <= theirs_both, (ours_both, theirs_both)


@pytest.mark.slow
def test_compiled_entropy_matches_eager():
    """verl's engines call ``torch.compile(entropy_from_logits, dynamic=True)``: traced, it never takes
    the kept entropy, and gives eager's values and gradient."""
    z, y = logits_case((5, 7), 61, torch.bfloat16)
    compiled = torch.compile(fl.verl_entropy_from_logits, dynamic=True)
    (lp0, h0), g0 = grads(lambda x: [fl.verl_logprobs_from_logits(x, y), fl.verl_entropy_from_logits(x)], z)
    with fl.share_entropy():
        (lp, h), g = grads(lambda x: [fl.verl_logprobs_from_logits(x, y), compiled(x)], z)
    assert h.dtype == torch.bfloat16
    close(h, h0, "entropy", rtol=0, atol=0)
    close(g, g0, "grad", **BF16_GRAD)


@pytest.mark.slow
@needs_trl
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_head_matches_trl(dtype, bias):
    """The rerouted head's call against TRL's ``_ChunkedLogProbFunction`` on the same arguments (both
    outputs' gradients w.r.t. hidden, weight, bias; log-probs only as TRL's reference-model head)."""
    import trl.trainer.utils as tU

    h, w, b, y = head_case(23, 16, 1009, dtype, seed=6, bias=bias)
    for outputs in (("log_probs", "entropy"), ("log_probs",)):
        args = (y, 0.7, 32768, None, 1.0, outputs)
        outs, got = head_grads(lambda *x, a=args: fl.trl_chunked_logprobs(*x, *a), h, w, b)
        theirs, want = head_grads(lambda *x, a=args: tU._ChunkedLogProbFunction.apply(*x, *a), h, w, b)
        assert len(outs) == len(theirs) == len(outputs)
        for o, e, what in zip(outs, theirs, outputs):
            close(o, e, what, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)))  # bf16 logits
        close_grads(got, want, str(outputs), 1e-5 if dtype == torch.float32 else 3e-2)


FALLBACKS = {  # name -> (hidden, weight, bias, targets, args after the targets, backend) -> the same, changed
    "softcap": lambda h, w, b, y, a, be: (h, w, b, y, a[:2] + (30.0,) + a[3:], be),
    "logit_scale": lambda h, w, b, y, a, be: (h, w, b, y, a[:3] + (2.0,) + a[4:], be),
    "is_top1": lambda h, w, b, y, a, be: (h, w, b, y, a[:4] + (a[4] + ("is_top1",),), be),
    "reference": lambda h, w, b, y, a, be: (h, w, b, y, a, "reference"),
    "float64": lambda h, w, b, y, a, be: (h.double(), w.double(), b.double(), y, a, be),
    "no_rows": lambda h, w, b, y, a, be: (h[:0], w, b, y[:0], a, be),
}
ROUTED = {"routed": lambda *c: c,  # autocast's dtype is the head's: the hidden states go in cast, as TRL's
          "routed_autocast": lambda h, w, b, y, a, be: (h, w.bfloat16(), b.bfloat16(), y, a, be)}


@pytest.mark.slow
@needs_trl
@pytest.mark.parametrize("case", sorted(FALLBACKS) + ["autocast_bf16", "zero3"] + sorted(ROUTED))
def test_trl_head_falls_back_to_trl(case, trl_head_calls, monkeypatch):
    """Where the tiles here would not be exact (or cannot run), the call is TRL's own function's,
    unchanged; else TRL's is never called."""
    import trl.trainer.utils as tU

    h, w, b, y = head_case(9, 8, 131, torch.float32, seed=7)
    call = (h, w, b, y, (0.8, 32768, None, 1.0, ("log_probs", "entropy")), "auto")
    call = {**FALLBACKS, **ROUTED}.get(case, lambda *c: c)(*call)
    autocast = case in ("autocast_bf16", "routed_autocast")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    if case == "zero3":
        monkeypatch.setattr(fl, "_zero3", lambda: True)
    *tensors, args, backend = call
    with ctx:
        got = fl.trl_chunked_logprobs(*tensors, *args, backend=backend)
    assert len(trl_head_calls) == (0 if case in ROUTED else 1)
    with ctx:
        want = tU._ChunkedLogProbFunction.apply(*tensors, *args)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:  # TRL's own call: the same bits
            close(g, e, case, **({} if case == "routed" else dict(rtol=2e-2, atol=5e-2) if case in ROUTED else
                                 dict(rtol=0, atol=0)))


def tiny_causal_lm(V=257, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


@pytest.mark.slow
@needs_trl
def test_fuse_trl_lm_head_on_a_model(trl_head_calls):
    """fuse_trl_lm_head reroutes one model's TRL head (and only its): the model's log-probs, entropy,
    loss and every parameter's gradient equal those of a twin on TRL's head; its plain forward, its
    signature and trl.trainer.utils stay as they were."""
    import inspect

    import trl.trainer.utils as tU

    spy = tU._ChunkedLogProbFunction
    ours, twin = tiny_causal_lm(), tiny_causal_lm()
    for m in (ours, twin):
        tU.add_fused_lm_head(m, temperature=0.8, outputs=("log_probs", "entropy"))
    assert fl.fuse_trl_lm_head(ours, backend="torch") == 1
    assert fl.fuse_trl_lm_head(ours) == 1 and ours.forward.__func__._mhpo_trl_head.backend == "auto"  # again
    assert fl.fuse_trl_lm_head(tiny_causal_lm()) == 0  # no TRL head there
    assert tU._ChunkedLogProbFunction is spy and twin.forward.__func__.__globals__ is vars(tU)
    assert inspect.signature(ours.forward) == inspect.signature(twin.forward)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 257, (3, 7), generator=g)
    labels = ids.masked_fill(torch.rand(3, 7, generator=g) < 0.3, -100)
    r = torch.randn(2, 3, 6, generator=g)
    results = []
    for m in (ours, twin):
        m.zero_grad()
        out = m(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + (r[0] * out.log_probs).sum() + (r[1] * out.entropy).sum()).backward()
        results.append([out.loss.detach(), out.log_probs.detach(), out.entropy.detach()]
                       + [p.grad for p in m.parameters()])
        assert len(trl_head_calls) == (m is twin)
    for i, (a, e) in enumerate(zip(*results)):
        close(a, e, f"output / gradient {i}", rtol=1e-5, atol=1e-6 * max(e.abs().max().item(), 1.0))
    close(ours(input_ids=ids).logits, twin(input_ids=ids).logits, "plain forward", rtol=0, atol=0)
