"""The forward that writes the gradient (issue 12, mhpo_kernels/_fused_grad.py): the same loss,
log-probs, metrics and gradient as the two-kernel path (bit for bit where the math is the same),
``entropy_coeff=`` against the float64 reference, every fallback case (and that it really fell
back), AMP-style upstream gradients, in-place, torch.compile, ids checked before any gradient
exists, no host sync with ``check_ids=False``, and the forward's one [N, V] allocation."""
import pytest
import toy_backend
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from util import SCALAR_TOL, TOL, assert_close, assert_compiled_matches_eager, device_for, make_case

import mhpo_kernels as mk
from mhpo_kernels import _fused_grad, backends
from mhpo_kernels import reference as R
from mhpo_kernels._inputs import LOSS_AGG_MODES
from mhpo_kernels.sequences import Sequences

# the backends with a fwd_grad launcher that this process can run, each on its own device
FUSED = [b for b in ("cpu", "torch", "triton", "cuda") if b in mk.available_backends(device_for(b))
         and getattr(backends.get(b), "fwd_grad", None) is not None]
BITWISE = ("cpu", "torch")  # fwd_grad = their own fwd + bwd row code, so the same bits as the two kernels
MODES = {
    "mhpo": mk.MHPOConfig(),
    "mhpo_dhp_only": mk.MHPOConfig(use_lfm=False),
    "clip_dual": mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, delta=4.0),
    "sapo": mk.SAPOConfig(),
}
V = 37


def small(backend):
    """Shapes for the backend: Triton's interpreter is slow."""
    return (3, 5) if backend == "triton" else (4, 9)


class Spy:
    """Counts the launcher calls of one backend (fwd_grad vs fwd / bwd: which path ran)."""

    def __init__(self, monkeypatch, name):
        self.kb, self.calls, self.depth = backends.get(name), {}, 0
        for launcher in ("fwd", "bwd", "fwd_grad", "scale_grad"):
            f = getattr(self.kb, launcher, None)
            if f is not None:
                monkeypatch.setattr(self.kb, launcher, self._wrap(launcher, f))

    def _wrap(self, name, f):
        def spy(*args, **kw):
            if not self.depth:  # a launcher built from the others (the torch backend's) counts once
                self.calls[name] = self.calls.get(name, 0) + 1
            self.depth += 1
            try:
                return f(*args, **kw)
            finally:
                self.depth -= 1
        return spy

    def fused(self):
        return self.calls.get("fwd_grad", 0) == 1 and not self.calls.get("bwd") and not self.calls.get("fwd")

    def two_kernel(self):
        return not self.calls.get("fwd_grad") and self.calls.get("fwd") == 1


def run(logits, *args, g=None, fn=mk.policy_loss, **kw):
    """(out, grad) of one forward + backward (``g``: the loss's upstream gradient)."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    out.loss.backward(g)
    return out, x.grad


def assert_same(a, b, bitwise, dtype, what=""):
    (oa, ga), (ob, gb) = a, b
    if bitwise:
        assert torch.equal(oa.loss, ob.loss), f"{what} loss {oa.loss.item()} != {ob.loss.item()}"
        assert torch.equal(oa.logprobs, ob.logprobs), what
        assert torch.equal(ga, gb), f"{what} grad: max diff {(ga.double() - gb.double()).abs().max().item()}"
        for k in ob.metrics:
            assert torch.equal(oa.metrics[k], ob.metrics[k]), f"{what} metric {k}"
    else:
        assert_close(oa.loss, ob.loss, *SCALAR_TOL, f"{what} loss")
        assert_close(oa.logprobs, ob.logprobs, *SCALAR_TOL, f"{what} logprobs")
        assert_close(ga, gb, *TOL[dtype], f"{what} grad")
        for k in ob.metrics:
            assert_close(oa.metrics[k], ob.metrics[k], *TOL["metric"], f"{what} metric {k}", floor=1e-2)
    assert oa.metrics.keys() == ob.metrics.keys()


def case(backend, dtype=torch.float32, seed=0, packed=False):
    shape = small(backend)
    logits, ids, old, adv, mask, ref = make_case(shape, V, dtype, backend=backend, seed=seed)
    kw = {}
    if packed:  # [N, V] with three packed sequences
        N = shape[0] * shape[1]
        logits, ids, old, adv, mask, ref = (t.reshape(N, *t.shape[2:]) for t in (logits, ids, old, adv, mask, ref))
        kw["cu_seqlens"] = torch.tensor([0, 4, 4 + N // 3, N], device=logits.device)
    return (logits, ids, old, adv, mask), ref, kw


# ---------------------------------------------------------------------------- same results, both paths


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_matches_two_kernel_path(backend, mode, agg, monkeypatch):
    packed = agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm")
    args, ref, kw = case(backend, packed=packed, seed=len(agg))
    kw.update(ratio_control=MODES[mode], loss_agg_mode=agg, backend=backend, entropy_coeff=0.01,
              ref_logprobs=ref, beta=0.05 if mode == "mhpo" else 0.0, temperature=0.9)
    two = run(*args, fused_gradient=False, **kw)
    spy = Spy(monkeypatch, backend)
    fused = run(*args, fused_gradient=True, **kw)
    assert spy.fused(), spy.calls
    assert_same(fused, two, backend in BITWISE, torch.float32, f"{backend} {mode} {agg}")
    # and the float64 ground truth (entropy_coeff included)
    z = args[0].double().requires_grad_()
    rkw = {k: v for k, v in kw.items() if k != "backend"}
    want = R.policy_loss(z, args[1], *(t.double() for t in args[2:]), **rkw)
    want.loss.backward()
    assert_close(fused[0].loss, want.loss, *SCALAR_TOL, "loss vs reference")
    assert_close(fused[1], z.grad, *TOL[torch.float32], "grad vs reference")
    assert fused[0].metrics.keys() == want.metrics.keys() and "entropy_mean" in want.metrics


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("entropy_coeff", [0.0, -0.03])
def test_dtypes_and_mhpo_loss(backend, dtype, entropy_coeff, monkeypatch):
    args, _, _ = case(backend, dtype=dtype, seed=3)
    kw = dict(backend=backend, entropy_coeff=entropy_coeff, return_entropy=True, loss_agg_mode="seq-mean-token-sum")
    adv_b = args[3][:, 0].nan_to_num()  # one advantage per sequence, [B]
    two = run(*args[:3], adv_b, args[4], fn=mk.mhpo_loss, fused_gradient=False, **kw)
    spy = Spy(monkeypatch, backend)
    fused = run(*args[:3], adv_b, args[4], fn=mk.mhpo_loss, fused_gradient=True, **kw)
    assert spy.fused(), spy.calls
    assert fused[1].dtype == dtype
    assert_same(fused, two, backend in BITWISE, dtype, f"{backend} {dtype}")
    if backend in BITWISE:
        assert torch.equal(fused[0].entropy, two[0].entropy)
    assert_close(fused[0].entropy, two[0].entropy, *SCALAR_TOL, "entropy")


def test_weights_are_the_aggregation_weights():
    """_fused_grad.weights (one finish launch) gives Sequences.weights (the torch twin), every mode."""
    logits, ids, old, adv, mask, _ = make_case((9,), V, torch.float32, backend="cpu")
    cu = torch.tensor([0, 2, 2, 6, 9])
    for agg_name, agg in mk._finish.AGG_IDS.items():
        a = mk._ops.FwdArgs(logits, ids, old, adv, mask, None, cu, 1, 9, 1, [0.0] * 8, 0.0, False, agg, 1.0, -100,
                            False, True, False, "cpu")
        w, bad = _fused_grad.weights(backends.get("cpu"), a, True)
        m = torch.where(ids == -100, 0.0, mask)
        assert_close(w, Sequences(1, 9, cu, 9, "cpu").weights(m, agg), *SCALAR_TOL, agg_name)
        assert int(bad[0]) == 0


# ---------------------------------------------------------------------------- the fallbacks, each


@pytest.mark.parametrize("why", ["no_grad", "no_requires_grad", "gspo", "sequence_level", "opt_out", "toy"])
def test_falls_back(why, monkeypatch):
    """Every case where the forward cannot write the gradient runs the two-kernel path, same results."""
    backend = "toy" if why == "toy" else "cpu"
    if why == "toy":
        backends.register(toy_backend.ROW)
        monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))  # undone after the test
        backends.unregister("toy")
        backends.register(toy_backend.ROW)
    args, _, kw = case("cpu", packed=True)
    kw.update(backend=backend, entropy_coeff=0.02, loss_agg_mode="seq-mean-token-mean")
    if why == "gspo":
        kw["ratio_control"] = mk.GSPOConfig()
    if why == "sequence_level":
        kw.update(ratio_control=mk.MHPOConfig(), importance_sampling_level="sequence")
    fused_gradient = False if why == "opt_out" else True
    a = args[0].detach().clone().requires_grad_(why != "no_requires_grad")
    spy = Spy(monkeypatch, backend)
    with torch.set_grad_enabled(why != "no_grad"):
        out = mk.policy_loss(a, *args[1:], fused_gradient=fused_gradient, **kw)
    assert spy.two_kernel(), spy.calls
    want = mk.policy_loss(args[0], *args[1:], fused_gradient=False, **kw)
    assert torch.equal(out.loss, want.loss)
    if out.loss.requires_grad:
        out.loss.backward()
        assert spy.calls.get("bwd") == 1
        x = args[0].detach().clone().requires_grad_()
        mk.policy_loss(x, *args[1:], fused_gradient=False, **kw).loss.backward()
        assert torch.equal(a.grad, x.grad)
    if why == "toy":
        assert "has no fwd_grad" in _fused_grad.why_not(mk._ops.FwdArgs(
            a, args[1], args[2], args[3], None, None, None, 1, 1, 1, [0.0] * 8, 0.0, False, 0, 1.0, -100, False,
            False, False, "toy"), True)
        backends.unregister("toy")


def test_auto_is_on_for_cpu_only():
    args, _, _ = case("cpu")
    x = args[0].reshape(-1, V).requires_grad_()
    flat = [t.reshape(-1) for t in args[1:]]
    a = mk._ops.FwdArgs(x, flat[0], flat[1], flat[2], flat[3], None, None, 1, x.shape[0], 1, [1.0] * 8, 0.0, False,
                        0, 1.0, -100, False, False, False, "cpu")
    assert _fused_grad.why_not(a, None) == "" and _fused_grad.why_not(a, True) == ""
    assert "fused_gradient=False" in _fused_grad.why_not(a, False)
    assert _fused_grad.AUTO_DEVICES == ("cpu",)


def test_vocab_parallel_takes_entropy_coeff(monkeypatch):
    """process_group: the two-kernel path (the gradient needs the all-reduced lse); entropy_coeff still
    applies (one gloo rank holding the whole vocabulary = the single-process result)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import tempfile

    args, _, _ = case("cpu")
    kw = dict(backend="cpu", entropy_coeff=0.05, loss_agg_mode="token-mean")
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            spy = Spy(monkeypatch, "cpu")
            got = run(*args, fn=mk.mhpo_loss, process_group=dist.group.WORLD, **kw)
            assert not spy.calls.get("fwd_grad"), spy.calls
        finally:
            dist.destroy_process_group()
    want = run(*args, fn=mk.mhpo_loss, fused_gradient=False, **kw)
    assert_close(got[0].loss, want[0].loss, *SCALAR_TOL, "loss")
    assert_close(got[1], want[1], *TOL[torch.float32], "grad")


@pytest.mark.parametrize("backend", FUSED)
def test_entropy_gradient_from_elsewhere_falls_back_in_backward(backend, monkeypatch):
    """return_entropy=True and a gradient for the entropy: the backward recomputes the two-kernel
    gradient (into the same buffer); the loss alone still takes the forward's buffer."""
    args, _, _ = case(backend, seed=5)
    kw = dict(backend=backend, return_entropy=True, entropy_coeff=0.01)
    g_ent = torch.randn(args[1].shape, generator=torch.Generator().manual_seed(0)).to(args[0].device)
    grads = []
    for fg in (True, False):
        x = args[0].detach().clone().requires_grad_()
        spy = Spy(monkeypatch, backend)
        out = mk.mhpo_loss(x, *args[1:], fused_gradient=fg, **kw)
        torch.autograd.backward([out.loss, out.entropy], [torch.tensor(1.0, device=x.device), g_ent])
        assert spy.calls.get("bwd") == 1, spy.calls
        grads.append(x.grad)
        monkeypatch.undo()
    if backend in BITWISE:
        assert torch.equal(*grads)
    else:
        assert_close(*grads, *TOL[torch.float32], "grad")


def test_logp_gradient_from_elsewhere_falls_back():
    """The public entry points detach the log-probs; the op's own log-probs output still gets its
    gradient right (two-kernel backward)."""
    args, _, _ = case("cpu", seed=6)
    logits, ids, old, adv, mask = (t.reshape(-1, *t.shape[2:]) for t in args)
    g = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fg in (True, False):
        x = logits.clone().requires_grad_()
        a = mk._ops.FwdArgs(x, ids, old, adv, mask, None, None, 1, ids.numel(), 1,
                            list(mk.MHPOConfig().kernel_params()), 0.0, False, 0, 1.0, -100, False, True, False, "cpu")
        loss, logp, _, _, _ = _fused_grad.policy_forward(a, 0.0, fg)
        ((loss * 3.0) + (logp * g).sum()).backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_retain_graph_second_backward():
    args, _, _ = case("cpu", seed=7)
    x = args[0].detach().clone().requires_grad_()
    out = mk.mhpo_loss(x, *args[1:], backend="cpu", fused_gradient=True, entropy_coeff=0.01)
    out.loss.backward(retain_graph=True)
    first = x.grad.clone()
    out.loss.backward()  # the forward's buffer was handed out: recomputed by the two-kernel backward
    assert_close(x.grad, 2 * first, *TOL[torch.float32], "accumulated grad")


# ---------------------------------------------------------------------------- upstream gradient != 1


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("g", [1.0, 1024.0, 0.25, 1.7, 0.0])
def test_upstream_gradient(backend, dtype, g, monkeypatch):
    """AMP loss scaling: the forward's gradient (for g = 1) scaled in place by the backend's scale_grad.
    A power of two scales exactly (bit for bit the two-kernel result); others round once more."""
    args, _, _ = case(backend, dtype=dtype, seed=8)
    kw = dict(backend=backend, entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean")
    gt = torch.tensor(g, device=args[0].device)
    two = run(*args, fn=mk.mhpo_loss, g=gt, fused_gradient=False, **kw)
    spy = Spy(monkeypatch, backend)
    fused = run(*args, fn=mk.mhpo_loss, g=gt, fused_gradient=True, **kw)
    assert spy.fused() and spy.calls.get("scale_grad") == 1, spy.calls
    exact = backend in BITWISE and g in (1.0, 1024.0, 0.25, 0.0)
    assert_same(fused, two, exact, dtype, f"g={g}")


def test_no_host_sync_without_check_ids(monkeypatch):
    """check_ids=False: not one host sync, also with an upstream gradient != 1 (scale read on the device)."""
    from test_dispatch_counts import SYNC, count_ops

    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)  # conftest's NaN fills
    args, _, _ = case("cpu")
    x = args[0].detach().clone().requires_grad_()
    g = torch.tensor(3.0)

    def step():
        mk.mhpo_loss(x, *args[1:], backend="cpu", check_ids=False, entropy_coeff=0.01).loss.backward(g)
    c = count_ops(step)
    assert c["mhpo_kernels_C::fwd_grad"] == 1 and c["mhpo_kernels_C::scale_grad"] == 1, c
    assert c[SYNC] == 0 and "mhpo_kernels_C::bwd" not in c, c
    assert sum(c.values()) <= 12, c
    c = count_ops(lambda: mk.mhpo_loss(x, *args[1:], backend="cpu", entropy_coeff=0.01).loss.backward())
    assert c[SYNC] == 1, c


# ---------------------------------------------------------------------------- in place, memory


@pytest.mark.parametrize("backend", FUSED)
def test_inplace(backend, monkeypatch):
    args, _, _ = case(backend, dtype=torch.bfloat16, seed=9)
    kw = dict(backend=backend, entropy_coeff=0.01)
    want = run(*args, fn=mk.mhpo_loss, fused_gradient=False, **kw)
    leaf = args[0].detach().clone().requires_grad_()
    z = leaf.clone()  # a non-leaf, as the logits of a model are
    z.retain_grad()
    spy = Spy(monkeypatch, backend)
    out = mk.mhpo_loss(z, *args[1:], inplace_backward=True, fused_gradient=True, **kw)
    assert spy.fused(), spy.calls
    assert not torch.equal(z.detach(), args[0]), "the forward wrote the gradient into the logits"
    out.loss.backward()
    assert torch.equal(z.detach(), z.grad), "the gradient is in the logits' storage"
    assert_same((out, z.grad), want, backend in BITWISE, torch.bfloat16, "inplace")
    assert_same((out, leaf.grad), want, backend in BITWISE, torch.bfloat16, "inplace, leaf")


def test_inplace_then_entropy_gradient_raises():
    args, _, _ = case("cpu", seed=10)
    z = args[0].detach().clone().requires_grad_().clone()
    out = mk.mhpo_loss(z, *args[1:], backend="cpu", inplace_backward=True, return_entropy=True, fused_gradient=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True.*entropy"):
        (out.loss + out.entropy.sum()).backward()


def test_inplace_with_returned_entropy_is_two_kernel_by_default(monkeypatch):
    """fused_gradient=None keeps inplace_backward=True + return_entropy=True on the two-kernel path, where
    an entropy gradient works as before."""
    args, _, _ = case("cpu", seed=10)
    grads = []
    for inplace in (True, False):
        z = args[0].detach().clone().requires_grad_()
        zz = z.clone()
        spy = Spy(monkeypatch, "cpu")
        out = mk.mhpo_loss(zz, *args[1:], backend="cpu", inplace_backward=inplace, return_entropy=True)
        assert spy.two_kernel() if inplace else spy.fused(), spy.calls
        (out.loss + 0.1 * out.entropy.sum()).backward()
        grads.append(z.grad)
        monkeypatch.undo()
    assert torch.equal(*grads)


def test_inplace_second_backward_raises():
    args, _, _ = case("cpu", seed=10)
    z = args[0].detach().clone().requires_grad_().clone()
    out = mk.mhpo_loss(z, *args[1:], backend="cpu", inplace_backward=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


def test_inplace_other_users_of_the_logits_fail_loudly():
    """The logits hold the gradient after the forward: an op that saved them errors in backward
    (their version was bumped), never a silently wrong gradient."""
    args, _, _ = case("cpu", seed=11)
    z = args[0].detach().clone().requires_grad_().clone()
    other = (z * z).sum()  # saves z
    out = mk.mhpo_loss(z, *args[1:], backend="cpu", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_ids_checked_before_any_gradient(inplace):
    args, _, _ = case("cpu", seed=12)
    ids = args[1].clone()
    ids[1, 2] = V + 3
    z = args[0].detach().clone().requires_grad_().clone()
    before = z.detach().clone()
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        mk.mhpo_loss(z, ids, *args[2:], backend="cpu", inplace_backward=inplace, fused_gradient=True)
    assert torch.equal(z.detach(), before), "the logits were not touched"


class _BigAllocs(TorchDispatchMode):
    """Counts the [N, V] tensors the ops under it allocate (outputs that are not views of an input)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and \
                    t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_one_gradient_buffer(backend, inplace):
    """The forward allocates exactly one [N, V] tensor (the gradient; none in place; the cpu backend
    nothing else), the backward none (the torch backend materialises float32 temporaries by design)."""
    args, _, _ = case(backend)
    z = args[0].detach().clone().requires_grad_().clone()
    with _BigAllocs(args[0][..., 0].numel() * V) as fwd:
        out = mk.mhpo_loss(z, *args[1:], backend=backend, inplace_backward=inplace, entropy_coeff=0.01)
    with _BigAllocs(args[0][..., 0].numel() * V) as bwd:
        out.loss.backward(torch.tensor(2.0))
    if backend == "cpu":
        assert fwd.count == (0 if inplace else 1)
        assert bwd.count == 0
    else:
        assert fwd.count >= (0 if inplace else 1)


# ---------------------------------------------------------------------------- torch.compile, bad input


@pytest.mark.slow
def test_compile_falls_back_cleanly():
    """torch.compile(fullgraph=True) traces the two-kernel op (entropy_coeff included): the eager fused
    call and the compiled one agree."""
    torch._dynamo.reset()
    args, _, _ = case("cpu", seed=13)

    def f(z):
        out = mk.mhpo_loss(z, *args[1:], backend="cpu", entropy_coeff=0.02, check_ids=False,
                           loss_agg_mode="seq-mean-token-mean")
        return out.loss, out.metrics["entropy_mean"]
    assert_compiled_matches_eager(f, args[0])


@pytest.mark.parametrize("bad", [True, float("inf"), float("nan"), "0.1"])
def test_bad_entropy_coeff(bad):
    args, _, _ = case("cpu")
    for fn in (mk.mhpo_loss, R.mhpo_loss):
        with pytest.raises(ValueError, match="entropy_coeff must be a finite number"):
            fn(*args, entropy_coeff=bad)


def test_bad_fused_gradient():
    args, _, _ = case("cpu")
    with pytest.raises(ValueError, match="fused_gradient must be None, True or False"):
        mk.mhpo_loss(*args, backend="cpu", fused_gradient="yes")
