"""Shared benchmark harness: timing, peak memory, roofline, CSV/JSON rows, summary.

Per-op scripts (``bench_*.py``) only describe their variants (how to make
inputs, how to run the forward) and the op's byte / FLOP floor; this module
does the rest:

* time: CUDA events after warm-up, rotating fresh random input sets so the data
  is not L2-resident (20/50/80 percentiles); wall-clock on CPU. Forward and
  backward are timed within the same iteration, so one run yields the fwd, bwd
  and fwd+bwd rows.
* peak extra memory over the level after the inputs exist: CUDA
  ``max_memory_allocated`` delta; on CPU each variant runs in its own
  subprocess and the resident-set high-water mark is read (``VmHWM`` reset
  through ``/proc/self/clear_refs``, else the ``ru_maxrss`` delta).
* roofline: bytes moved at the op's floor, achieved GB/s, and the fraction of
  the device-to-device copy bandwidth measured in the same run.
* rows tagged with device name, torch / triton / package versions, git commit;
  written as CSV and JSON; a summary with speedups over the eager reference
  (``torch``) and over ``torch.compile`` of the reference, printed last.

Run a per-op script, e.g. ``python bench/bench_mhpo_loss.py --N 4096 --V 151936``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from mhpo_kernels.tools import bench_utils as bu  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
EAGER, COMPILED = "torch", "torch.compile"
# Triton's interpreter (CPU tensors) runs ~1 us per element: skip it above this many.
INTERPRET_MAX_ELEMS = 4_000_000


@dataclasses.dataclass
class Variant:
    """One thing to time. ``setup(shape, dtype, device, seed) -> inputs dict``;
    ``fwd(inputs) -> 0-d loss`` (differentiable w.r.t. the inputs that require grad)."""

    name: str
    kind: str  # "ours" | "reference" | "compiled" | "peer"
    setup: Optional[Callable] = None
    fwd: Optional[Callable] = None
    skip: Optional[str] = None  # why it cannot run here (reported, not an error)
    compiled: bool = False  # needs a warm-up call before memory is measured
    note: str = ""


@dataclasses.dataclass
class Shape:
    N: int
    V: int
    H: int = 0

    def label(self) -> str:
        return f"N={self.N} V={self.V}" + (f" H={self.H}" if self.H else "")


# ----------------------------------------------------------------------------- CLI


# The logits-in ops (mhpo_loss, token_logprobs) share their shapes and byte floor:
# fwd reads the [N, V] logits once, bwd reads them and writes the gradient.
def logits_shapes(args) -> List[Shape]:
    return [Shape(N, V) for V in args.V for N in args.N]


def logits_input_bytes(shape, dtype) -> int:
    return shape.N * shape.V * torch.empty((), dtype=dtype).element_size()


def logits_bytes_floor(shape, dtype, mode) -> int:
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * logits_input_bytes(shape, dtype)


def no_flops(shape, mode):
    return None


def base_parser(description: str, *, with_H: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--N", type=int, nargs="+", default=None, help="token counts (default: 4096 CPU / 16384 GPU)")
    p.add_argument("--V", type=int, nargs="+", default=[151936], help="vocabulary sizes")
    if with_H:
        p.add_argument("--H", type=int, nargs="+", default=None, help="hidden sizes (default: 512 CPU / 4096 GPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--backends", nargs="+", default=None,
                   help="our backends to time (default: every available one); the eager reference always runs")
    p.add_argument("--peers", nargs="+", default=["compile", "liger", "cce"],
                   help="peers to include: compile (torch.compile of the reference), liger, cce; 'none' for none")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default: 3 CPU / 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 0 CPU / 3 GPU)")
    p.add_argument("--baseline-repeats", type=int, default=None,
                   help="timed iterations for the eager reference (default: --repeats; 0 = reuse the "
                        "memory pass's single cold call, for CPU where one call takes a minute)")
    p.add_argument("--inplace", action="store_true", help="also time our fused backends with inplace_backward=True")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, help="folder for <op>.csv / <op>.json (default: none written)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="CPU: seconds per variant subprocess")
    p.add_argument("--no-subprocess", action="store_true", help="CPU: measure in this process (memory less exact)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def finish_args(args) -> argparse.Namespace:
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    if args.N is None:
        args.N = [16384 if cuda else 4096]
    if getattr(args, "H", 0) is None:
        args.H = [4096 if cuda else 512]
    if args.repeats is None:
        args.repeats = 20 if cuda else 3
    if args.warmup is None:
        args.warmup = 3 if cuda else 0
    args.peers = [] if args.peers in (["none"], []) else list(args.peers)
    args.dtype_t = bu.parse_dtype(args.dtype)
    return args


def wanted_backends(args, device) -> List[str]:
    import mhpo_kernels as mk

    avail = [b for b in mk.available_backends(device) if b not in ("torch", "reference")]
    want = avail if args.backends is None else [b for b in args.backends if b not in ("torch", "reference")]
    return want


def interpreter_skip(backend: str, device, n_elems: int) -> Optional[str]:
    if backend == "triton" and torch.device(device).type == "cpu" and n_elems > INTERPRET_MAX_ELEMS:
        return (f"Triton interpreter on CPU is ~1 us/element: N*V={n_elems:,} would take minutes "
                f"(limit {INTERPRET_MAX_ELEMS:,}); skipped")
    return None


# ----------------------------------------------------------------------------- measuring one variant


def measure_variant(op, args, variant: Variant, shape: Shape) -> dict:
    """Peak memory then timing of one variant at one shape, in this process."""
    device, dtype = args.device, args.dtype_t
    backward = any(m != "fwd" for m in args.modes)
    cuda = device.type == "cuda"
    set_bytes = op.input_bytes(shape, dtype)
    n_sets = bu.rotation_count(set_bytes, device)
    sets = [variant.setup(shape, dtype, device, args.seed + i) for i in range(n_sets)]
    bu.sync(device)
    if variant.compiled or cuda:
        _one_call(variant, sets[0], backward)  # compile / autotune / lazy init before measuring memory
    peaks, cold_ms = bu.measure_peaks(variant.fwd, sets[0], device, backward=backward)
    repeats = args.repeats
    if variant.kind == "reference" and args.baseline_repeats is not None:
        repeats = args.baseline_repeats
    if repeats > 0:
        phases = bu.time_phases(variant.fwd, sets, device, backward=backward, warmup=args.warmup, repeats=repeats)
    else:  # --baseline-repeats 0: the memory pass's own (cold, wall-clock) time
        phases = cold_ms
    out = {"n_sets": n_sets, "repeats": repeats, "mem_method": "cuda" if cuda else bu.cpu_peak_method()}
    for mode in args.modes:
        p20, p50, p80 = bu.quantiles(phases[mode])
        out[mode] = dict(ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_bytes=peaks.get(mode))
    del sets
    if cuda:
        torch.cuda.empty_cache()
    return out


def _one_call(variant, inputs, backward):
    bu._clear_grads(inputs)
    loss = variant.fwd(inputs)
    if backward:
        loss.backward()
    bu._clear_grads(inputs)


def _worker(op, spec: dict) -> None:
    """Subprocess entry: measure one variant at each given shape; print one JSON line per shape."""
    args = finish_args(op.parser().parse_args(spec["argv"]))
    for i, sh in enumerate(spec["shapes"]):
        shape = Shape(**sh)
        variant = next(v for v in op.variants(args, shape) if v.name == spec["variant"])
        try:
            res = measure_variant(op, args, variant, shape)
        except Exception as e:  # reported as the row's status
            res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "trace": traceback.format_exc()[-2000:]}
        print(f"@@RESULT {i} " + json.dumps(res), flush=True)


def _run_subprocess(op, args, argv, variant: Variant, shapes: List[Shape]) -> List[dict]:
    """One subprocess per variant (all its shapes, when the RSS high-water mark can be reset)."""
    spec = dict(argv=argv, shapes=[dataclasses.asdict(s) for s in shapes], variant=variant.name)
    cmd = [sys.executable, os.path.abspath(op.__file__), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    results: List[Optional[dict]] = [None] * len(shapes)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * len(shapes), env=env,
                              cwd=ROOT)
        stdout, err = proc.stdout, f"worker exited {proc.returncode}: " + " | ".join(
            (proc.stderr or proc.stdout).strip().splitlines()[-3:])[-300:]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {args.timeout * len(shapes):.0f} s"
    for line in stdout.splitlines():
        if line.startswith("@@RESULT "):
            _, i, payload = line.split(" ", 2)
            results[int(i)] = json.loads(payload)
    return [r if r is not None else {"error": err} for r in results]


# ----------------------------------------------------------------------------- the run


def run(op, argv=None, notes_out: Optional[list] = None) -> List[dict]:
    """Parse the CLI, measure every variant at every shape, write rows, print the summary.

    ``notes_out``: a list that receives the run's notes (what was skipped and why)."""
    parser = op.parser()
    args = parser.parse_args(argv)
    if args.worker:
        _worker(op, json.loads(args.worker))
        return []
    argv = list(sys.argv[1:] if argv is None else argv)
    args = finish_args(args)
    device = args.device
    info = bu.env_info(device)
    print(f"# {op.OP} on {info['device_name']} | torch {info['torch']} | triton {info['triton']} | "
          f"mhpo_kernels {info['mhpo_kernels']} @ {info['commit']}", flush=True)
    copy_gbs = bu.copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cpu" else (2 << 30))
    print(f"# device-to-device copy bandwidth (roofline reference): {copy_gbs:.1f} GB/s", flush=True)
    use_sub = device.type == "cpu" and not args.no_subprocess
    rows: List[dict] = []
    notes: List[str] = []
    # (shape, variant) pairs, variant-major so that on CPU one subprocess serves all shapes of a variant
    todo = {}
    for shape in op.shapes(args):
        for v in op.variants(args, shape):
            todo.setdefault(v.name, []).append((shape, v))
    batch = use_sub and bu.cpu_peak_method() == "vmhwm"
    for pairs in todo.values():
        live = []
        for shape, v in pairs:
            if v.skip:
                msg = f"{v.name}: {v.skip}"
                if msg not in notes:
                    notes.append(msg)
                print(f"  skip {op.OP} {shape.label()} {args.dtype} {v.name}: {v.skip}", flush=True)
                rows += [_row(op, args, info, shape, v, m, None, copy_gbs, status="skipped: " + v.skip)
                         for m in args.modes]
            else:
                live.append((shape, v))
        groups = [live] if (batch and live) else [[p] for p in live]
        for group in groups:
            t0 = time.perf_counter()
            if use_sub:
                results = _run_subprocess(op, args, argv, group[0][1], [s for s, _ in group])
            else:
                results = [_measure_here(op, args, v, s) for s, v in group]
            took = (time.perf_counter() - t0) / len(group)
            for (shape, v), res in zip(group, results):
                label = f"{op.OP} {shape.label()} {args.dtype} {v.name}"
                if "error" in res:
                    print(f"  FAIL {label}: {res['error']}", flush=True)
                    rows += [_row(op, args, info, shape, v, m, None, copy_gbs, status="error: " + res["error"])
                             for m in args.modes]
                    continue
                rows += [_row(op, args, info, shape, v, m, res, copy_gbs) for m in args.modes]
                last = res[args.modes[-1]]
                print(f"  done {label}: {args.modes[-1]} {last['ms_p50']:.2f} ms, peak "
                      f"{bu.fmt_bytes(last['peak_bytes'])} (~{took:.1f} s)", flush=True)
    add_speedups(rows)
    if args.out:
        write_rows(rows, args.out, op.OP)
    print()
    print(summary(rows, notes=notes))
    goals = getattr(op, "goals", None)
    if goals:
        print(goals(rows))
    if notes_out is not None:
        notes_out.extend(notes)
    return rows


def _measure_here(op, args, v, shape) -> dict:
    try:
        return measure_variant(op, args, v, shape)
    except Exception as e:
        oom = isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ()))
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": "OOM" if oom else f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def _row(op, args, info, shape, v, mode, res, copy_gbs, status="ok") -> dict:
    r = dict(op=op.OP, variant=v.name, kind=v.kind, N=shape.N, V=shape.V, H=shape.H, dtype=args.dtype, mode=mode,
             ms_p20=None, ms_p50=None, ms_p80=None, peak_bytes=None, status=status, note=v.note)
    floor = op.bytes_floor(shape, args.dtype_t, mode)
    flops = op.flops(shape, mode)
    r.update(bytes_floor=floor, flops=flops, copy_gbs=round(copy_gbs, 2), gbs=None, frac_copy=None, tflops=None)
    if res is not None and mode in res:
        m = res[mode]
        r.update(ms_p20=m["ms_p20"], ms_p50=m["ms_p50"], ms_p80=m["ms_p80"], peak_bytes=m["peak_bytes"],
                 n_sets=res.get("n_sets"), repeats=res.get("repeats"), mem_method=res.get("mem_method"))
        if floor and m["ms_p50"]:
            r["gbs"] = floor / (m["ms_p50"] * 1e-3) / 1e9
            r["frac_copy"] = r["gbs"] / copy_gbs
        if flops and m["ms_p50"]:
            r["tflops"] = flops / (m["ms_p50"] * 1e-3) / 1e12
    r.update({k: info[k] for k in ("device", "device_name", "torch", "triton", "mhpo_kernels", "commit", "date")})
    return r


def add_speedups(rows: List[dict]) -> None:
    """speedup_eager / speedup_compiled: reference time / this time, same op, shape, dtype and mode."""
    key = lambda r: (r["op"], r["N"], r["V"], r["H"], r["dtype"], r["mode"])
    base = {}
    for r in rows:
        if r["variant"] in (EAGER, COMPILED) and r["ms_p50"]:
            base[(key(r), r["variant"])] = r["ms_p50"]
    for r in rows:
        for name, col in ((EAGER, "speedup_eager"), (COMPILED, "speedup_compiled")):
            b = base.get((key(r), name))
            r[col] = b / r["ms_p50"] if (b and r["ms_p50"]) else None


COLUMNS = ["op", "variant", "kind", "N", "V", "H", "dtype", "mode", "ms_p20", "ms_p50", "ms_p80", "peak_bytes",
           "bytes_floor", "gbs", "copy_gbs", "frac_copy", "flops", "tflops", "speedup_eager", "speedup_compiled",
           "status", "note", "n_sets", "repeats", "mem_method", "device", "device_name", "torch", "triton",
           "mhpo_kernels", "commit", "date"]


def write_rows(rows: List[dict], out: str, stem: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(rows, f, indent=1)


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summary(rows: List[dict], notes=()) -> str:
    """The summary table (Markdown), one line per measured row, skipped / failed variants listed below."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["N"], r["V"], r["H"], r["dtype"]), []).append(r)
    for (op, N, V, H, dtype), rs in groups.items():
        shape = f"N={N} V={V}" + (f" H={H}" if H else "")
        lines.append(f"\n### {op}  {shape}  {dtype}  ({rs[0]['device_name']}, copy {rs[0]['copy_gbs']} GB/s)\n")
        body, bad = [], []
        for r in rs:
            if r["ms_p50"] is None:
                if r["mode"] == rs[-1]["mode"] and r["status"].startswith("error"):
                    bad.append(f"{r['variant']}: {r['status']}")
                continue
            perf = (f"{_f(r['gbs'], '.1f')} GB/s ({_f(100 * r['frac_copy'] if r['frac_copy'] else None, '.0f')}%)"
                    if r["bytes_floor"] and not r["flops"] else f"{_f(r['tflops'], '.2f')} TFLOP/s")
            body.append([r["variant"], r["mode"], _f(r["ms_p50"], ".2f"),
                         f"{_f(r['ms_p20'], '.2f')}-{_f(r['ms_p80'], '.2f')}", bu.fmt_bytes(r["peak_bytes"]), perf,
                         _f(r["speedup_eager"], ".2f") + "x" if r["speedup_eager"] else "-",
                         _f(r["speedup_compiled"], ".2f") + "x" if r["speedup_compiled"] else "-"])
        body.sort(key=lambda b: (MODES.index(b[1]), float(b[2]) if b[2] != "-" else 1e30))
        lines.append(bu.table(body, ["variant", "mode", "median ms", "p20-p80 ms", "peak extra mem",
                                     "achieved (of copy bw)", "vs eager", "vs compiled"]))
        if bad:
            lines.append("\nnot measured: " + "; ".join(bad))
    for n in notes:
        lines.append(f"- {n}")
    return "\n".join(lines)
