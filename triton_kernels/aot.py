"""Compile every shipped Triton kernel configuration ahead of time for NVIDIA GPUs.

No GPU is needed: Triton lowers to PTX and its bundled ptxas assembles SASS;
``cuobjdump --dump-resource-usage`` then reports registers and local memory
(spills). Exits non-zero on a compile error or a spill.

    TRITON_INTERPRET=0 python -m triton_kernels.aot --arch 80 90 --jobs 2
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

DTYPES = ("fp32", "bf16", "fp16")
MODES = (0, 1, 2, 3)


def configs():
    """(kernel, logits dtype, constexprs, num_warps): every block size and dtype at the
    heaviest epilogue, and every epilogue variant at the largest block."""
    from .fused_logprob import BLOCKS_V, CLIP_LOG_RATIO_LIMIT, num_warps

    top = BLOCKS_V[-1]
    fwd = {(dt, b, 1, True, True) for dt in DTYPES for b in BLOCKS_V}
    fwd |= {(dt, top, m, r, e) for dt in DTYPES for m in MODES for r in (False, True) for e in (False, True)}
    for dt, b, m, r, e in sorted(fwd):
        yield "fwd", dt, dict(MODE=m, HAS_REF=r, WANT_ENT=e, BLOCK_V=b, LIMIT=CLIP_LOG_RATIO_LIMIT), num_warps(b)
    for dt, b, d in itertools.product(DTYPES, BLOCKS_V, (False, True)):
        yield "bwd", dt, dict(HAS_DENT=d, HAS_SCALE=d, BLOCK_V=b), num_warps(b)
    for dt in DTYPES:  # the loss's upstream gradient without the entropy term, at the largest block
        yield "bwd", dt, dict(HAS_DENT=False, HAS_SCALE=True, BLOCK_V=top), num_warps(top)
    # the finishing kernel: every ratio control with everything on (packed, sequence-level) and with
    # everything off; every aggregation mode padded and packed (the "dtype" is that of cu_seqlens)
    from .finish import FINISH_BLOCK, FINISH_WARPS

    fin = {(m, 1, "i64", True, True) for m in range(5)} | {(m, 0, None, False, False) for m in range(5)}
    fin |= {(1, agg, cu, False, True) for agg in range(4) for cu in ("i32", None)}
    for mode, agg, cu, seq, opts in sorted(fin, key=str):
        yield "finish", cu or "i32", dict(
            MODE=mode, HAS_ENT=opts, HAS_MASK=opts, HAS_REF=opts, HAS_CU=cu is not None, SEQ_LEVEL=seq, AGG=agg,
            CHECK=opts, BLOCK=FINISH_BLOCK, CLIP_LIMIT=20.0, GSPO_LIMIT=10.0), FINISH_WARPS


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

    from . import fused_logprob
    from .finish import _finish_kernel

    fn = {"fwd": fused_logprob._fwd_kernel, "bwd": fused_logprob._bwd_kernel, "finish": _finish_kernel}[kernel]
    src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    except Exception as e:  # noqa: BLE001 - reported as a failed row
        return job, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return job, {k: int(v) for k, v in fields.items()}, None


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_kernels.aot: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    jobs = [c + (a,) for a in args.arch for c in configs()]
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
                print(f"{kernel:6} {dtype:5} {arch:>3} {warps:>5}  {res.get('REG', -1):>4} {res.get('LOCAL', 0):>5}  {flags}")
    print(f"{len(jobs)} configurations compiled for sm_{', sm_'.join(map(str, args.arch))}: {failures} failed or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
