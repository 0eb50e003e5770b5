"""Compile every shipped Triton kernel configuration ahead of time for NVIDIA GPUs.

No GPU is needed: Triton lowers to PTX and its bundled ptxas assembles SASS;
``cuobjdump --dump-resource-usage`` then reports registers and local memory
(spills). Exits non-zero on a compile error or a spill.

    TRITON_INTERPRET=0 python -m mhpo_kernels.triton_kernels.aot --arch 80 90 --jobs 2 [--kernels finish]
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .. import _constants

DTYPES = ("fp32", "bf16", "fp16")
FINISH_ONLY = (_constants.MODE_GSPO, _constants.MODE_CISPO)
MODES = tuple(m for m in _constants.MODES.values() if m not in FINISH_ONLY)  # the forward's epilogues
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
KERNELS = ("fwd", "bwd", "finish", "fwd_grad", "scale_grad")


def configs():
    """(kernel, logits dtype, constexprs, num_warps): every block size and dtype at the
    heaviest epilogue, and every epilogue variant at the largest block."""
    from .fused_logprob import BLOCKS_V, CLIP_LOG_RATIO_LIMIT, num_warps, vec_width

    top = BLOCKS_V[-1]
    fwd = {(dt, b, 1, True, True) for dt in DTYPES for b in BLOCKS_V}
    fwd |= {(dt, top, m, r, e) for dt in DTYPES for m in MODES for r in (False, True) for e in (False, True)}
    for dt, b, m, r, e in sorted(fwd):
        yield "fwd", dt, dict(MODE=m, HAS_REF=r, WANT_ENT=e, BLOCK_V=b, VEC=vec_width(ITEMSIZE[dt]),
                              LIMIT=CLIP_LOG_RATIO_LIMIT), num_warps(b)
    for dt, b, d in itertools.product(DTYPES, BLOCKS_V, (False, True)):
        yield "bwd", dt, dict(HAS_DENT=d, HAS_SCALE=d, BLOCK_V=b), num_warps(b)
    for dt in DTYPES:  # the loss's upstream gradient without the entropy term, at the largest block
        yield "bwd", dt, dict(HAS_DENT=False, HAS_SCALE=True, BLOCK_V=top), num_warps(top)
    # the finishing kernel: every ratio control with everything on (packed, sequence-level,
    # importance weights, token_out, low_var_kl) and with everything off; every aggregation mode padded
    # and packed, every KL estimator (the "dtype" is that of cu_seqlens)
    from .constants import GSPO_LOG_RATIO_LIMIT
    from .finish import FINISH_BLOCK, FINISH_WARPS

    modes, mhpo, kls = tuple(_constants.MODES.values()), _constants.MODE_MHPO, _constants.KL_ESTIMATORS
    lvk = kls["low_var_kl"]
    fin = {(m, 1, "i64", True, True, lvk) for m in modes}
    fin |= {(m, 0, None, False, False, kls["k3"]) for m in modes}
    fin |= {(mhpo, agg, cu, False, True, lvk) for agg in _constants.AGG_IDS.values() for cu in ("i32", None)}
    fin |= {(mhpo, 0, None, False, True, k) for k in kls.values()}
    for mode, agg, cu, seq, opts, kl in sorted(fin, key=str):
        yield "finish", cu or "i32", dict(
            MODE=mode, HAS_ENT=opts, HAS_MASK=opts, HAS_REF=opts, HAS_CU=cu is not None, SEQ_LEVEL=seq, AGG=agg,
            CHECK=opts, HAS_IW=opts, KL_EST=kl, HAS_TOK=opts, BLOCK=FINISH_BLOCK, CLIP_LIMIT=CLIP_LOG_RATIO_LIMIT,
            GSPO_LIMIT=GSPO_LOG_RATIO_LIMIT,
        ), FINISH_WARPS
    yield from fused_grad_configs()


def fused_grad_configs():
    """The forward that writes the gradient (fused_grad.py): every block size and dtype at the
    heaviest epilogue, every ratio control with and without the KL and entropy terms at the largest
    block, and the in-place scaling kernel per dtype."""
    from .constants import CLIP_LOG_RATIO_LIMIT
    from .fused_grad import BLOCKS_V, SCALE_BLOCK, num_warps

    top = BLOCKS_V[-1]
    fg = {(dt, b, 1, True, True) for dt in DTYPES for b in BLOCKS_V}
    fg |= {("bf16", top, m, r, e) for m in MODES[1:] for r in (False, True) for e in (False, True)}
    for dt, b, m, r, e in sorted(fg):
        yield "fwd_grad", dt, dict(MODE=m, HAS_REF=r, WANT_ENT=e, HAS_ENT=e, BLOCK_V=b,
                                   LIMIT=float(CLIP_LOG_RATIO_LIMIT)), num_warps(b)
    for dt in DTYPES:
        yield "scale_grad", dt, dict(BLOCK_V=SCALE_BLOCK), 4


def _signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "out_ptr"):
            sig[name] = "*" + dtype
        elif name == "cu_ptr":
            sig[name] = "*" + dtype
        elif name in ("target_ptr", "bad_ptr"):
            sig[name] = "*i64"
        elif name in ("N", "S", "seq_len", "num_classes"):
            sig[name] = "i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in ("V", "ignore_index", "vocab_start"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    kernel, dtype, constexprs, warps, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import fused_grad, fused_logprob
    from .finish import _finish_kernel

    fn = {"fwd": fused_logprob._fwd_kernel, "bwd": fused_logprob._bwd_kernel, "finish": _finish_kernel,
          "fwd_grad": fused_grad._fwd_grad_kernel, "scale_grad": fused_grad._scale_grad_kernel}[kernel]
    src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    except Exception as e:  # reported as a failed row
        return job, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return job, {k: int(v) for k, v in fields.items()}, None


def main_loop_sass(kernel, dtype, constexprs, warps, arch=90):
    """The SASS of the kernel's first loop over V (its first backward branch) and ptxas's registers, for
    rows as a launch specialises them when every pointer, the row strides and V are multiples of 16
    (V = 151936, say)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import fused_logprob

    fn = {"fwd": fused_logprob._fwd_kernel, "bwd": fused_logprob._bwd_kernel}[kernel]
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride") or n == "V")}
    k = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs), constexprs, attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    for addr, text in ins:
        b = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            return [t for a, t in ins if int(b.group(1), 16) <= a <= addr], k.n_regs if hasattr(k, "n_regs") else None
    raise RuntimeError(f"no loop found in the SASS of {kernel} {constexprs}")


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("mhpo_kernels.triton_kernels.aot: unset TRITON_INTERPRET (the interpreter does not compile)",
              file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS, help="only these kernels")
    args = p.parse_args(argv)
    jobs = [c + (a,) for a in args.arch for c in configs() if c[0] in args.kernels]
    failures = 0
    print(f"{'kernel':6} {'dtype':5} {'sm':>3} {'warps':>5}  {'REG':>4} {'LOCAL':>5}  constexprs")
    with ProcessPoolExecutor(args.jobs) as pool:
        for (kernel, dtype, cx, warps, arch), res, err in pool.map(compile_one, jobs):
            flags = " ".join(f"{k}={v}" for k, v in cx.items() if k not in ("LIMIT", "CLIP_LIMIT", "GSPO_LIMIT"))
            if err or res.get("LOCAL", 0) or res.get("STACK", 0):
                failures += 1
            if err:
                print(f"{kernel:6} {dtype:5} {arch:>3} {warps:>5}  FAILED {err}  {flags}")
            else:
                print(f"{kernel:6} {dtype:5} {arch:>3} {warps:>5}  {res.get('REG', -1):>4} "
                      f"{res.get('LOCAL', 0):>5}  {flags}")
    archs = ", sm_".join(map(str, args.arch))
    print(f"{len(jobs)} configurations compiled for sm_{archs}: {failures} failed or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
