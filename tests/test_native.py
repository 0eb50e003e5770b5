"""The native backends (csrc/) against the float64 reference, launcher by launcher.

Expected values come from ``mhpo_kernels.reference`` in float64 on the same
(dtype-rounded) logits: ``token_logprobs_entropy`` for logp / entropy,
``token_loss`` (+ k3 KL) differentiated w.r.t. logp for loss / coef, and
autograd through both for the logits gradient the bwd launcher must write.
CUDA tests run only on a GPU machine (``-m gpu``); without one, the build
checks (SASS for sm_80 / sm_90, CUDA kernels registered) still run.
"""
import glob
import importlib
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import mhpo_kernels
from mhpo_kernels import reference
from mhpo_kernels.config import MODE_NONE, MODE_SAPO, ClipConfig, MHPOConfig, SAPOConfig

from util import SCALAR_TOL, TOL, assert_close

try:
    from mhpo_kernels.backends import native as _native

    _native.backend("cpu")
    HAVE_CPU = True
except ImportError:
    HAVE_CPU = False
try:
    _native.backend("cuda")
    HAVE_CUDA_EXT = True
except (ImportError, NameError):
    HAVE_CUDA_EXT = False

needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="mhpo_kernels._C_cpu is not built")
GPU = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not (HAVE_CUDA_EXT and torch.cuda.is_available()), reason="needs a GPU and _C_cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=[GPU, needs_gpu])]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = [1, 2, 127, 1031, 32781]
IGNORE = -100

# Every epilogue: (name, config or None for MODE_NONE).
CONFIGS = [
    ("none", None),
    ("mhpo", MHPOConfig()),
    ("mhpo-lfm-only", MHPOConfig(use_dhp=False)),
    ("mhpo-dhp-only", MHPOConfig(use_lfm=False)),
    ("mhpo-c0.5-sym", MHPOConfig(c=0.5, k_neg=1.5, lam_neg=1.0)),
    ("clip", ClipConfig()),
    ("clip-dapo-dual-delta", ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, delta=1.25)),
    ("sapo", SAPOConfig()),
]


def mode_params(cfg):
    if cfg is None:
        return MODE_NONE, [0.0] * 8
    return cfg.kernel_mode, list(cfg.kernel_params())


def make_rows(N, V, dtype, *, seed, device="cpu", spread=0.5):
    """logits, target, old, adv, mask, ref; ignored and masked rows hold inf / NaN garbage."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.15] = IGNORE
    lp = torch.log_softmax(logits.double(), -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    old = (lp + spread * torch.randn(N, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(N, generator=g)
    adv[torch.rand(N, generator=g) < 0.1] = 0.0
    mask = (torch.rand(N, generator=g) >= 0.2).float()
    inactive = (mask == 0) | (target == IGNORE)
    old[inactive] = float("inf")
    adv[inactive] = float("nan")
    ref = (lp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref[inactive] = float("-inf")
    return tuple(t.to(device) for t in (logits, target, old, adv, mask, ref))


def expected_rows(logits, target, T):
    """float64 logp, entropy, lse (as the reference computes them)."""
    z = logits.detach().cpu().double()
    lp, ent = reference.token_logprobs_entropy(z, target.cpu(), T, IGNORE, torch.float64)
    return lp, ent, torch.logsumexp(z / T, -1)


def expected_epilogue(logp, target, old, adv, mask, ref, cfg, beta):
    """float64 loss and coef = d loss / d logp (zero on inactive rows), from reference.token_loss."""
    target, old, adv, mask = target.cpu(), old.cpu().double(), adv.cpu().double(), mask.cpu()
    zero = torch.zeros_like(logp)
    if cfg is None:
        return zero, zero
    lpl = logp.detach().clone().requires_grad_()
    active = (target != IGNORE) & (mask != 0)
    delta = torch.where(active, lpl - old, zero)
    L = reference.token_loss(delta, torch.where(active, adv, zero), cfg)
    if ref is not None:
        d = torch.where(active, ref.cpu().double() - lpl, zero)
        L = L + beta * (torch.expm1(d) - d)
    (coef,) = torch.autograd.grad(L.sum(), lpl)
    return L.detach(), coef


def expected_grad(logits, target, T, dlogp, dent):
    """d (sum dlogp * logp + sum dent * entropy) / d logits in float64."""
    z = logits.detach().cpu().double().requires_grad_()
    lp, ent = reference.token_logprobs_entropy(z, target.cpu(), T, IGNORE, torch.float64)
    total = (lp * dlogp.cpu().double()).sum()
    if dent is not None:
        total = total + (ent * dent.cpu().double()).sum()
    (g,) = torch.autograd.grad(total, z)
    return g


def run_fwd(be, logits, target, old, adv, mask, ref, cfg, beta, T, want_entropy):
    mode, params = mode_params(cfg)
    return be.fwd(logits, target, old, adv, mask, ref, mode, params, beta, T, IGNORE, want_entropy)


def check_fwd_outputs(out, logits, target, old, adv, mask, ref, cfg, beta, T, want_entropy, what="", rows64=None):
    logp, ent, lse, loss, coef = out
    N = logits.shape[0]
    for t in out:
        assert t.dtype == torch.float32 and t.device == logits.device
    assert logp.shape == lse.shape == loss.shape == coef.shape == (N,)
    assert ent.shape == ((N,) if want_entropy else (0,))
    lp64, ent64, lse64 = rows64 if rows64 is not None else expected_rows(logits, target, T)
    # logp = x_y - lse in fp32 is exact up to rounding at the scale of the logits (|lse|), not of logp
    scale = max(lse64.abs().max().item(), 1.0) if N else 1.0
    assert_close(logp, lp64, *SCALAR_TOL, f"{what} logp", floor=scale)
    assert_close(lse, lse64, *SCALAR_TOL, f"{what} lse", floor=scale)
    if want_entropy:
        assert_close(ent, ent64, *SCALAR_TOL, f"{what} entropy", floor=1.0)
    ignored = (target == IGNORE).cpu()
    assert (logp.cpu()[ignored] == 0).all()
    # the epilogue sees the kernel's own logp (fp32): compare against the float64 math on it
    want_loss, want_coef = expected_epilogue(logp.cpu().double(), target, old, adv, mask, ref, cfg, beta)
    assert_close(loss, want_loss, *SCALAR_TOL, f"{what} loss")
    assert_close(coef, want_coef, *SCALAR_TOL, f"{what} coef")
    inactive = ignored | (mask.cpu() == 0)
    assert (loss.cpu()[inactive] == 0).all() and (coef.cpu()[inactive] == 0).all()


def check_bwd(be, logits, target, lse, ent, T, *, with_entropy, inplace, seed, what=""):
    g = torch.Generator().manual_seed(seed + 1)
    N = logits.shape[0]
    dlogp = torch.randn(N, generator=g).to(logits.device)
    dent = torch.randn(N, generator=g).to(logits.device) if with_entropy else None
    want = expected_grad(logits, target, T, dlogp, dent)
    if inplace:
        out = logits.clone()
        be.bwd(out, target, lse, ent if with_entropy else None, dlogp, dent, T, IGNORE, out)
    else:
        out = torch.full_like(logits, float("nan"))  # every element must be written
        be.bwd(logits, target, lse, ent if with_entropy else None, dlogp, dent, T, IGNORE, out)
    assert out.dtype == logits.dtype
    # fp32 rounding of log p is at the scale of the logits: 1 - p of a confident row has an
    # absolute error ~ eps |dlogp| / T however small the gradient itself is
    floor = (dlogp.abs().max().item() + (dent.abs().max().item() if dent is not None else 0.0)) / T if N else 1.0
    assert_close(out, want, *TOL[logits.dtype], f"{what} grad", floor=floor)
    ignored = (target == IGNORE).cpu()
    assert (out.cpu()[ignored] == 0).all(), "ignored rows must get exact zeros"


@needs_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("N", [0, 1, 37], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("V", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("variant", ["plain", "entropy", "inplace", "entropy-inplace"])
def test_grid(variant, dtype, V, N, T, device):
    """fwd (every epilogue, KL on / off) and bwd, against float64."""
    be = _native.backend(device)
    seed = V * 1000 + N + int(T * 10)
    case = make_rows(N, V, dtype, seed=seed, device=device)
    logits, target, old, adv, mask, ref = case
    want_entropy = "entropy" in variant
    rows64 = expected_rows(logits, target, T)
    for name, cfg in CONFIGS:
        for r in (None, ref):
            beta = 0.1 if r is not None else 0.0
            out = run_fwd(be, logits, target, old, adv, mask, r, cfg, beta, T, want_entropy)
            check_fwd_outputs(out, logits, target, old, adv, mask, r, cfg, beta, T, want_entropy,
                              f"{name}{'+kl' if r is not None else ''}", rows64)
    _, ent, lse, _, _ = out
    check_bwd(be, logits, target, lse, ent, T, with_entropy=want_entropy, inplace="inplace" in variant, seed=seed)
    assert torch.equal(logits, case[0]), "fwd / non-inplace bwd must not modify the logits"


def cpu_isas():
    """The row-kernel ISAs built here and supported by this CPU, worst to best."""
    have, saved = [], os.environ.get("MHPO_CPU_ISA")
    for isa in ("default", "avx2", "avx512"):
        os.environ["MHPO_CPU_ISA"] = isa
        try:
            if HAVE_CPU and _native.cpu_isa() == isa:
                have.append(isa)
        except RuntimeError:
            pass
    if saved is None:
        del os.environ["MHPO_CPU_ISA"]
    else:
        os.environ["MHPO_CPU_ISA"] = saved
    return have


@needs_cpu
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_each_cpu_isa(isa, dtype, monkeypatch):
    """Every compiled instruction-set variant of the row kernels (MHPO_CPU_ISA forces one)."""
    if isa not in cpu_isas():
        pytest.skip(f"{isa} not built or not supported by this CPU")
    monkeypatch.setenv("MHPO_CPU_ISA", isa)
    be = _native.backend("cpu")
    for V in (1, 15, 17, 2048 + 33, 5000):  # around the 16 lanes and the 2048-element chunk
        logits, target, old, adv, mask, ref = make_rows(19, V, dtype, seed=V)
        out = run_fwd(be, logits, target, old, adv, mask, ref, MHPOConfig(), 0.05, 0.7, True)
        check_fwd_outputs(out, logits, target, old, adv, mask, ref, MHPOConfig(), 0.05, 0.7, True, f"{isa} V{V}")
        check_bwd(be, logits, target, out[2], out[1], 0.7, with_entropy=True, inplace=V % 2 == 1, seed=V)


@needs_cpu
def test_isa_selection(monkeypatch):
    isas = cpu_isas()
    assert "default" in isas
    monkeypatch.delenv("MHPO_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert _native.cpu_isa() == isas[-1], "the best supported ISA is the default choice"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert _native.cpu_isa() == "default"
    monkeypatch.setenv("MHPO_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MHPO_CPU_ISA"):
        _native.cpu_isa()


@needs_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_rows(dtype, device):
    """Rows with a stride != V and a start off the 16-byte grid; out with yet another layout."""
    be = _native.backend(device)
    N, V = 23, 1031
    logits, target, old, adv, mask, ref = make_rows(N, V, dtype, seed=5, device=device)
    big = torch.zeros(N, V + 11, dtype=dtype, device=device)
    big[:, 3:3 + V] = logits
    view = big[:, 3:3 + V]
    assert view.stride(0) == V + 11
    out = run_fwd(be, view, target, old, adv, mask, ref, MHPOConfig(), 0.1, 1.0, True)
    check_fwd_outputs(out, view, target, old, adv, mask, ref, MHPOConfig(), 0.1, 1.0, True, "strided")
    dlogp, dent = torch.randn(N, device=device), torch.randn(N, device=device)
    want = expected_grad(logits, target, 1.0, dlogp, dent)
    for off in (0, 1, 5):
        gbig = torch.full((N, V + 7), float("nan"), dtype=dtype, device=device)
        g = gbig[:, off:off + V]
        be.bwd(view, target, out[2], out[1], dlogp, dent, 1.0, IGNORE, g)
        assert_close(g, want, *TOL[dtype], f"strided grad off={off}", floor=4.0)
        assert gbig[:, :off].isnan().all() and gbig[:, off + V:].isnan().all(), "wrote outside out"
    be.bwd(view, target, out[2], out[1], dlogp, dent, 1.0, IGNORE, view)  # in place, strided
    assert_close(view, want, *TOL[dtype], "strided in-place grad", floor=4.0)
    assert (big[:, :3] == 0).all() and (big[:, 3 + V:] == 0).all()


@needs_cpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg", [c for c in CONFIGS if c[1] is not None], ids=[c[0] for c in CONFIGS[1:]])
def test_extreme_log_ratios(name, cfg, device):
    """delta = +-20.5, +-300, +-1e4 (a very stale rollout): loss and coef finite and exact."""
    be = _native.backend(device)
    deltas = torch.tensor([-1e4, -300.0, -30.0, -20.5, -19.5, 0.0, 19.5, 20.5, 30.0, 300.0, 1e4])  # no kink exactly
    n = len(deltas)
    logits = torch.randn(2 * n, 64, generator=torch.Generator().manual_seed(3)).to(device)
    target = torch.arange(2 * n, device=device) % 64
    lp64, _, _ = expected_rows(logits, target, 1.0)
    old = (lp64 - deltas.double().repeat(2)).float().to(device)
    adv = torch.cat([torch.ones(n), -torch.ones(n)]).to(device)  # both signs of A
    mask = torch.ones(2 * n, device=device)
    ref = (lp64 + 0.1).float().to(device)
    for r in (None, ref):
        out = run_fwd(be, logits, target, old, adv, mask, r, cfg, 0.05, 1.0, False)
        for t in out:
            assert torch.isfinite(t).all(), f"{name}: non-finite output {t}"
        want_loss, want_coef = expected_epilogue(out[0].cpu().double(), target, old, adv, mask, r, cfg, 0.05)
        assert torch.isfinite(want_loss).all() and torch.isfinite(want_coef).all()
        assert_close(out[3], want_loss, *SCALAR_TOL, f"{name} loss")
        assert_close(out[4], want_coef, *SCALAR_TOL, f"{name} coef")


@needs_cpu
@pytest.mark.parametrize("c", [0.5, 1.5, 2.0])
def test_mhpo_gradient_bound(c):
    """Theorem: |M(r)| = |coef / A| <= e^c for r from 1e-30 to 1e30."""
    be = _native.backend("cpu")
    cfg = MHPOConfig(c=c)
    logr = torch.linspace(math.log(1e-30), math.log(1e30), 2001)
    N = len(logr)
    logits = torch.zeros(N, 2)
    target = torch.zeros(N, dtype=torch.long)  # logp = -log 2
    old = (-math.log(2) - logr).float()
    adv = torch.ones(N)
    out = run_fwd(be, logits, target, old, adv, torch.ones(N), None, cfg, 0.0, 1.0, False)
    mult = out[4].abs()
    assert torch.isfinite(mult).all()
    assert mult.max().item() <= math.exp(c) * (1 + 1e-5)
    assert mult[N // 2 - 50:N // 2 + 50].min().item() > 0  # a live gradient around r = 1


@needs_cpu
def test_sanity_table():
    """docs/mhpo.md's sanity table at the defaults: weight = -loss / A, mult = -coef / A."""
    be = _native.backend("cpu")
    rows = [(0.05, 0.0029, 0.0002), (0.5, 0.0669, 0.0544), (1.0, 0.2651, 0.2651), (2.0, 0.4802, 0.3907),
            (20.0, 0.4688, 0.0333)]
    r = torch.tensor([x[0] for x in rows], dtype=torch.float64)
    N = len(rows)
    out = run_fwd(be, torch.zeros(N, 2), torch.zeros(N, dtype=torch.long), (-math.log(2) - r.log()).float(),
                  torch.ones(N), torch.ones(N), None, MHPOConfig(), 0.0, 1.0, False)
    assert torch.allclose(-out[3].double(), torch.tensor([x[1] for x in rows], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(-out[4].double(), torch.tensor([x[2] for x in rows], dtype=torch.float64), atol=1e-4)


def raises_exactly(message, fn, *args):
    """fn(*args) raises RuntimeError whose message is exactly ``message``, numbers included (a
    C++ runtime mixed up with torch's loses or crashes on them; the first line only, so that
    TORCH_SHOW_CPP_STACKTRACES=1 still passes)."""
    with pytest.raises(RuntimeError) as e:
        fn(*args)
    got = str(e.value).split("\n")[0]
    assert got == message, f"expected {message!r}, got {got!r}"


@needs_cpu
def test_bad_arguments():
    be = _native.backend("cpu")
    logits, target, old, adv, mask, ref = make_rows(4, 10, torch.float32, seed=0)
    mode, params = mode_params(MHPOConfig())
    ok = (logits, target, old, adv, mask, ref, mode, params, 0.1, 1.0, IGNORE, True)
    be.fwd(*ok)
    modes = f"(expected {MODE_NONE} to {MODE_SAPO})"
    bad = [
        ("logits", logits[None], "logits must be [N, V], got [1, 4, 10]"),
        ("logits", logits.double(), "logits must be float32, bfloat16 or float16, got Double"),
        ("logits", logits.t().contiguous().t(), "logits need stride(1) == 1, got strides [1, 4]"),
        ("logits", logits[:, :0], "logits need V >= 1, got [4, 0]"),
        ("target", target.int(), "target must be Long, got Int"),
        ("target", target[:, None], "target must be [N] with N = 4, got [4, 1]"),
        ("old", old.double(), "old must be Float, got Double"),
        ("adv", adv[:3], "adv must be [N] with N = 4, got [3]"),
        ("mask", mask.bool(), "mask must be Float, got Bool"),
        ("ref", ref[:2], "ref must be [N] with N = 4, got [2]"),
        ("mode", 7, f"unknown mode 7 {modes}"),
        ("mode", -1, f"unknown mode -1 {modes}"),
        ("params", params[:7], "params must have 8 values, got 7"),
        ("temperature", 0.0, "temperature must be > 0, got 0"),
        ("temperature", -0.25, "temperature must be > 0, got -0.25"),
        ("temperature", float("nan"), "temperature must be > 0, got nan"),
    ]
    names = ["logits", "target", "old", "adv", "mask", "ref", "mode", "params", "beta", "temperature"]
    for key, value, msg in bad:
        args = list(ok)
        args[names.index(key)] = value
        raises_exactly(f"mhpo_kernels_C: {msg}", be.fwd, *args)
    # ids are validated in Python before any launch; the op itself never reads out of bounds:
    # an id outside [vocab_start, vocab_start + V) belongs to another vocabulary shard (logp 0)
    for y in (10, -1):
        t = target.clone()
        t[2] = y
        logp = be.fwd(logits, t, *ok[2:])[0]
        assert logp[2].item() == 0.0 and torch.isfinite(logp).all()
    _, ent, lse, _, _ = be.fwd(*ok)
    dl = torch.ones(4)
    bwd = torch.ops.mhpo_kernels_C.bwd
    okb = (logits, target, lse, ent, dl, dl, 1.0, IGNORE, torch.empty(4, 10))
    bwd(*okb)
    bad_bwd = [
        (8, torch.empty(4, 10, dtype=torch.bfloat16), "out must have the logits' dtype Float, got BFloat16"),
        (8, torch.empty(4, 11), "out must have the logits' shape [4, 10], got [4, 11]"),
        (8, torch.empty(10, 4).t(), "out needs stride(1) == 1, got strides [1, 4]"),
        (3, None, "dent needs the forward's entropy"),
        (4, torch.ones(5), "dlogp must be [N] with N = 4, got [5]"),
        (2, lse.double(), "lse must be Float, got Double"),
        (6, 0.0, "temperature must be > 0, got 0"),
        (6, -1.5, "temperature must be > 0, got -1.5"),
    ]
    for i, value, msg in bad_bwd:
        args = list(okb)
        args[i] = value
        raises_exactly(f"mhpo_kernels_C: {msg}", bwd, *args)


def elf_needed(path):
    """The DT_NEEDED entries of a 64-bit ELF shared object, parsed here (no readelf needed)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path}: not a 64-bit ELF file"
    end = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(end + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        p_type, _, off, vaddr, _, filesz, _, _ = struct.unpack_from(end + "IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, off, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (off, filesz)
    assert dynamic is not None, f"{path}: no dynamic section"
    needed, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from(end + "qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED: an offset into the string table
            needed.append(val)
        elif tag == 5:  # DT_STRTAB: a virtual address
            strtab = next(off + val - vaddr for vaddr, off, size in loads if vaddr <= val < vaddr + size)
    return [data[strtab + n:data.index(b"\0", strtab + n)].decode() for n in needed]


def native_extension_files():
    """The loaded _C_cpu (and _C_cuda where built) shared objects."""
    files = [importlib.import_module("mhpo_kernels._C_cpu").__file__]
    files += [importlib.import_module("mhpo_kernels._C_cuda").__file__] if HAVE_CUDA_EXT else CUDA_SO
    return files


@needs_cpu
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF / libstdc++ are Linux matters")
def test_extensions_share_torchs_libstdcxx():
    """Each extension NEEDs the shared libstdc++.so.6 (setup.py links it whatever the toolchain's
    default): a private static copy beside torch's runtime breaks every message with a number."""
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "libstdc++.so" in line}
    assert mapped, "torch's libstdc++.so.6 is not mapped in this process"
    readelf = shutil.which("readelf")
    for so in native_extension_files():
        needed = elf_needed(so)
        if readelf:  # the parser agrees with binutils
            out = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
            assert needed == [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]
        assert "libstdc++.so.6" in needed, f"{so} links libstdc++ statically (NEEDED: {needed})"


def _op_args(device="cpu", dtype=torch.bfloat16):
    logits, target, old, adv, mask, ref = make_rows(9, 33, dtype, seed=1, device=device)
    mode, params = mode_params(MHPOConfig())
    fwd = (logits, target, old, adv, mask, ref, mode, params, 0.1, 0.7, IGNORE, True)
    _, ent, lse, _, coef = torch.ops.mhpo_kernels_C.fwd(*fwd)
    bwd = (logits, target, lse, ent, coef, torch.randn(9, device=device), 0.7, IGNORE, torch.empty_like(logits))
    return fwd, bwd


@needs_cpu
def test_opcheck():
    fwd, bwd = _op_args()
    torch.library.opcheck(torch.ops.mhpo_kernels_C.fwd.default, fwd)
    torch.library.opcheck(torch.ops.mhpo_kernels_C.bwd.default, bwd)
    fwd_noent = fwd[:5] + (None,) + fwd[6:11] + (False,)
    torch.library.opcheck(torch.ops.mhpo_kernels_C.fwd.default, fwd_noent)


@needs_cpu
def test_compile_fullgraph():
    """The ops have Meta kernels: torch.compile captures them without a graph break."""
    fwd, bwd = _op_args(dtype=torch.float32)

    def f(logits, target, old, adv, mask, ref, lse, ent, dlogp, dent):
        out = torch.ops.mhpo_kernels_C.fwd(logits, target, old, adv, mask, ref, 1, fwd[7], 0.1, 0.7, IGNORE, True)
        g = torch.zeros_like(logits)  # (conftest's NaN-poisoned empty_like is not traceable)
        torch.ops.mhpo_kernels_C.bwd(logits, target, out[2], out[1], dlogp, dent, 0.7, IGNORE, g)
        return out[3].sum(), g

    args = fwd[:6] + bwd[2:6]
    want = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


# ---- the CUDA build (checked without a GPU) ----

CUDA_SO = glob.glob(os.path.join(os.path.dirname(mhpo_kernels.__file__), "_C_cuda*.so"))


def _cuobjdump():
    cands = [shutil.which("cuobjdump")]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        cands.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


@pytest.mark.skipif(not CUDA_SO, reason="mhpo_kernels._C_cuda is not built")
def test_cuda_extension_has_sm80_sm90_sass():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to inspect the extension")
    elf = subprocess.run([tool, "--list-elf", CUDA_SO[0]], capture_output=True, text=True, check=True).stdout
    for arch in ("sm_80", "sm_90"):
        assert f".{arch}.cubin" in elf, f"no {arch} SASS in {CUDA_SO[0]}:\n{elf}"
    sass = subprocess.run([tool, "--dump-resource-usage", CUDA_SO[0]], capture_output=True, text=True).stdout
    assert "fwd_kernel" in sass and "bwd_kernel" in sass


# the row kernels (csrc/mhpo_cuda.cu, csrc/mhpo_fused_grad.cu) and the finishing kernel (csrc/mhpo_finish.cu):
# no stack frame, no local memory
NO_SPILL_KERNELS = ("fwd_kernel", "bwd_kernel", "fg_rows_kernel", "fg_cluster_kernel", "scale_kernel",
                    "finish_kernel")


def _by_arch_and_function(text, start):
    """{arch: {function: [lines]}} of cuobjdump output whose function headers start with ``start``."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch, fn = s.split("=", 1)[1].strip(), None
        elif s.startswith(start):
            fn = s[len(start):].strip().rstrip(":")
            out.setdefault(arch, {})[fn] = []
        elif fn is not None:
            out[arch][fn].append(s)
    return out


@pytest.mark.skipif(not CUDA_SO, reason="mhpo_kernels._C_cuda is not built")
def test_cuda_kernels_do_not_spill():
    """Every instantiation of the row kernels (fwd, bwd, fwd_grad's cluster and two-read kernels,
    scale_grad) and of the finishing kernel, sm_80 and sm_90: STACK:0 and LOCAL:0 in the SASS (ptxas
    spills to the stack), so a spill fails CI."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to inspect the extension")
    text = subprocess.run([tool, "--dump-resource-usage", CUDA_SO[0]], capture_output=True, text=True,
                          check=True).stdout
    usage = _by_arch_and_function(text, "Function ")
    for arch in ("sm_80", "sm_90"):
        fns = {f: " ".join(lines) for f, lines in usage.get(arch, {}).items()}
        for kernel in NO_SPILL_KERNELS:
            found = {f: u for f, u in fns.items() if kernel in f}
            assert found, f"no {kernel} in the {arch} SASS of {CUDA_SO[0]}"
            for f, u in found.items():
                assert "STACK:0 " in u and "LOCAL:0 " in u, f"{arch} {f}: a stack frame or local memory (spill?): {u}"


@pytest.mark.skipif(not CUDA_SO, reason="mhpo_kernels._C_cuda is not built")
def test_cluster_kernel_is_a_cluster_kernel_on_sm90():
    """The sm_90 SASS of every fg_cluster_kernel has cluster barriers (UCGABAR_ARV / _WAIT: the
    statistics exchanged through distributed shared memory) and asynchronous global -> shared
    copies (LDGSTS: cp.async); the sm_80 one has neither (an empty body, never launched there:
    without clusters the plan takes two reads)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to inspect the extension")
    text = subprocess.run([tool, "-sass", CUDA_SO[0]], capture_output=True, text=True, check=True).stdout
    sass = _by_arch_and_function(text, "Function : ")
    for arch, want in (("sm_90", True), ("sm_80", False)):
        found = {f: "\n".join(lines) for f, lines in sass.get(arch, {}).items() if "fg_cluster_kernel" in f}
        assert len(found) == 6, f"{arch}: 3 dtypes x (entropy or not) instantiations, got {list(found)}"
        for f, code in found.items():
            for op in ("UCGABAR_ARV", "UCGABAR_WAIT", "LDGSTS"):
                assert (op in code) == want, f"{arch} {f}: {op} {'missing' if want else 'present'}"


@pytest.mark.skipif(not CUDA_SO, reason="mhpo_kernels._C_cuda is not built")
def test_cuda_ops_registered():
    assert HAVE_CUDA_EXT, "_C_cuda is built but does not load"
    for op in ("fwd", "bwd", "fwd_grad", "scale_grad"):
        name = f"mhpo_kernels_C::{op}"
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"


# ---- GPU only ----

@GPU
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cuda_grid_stride_many_rows(dtype):
    """More rows than one grid covers (warp per row): the grid-stride loop."""
    be = _native.backend("cuda")
    logits, target, old, adv, mask, ref = make_rows(300_001, 3, dtype, seed=2, device="cuda")
    out = run_fwd(be, logits, target, old, adv, mask, ref, MHPOConfig(), 0.1, 1.0, True)
    check_fwd_outputs(out, logits, target, old, adv, mask, ref, MHPOConfig(), 0.1, 1.0, True, "many rows")
    check_bwd(be, logits, target, out[2], out[1], 1.0, with_entropy=True, inplace=True, seed=2)


@GPU
@needs_gpu
def test_cuda_matches_cpu():
    """The two native backends agree closely (the same epilogue header)."""
    cpu, gpu = _native.backend("cpu"), _native.backend("cuda")
    case = make_rows(64, 32781, torch.bfloat16, seed=9)
    for name, cfg in CONFIGS:
        a = run_fwd(cpu, *case, cfg, 0.1, 0.7, True)
        b = run_fwd(gpu, *(t.cuda() for t in case), cfg, 0.1, 0.7, True)
        for x, y, what in zip(a, b, ("logp", "entropy", "lse", "loss", "coef")):
            assert_close(y, x, *SCALAR_TOL, f"{name} {what}")


# ---- N * V > 2^31: int64 offsets ----

def _mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


@needs_cpu
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_more_than_2_31_elements(device):
    """bf16 [16385, 131072] (4.3 GB): rows past element 2^31 are right; checked on a few rows."""
    N, V = 16385, 131072
    assert N * V > 2**31
    if device == "cpu" and _mem_available_gb() < 9:
        pytest.skip("needs ~9 GB of free memory")
    be = _native.backend(device)
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(N, V, dtype=torch.bfloat16, device=device)
    for i in range(0, N, 1024):
        logits[i:i + 1024] = (torch.randn(min(1024, N - i), V, generator=g) * 3).to(device, torch.bfloat16)
    target = torch.randint(0, V, (N,), generator=g).to(device)
    target[N - 2] = IGNORE
    rows = torch.tensor([0, 1, N // 2, 16383, N - 2, N - 1], device=device)  # 16383 * V + V > 2^31
    sub = logits[rows].clone()
    lp_sub, _, _ = expected_rows(sub, target[rows], 1.0)
    old = torch.zeros(N, device=device)
    old[rows] = (lp_sub - 0.2).float().to(device)
    adv, mask = torch.ones(N, device=device), torch.ones(N, device=device)
    out = run_fwd(be, logits, target, old, adv, mask, None, MHPOConfig(), 0.0, 1.0, True)
    picked = tuple(t[rows] for t in out)
    check_fwd_outputs(picked, sub, target[rows], old[rows], adv[rows], mask[rows], None, MHPOConfig(), 0.0, 1.0,
                      True, "N*V > 2^31")
    dlogp, dent = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    be.bwd(logits, target, out[2], out[1], dlogp, dent, 1.0, IGNORE, logits)  # in place: no second 4.3 GB
    want = expected_grad(sub, target[rows], 1.0, dlogp[rows], dent[rows])
    assert_close(logits[rows], want, *TOL[torch.bfloat16], "grad of rows past 2^31")
    assert (logits[N - 2] == 0).all()
