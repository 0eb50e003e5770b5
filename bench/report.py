"""One command, one device report: every op's benchmark, the plots, a Markdown summary.

    python bench/report.py                      # CPU: N=4096 V=151936 bf16 (< 10 min on 2 cores)
    python bench/report.py --device cuda        # GPU: N=16384 V=151936 bf16, in-place variants, sweeps
    python bench/report.py --quick --out /tmp/r # tiny shapes (smoke test / dry run)

Writes ``<out>/<device>-<date>.{md,csv,json}`` and ``<out>/<device>-<date>-*.png``,
updates the "latest per device" table of ``<out>/README.md`` when it has one,
and prints the summary last.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_fused_linear  # noqa: E402
import bench_mhpo_loss  # noqa: E402
import bench_token_logprobs  # noqa: E402
import harness as H  # noqa: E402
import plots  # noqa: E402
import torch  # noqa: E402

from mhpo_kernels.tools import bench_utils as bu  # noqa: E402

OPS = {"mhpo_loss": bench_mhpo_loss, "token_logprobs": bench_token_logprobs, "fused_linear": bench_fused_linear}


def plan(device: str, quick: bool, N, V, Hd, dtype):
    """[(op key, argv)] for one report. The main shape gets every mode; sweeps only fwd+bwd."""
    common = ["--device", device, "--dtype", dtype]
    if quick:
        return [
            ("mhpo_loss", common + ["--N", "32", "64", "--V", "512", "1024", "--repeats", "2", "--inplace",
                                    "--peers", "liger", "cce"]),
            ("token_logprobs", common + ["--N", "32", "--V", "512", "--repeats", "2", "--modes", "fwd+bwd",
                                         "--peers", "none"]),
            ("fused_linear", common + ["--N", "32", "--V", "512", "--H", "32", "--repeats", "2", "--modes",
                                       "fwd+bwd", "--peers", "none"]),
        ]
    if device == "cuda":
        N, Hd = N or 16384, Hd or 4096
        return [
            ("mhpo_loss", common + ["--N", str(N), "--V", str(V), "--inplace"]),
            ("mhpo_loss", common + ["--N", "4096", "--V", "32768", "65536", "131072", str(V), "262144",
                                    "--modes", "fwd+bwd", "--inplace", "--peers", "compile", "liger"]),
            ("mhpo_loss", common + ["--N", "1024", "8192", "--V", str(V), "--modes", "fwd+bwd", "--inplace",
                                    "--peers", "compile", "liger"]),
            ("token_logprobs", common + ["--N", "8192", "--V", str(V), "--modes", "fwd", "fwd+bwd"]),
            ("fused_linear", common + ["--N", str(N), "--V", str(V), "--H", str(Hd), "--modes", "fwd+bwd",
                                       "--repeats", "5"]),
        ]
    N, Hd = N or 4096, Hd or 512
    slow = ["--baseline-repeats", "0"]  # the eager reference takes about a minute per call here: time its memory pass
    return [
        ("mhpo_loss", common + ["--N", str(N), "--V", str(V), "--repeats", "3"] + slow),
        ("mhpo_loss", common + ["--N", "1024", "--V", "16384", "65536", str(V), "--modes", "fwd+bwd",
                                "--repeats", "2", "--peers", "compile"] + slow),
        ("token_logprobs", common + ["--N", str(N), "--V", str(V), "--modes", "fwd+bwd", "--repeats", "2"] + slow),
        # N / 4: the lm_head matmuls take ~20 s per call at N=4096 here; the full shape is
        # python bench/bench_fused_linear.py --N 4096 --V 151936 --H 512 --modes fwd+bwd --repeats 1 ...
        ("fused_linear", common + ["--N", str(max(N // 4, 1)), "--V", str(V), "--H", str(Hd), "--modes", "fwd+bwd",
                                   "--repeats", "1"] + slow),
    ]


def _slug(device: str, name: str) -> str:
    base = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{base}-{datetime.date.today().isoformat()}"


def update_readme(out: str, device_name: str, slug: str, headline: str, command: str) -> None:
    path = os.path.join(out, "README.md")
    if not os.path.exists(path):
        return
    text = open(path).read()
    start, end = "<!-- latest:begin -->", "<!-- latest:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    rows = [ln for ln in body.strip().splitlines() if ln.startswith("|")][2:]
    rows = [r for r in rows if not r.startswith(f"| {device_name} |")]
    rows.append(f"| {device_name} | [{slug}]({slug}.md) | {headline} | `{command}` |")
    table = ["| device | report | fwd+bwd, logits op (main shape) | command |", "|---|---|---|---|"] + sorted(rows)
    open(path, "w").write(head + start + "\n" + "\n".join(table) + "\n" + end + tail)


def headline(rows) -> str:
    main = [r for r in rows if r["op"] == "mhpo_loss" and r["mode"] == "fwd+bwd" and r["ms_p50"]]
    if not main:
        return "-"
    big = max(main, key=lambda r: r["N"] * r["V"])
    at = [r for r in main if (r["N"], r["V"]) == (big["N"], big["V"])]
    ours = [r for r in at if r["kind"] == "ours" and not r["variant"].startswith("clip")]
    if not ours:
        return "-"
    b = min(ours, key=lambda r: r["ms_p50"])
    parts = [f"N={b['N']} V={b['V']} {b['dtype']}: {b['variant']} {b['ms_p50']:.1f} ms "
             f"({100 * (b['frac_copy'] or 0):.0f}% of copy bw)"]
    if b.get("speedup_eager"):
        parts.append(f"{b['speedup_eager']:.1f}x eager")
    if b.get("speedup_compiled"):
        parts.append(f"{b['speedup_compiled']:.1f}x compiled")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the pipeline, not the kernels")
    ap.add_argument("--N", type=int, default=None)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--H", type=int, default=None)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--name", default=None, help="file stem (default: <device>-<date>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-subprocess", action="store_true",
                    help="CPU: measure in this process (faster, memory less exact)")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = bu.env_info(device)
    slug = a.name or _slug(device, info["device_name"]) + ("-quick" if a.quick else "")
    command = "python bench/report.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    rows, sections = [], []
    for key, argv_op in plan(device, a.quick, a.N, a.V, a.H, a.dtype):
        if key not in a.ops:
            continue
        op = OPS[key]
        if a.no_subprocess:
            argv_op = argv_op + ["--no-subprocess"]
        print(f"\n## {key}: python bench/{op.__name__}.py {' '.join(argv_op)}", flush=True)
        notes = []
        r = H.run(op, argv_op, notes_out=notes)
        rows += r
        goals = op.goals(r) if hasattr(op, "goals") else ""
        sections.append((key, argv_op, r, notes, goals))
    os.makedirs(a.out, exist_ok=True)
    H.write_rows(rows, a.out, slug)
    pngs = [] if a.no_plots else plots.plot_rows(rows, a.out, prefix=slug + "-")
    took = time.perf_counter() - t0

    md = [f"# Benchmark report: {info['device_name']}", "",
          f"- date {info['date']}, commit `{info['commit']}`, torch {info['torch']}, triton {info['triton']}, "
          f"mhpo_kernels {info['mhpo_kernels']}" + (f", CUDA {info['cuda']}" if info.get("cuda") else ""),
          f"- command: `{command}` ({took / 60:.1f} min)",
          f"- rows: [{slug}.csv]({slug}.csv), [{slug}.json]({slug}.json)",
          "- time: median (p20-p80) over the timed iterations; forward and backward timed in the same iteration. "
          "peak extra memory: above the inputs (CUDA allocator peak, or on CPU the resident-set high-water mark "
          "of the variant's own process). achieved = the op's byte floor / median time "
          "(logits op: fwd 1 read, bwd 1 read + 1 write, fwd+bwd 2 reads + 1 write of N*V*elem), "
          "against a device copy measured in the same run.", ""]
    if device == "cpu":
        md.append("CPU: timings on a shared 2-core machine are noisy; the eager reference is timed on a "
                  "single call, its memory pass (`--baseline-repeats 0`), because one call takes about a minute.\n")
    for key, argv_op, r, notes, goals in sections:
        md.append(f"## {key}\n\n`python bench/{OPS[key].__name__}.py {' '.join(argv_op)}`\n")
        md.append(H.summary(r, notes=notes))
        if goals:
            md.append(goals)
        md.append("")
    for p in pngs:
        md.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    text = "\n".join(md) + "\n"
    with open(os.path.join(a.out, slug + ".md"), "w") as f:
        f.write(text)
    if not a.quick:
        update_readme(a.out, info["device_name"], slug, headline(rows), command)
    print("\n" + "=" * 100)
    print(text)
    print(f"report: {os.path.join(a.out, slug + '.md')} ({took / 60:.1f} min); plots: {len(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
