"""Input validation, dispatch, torch.compile capture and opcheck of the registered ops."""
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

import mhpo_kernels as mk
from mhpo_kernels import _ops, backends

from util import DEVICE, TOL, assert_close, assert_compiled_matches_eager, device_for, fused_backends, make_case

FUSED = fused_backends()  # each on its own device (the cpu backend on CPU tensors on a GPU machine too)


def args(backend, V=11, shape=(2, 5), dtype=torch.float32):
    logits, ids, old, adv, mask, ref = make_case(shape, V, dtype, seed=0, backend=backend, ref=True)
    return dict(logits=logits, target_ids=ids, old_logprobs=old, advantages=adv, mask=mask), ref


def bad_ids(value):
    def edit(a):
        ids = a["target_ids"].clone()
        ids[1, 3] = value
        a["target_ids"] = ids
    return edit


# ids are checked by the finishing kernel, read after the launches (the call's one host sync)
BAD_IDS = {
    "id_too_large": (bad_ids(11), ValueError, r"target_ids\[8\] \(flattened\) = 11 is outside \[0, 11\)"),
    "id_negative": (bad_ids(-1), ValueError, r"target_ids\[8\] \(flattened\) = -1 is outside"),
}
BAD = {
    "float_ids": (lambda a: a.update(target_ids=a["target_ids"].float()), TypeError, "target_ids must have a int"),
    "int_logits": (lambda a: a.update(logits=a["logits"].long()), TypeError, "logits must be float32"),
    "1d_logits": (lambda a: a.update(logits=a["logits"][0, 0]), ValueError, r"logits must be \[N, V\]"),
    "ids_shape": (lambda a: a.update(target_ids=a["target_ids"][:, :4]), ValueError, "target_ids has shape"),
    "old_shape": (lambda a: a.update(old_logprobs=a["old_logprobs"].reshape(-1)), ValueError, "old_logprobs has shape"),
    "old_int": (lambda a: a.update(old_logprobs=a["old_logprobs"].long()), TypeError, "old_logprobs must have a float"),
    "adv_shape": (lambda a: a.update(advantages=torch.zeros(3, device=a["logits"].device)), ValueError,
                  "advantages has shape"),
    "mask_shape": (lambda a: a.update(mask=a["mask"][:1]), ValueError, "mask has shape"),
    "not_tensor": (lambda a: a.update(old_logprobs=[0.0] * 10), TypeError, "old_logprobs must be a torch.Tensor"),
}
KW_BAD = {
    "temperature": (dict(temperature=0.0), ValueError, "temperature must be"),
    "agg": (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of"),
    "backend": (dict(backend="tpu"), ValueError, "backend must be one of"),
    "ignore_in_range": (dict(ignore_index=3), ValueError, "ignore_index=3 is a valid token id"),
    "beta_without_ref": (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    "negative_beta": (dict(beta=-1.0), ValueError, "beta must be"),
    "config_type": (dict(config=mk.ClipConfig()), TypeError, "config must be an MHPOConfig"),
}


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(backend, case, no_launch):
    a, _ = args(backend)
    edit, exc, msg = BAD[case]
    edit(a)
    with pytest.raises(exc, match=msg):
        mk.mhpo_loss(**a, backend=backend)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("case", list(BAD_IDS), ids=list(BAD_IDS))
def test_bad_ids(backend, case):
    a, _ = args(backend)
    edit, exc, msg = BAD_IDS[case]
    edit(a)
    logits = a.pop("logits").requires_grad_()
    with pytest.raises(exc, match=msg):
        mk.mhpo_loss(logits, **a, backend=backend)
    assert logits.grad is None
    if backend != "reference":  # the caller vouches for the ids: no check, no host sync
        out = mk.mhpo_loss(logits, **a, backend=backend, check_ids=False)
        assert out.logprobs.reshape(-1)[8] == 0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("case", list(KW_BAD), ids=list(KW_BAD))
def test_bad_keywords(backend, case, no_launch):
    a, _ = args(backend)
    kw, exc, msg = KW_BAD[case]
    with pytest.raises(exc, match=msg):
        mk.mhpo_loss(**a, **{"backend": backend, **kw})


def test_config_validation():
    for bad in [dict(c=0.0), dict(k_pos=-1.0), dict(lam_neg=float("inf")), dict(c="1"), dict(use_lfm=1)]:
        with pytest.raises(ValueError):
            mk.MHPOConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mk.MHPOConfig().c = 2.0
    with pytest.raises(ValueError):
        mk.ClipConfig(eps_low=1.0)
    with pytest.raises(ValueError):
        mk.ClipConfig(dual_clip_c=0.9)


def test_backend_resolution(monkeypatch):
    assert mk.available_backends("cpu")[-1] == "reference"
    with pytest.raises(RuntimeError, match="not available"):
        backends.resolve("cuda", torch.device("cpu"))
    monkeypatch.setenv("MHPO_BACKEND", "torch")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", FUSED)
def test_float64_needs_reference(backend):
    a, _ = args(backend, dtype=torch.float64)
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        mk.mhpo_loss(**a, backend=backend)


def test_advantages_per_sequence_broadcast():
    a, _ = args("torch")
    per_seq = torch.tensor([0.5, -1.5], device=DEVICE)
    full = mk.mhpo_loss(**{**a, "advantages": per_seq[:, None].expand(2, 5)}, backend="reference")
    bcast = mk.mhpo_loss(**{**a, "advantages": per_seq}, backend="reference")
    assert torch.equal(full.loss, bcast.loss)


@pytest.fixture
def no_poison():
    torch.use_deterministic_algorithms(False)  # compile and opcheck run with torch's defaults


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED + ["auto"])
def test_compile_fullgraph_matches_eager(backend, no_poison):
    torch._dynamo.reset()
    a, ref = args(backend, V=37, shape=(3, 7))
    logits = a.pop("logits")

    def f(z):
        out = mk.mhpo_loss(z, **a, ref_logprobs=ref, beta=0.05, return_entropy=True, backend=backend,
                           loss_agg_mode="seq-mean-token-mean", temperature=0.8)
        return out.loss + 0.01 * out.entropy.sum(), out.metrics["survival_mean"]

    assert_compiled_matches_eager(f, logits)


# "name", not "backend": the work runs in a subprocess, where the in-process device audit sees nothing
@pytest.mark.slow
@pytest.mark.parametrize("name", ["auto"] + [b for b in mk.available_backends("cpu") if b != "reference"])
def test_compile_first_call_in_a_fresh_process(name):
    """torch.compile(fullgraph=True) of a process's very first mhpo_loss call: no backend may be
    loaded inside the trace (importlib is not traceable, so fullgraph would fail)."""
    code = textwrap.dedent(f"""
        import torch, mhpo_kernels as mk
        z = torch.randn(6, 11, requires_grad=True)
        ids, old, adv = torch.randint(0, 11, (6,)), torch.full((6,), -2.4), torch.randn(6)
        f = torch.compile(lambda z: mk.mhpo_loss(z, ids, old, adv, backend={name!r}).loss, fullgraph=True)
        f(z).backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("leaf", [True, False], ids=["leaf", "activation"])
def test_compile_inplace_backward_falls_back(backend, leaf, no_poison):
    """Under torch.compile inplace_backward is ignored: the graph compiles with the logits a
    leaf or an activation, the gradient is right, and the logits still hold their values."""
    torch._dynamo.reset()
    a, _ = args(backend, V=37, shape=(3, 7))
    logits = a.pop("logits")
    want = logits.clone().requires_grad_()
    mk.mhpo_loss(want, **a, backend="reference").loss.backward()
    mk.mhpo_loss(logits, **a, backend=backend)  # a native extension loads outside the trace
    f = torch.compile(lambda z: mk.mhpo_loss(z, **a, backend=backend, inplace_backward=True).loss, fullgraph=True)
    z = logits.clone().requires_grad_()
    h = z if leaf else z * 1.0
    # no compiled-graph caches: a graph compiled by an earlier version of the op must not answer
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        f(h).backward()
    assert_close(z.grad, want.grad, *TOL[torch.float32], "grad")
    unchanged = torch.equal(h.detach(), logits)
    assert unchanged, "the compiled backward wrote the gradient into the logits"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(backend, packed, no_poison):
    logits, ids, old, adv, mask, ref = make_case((9,), 23, torch.float32, seed=1, backend=backend)
    cfg = mk.MHPOConfig()
    logits.requires_grad_()
    cu = torch.tensor([0, 4, 9], device=logits.device) if packed else None
    fwd_args = (logits, ids, old, adv, mask, ref, cu, 1, 9, cfg.kernel_mode, list(cfg.kernel_params()), 0.1,
                packed, 1, 0.9, -100, True, True, False, backend)
    torch.library.opcheck(_ops.policy_fwd, fwd_args)
    # per-token outputs, importance weights and another KL estimator: the op's other output shapes
    iw = torch.rand(9, device=logits.device)
    torch.library.opcheck(_ops.policy_fwd, fwd_args + (None, iw, 3, False))
    loss, logp, ent, lse, dlogp, metrics, tok = (t.detach() for t in _ops.policy_fwd(*fwd_args))
    assert loss.shape == () and tok.shape == (0, 9)
    bwd_args = (logits.detach(), ids, lse, ent, dlogp, torch.rand((), device=logits.device),
                torch.randn(9, device=logits.device), 0.9, -100, backend)
    torch.library.opcheck(_ops.policy_bwd, bwd_args)
    torch.library.opcheck(_ops.policy_bwd_, (logits.detach().clone(),) + bwd_args[1:])


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_ref_without_beta_only_feeds_the_metric(backend):
    """beta = 0 with ref_logprobs: kl_ref is logged, the loss ignores ref (0 * inf would be NaN)."""
    a, ref = args(backend)
    far = ref + 200.0  # exp(ref - logp) overflows fp32
    z = a.pop("logits").clone().requires_grad_()
    out = mk.mhpo_loss(z, **a, ref_logprobs=far, beta=0.0, backend=backend)
    want = mk.mhpo_loss(z.detach(), **a, backend="reference")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    assert_close(out.loss, want.loss, 2e-5, 2e-5, "loss")
    assert out.metrics["kl_ref"].item() == float("inf")


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_backward_refuses_overlapping_rows(backend):
    a, _ = args(backend, V=11, shape=(4,))
    a["logits"] = torch.randn(11, device=device_for(backend)).expand(4, 11)  # every row is the same memory
    with pytest.raises(ValueError, match="rows do not overlap"):
        mk.mhpo_loss(**a, backend=backend, inplace_backward=True)


def test_dhp_only_needs_k_pos_above_one():
    with pytest.raises(ValueError, match="k_pos > 1"):
        mk.MHPOConfig(use_lfm=False, k_pos=1.0)
    mk.MHPOConfig(use_lfm=False, use_dhp=False, k_pos=1.0)  # plain importance weight: allowed
