"""The CUDA fwd_grad's partition of a row (csrc/mhpo_fused_grad_plan.h: the functions its launcher and
cluster kernel use, computed here through the CPU extension's ``fused_grad_plan`` op): the CTAs' slices
tile [0, V) exactly, each fits the shared memory it is given, starts on a 16-byte column, and the
cluster size follows the design (README, "The forward that writes the gradient")."""
import pytest
import torch

try:
    from mhpo_kernels.backends import native

    native.backend("cpu")
except ImportError:
    pytest.skip("mhpo_kernels._C_cpu is not built", allow_module_level=True)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = [1, 2, 127, 4096, 32781, 151936, 262144]
H100 = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin
A100 = 163 * 1024


@pytest.mark.parametrize("max_shared", [0, H100, A100, 64 * 1024], ids=["default", "h100", "a100", "64k"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("V", VOCABS)
def test_slices_tile_the_row(V, dtype, max_shared):
    p = native.fused_grad_plan(V, dtype, max_shared)
    size = dtype.itemsize
    slices = p["slices"]
    assert len(slices) == p["cluster"] >= 1
    assert slices[0][0] == 0 and slices[-1][1] == V, slices
    for (_, e0), (b1, _) in zip(slices, slices[1:]):
        assert e0 == b1, f"gap or overlap between slices: {slices}"
    for b, e in slices:
        assert 0 <= b < e <= V, f"empty or out-of-range slice ({b}, {e}) of V={V}: {slices}"
        assert e - b <= p["chunk"]
    covered = torch.zeros(V, dtype=torch.int32)
    for b, e in slices:
        covered[b:e] += 1
    assert bool((covered == 1).all()), "every column exactly once"
    if p["kind"] == "cluster":
        assert 1 <= p["cluster"] <= 8 and p["cluster"] & (p["cluster"] - 1) == 0
        assert all(b * size % 16 == 0 for b, _ in slices), "slices start on 16-byte columns"
        assert p["chunk"] * size <= p["smem_bytes"] <= (max_shared or H100), p
        assert p["smem_bytes"] >= p["chunk"] * size + 15, "room to store the slice at its address's offset mod 16"
    else:
        assert p["cluster"] == 1 and p["smem_bytes"] == 0 and p["chunk"] == V
        assert p["kind"] == ("two-read warp" if V * size <= 8192 else "two-read block")


def test_the_design_points():
    """The shapes the issue is about, pinned (a change here is a change of the kernel's design)."""
    p = native.fused_grad_plan(151936, torch.bfloat16)  # 297 KB a row: 8 CTAs of 37 KB, several per SM
    assert (p["kind"], p["cluster"], p["chunk"]) == ("cluster", 8, 18992)
    assert 5 * (p["smem_bytes"] + 1024) <= 228 * 1024, "five CTAs share an H100 SM's 228 KB"
    p = native.fused_grad_plan(151936, torch.float32)
    assert (p["kind"], p["cluster"]) == ("cluster", 8) and p["chunk"] * 4 <= 76 * 1024
    p = native.fused_grad_plan(32781, torch.bfloat16)  # 64 KB: two CTAs
    assert (p["kind"], p["cluster"]) == ("cluster", 2)
    p = native.fused_grad_plan(8192, torch.float32)  # 32 KB: one CTA, a cluster of one
    assert (p["kind"], p["cluster"]) == ("cluster", 1)
    assert native.fused_grad_plan(1, torch.float32)["kind"] == "two-read warp"
    assert native.fused_grad_plan(4096, torch.bfloat16)["kind"] == "two-read warp"  # 8 KB: a warp


def test_too_long_or_no_clusters_takes_two_reads():
    # fp32 V = 2^19: 2 MB a row, 256 KB per CTA of 8 > an H100's 227 KB
    p = native.fused_grad_plan(2**19, torch.float32)
    assert (p["kind"], p["slices"]) == ("two-read block", [(0, 2**19)])
    assert native.fused_grad_plan(2**19, torch.bfloat16)["kind"] == "cluster"  # 1 MB: 8 x 128 KB
    assert native.fused_grad_plan(262144, torch.float32, max_shared=64 * 1024)["kind"] == "two-read block"
    for dtype in DTYPES.values():  # sm_80: no clusters
        assert native.fused_grad_plan(151936, dtype, clusters=False)["kind"] == "two-read block"


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="V must be"):
        native.fused_grad_plan(0, torch.float32)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.fused_grad_plan(16, torch.float64)
    with pytest.raises(RuntimeError, match="max_shared"):
        native.fused_grad_plan(16, torch.float32, max_shared=-1)


def test_check_runs_the_fused_gradient_where_it_is_opt_in(monkeypatch, capsys):
    """``python -m mhpo_kernels check`` on a device where the fused gradient is opt-in (a GPU) adds a
    ``<backend> fused-grad`` row per case that calls ``mhpo_loss(..., fused_gradient=True)``; the CPU
    stands in for the GPU here (AUTO_DEVICES emptied), its default row then being the two-kernel path."""
    import mhpo_kernels as mk
    from mhpo_kernels import _fused_grad, backends
    from mhpo_kernels.tools import check

    monkeypatch.setattr(_fused_grad, "AUTO_DEVICES", ())
    monkeypatch.setattr(check, "_cases", lambda quick, large: [("N=5 V=37 bf16", (5,), 37, torch.bfloat16, {})])
    seen = []
    real = mk.mhpo_loss

    def spy(*args, **kw):
        seen.append((kw.get("backend"), kw.get("fused_gradient")))
        return real(*args, **kw)

    monkeypatch.setattr(mk, "mhpo_loss", spy)
    launched = []
    kb = backends.get("cpu")
    real_fwd_grad = kb.fwd_grad
    monkeypatch.setattr(kb, "fwd_grad", lambda *a: launched.append(1) or real_fwd_grad(*a))
    assert check.main(["--backends", "cpu", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu fused-grad" in out and "FAIL" not in out, out
    assert ("cpu", None) in seen and ("cpu", True) in seen, seen
    assert launched, "the fused-grad row ran the fwd_grad launcher"



# ---- GPU only: the CUDA fwd_grad / scale_grad against the CPU ones (same contract, same epilogue) ----

def _cuda_fused():
    try:
        return torch.cuda.is_available() and hasattr(native.backend("cuda"), "fwd_grad")
    except ImportError:
        return False


GPU_CASES = [  # (V, dtype, N): every kind of the plan
    (1, torch.float32, 5),  # two-read warp, V = 1 exact
    (37, torch.bfloat16, 7),  # two-read warp
    (4099, torch.float16, 9000),  # cluster of 1, more rows than clusters (grid-stride, both parities)
    (32781, torch.bfloat16, 6),  # cluster of 2
    (151936, torch.bfloat16, 6),  # cluster of 8
    (151936, torch.float32, 4),  # cluster of 8, fp32
    (2**19, torch.float32, 3),  # too long for a cluster: two-read block
]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_fused(), reason="needs a GPU and _C_cuda with fwd_grad")
@pytest.mark.parametrize("layout", ["contiguous", "strided", "inplace"])
@pytest.mark.parametrize("V,dtype,N", GPU_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_cuda_fwd_grad_matches_cpu(V, dtype, N, layout):
    from mhpo_kernels import MHPOConfig
    from util import SCALAR_TOL, TOL, assert_close

    kind = native.fused_grad_plan(V, dtype)["kind"]
    g = torch.Generator().manual_seed(V % 1000 + N)
    pad = 3 if layout == "strided" else 0  # row stride V + 3: rows (and slices) off 16-byte alignment
    logits = ((torch.randn(N, V + pad, generator=g) * 3).to(dtype))[:, :V]
    target = torch.randint(0, V, (N,), generator=g)
    target[1 % N] = -100
    old = torch.randn(N, generator=g) * 0.3 - 8
    adv = torch.randn(N, generator=g)
    ref = torch.randn(N, generator=g) * 0.2 - 8
    weight = torch.rand(N, generator=g) / N
    weight[2 % N] = 0.0
    params = [float(p) for p in MHPOConfig().kernel_params()]
    cpu_grad = torch.empty(N, V, dtype=dtype)
    want = torch.ops.mhpo_kernels_C.fwd_grad(logits, target, old, adv, ref, weight, 1, params, 0.05, 0.7, -100, True,
                                             -0.01, cpu_grad)
    d = torch.device("cuda")
    x = torch.empty(N, V + pad, dtype=dtype, device=d)[:, :V].copy_(logits)
    grad = x if layout == "inplace" else torch.empty(N, V, dtype=dtype, device=d)
    got = torch.ops.mhpo_kernels_C.fwd_grad(x, *(t.to(d) for t in (target, old, adv, ref, weight)), 1, params, 0.05,
                                            0.7, -100, True, -0.01, grad)
    torch.cuda.synchronize()
    for a, b, what in zip(got, want, ("logp", "entropy", "lse", "loss", "coef")):
        assert_close(a, b, *SCALAR_TOL, f"{kind} {what}")
    assert_close(grad, cpu_grad, *TOL[dtype], f"{kind} grad")
    assert (grad[1 % N] == 0).all() and not torch.signbit(grad[1 % N].float()).any(), "ignored row: +0.0"
    if V == 1:
        assert (got[0] == 0).all() and (grad == 0).all(), "V = 1: log p and gradient exactly 0"
    for s in (1.0, 0.5):  # scale_grad: 1 leaves the bits, others round once
        before = grad.clone()
        torch.ops.mhpo_kernels_C.scale_grad(grad, torch.tensor(s, device=d))
        want_s = before if s == 1.0 else (before.float() * s).to(dtype)
        assert torch.equal(grad, want_s), f"scale_grad({s})"
