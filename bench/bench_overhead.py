"""Fixed per-call cost: one small mhpo_loss forward + backward vs F.cross_entropy on the same tensors.

At N=64, V=512 the kernels' own work is microseconds; what is left is the Python
glue and the op dispatches around them (on a GPU: the launches). Target: our
fwd+bwd <= 1.5x F.cross_entropy's. Also prints the dispatched work ops and host
syncs per call (the counter of tests/test_dispatch_counts.py).

    python bench/bench_overhead.py                     # writes bench/results/overhead-<device>-<date>.{md,csv}
    python bench/bench_overhead.py --N 64 --V 512 --backend cpu --repeats 2000 --out DIR
"""
from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mhpo_kernels as mk  # noqa: E402


def make(N, V, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g).to(device)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    old = (torch.randn(N, generator=g) * 0.3 - 6.5).to(device)
    adv = torch.randn(N, generator=g).to(device)
    mask = torch.ones(N, device=device)
    return logits, ids, old, adv, mask


def cases(logits, ids, old, adv, mask, backend):
    x = logits.detach().requires_grad_(True)

    def ce():
        x.grad = None
        F.cross_entropy(x, ids).backward()

    def ours(**kw):
        def step():
            x.grad = None
            mk.mhpo_loss(x, ids, old, adv, mask, backend=backend, **kw).loss.backward()
        return step

    out = {
        "F.cross_entropy": ce,
        f"mhpo_loss ({backend})": ours(),
        f"mhpo_loss ({backend}, check_ids=False)": ours(check_ids=False),
        f"mhpo_loss ({backend}, seq-mean-token-mean, entropy)": ours(loss_agg_mode="seq-mean-token-mean",
                                                                     return_entropy=True),
    }
    if "fused_gradient" in inspect.signature(mk.mhpo_loss).parameters:  # the two-kernel path (fwd, finish, bwd)
        out[f"mhpo_loss ({backend}, fused_gradient=False)"] = ours(fused_gradient=False)
    return out


def timeit_all(fns, repeats, sync, clock, rounds=7):
    """Median us per call of each function: ``rounds`` batches of ``repeats`` calls, the cases
    interleaved batch by batch (so a change in machine load hits every case alike)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(max(20, repeats // 20)):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(repeats):
                fn()
            sync()
            times[name].append((clock() - t0) / repeats * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--V", type=int, default=512)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--clock", choices=("wall", "thread"), default=None,
                   help="wall: time.perf_counter; thread: time.thread_time, this thread's CPU time (not inflated "
                        "by other processes on a shared machine; CPU device with --threads 1 only). "
                        "Default: thread there, else wall")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from test_dispatch_counts import SYNC, count_ops, total

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    single_cpu = dev.type == "cpu" and torch.get_num_threads() == 1
    if args.clock == "thread" and not single_cpu:
        p.error("--clock thread needs --device cpu --threads 1 (other threads' and the GPU's time would be missed)")
    clock_name = args.clock or ("thread" if single_cpu else "wall")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    tensors = make(args.N, args.V, dev)
    fns = cases(*tensors, args.backend)
    timed = timeit_all(fns, args.repeats, sync, clock)
    rows = []
    base = None
    for name, fn in fns.items():
        us = timed[name]
        c = count_ops(fn)
        base = us if base is None else base
        rows.append(dict(case=name, N=args.N, V=args.V, us_per_call=round(us, 1), vs_cross_entropy=round(us / base, 2),
                         work_ops=total(c), host_syncs=c[SYNC]))
        print(f"{name:55s} {us:8.1f} us  {us / base:5.2f}x  ops {total(c):3d}  syncs {c[SYNC]}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"overhead-{dev.type}-{datetime.date.today().isoformat()}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    with open(stem + ".md", "w") as f:
        f.write(f"# Per-call overhead, N={args.N}, V={args.V}, {dev.type} ({cpu}, {torch.get_num_threads()} threads), "
                f"torch {torch.__version__}, {datetime.date.today().isoformat()}\n\n")
        f.write("One forward + backward per call, median of 7 batches of "
                f"{args.repeats} calls, the cases interleaved batch by batch, timed with the {clock_name} clock "
                f"({'this thread' + chr(39) + 's CPU time' if clock_name == 'thread' else 'wall time'}); "
                "work ops and host syncs counted as in tests/test_dispatch_counts.py. "
                f"Target: mhpo_loss <= 1.5x F.cross_entropy. Load average at the end of the run: {load} "
                "(a shared machine: absolute times are inflated, the ratios less so).\n\n")
        f.write(f"Command: `python bench/bench_overhead.py --N {args.N} --V {args.V} --backend {args.backend} "
                f"--device {args.device} --repeats {args.repeats} --threads {args.threads} --clock {clock_name}`\n\n")
        f.write("| case | us / call | vs F.cross_entropy | work ops | host syncs |\n|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['case']} | {r['us_per_call']} | {r['vs_cross_entropy']}x | {r['work_ops']} | "
                    f"{r['host_syncs']} |\n")
    print(f"wrote {stem}.md / .csv")


if __name__ == "__main__":
    main()
