"""Benchmark ``mk.fused_linear_mhpo_loss`` (hidden + lm_head weight in) vs the unfused paths and peers.

    python bench/bench_fused_linear.py --N 4096 --V 151936 --H 512 --dtype bf16 --out bench/results/run

Variants: ``torch`` = eager unfused (``hidden @ W.T`` then the reference loss),
``unfused:<backend>`` = the matmul then ``mk.mhpo_loss``, ``fused:<backend>`` =
``mk.fused_linear_mhpo_loss`` (chunked; never holds all logits),
``fused-clip:<backend>`` = the same in GRPO clip mode (vs Liger), and
``torch.compile`` of the eager unfused path. Peers: Liger-Kernel's
``LigerFusedLinearGRPOLoss`` (chunked, compiled PyTorch: runs on CPU too) and
Cut Cross-Entropy's ``linear_cross_entropy`` (log-prob part only; ``cce`` impl on
CUDA, its ``torch_compile`` impl on CPU). Compute-bound: rows report TFLOP/s
against 6*N*V*H FLOPs for fwd+bwd (2 for fwd, 4 for bwd); the fused path does 8*N*V*H (its
backward recomputes the logits, see mhpo_kernels/fused_linear.py).

``--chunk-size`` / ``--vocab-chunk-size`` set the fused tiles (token rows x vocabulary rows; default:
``default_chunk_sizes``), ``--only`` keeps the variants whose names start with the given prefixes
(e.g. ``--only fused`` where the eager baseline would take too long). On a CPU without bf16 matrix
instructions PyTorch's bf16 matmuls (the unfused variants') use slow generic loops, while the fused
path multiplies float32 tiles: compare bf16 times there with that in mind, or run ``--dtype fp32`` too.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H
import torch

import mhpo_kernels as mk

OP = "fused_linear_mhpo_loss"
LIGER_SEQ_LEN = 512  # Liger chunks over sequences: [B, T, H] with B = N / T, one sequence per chunk
GOAL_MEM_FRAC = 0.25  # fused-linear goal: no slower than Liger's, at <= 1/4 of its peak memory


def parser():
    p = H.base_parser(__doc__.splitlines()[0], with_H=True)
    p.add_argument("--chunk-size", type=int, default=None, help="fused: token rows per tile")
    p.add_argument("--vocab-chunk-size", type=int, default=None, help="fused: vocabulary rows per tile")
    p.add_argument("--only", nargs="+", default=None, help="keep variants whose names start with these")
    return p



def shapes(args):
    return [H.Shape(N, V, Hd) for Hd in args.H for V in args.V for N in args.N]


def _elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


def input_bytes(shape, dtype):
    return (shape.N + shape.V) * shape.H * _elem(dtype)


def bytes_floor(shape, dtype, mode):
    return None  # compute-bound: judged in TFLOP/s


def flops(shape, mode):
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * shape.N * shape.V * shape.H


def _setup(shape, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    N, V, Hd = shape.N, shape.V, shape.H
    hidden = torch.randn(N, Hd, generator=g, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, Hd, generator=g, device=device) / math.sqrt(Hd)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (N,), generator=g, device=device)
    # logits ~ N(0, 1): logsumexp ~ log(V) + 0.5; old log-probs near that level (ratios within e^{+-3})
    old = -(math.log(V) + 0.5) + torch.randn(N, generator=g, device=device)
    adv = torch.randn(N, generator=g, device=device)
    mask = (torch.rand(N, generator=g, device=device) > 0.1).float()
    return dict(hidden=hidden, weight=weight, ids=ids, old=old, adv=adv, mask=mask)


def _eager(s):
    logits = s["hidden"] @ s["weight"].T
    return mk.reference.mhpo_loss(logits, s["ids"], s["old"], s["adv"], s["mask"]).loss


def _compiled():
    fn = torch.compile(_eager)
    return lambda s: fn(s)


def _unfused(backend):
    def fwd(s):
        logits = s["hidden"] @ s["weight"].T
        return mk.mhpo_loss(logits, s["ids"], s["old"], s["adv"], s["mask"], backend=backend).loss
    return fwd


def _fused(backend, clip=False, rows=None, cols=None):
    kw = {"ratio_control": mk.ClipConfig(eps_low=0.2, eps_high=0.2)} if clip else {}
    kw.update(chunk_size=rows, vocab_chunk_size=cols)

    def fwd(s):
        return mk.fused_linear_mhpo_loss(s["hidden"], s["weight"], s["ids"], s["old"], s["adv"], s["mask"],
                                         backend=backend, **kw).loss
    return fwd


def _liger():
    state = {}

    def fwd(s):
        if "fn" not in state:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            state["fn"] = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", chunk_size=1,
                                                   epsilon_low=0.2, epsilon_high=0.2, temperature=1.0, compiled=True)
        N, Hd = s["hidden"].shape
        T = min(LIGER_SEQ_LEN, N)
        B = N // T
        rows = B * T
        out = state["fn"](s["hidden"][:rows].view(B, T, Hd), s["weight"], s["ids"][:rows].view(B, T),
                          s["mask"][:rows].view(B, T), s["adv"][:B], old_per_token_logps=s["old"][:rows].view(B, T))
        return out[0] if isinstance(out, tuple) else out
    return fwd


def _cce(device):
    impl = "cce" if torch.device(device).type == "cuda" else "torch_compile"

    def fwd(s):
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(s["hidden"], s["weight"], s["ids"], reduction="mean", impl=impl)
    return fwd, impl


def variants(args, shape):
    device = args.device
    out = [H.Variant(H.EAGER, "reference", _setup, _eager, note="hidden @ W.T, then mk.reference.mhpo_loss")]
    for b in H.wanted_backends(args, device):
        skip = H.interpreter_skip(b, device, shape.N * shape.V)
        if b not in mk.available_backends(device):
            skip = f"backend {b!r} not available on {device.type}"
        out.append(H.Variant(f"unfused:{b}", "ours", _setup, _unfused(b), skip=skip,
                             note="hidden @ W.T, then mk.mhpo_loss"))
        out.append(H.Variant(f"fused:{b}", "ours", _setup, _fused(b, rows=args.chunk_size, cols=args.vocab_chunk_size),
                             skip=skip))
    if "compile" in args.peers:
        out.append(H.Variant(H.COMPILED, "compiled", _setup, _compiled(), compiled=True,
                             note="torch.compile of the eager unfused path"))
    if "liger" in args.peers:
        skip = (None if importlib.util.find_spec("liger_kernel")
                else "liger-kernel not installed (pip install liger-kernel)")
        out.append(H.Variant("liger-fl-grpo", "peer", _setup, _liger(), skip=skip, compiled=True,
                             note=f"LigerFusedLinearGRPOLoss bnpo, {LIGER_SEQ_LEN}-token sequences, 1 per chunk"))
        fused = [b for b in H.wanted_backends(args, device) if b in mk.available_backends(device)]
        best = next((b for b in ("cuda", "triton", "cpu") if b in fused), None)
        if best is not None:
            out.append(H.Variant(f"fused-clip:{best}", "ours", _setup, _fused(best, clip=True),
                                 skip=H.interpreter_skip(best, device, shape.N * shape.V),
                                 note="fused_linear_mhpo_loss(ratio_control=ClipConfig()), vs liger-fl-grpo"))
    if "cce" in args.peers:
        skip = None if importlib.util.find_spec("cut_cross_entropy") else \
            "cut-cross-entropy not installed (pip install cut-cross-entropy)"
        fwd, impl = _cce(device)
        out.append(H.Variant(f"cce({impl})", "peer", _setup, fwd, skip=skip, compiled=True,
                             note="cut_cross_entropy.linear_cross_entropy: log-prob (CE) part only"))
    if args.only:
        out = [v for v in out if any(v.name.startswith(p) for p in args.only)]
    return out


def goals(rows):
    """Fused-linear goal: no slower than Liger's fused-linear GRPO at <= 1/4 of its peak memory."""
    lines = ["\n### Goals (fused-linear, fwd+bwd): no slower than liger-fl-grpo at <= 1/4 of its peak memory\n"]
    by = {}
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["ms_p50"]:
            by.setdefault((r["N"], r["V"], r["H"], r["dtype"]), {})[r["variant"]] = r
    for (N, V, Hd, dtype), vs in by.items():
        lig = vs.get("liger-fl-grpo")
        eager = vs.get(H.EAGER)
        for name, r in vs.items():
            if not name.startswith("fused"):
                continue
            parts = [f"- N={N} V={V} H={Hd} {dtype} {name}: {r['ms_p50']:.1f} ms, "
                     f"peak {r['peak_bytes'] / 2**20:.0f} MiB"]
            if lig:
                t, m = lig["ms_p50"] / r["ms_p50"], r["peak_bytes"] / max(lig["peak_bytes"], 1)
                ok = t >= 1.0 and m <= GOAL_MEM_FRAC
                parts.append(f"vs liger-fl-grpo: {t:.2f}x speed, {m:.2f}x memory -> {'PASS' if ok else 'FAIL'}")
            else:
                parts.append("vs liger-fl-grpo: n/a")
            if eager and eager["peak_bytes"]:
                parts.append(f"vs eager unfused: {eager['ms_p50'] / r['ms_p50']:.2f}x speed, "
                             f"{r['peak_bytes'] / eager['peak_bytes']:.3f}x memory")
            backend = name.split(":")[-1]
            unfused = vs.get(f"unfused:{backend}")
            if unfused and unfused["ms_p50"]:  # CPU goal: time <= 1.0x, peak <= 0.1x eager
                parts.append(f"vs unfused:{backend}: {r['ms_p50'] / unfused['ms_p50']:.2f}x time, "
                             f"{r['peak_bytes'] / max(unfused['peak_bytes'], 1):.3f}x memory")
            lines.append("; ".join(parts))
    if len(lines) == 1:
        lines.append("- no fused-linear row measured")
    return "\n".join(lines)


if __name__ == "__main__":
    H.run(sys.modules[__name__])
