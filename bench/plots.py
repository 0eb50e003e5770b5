"""PNG plots from benchmark rows (JSON written by the harness): time and GB/s vs V, peak memory vs N.

    python bench/plots.py bench/results/cpu-2026-01-01.json --out bench/results/

One line per variant (backend or peer); the fwd+bwd rows of each op. ``time vs V``
uses the token count with the most V points, ``memory vs N`` the vocabulary
with the most N points.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import List


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, x_key, fixed_key, fixed_val, y_key):
    out = {}
    for r in rows:
        if r[fixed_key] == fixed_val and r.get(y_key) is not None:
            out.setdefault(r["variant"], []).append((r[x_key], r[y_key]))
    return {k: sorted(v) for k, v in out.items() if v}


def plot_rows(rows: List[dict], out_dir: str, prefix: str = "", mode: str = "fwd+bwd") -> List[str]:
    """Write PNGs for every op in ``rows``; return their paths (none when matplotlib is missing)."""
    try:
        plt = _plt()
    except ImportError:
        print("plots: matplotlib not installed (pip install matplotlib); no PNG written")
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    ops = sorted({r["op"] for r in rows})
    for op in ops:
        rs = [r for r in rows if r["op"] == op and r["mode"] == mode and r.get("ms_p50")]
        if not rs:
            continue
        dev = rs[0].get("device_name", "")
        dtype = rs[0].get("dtype", "")
        # time and GB/s (or TFLOP/s) vs V at the N with the most V values
        n_counts = Counter((r["N"], r["H"]) for r in {(r["N"], r["H"], r["V"]): r for r in rs}.values())
        (N, Hd), nv = n_counts.most_common(1)[0]
        sub = [r for r in rs if r["N"] == N and r["H"] == Hd]
        perf_key = "gbs" if any(r.get("gbs") for r in sub) else "tflops"
        if nv >= 2:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
            for ax, key, ylabel in ((axes[0], "ms_p50", "median time (ms)"),
                                    (axes[1], perf_key, "achieved GB/s (byte floor)" if perf_key == "gbs"
                                     else "TFLOP/s")):
                for name, pts in _series(sub, "V", "N", N, key).items():
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                if key == "gbs" and sub[0].get("copy_gbs"):
                    ax.axhline(sub[0]["copy_gbs"], color="gray", ls="--", label="copy bandwidth")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("vocabulary V")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            axes[1].legend(fontsize=8)
            fig.suptitle(f"{op} {mode}, N={N}{f' H={Hd}' if Hd else ''}, {dtype} — {dev}", fontsize=10)
            fig.tight_layout()
            p = os.path.join(out_dir, f"{prefix}{op}-vs-V.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        # peak memory vs N at the V with the most N values
        v_counts = Counter((r["V"], r["H"]) for r in {(r["N"], r["H"], r["V"]): r for r in rs}.values())
        (V, Hd), nn = v_counts.most_common(1)[0]
        if nn >= 2:
            sub = [r for r in rs if r["V"] == V and r["H"] == Hd and r.get("peak_bytes") is not None]
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            for name, pts in _series(sub, "N", "V", V, "peak_bytes").items():
                ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel("peak extra memory (MiB)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"{op} {mode}, V={V}{f' H={Hd}' if Hd else ''}, {dtype} — {dev}", fontsize=9)
            fig.tight_layout()
            p = os.path.join(out_dir, f"{prefix}{op}-mem-vs-N.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="row files written by the harness or bench/report.py")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: beside the first JSON)")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--mode", default="fwd+bwd")
    a = ap.parse_args(argv)
    rows = []
    for path in a.json:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"] if isinstance(data, dict) else data
    for p in plot_rows(rows, a.out or os.path.dirname(os.path.abspath(a.json[0])), a.prefix, a.mode):
        print(p)


if __name__ == "__main__":
    main()
