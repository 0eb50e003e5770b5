"""``mhpo-kernels check``: every available backend against the float64 reference.

For each case (a few shapes, one with a large vocabulary) and each backend it
prints the max errors of the loss, the per-token log-probs and the logits
gradient (with a random upstream gradient), each against the dtype's tolerance,
plus the backend's fwd+bwd time and peak extra memory. Exit code 1 when any
error exceeds its tolerance, 0 otherwise.

    python -m mhpo_kernels check            # default cases (< 1 minute on 2 CPU cores)
    python -m mhpo_kernels check --quick    # small cases only
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

# Tolerances, one row per logits dtype: (atol relative to max|expected|, rtol).
# The gradient is stored in the logits dtype; the loss and log-probs are fp32
# whatever the input dtype and use the fp32 row. Same table as tests/conftest.py.
GRAD_TOL = {
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (2e-4, 2e-3),
}
SCALAR_TOL = (2e-5, 2e-5)
INTERPRET_MAX_ELEMS = 600_000  # Triton's interpreter: ~1 us per element and pass


def source(root=None) -> str:
    """Which code is running: ``"<version> @ <commit>"`` when the package is imported from a
    git checkout of this project (an editable install), else ``"<version> (installed package)"``.

    An installed package (a wheel) has no commit; and a site-packages folder inside some
    other git repository (a venv in a project folder) must not report that repository's commit.
    """
    from .. import __version__
    from .bench_utils import ROOT, git_commit

    root = os.path.realpath(root or ROOT)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        top = ""
    if top and os.path.realpath(top) == root and os.path.isdir(os.path.join(root, "mhpo_kernels")):
        return f"{__version__} @ {git_commit(root)}"
    return f"{__version__} (installed package)"


def _cases(quick: bool, large: bool):
    """(label, token shape, V, dtype, kwargs)."""
    cases = [
        ("N=37 V=1031 fp32", (37,), 1031, torch.float32, {}),
        ("B=2 T=19 V=4099 fp16 T=0.7 KL ent seq-mean", (2, 19), 4099, torch.float16,
         dict(temperature=0.7, loss_agg_mode="seq-mean-token-mean", beta=0.05, return_entropy=True)),
        ("N=64 V=32781 bf16", (64,), 32781, torch.bfloat16, {}),
        # the finishing step's per-token inputs and outputs (rollout weights, KL estimator, per-token
        # terms, CISPO; k2, which unlike low_var_kl differs from k3 at every |d|); the first one keeps the
        # fused-gradient forward (weights folded into w)
        ("N=61 V=8191 bf16 IS-weights", (61,), 8191, torch.bfloat16, dict(importance_weights=True)),
        ("B=3 T=17 V=2053 fp32 CISPO IS-weights k2 per-token", (3, 17), 2053, torch.float32,
         dict(ratio_control="cispo", beta=0.05, kl_estimator="k2", reduce=False, importance_weights=True)),
    ]
    if quick:
        cases = cases[:2]
    if large:
        cases.append(("N=128 V=151936 bf16 (large vocab)", (128,), 151936, torch.bfloat16, {}))
    return cases


def _make(shape, V, dtype, device, seed, kw):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, shape, generator=g)
    ids[torch.rand(shape, generator=g) < 0.1] = -100
    with torch.no_grad():
        lse = torch.logsumexp(logits.float(), -1)
        logp = logits.float().gather(-1, ids.clamp(min=0)[..., None])[..., 0] - lse
    old = logp + 0.3 * torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.15).float()
    ref = (logp + 0.2 * torch.randn(shape, generator=g)) if kw.get("beta") else None
    upstream = torch.randn(shape if kw.get("reduce") is False else (), generator=g).abs() + 0.5
    iw = torch.rand(shape, generator=g) * 2 if kw.get("importance_weights") else None
    to = lambda t: None if t is None else t.to(device)
    return to(logits), to(ids), to(old), to(adv), to(mask), to(ref), to(upstream), to(iw)


def _err(actual, expected, atol_rel, rtol):
    """(max abs error, worst error / its tolerance): <= 1 passes."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    err = (a - e).abs()
    bound = atol_rel * scale + rtol * e.abs()
    return (err.max().item() if err.numel() else 0.0), ((err / bound).max().item() if err.numel() else 0.0)


def _run_backend(mk, backend, logits, ids, old, adv, mask, ref, upstream, kw, device, timed=True,
                 fused_gradient=None, iw=None):
    from .bench_utils import PeakMemory, sync

    x = logits.detach().clone().requires_grad_(True)
    kw = dict(kw)
    if kw.pop("ratio_control", None) == "cispo":  # policy_loss with CISPO, else mhpo_loss
        fn = mk.reference.policy_loss if backend == "reference" else mk.policy_loss
        kw["ratio_control"] = mk.CISPOConfig(0.2, 0.28)
    else:
        fn = mk.reference.mhpo_loss if backend == "reference" else mk.mhpo_loss
    if kw.pop("importance_weights", None):
        kw["importance_weights"] = iw
    extra = {} if backend == "reference" else {"backend": backend}
    if fused_gradient is not None:
        extra["fused_gradient"] = fused_gradient
    def call():
        x.grad = None
        out = fn(x, ids, old, adv, mask, ref_logprobs=ref, **kw, **extra)
        ((out.loss * upstream).sum() + (0.01 * out.entropy.sum() if out.entropy is not None else 0.0)).backward()
        sync(device)
        return out

    sync(device)
    with PeakMemory(device) as pm:  # the first call: peak extra memory (and any lazy init)
        out = call()
    t0 = time.perf_counter()
    if timed:  # a second call for the time
        out = call()
    ms = (time.perf_counter() - t0) * 1e3
    return out, x.grad, ms, pm.bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mhpo-kernels check", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small cases only (a few seconds)")
    p.add_argument("--no-large", action="store_true", help="skip the large-vocabulary case")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", nargs="+", default=None, help="backends to check (default: all available)")
    p.add_argument("--interpret", choices=["auto", "on", "off"], default="auto",
                   help="CPU: run the Triton backend through Triton's interpreter (auto: when no GPU is present)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.interpret != "off" and "mhpo_kernels.triton_kernels" not in sys.modules:
        if args.interpret == "on" or not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are first imported

    import mhpo_kernels as mk

    from .bench_utils import env_info, fmt_bytes, table
    from ..backends import unavailable_reason

    info = env_info(device)
    avail = mk.available_backends(device)
    backends = avail if args.backends is None else args.backends
    unknown = [b for b in backends if b not in avail]
    print(f"mhpo-kernels {source()} | torch {info['torch']} | triton {info['triton']}")
    print(f"device: {info['device_name']} | available backends: {', '.join(avail)}"
          + (" (triton through the interpreter)" if "triton" in avail and device.type == "cpu" else ""))
    for b in unknown:
        print(f"  {b}: not available on {device.type} ({unavailable_reason(b, device)}); skipped")
    backends = [b for b in backends if b in avail]
    # the forward that writes the gradient is opt-in on GPUs: each backend with a fwd_grad
    # launcher gets a second row with fused_gradient=True (on the CPU it is already the default)
    from .. import backends as registry
    from .._fused_grad import AUTO_DEVICES

    runs = []
    for b in backends:
        runs.append((b, None))
        if device.type not in AUTO_DEVICES and getattr(registry.get(b), "fwd_grad", None) is not None:
            runs.append((b, True))
    if device.type == "cpu" and "triton" not in avail and args.interpret != "off":
        print(f"  triton: {unavailable_reason('triton', device)}; skipped")

    rows, notes, failed = [], [], False
    t_start = time.perf_counter()
    for ci, (label, shape, V, dtype, kw) in enumerate(_cases(args.quick, not args.no_large)):
        logits, ids, old, adv, mask, ref, up, iw = _make(shape, V, dtype, device, ci, kw)
        dbl = lambda t: None if t is None else t.double()
        truth, gtruth, _, _ = _run_backend(mk, "reference", logits.double(), ids, old.double(), adv.double(),
                                           mask.double(), dbl(ref), up.double(), kw, device, timed=False,
                                           iw=dbl(iw))
        gtol = GRAD_TOL[dtype]
        for b, fused in runs:
            name = b if fused is None else f"{b} fused-grad"
            n_elems = logits.numel()
            if b == "triton" and device.type == "cpu" and n_elems > INTERPRET_MAX_ELEMS:
                note = (f"triton (interpreter) skipped on '{label}': {n_elems:,} logits would take more than "
                        f"a few seconds at ~1 us/element")
                notes.append(note)
                rows.append([label, name, "-", "-", "-", "-", "-", "skipped"])
                continue
            try:
                out, grad, ms, peak = _run_backend(mk, b, logits, ids, old, adv, mask, ref, up, kw, device,
                                                   fused_gradient=fused, iw=iw)
            except Exception as e:  # a crash is a failure, reported in the table
                failed = True
                rows.append([label, name, "-", "-", "-", "-", "-", f"FAIL: {type(e).__name__}: {e}"[:120]])
                continue
            e_loss = _err(out.loss, truth.loss, *SCALAR_TOL)
            e_logp = _err(out.logprobs, truth.logprobs, *SCALAR_TOL)
            e_grad = _err(grad, gtruth, *gtol)
            worst = max(e_loss[1], e_logp[1], e_grad[1])
            if out.entropy is not None:
                worst = max(worst, _err(out.entropy, truth.entropy, *SCALAR_TOL)[1])
            ok = worst <= 1.0
            failed |= not ok
            rows.append([label, name, f"{e_loss[0]:.1e}", f"{e_logp[0]:.1e}", f"{e_grad[0]:.1e}",
                         f"{ms:.1f}", fmt_bytes(peak), f"{'ok' if ok else 'FAIL'} ({worst:.2f} of tol)"])
    print()
    print(table(rows, ["case", "backend", "err loss", "err logp", "err grad", "fwd+bwd ms", "peak extra mem",
                       "status"]))
    for n in notes:
        print(f"- {n}")
    print("- errors are max |backend - float64 reference|; status = worst error / dtype tolerance "
          "(grad: atol = tol * max|grad|, + rtol * |grad|; loss, logp: fp32 tolerance)")
    print("- time: one warm call; peak memory: the first call, above the inputs (CPU: resident-set high-water mark); "
          "for real numbers use bench/")
    print(f"\n{'FAIL' if failed else 'OK'}: {len(runs)} backend run(s), {len(_cases(args.quick, not args.no_large))} "
          f"case(s) in {time.perf_counter() - t_start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
