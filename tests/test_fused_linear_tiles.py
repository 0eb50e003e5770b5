"""fused_linear_mhpo_loss over vocabulary tiles: sequence-level controls, packed input, a reference head,
tilings, weight-gradient precision and peak memory against the unfused path."""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mhpo_kernels as mk
from mhpo_kernels import fused_linear
from mhpo_kernels._inputs import LOSS_AGG_MODES
from mhpo_kernels.fused_linear import default_chunk_sizes

from util import SCALAR_TOL, TOL, assert_close, device_for, fused_backends

FUSED = fused_backends()  # each on its own device
H, V = 24, 257
CU = [0, 9, 9, 22, 37]  # four packed sequences, one empty


def make_case(N, dtype, *, backend, seed, ref_head=False, bias=True, shape=None):
    """hidden, weight, bias, ids, old, adv, mask, ref-head (hidden, weight, bias) or None, on the backend's device."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(seed)
    shape = shape or (N,)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    ids = torch.randint(0, V, shape, generator=g)
    ids[torch.rand(shape, generator=g) < 0.1] = -100
    logp = torch.log_softmax(F.linear(hidden.double(), weight.double(), None if b is None else b.double()), -1)
    logp = logp.gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) >= 0.2).float()
    old[mask == 0] = float("inf")
    adv[mask == 0] = float("nan")
    head = None
    if ref_head:
        Hr = H + 8
        head = (torch.randn(*shape, Hr, generator=g), torch.randn(V, Hr, generator=g) * 0.5,
                torch.randn(V, generator=g) * 0.5)
    cast = lambda t: None if t is None else t.to(dev, dtype if t.is_floating_point() else t.dtype)
    fixed = lambda t: t.to(dev)
    return (cast(hidden), cast(weight), cast(b), fixed(ids), fixed(old), fixed(adv), fixed(mask),
            None if head is None else tuple(cast(t) for t in head))


def run(case, *, fused, backend, upstream_seed=0, return_entropy=True, to=None, **kw):
    """(output, grads of hidden, weight, bias[, ref hidden, ref weight, ref bias]) for random upstream gradients.

    fused=False: F.linear then mk.policy_loss (``to`` casts the inputs first, e.g. float64), the ref head's
    log-probs from mk.reference.token_logprobs of its full logits.
    """
    hidden, weight, bias, ids, old, adv, mask, head = case
    tensors = [hidden, weight, bias] + (list(head) if head is not None else [])
    leaves = [None if t is None else (t.to(to) if to else t).clone().requires_grad_() for t in tensors]
    h, w, b = leaves[:3]
    kw = dict(kw, return_entropy=return_entropy)
    if fused:
        if head is not None:
            kw.update(ref_hidden=leaves[3], ref_weight=leaves[4], ref_bias=leaves[5])
        out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=b, backend=backend, **kw)
    else:
        kw.pop("chunk_size", None), kw.pop("vocab_chunk_size", None)
        ref_lp = None
        if head is not None:
            rh, rw, rb = leaves[3:]
            ref_lp = mk.reference.token_logprobs(F.linear(rh, rw, rb), ids, temperature=kw.get("temperature", 1.0))
            kw["ref_logprobs"] = ref_lp.detach()  # the reference loss takes them as constants
        logits = F.linear(h, w, b)
        out = mk.policy_loss(logits, ids, old, adv, mask, backend=backend, **kw)
        if ref_lp is not None:  # + a zero-valued term whose gradient is the k3 KL's d / d ref_logp
            d = ref_lp - out.logprobs.to(ref_lp.dtype)
            k3 = torch.expm1(d) - d
            wk = agg_weights(mask, ids, kw["loss_agg_mode"], kw.get("cu_seqlens")).to(k3) * kw["beta"]
            out = out._replace(loss=out.loss + (wk * (k3 - k3.detach())).sum())
    g = torch.Generator().manual_seed(upstream_seed)
    total = out.loss * (1 + torch.rand((), generator=g).item())
    if return_entropy:
        total = total + (out.entropy * torch.randn(out.entropy.shape, generator=g).to(out.entropy)).sum()
    total.backward()
    return out, [None if t is None else t.grad for t in leaves]


def agg_weights(mask, ids, agg, cu_seqlens):
    """Per-token loss weights of token-mean / seq-mean-token-mean (the spec's aggregations), independently."""
    m = (mask.double() * (ids != -100)).reshape(-1)
    if agg == "token-mean":
        return (m / m.sum().clamp(min=1)).reshape(mask.shape)
    assert agg == "seq-mean-token-mean"
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [i * mask.shape[-1] for i in range(mask.shape[0] + 1)]
    w = torch.zeros_like(m)
    seqs = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if m[a:b].sum() > 0]
    for a, b in seqs:
        w[a:b] = m[a:b] / m[a:b].sum() / len(seqs)
    return w.reshape(mask.shape)


def rel_err(actual, expected):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30) if actual.numel() else 0.0


NAMES = ("grad_hidden", "grad_weight", "grad_bias", "grad_ref_hidden", "grad_ref_weight", "grad_ref_bias")


def check(backend, case, dtype, **kw):
    """fp32: tight against float64; bf16: within 2x the eager bf16 (F.linear + reference) error."""
    out, grads = run(case, fused=True, backend=backend, **kw)
    want, want_grads = run(case, fused=False, backend="reference", to=torch.float64, **kw)
    assert len(grads) == len(want_grads)
    if dtype == torch.float32:
        assert_close(out.loss, want.loss, *SCALAR_TOL, "loss", floor=1e-2)
        assert_close(out.logprobs, want.logprobs, *SCALAR_TOL, "logprobs")
        if out.entropy is not None:
            assert_close(out.entropy, want.entropy, *SCALAR_TOL, "entropy")
        for name, a, e in zip(NAMES, grads, want_grads):
            assert (a is None) == (e is None), name
            if e is not None:
                assert a.dtype == dtype, name
                assert_close(a, e, *TOL[dtype], name)
    else:
        eager, eager_grads = run(case, fused=False, backend="reference", **kw)
        atol = TOL[dtype][0]
        for name, a, n, e in [("loss", out.loss, eager.loss, want.loss),
                              ("logprobs", out.logprobs, eager.logprobs, want.logprobs)] + list(
                zip(NAMES, grads, eager_grads, want_grads)):
            assert (a is None) == (e is None) == (n is None), name
            if e is None:
                continue
            assert a.dtype == n.dtype and torch.isfinite(a).all(), name
            assert rel_err(a, e) <= 2 * rel_err(n, e) + atol, (
                f"{name}: fused err {rel_err(a, e):.2e} vs eager {dtype} err {rel_err(n, e):.2e}")
    for k in want.metrics:
        if "frac" not in k:
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            assert_close(out.metrics[k], want.metrics[k], tol, tol, f"metric {k}", floor=1e-1)
    return out, grads


def seq_grid():
    """ratio control x layout x dtype, the remaining options cycled over it; the id spells every option."""
    for i, (ctrl, layout, dtype) in enumerate(itertools.product(("gspo", "mhpo-seq"), ("padded", "packed"),
                                                                ("fp32", "bf16"))):
        agg, T, chunk, vchunk, entropy = LOSS_AGG_MODES[i % 4], (1.0, 0.7)[i % 2], (37, 8)[i % 2], \
            (64, 100)[i % 2], i % 2 == 1
        yield pytest.param(ctrl, layout, dtype, agg, T, chunk, vchunk, entropy, i,
                           id=f"{ctrl}-{layout}-{dtype}-{agg}-T{T}-chunk{chunk}-vchunk{vchunk}-"
                              f"{('logp', 'entropy')[entropy]}-seed{i}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("ctrl,layout,dtype,agg,temperature,chunk,vchunk,return_entropy,seed", list(seq_grid()))
def test_sequence_level(backend, ctrl, layout, dtype, agg, temperature, chunk, vchunk, return_entropy, seed):
    """GSPO and sequence-level MHPO, padded [B, T] or packed (cu_seqlens), every aggregation mode."""
    i = seed
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    kw = dict(ratio_control=mk.GSPOConfig(eps_low=0.2, eps_high=0.3) if ctrl == "gspo" else mk.MHPOConfig(),
              importance_sampling_level="sequence", loss_agg_mode=agg, temperature=temperature, chunk_size=chunk,
              vocab_chunk_size=vchunk)
    if layout == "packed":
        case = make_case(37, dt, backend=backend, seed=i)
        kw["cu_seqlens"] = torch.tensor(CU, device=device_for(backend))
    else:
        case = make_case(None, dt, backend=backend, seed=i, shape=(3, 13))
    out, _ = check(backend, case, dt, upstream_seed=i, return_entropy=return_entropy, **kw)
    assert out.logprobs.shape == case[3].shape


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reference_head(backend, level, dtype):
    """ref_hidden / ref_weight / ref_bias: the KL's reference log-probs from the same tile loop, with gradients."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    case = make_case(37, dt, backend=backend, seed=21, ref_head=True)
    ctrl = mk.ClipConfig(0.2, 0.28) if level == "token" else mk.MHPOConfig()
    out, grads = check(backend, case, dt, ratio_control=ctrl, importance_sampling_level=level, beta=0.1,
                       loss_agg_mode="seq-mean-token-mean", chunk_size=10, vocab_chunk_size=70,
                       cu_seqlens=torch.tensor(CU, device=device_for(backend)), temperature=0.8)
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert "kl_ref" in out.metrics


@pytest.mark.parametrize("backend", FUSED + ["torch", "reference"])
def test_reference_head_shared_parts(backend):
    """A missing ref_hidden / ref_weight is the policy's own, used detached: only the policy path gets gradient."""
    hidden, weight, bias, ids, old, adv, mask, (rh, rw, rb) = make_case(37, torch.float32, backend=backend, seed=4,
                                                                        ref_head=True)
    rw = rw[:, :H].contiguous()
    kw = dict(beta=0.2, loss_agg_mode="token-mean", vocab_chunk_size=50)
    h, w, r = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), rw.clone().requires_grad_()
    out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, mask, bias=bias, ref_weight=r, backend=backend, **kw)
    out.loss.backward()
    h2, w2, r2 = (t.double().requires_grad_() for t in (hidden, weight, rw))
    ref_lp = mk.reference.token_logprobs(F.linear(h2.detach(), r2), ids)  # differentiable: the reference's KL
    want = mk.reference.policy_loss(F.linear(h2, w2, bias.double()), ids, old, adv, mask, ref_logprobs=ref_lp,
                                    beta=0.2, loss_agg_mode="token-mean")  # term sends the gradient on to r2
    want.loss.backward()
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    for name, a, e in (("hidden", h.grad, h2.grad), ("weight", w.grad, w2.grad), ("ref_weight", r.grad, r2.grad)):
        assert_close(a, e, *TOL[torch.float32], name)
    # ref_hidden alone: the policy's weight, detached
    w3 = weight.clone().requires_grad_()
    rh3 = rh[:, :H].contiguous().requires_grad_()
    mk.fused_linear_mhpo_loss(hidden, w3, ids, old, adv, mask, ref_hidden=rh3, backend=backend, **kw).loss.backward()
    w4, rh4 = weight.double().requires_grad_(), rh[:, :H].double().requires_grad_()
    ref_lp = mk.reference.token_logprobs(F.linear(rh4, w4.detach()), ids)
    want = mk.reference.policy_loss(F.linear(hidden.double(), w4), ids, old, adv, mask, ref_logprobs=ref_lp, beta=0.2)
    want.loss.backward()
    assert_close(w3.grad, w4.grad, *TOL[torch.float32], "weight with a shared ref weight")
    assert_close(rh3.grad, rh4.grad, *TOL[torch.float32], "ref_hidden")


TILINGS = [(1, 1), (5, 16), (37, 257), (36, 256), (8, 300), (100, 7), (None, 64), (4, None)]
# every tile is a launch: thousands of them take minutes under Triton's interpreter
TILE_CASES = [(b, r, c) for b in FUSED for r, c in TILINGS
              if not (b == "triton" and device_for(b).type == "cpu"
                      and -(-37 // (r or 37)) * -(-257 // (c or 257)) > 10)]


@pytest.mark.parametrize("backend,rows,cols", TILE_CASES, ids=[f"{b}-{r}x{c}" for b, r, c in TILE_CASES])
def test_tilings_agree(backend, rows, cols):
    """Any tiling (token rows x vocabulary rows, ragged edges included) gives the untiled result."""
    case = make_case(37, torch.float32, backend=backend, seed=9, bias=True)
    kw = dict(loss_agg_mode="seq-mean-token-sum", temperature=0.9)
    out, grads = run(case, fused=True, backend=backend, chunk_size=rows, vocab_chunk_size=cols, **kw)
    want, want_grads = run(case, fused=False, backend="reference", to=torch.float64, **kw)
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss")
    assert_close(out.entropy, want.entropy, *SCALAR_TOL, "entropy")
    for name, a, e in zip(NAMES, grads, want_grads):
        assert_close(a, e, *TOL[torch.float32], name)


@pytest.mark.parametrize("gemm", ["native", "float32"])
def test_weight_gradient_precision_bf16(monkeypatch, gemm):
    """bf16: the weight gradient's error against float64 is no worse than eager bf16 F.linear + reference
    (one rounding of a float32-accumulated GEMM), whichever dtype the tile GEMMs run in."""
    if "cpu" not in FUSED:
        pytest.skip("the native CPU backend is not built")
    monkeypatch.setenv("MHPO_FUSED_LINEAR_GEMM", gemm)
    g = torch.Generator().manual_seed(3)
    N, Hd, Vd = 192, 64, 3000
    hidden = torch.randn(N, Hd, generator=g).bfloat16()
    weight = (torch.randn(Vd, Hd, generator=g) * 0.3).bfloat16()
    ids = torch.randint(0, Vd, (N,), generator=g)
    old = -8 + torch.randn(N, generator=g)
    adv = torch.randn(N, generator=g)
    errs = {}
    for name in ("fused", "eager", "truth"):
        h = (hidden.double() if name == "truth" else hidden).clone().requires_grad_()
        w = (weight.double() if name == "truth" else weight).clone().requires_grad_()
        if name == "fused":
            out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, backend="cpu", vocab_chunk_size=512)
        else:
            out = mk.reference.policy_loss(F.linear(h, w), ids, old, adv)
        out.loss.backward()
        errs[name] = (h.grad, w.grad)
    th, tw = errs.pop("truth")
    fused_w, eager_w = rel_err(errs["fused"][1], tw), rel_err(errs["eager"][1], tw)
    fused_h, eager_h = rel_err(errs["fused"][0], th), rel_err(errs["eager"][0], th)
    assert fused_w <= 1.05 * eager_w, (fused_w, eager_w)
    assert fused_h <= 2 * eager_h, (fused_h, eager_h)
    assert fused_linear.gemm_dtype(torch.bfloat16, torch.device("cpu")) == (
        torch.bfloat16 if gemm == "native" else torch.float32)


_MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys, torch, mhpo_kernels as mk
    from mhpo_kernels.tools.bench_utils import PeakMemory
    N, V, H, rows, cols = (int(a) if a != "None" else None for a in sys.argv[1:6])
    dtype, variants = getattr(torch, sys.argv[6]), sys.argv[7].split(",")
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) * 0.1).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    old, adv = torch.full((N,), -11.0), torch.randn(N, generator=g)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    def warm(n, v):  # first calls set up thread pools and GEMM buffers: not the loss's memory
        hh, ww = hidden[:n].clone().requires_grad_(), weight[:v].clone().requires_grad_()
        mk.fused_linear_mhpo_loss(hh, ww, ids[:n] % v, old[:n], adv[:n], backend="cpu", chunk_size=rows,
                                  vocab_chunk_size=cols).loss.backward()  # the measured tiles' GEMM shapes
        mk.policy_loss(torch.nn.functional.linear(hh, ww), ids[:n] % v, old[:n], adv[:n], backend="cpu").loss.backward()
    warm(N, min(V, 2 * cols) if cols else 256)
    peaks = {}
    for name in variants:  # the smaller first: valid with either way of reading the peak
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        trim(0)
        with PeakMemory("cpu") as pm:
            if name == "fused":
                out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, backend="cpu", chunk_size=rows,
                                                vocab_chunk_size=cols)
            else:
                out = mk.policy_loss(torch.nn.functional.linear(h, w), ids, old, adv, backend="cpu")
            out.loss.backward()
            del out
        peaks[name] = pm.bytes
        assert torch.isfinite(w.grad).all() and w.grad.dtype == dtype
        del h, w
    print(json.dumps(peaks))
""")


def _peaks(*args):
    # a fixed mmap threshold: glibc's adaptive one (raised after a large free) lets later large buffers come
    # from the heap and stay resident after they are freed, so the high-water mark varied 10-36 MB run to run
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *map(str, args)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_peak_memory_below_unfused(tiles):
    """Peak extra memory (resident set, fwd + bwd, one process) against F.linear + our fused loss on
    the full logits. N = 512, V = 32768, H = 64 float32: logits 64 MiB, weight gradient 8 MiB. Default
    tiles take at most the logits' size in scratch (the unfused path holds the logits and their gradient):
    <= 0.8x; 512 x 1024 tiles (2 MiB): <= 0.25x."""
    if "cpu" not in mk.available_backends("cpu"):
        pytest.skip("the native CPU backend is not built")
    rows, cols = (None, None) if tiles == "default" else (512, 1024)
    peaks = _peaks(512, 32768, 64, rows, cols, "float32", "fused,unfused")
    assert peaks["unfused"] >= 1.5 * 512 * 32768 * 4, peaks  # the measurement sees the logits and their gradient
    bound = 0.8 if tiles == "default" else 0.25
    assert peaks["fused"] <= bound * peaks["unfused"], peaks


def test_peak_memory_small_batch_bf16():
    """Few tokens, bf16: the weight gradient dominates. The peak stays within 1.5x the bf16 weight gradient
    itself (32 MiB at V = 32768, H = 512); a float32 [V, H] accumulator plus its cast would be 3x."""
    if "cpu" not in mk.available_backends("cpu"):
        pytest.skip("the native CPU backend is not built")
    peaks = _peaks(32, 32768, 512, None, None, "bfloat16", "fused")
    grad_weight = 32768 * 512 * 2
    assert peaks["fused"] <= 1.5 * grad_weight, peaks


def test_default_chunk_sizes():
    """All tokens per tile while >= 512 vocabulary rows fit; scratch <= min(128 MiB, free / 16, the logits)."""
    GiB, MiB = 2**30, 2**20
    bf16, f32 = torch.bfloat16, torch.float32

    def scratch(N, Vd, Hd, dtype, device, free):
        rows, cols = default_chunk_sizes(N, Vd, Hd, dtype, device, free_bytes=free)
        ge = fused_linear.gemm_dtype(dtype, torch.device(device)).itemsize
        convert = ge != dtype.itemsize
        return rows, cols, rows * cols * ge + cols * Hd * ge * convert + cols * Hd * 4 * (convert or rows < N)

    assert default_chunk_sizes(16384, 151936, 4096, bf16, "cuda", free_bytes=70 * GiB) == (16384, 4096)
    rows, cols, s = scratch(4096, 151936, 512, f32, "cpu", 20 * GiB)
    assert rows == 4096 and 4096 <= cols < 151936 and cols % 256 == 0 and s <= 128 * MiB
    rows, cols, s = scratch(4096, 151936, 512, bf16, "cpu", 20 * GiB)
    assert rows == 4096 and cols >= 512 and s <= 128 * MiB
    rows, cols, s = scratch(160, 151936, 512, bf16, "cpu", 20 * GiB)  # the demo: never more than the logits
    assert rows == 160 and s <= 160 * 151936 * 2
    rows, cols, s = scratch(4096, 151936, 512, f32, "cpu", 256 * MiB)  # little free memory
    assert s <= 16 * MiB + 512 * 4 * 4096
    rows, cols, s = scratch(2**20, 151936, 4096, bf16, "cuda", 4 * GiB)  # too many tokens: token chunks
    assert rows < 2**20 and cols >= 512 and s <= 4 * GiB // 16 + 512 * 4096 * 4
    assert default_chunk_sizes(3, 5, 8, f32, "cpu", free_bytes=GiB) == (3, 5)


@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_recomputes(backend):
    """The forward keeps no gradient: a retained graph backpropagates twice to the same gradients."""
    hidden, weight, bias, ids, old, adv, mask, _ = make_case(5, torch.float32, backend=backend, seed=3)
    h = hidden.clone().requires_grad_()
    out = mk.fused_linear_mhpo_loss(h, weight, ids, old, adv, mask, backend=backend, chunk_size=2,
                                    vocab_chunk_size=100)
    out.loss.backward(retain_graph=True)
    first = h.grad.clone()
    out.loss.backward()
    assert torch.isfinite(first).all() and first.abs().max() > 0
    assert_close(h.grad, 2 * first, *TOL[torch.float32], "second backward")


@pytest.mark.parametrize("backend", FUSED)
def test_bad_inputs_raise_before_any_launch(backend, no_launch):
    dev = device_for(backend)
    h, w = torch.randn(4, 8, device=dev), torch.randn(11, 8, device=dev)
    ids, z = torch.zeros(4, dtype=torch.long, device=dev), torch.zeros(4, device=dev)
    f = mk.fused_linear_mhpo_loss
    with pytest.raises(ValueError, match="cu_seqlens needs packed"):
        f(h[None], w, ids[None], z[None], z[None], ratio_control=mk.GSPOConfig(),
          cu_seqlens=torch.tensor([0, 4], device=dev), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens"):
        f(h, w, ids, z, z, cu_seqlens=torch.tensor([0, 3], device=dev), backend=backend)
    with pytest.raises(ValueError, match="GSPOConfig is sequence-level"):
        f(h, w, ids, z, z, ratio_control=mk.GSPOConfig(), importance_sampling_level="token", backend=backend)
    with pytest.raises(ValueError, match="not both"):
        f(h, w, ids, z, z, ref_weight=w, ref_logprobs=z, backend=backend)
    with pytest.raises(ValueError, match="ref_weight must be"):
        f(h, w, ids, z, z, ref_weight=torch.randn(11, 7, device=dev), backend=backend)
    with pytest.raises(ValueError, match="policy's V"):
        f(h, w, ids, z, z, ref_weight=torch.randn(10, 8, device=dev), backend=backend)
    with pytest.raises(ValueError, match="ref_hidden must be"):
        f(h, w, ids, z, z, ref_hidden=torch.randn(5, 8, device=dev), backend=backend)
    with pytest.raises(ValueError, match="ref_bias needs"):
        f(h, w, ids, z, z, ref_bias=torch.zeros(11, device=dev), backend=backend)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        f(h, w, ids, z, z, vocab_chunk_size=2.5, backend=backend)
    with pytest.raises(ValueError, match=r"target_ids\[2\]"):
        f(h, w, torch.tensor([0, 1, 11, 2], device=dev), z, z, backend=backend)
