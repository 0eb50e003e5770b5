"""Timing, peak-memory and provenance helpers shared by ``mhpo-kernels check`` and ``bench/``.

* :func:`time_phases` times ``fwd`` (and ``loss.backward()``) with CUDA events
  on CUDA (after warm-up, rotating several input sets so the data is not
  L2-resident) or wall-clock on CPU, and returns 20/50/80 percentiles per phase.
* :func:`peak_extra_bytes` measures peak memory above a baseline: CUDA
  ``max_memory_allocated`` delta, or on CPU the resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``; falls back to the
  ``ru_maxrss`` delta, which only sees peaks above every earlier one).
* :func:`env_info` tags a result with device, versions and git commit.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- inputs


def make_policy_inputs(N: int, V: int, dtype, device, *, seed: int = 0, requires_grad=True,
                       leading=None) -> dict:
    """Random (never zero) policy-loss inputs with ratios near 1, without an [N, V] fp32 pass.

    logits ~ 2 * N(0, 1), so logsumexp(row) ~ log(V) + 2 and the old log-probs are
    ``logits[y] - log(V) - 2`` plus noise. ``leading`` (e.g. ``(1, N + 1)``) gives
    the logits another leading shape of the same rows (Liger wants [B, L + 1, V]).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    rows = N if leading is None else math.prod(leading)
    logits = torch.empty(rows, V, dtype=dtype, device=device).normal_(0.0, 2.0, generator=g)
    ids = torch.randint(0, V, (N,), generator=g, device=device)
    x_y = logits[:N].gather(1, ids[:, None])[:, 0].float()
    old = x_y - (math.log(V) + 2.0) + 0.3 * torch.randn(N, generator=g, device=device)
    adv = torch.randn(N, generator=g, device=device)
    mask = (torch.rand(N, generator=g, device=device) > 0.1).float()
    if leading is not None:
        logits = logits.reshape(*leading, V)
    if requires_grad:
        logits.requires_grad_(True)
    return dict(logits=logits, ids=ids, old=old, adv=adv, mask=mask)


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so that a
    measured call's allocations fault in new pages instead of reusing resident free ones, which the
    resident-set peak would not see."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_method() -> str:
    """'vmhwm' when the RSS high-water mark can be reset (exact per call), else 'ru_maxrss'."""
    return "vmhwm" if _reset_hwm() and _proc_status_kb("VmHWM") is not None else "ru_maxrss"


class PeakMemory:
    """Context manager: ``.bytes`` = peak memory above the level at entry.

    On CPU with the 'ru_maxrss' fallback the number is only right for the first
    measurement in a process whose peak exceeds every earlier one (the bench
    harness runs each variant in its own process for that reason).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = 0
        self.method = "cuda" if self.device.type == "cuda" else cpu_peak_method()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.method == "vmhwm":
            _release_free_heap()
            _reset_hwm()
            self.base = _proc_status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method == "vmhwm":
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self.base)
        return False


def peak_extra_bytes(fn: Callable[[], object], device) -> int:
    with PeakMemory(device) as pm:
        out = fn()
        del out
    return pm.bytes


# ----------------------------------------------------------------------------- timing


def quantiles(xs: Sequence[float], qs=(0.2, 0.5, 0.8)) -> List[float]:
    """Linear-interpolated quantiles (numpy's default), without numpy."""
    s = sorted(xs)
    if not s:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def l2_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    return 32 << 20


def rotation_count(set_bytes: int, device, max_sets: int = 8, mem_fraction: float = 0.3) -> int:
    """How many fresh input sets to rotate so one pass over them is >= 4x the L2 cache."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1  # CPU: every benchmarked shape dwarfs the caches; one set
    want = max(1, math.ceil(4 * l2_bytes(device) / max(set_bytes, 1)))
    free, _ = torch.cuda.mem_get_info()
    fit = max(1, int(mem_fraction * free // max(set_bytes, 1)))
    return max(1, min(want, fit, max_sets))


def _clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def time_phases(fwd: Callable[[dict], torch.Tensor], input_sets: List[dict], device, *,
                backward: bool = True, warmup: int = 2, repeats: int = 10,
                grad_out: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, List[float]]:
    """Per-phase times in ms: ``{"fwd": [...], "bwd": [...], "fwd+bwd": [...]}``.

    Each iteration uses the next input set (round robin), clears the inputs'
    ``.grad`` outside the timed region, runs ``loss = fwd(inputs)`` and, with
    ``backward``, ``loss.backward()``. Forward and backward are timed in the same
    iteration (CUDA events at three points, or ``perf_counter`` after a sync).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = len(input_sets)

    def one(i, record):
        s = input_sets[i % n]
        _clear_grads(s)
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        else:
            t0 = time.perf_counter()
        loss = fwd(s)
        if cuda:
            ev[1].record()
        else:
            t1 = time.perf_counter()
        if backward:
            if grad_out is None:
                loss.backward()
            else:
                loss.backward(grad_out(loss))
        if cuda:
            ev[2].record()
            record.append(ev)
        else:
            t2 = time.perf_counter()
            record.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
        del loss

    for i in range(warmup):
        one(i, [])
    sync(device)
    rec: list = []
    for i in range(repeats):
        one(warmup + i, rec)
    sync(device)
    if cuda:
        rec = [(a.elapsed_time(b), b.elapsed_time(c)) for a, b, c in rec]
    out = {"fwd": [f for f, _ in rec]}
    if backward:
        out["bwd"] = [b for _, b in rec]
        out["fwd+bwd"] = [f + b for f, b in rec]
    return out


def measure_peaks(fwd: Callable[[dict], torch.Tensor], inputs: dict, device, backward=True):
    """``(peaks, ms)``: peak extra bytes over the level after the inputs exist, for fwd, bwd and
    fwd+bwd, and the wall-clock times of this (cold) call, syncs included.

    All three peaks are relative to the same baseline; "bwd" counts what the forward
    saved for backward plus the backward's own buffers (the gradient included).
    """
    _clear_grads(inputs)
    out, ms = {}, {}
    t0 = time.perf_counter()
    with PeakMemory(device) as pm_f:
        loss = fwd(inputs)
    t1 = time.perf_counter()
    out["fwd"], ms["fwd"] = pm_f.bytes, [(t1 - t0) * 1e3]
    if backward:
        with PeakMemory(device) as pm_b:
            loss.backward()
        t2 = time.perf_counter()
        out["bwd"], ms["bwd"] = max(0, pm_b.bytes + pm_b.base - pm_f.base), [(t2 - t1) * 1e3]
        ms["fwd+bwd"] = [(t2 - t0) * 1e3]
    del loss
    if backward:
        out["fwd+bwd"] = max(out["fwd"], out["bwd"])
    _clear_grads(inputs)
    return out, ms


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), the roofline reference."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages / warm up
    sync(device)
    phases = time_phases(lambda s: s["dst"].copy_(s["src"]), [dict(src=src, dst=dst)], device,
                         backward=False, warmup=2, repeats=repeats)
    ms = quantiles(phases["fwd"])[1]
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- provenance


def git_commit(root: str = ROOT) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def env_info(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "triton": triton_version,
        "mhpo_kernels": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def table(rows: List[list], header: List[str]) -> str:
    """A plain fixed-width text table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells[1:]])
