"""Benchmark ``mk.mhpo_loss`` (logits in): every backend vs the eager reference, torch.compile and peers.

    python bench/bench_mhpo_loss.py --N 4096 --V 151936 --dtype bf16 --modes fwd bwd fwd+bwd --out bench/results/run

Byte floor (the fused design's): fwd reads the [N, V] logits once; bwd reads
them again and writes the gradient once; fwd+bwd = 2 reads + 1 write.
Peers: ``torch.compile`` of the reference; Liger-Kernel's ``triton_grpo_loss``
(GRPO clip, Triton: CUDA only), compared with our MHPO for cost and with our
clip mode (``mk.policy_loss(ratio_control=mk.ClipConfig())``, once it exists).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H
import torch

import mhpo_kernels as mk
from mhpo_kernels.tools import bench_utils as bu

OP = "mhpo_loss"
GOAL_COPY_FRAC, GOAL_VS_LIGER, GOAL_VS_COMPILED = 0.85, 1.2, 2.0
GOAL_SHAPE = (16384, 151936, "bf16")


def parser():
    return H.base_parser(__doc__.splitlines()[0])



shapes, input_bytes, bytes_floor, flops = H.logits_shapes, H.logits_input_bytes, H.logits_bytes_floor, H.no_flops


def _setup(shape, dtype, device, seed):
    return bu.make_policy_inputs(shape.N, shape.V, dtype, device, seed=seed)


def _ours(backend, inplace=False, fused_gradient=None):
    def fwd(s):
        return mk.mhpo_loss(s["logits"], s["ids"], s["old"], s["adv"], s["mask"], backend=backend,
                            inplace_backward=inplace, fused_gradient=fused_gradient).loss
    return fwd


def has_fused_gradient(backend) -> bool:
    """Whether ``backend`` has the forward that writes the gradient (issue 12: a ``fwd_grad`` launcher)."""
    from mhpo_kernels import backends

    return getattr(backends.get(backend), "fwd_grad", None) is not None


def _reference(s):
    return mk.reference.mhpo_loss(s["logits"], s["ids"], s["old"], s["adv"], s["mask"]).loss


def _compiled():
    fn = torch.compile(_reference)
    return lambda s: fn(s)


def _clip(backend):
    cfg = mk.ClipConfig(eps_low=0.2, eps_high=0.2)

    def fwd(s):
        return mk.policy_loss(s["logits"], s["ids"], s["old"], s["adv"], s["mask"], ratio_control=cfg,
                              backend=backend).loss
    return fwd


def _liger_setup(shape, dtype, device, seed):
    # Liger takes [B, L + 1, V] logits (it drops the last position) and one advantage per sequence
    s = bu.make_policy_inputs(shape.N, shape.V, dtype, device, seed=seed, leading=(1, shape.N + 1))
    return dict(logits=s["logits"], ids=s["ids"][None].contiguous(), old=s["old"][None].contiguous(),
                adv=s["adv"][:1].contiguous(), mask=s["mask"][None].contiguous())


def _liger_fwd():
    def fwd(s):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        loss, _ = triton_grpo_loss(s["logits"], s["old"], None, s["ids"], s["adv"], s["mask"], temperature=1.0,
                                   beta=0.0, eps_low=0.2, eps_high=0.2, inplace=True, loss_type="bnpo",
                                   reduce=True)
        return loss
    return fwd


def liger_available():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed (pip install liger-kernel)"
    return None


def variants(args, shape):
    device = args.device
    out = [H.Variant(H.EAGER, "reference", _setup, _reference, note="mk.reference.mhpo_loss (eager)")]
    for b in H.wanted_backends(args, device):
        skip = H.interpreter_skip(b, device, shape.N * shape.V)
        if b not in mk.available_backends(device):
            skip = f"backend {b!r} not available on {device.type} (available: {mk.available_backends(device)})"
        out.append(H.Variant(b, "ours", _setup, _ours(b, fused_gradient=False), skip=skip,
                             note="two-kernel path (fused_gradient=False)"))
        if not skip and has_fused_gradient(b):
            out.append(H.Variant(f"fused-grad:{b}", "ours", _setup, _ours(b, fused_gradient=True), skip=skip,
                                 note="gradient written in the forward (fused_gradient=True, issue 12)"))
        if args.inplace:
            out.append(H.Variant(b + "+inplace", "ours", _setup, _ours(b, True, False), skip=skip))
    if "compile" in args.peers:
        out.append(H.Variant(H.COMPILED, "compiled", _setup, _compiled(), compiled=True,
                             note="torch.compile(mk.reference.mhpo_loss)"))
    if "liger" in args.peers:
        skip = liger_available()
        if skip is None and device.type != "cuda":
            skip = "Liger's triton_grpo_loss is a Triton kernel: CUDA only"
        out.append(H.Variant("liger-grpo", "peer", _liger_setup, _liger_fwd(), skip=skip,
                             compiled=True, note="liger_kernel triton_grpo_loss, bnpo, eps 0.2, inplace"))
        # the closest mode of ours: clip through the same fused kernels
        fused = [b for b in H.wanted_backends(args, device) if b in mk.available_backends(device)]
        best = next((b for b in ("cuda", "triton", "cpu") if b in fused), None)
        if best is not None:
            skip = H.interpreter_skip(best, device, shape.N * shape.V)
            out.append(H.Variant(f"clip:{best}", "ours", _setup, _clip(best), skip=skip,
                                 note="mk.policy_loss(ratio_control=ClipConfig()), vs liger-grpo"))
    if "cce" in args.peers:
        out.append(H.Variant("cce", "peer", skip="Cut Cross-Entropy takes hidden states, not logits: "
                                                 "see bench_fused_linear.py"))
    return out


def goals(rows):
    """The issue's GPU goals, judged on this run's rows (fwd+bwd)."""
    lines = ["\n### Goals (logits op, fwd+bwd; official shape N=%d V=%d %s on a GPU)\n" % GOAL_SHAPE]
    by = {}
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["ms_p50"]:
            by.setdefault((r["N"], r["V"], r["dtype"]), {})[r["variant"]] = r
    if not by:
        return lines[0] + "no fwd+bwd rows measured"
    for (N, V, dtype), vs in by.items():
        ours = [r for n, r in vs.items() if r["kind"] == "ours" and not n.startswith("clip:")]
        if not ours:
            lines.append(f"- N={N} V={V} {dtype}: no fused backend measured")
            continue
        best = min(ours, key=lambda r: r["ms_p50"])
        official = (N, V, dtype) == GOAL_SHAPE and best["device"] == "cuda"
        tag = "" if official else " (not the official shape/device: informative only)"
        frac = best["frac_copy"]
        lines.append(f"- N={N} V={V} {dtype}, best fused = {best['variant']} {best['ms_p50']:.2f} ms{tag}")
        lines.append(f"  - bandwidth: {best['gbs']:.1f} GB/s = {100 * frac:.0f}% of copy "
                     f"(goal >= {100 * GOAL_COPY_FRAC:.0f}%): {'PASS' if frac >= GOAL_COPY_FRAC else 'FAIL'}")
        comp = vs.get(H.COMPILED)
        if comp:
            x = comp["ms_p50"] / best["ms_p50"]
            lines.append(f"  - vs torch.compile(reference): {x:.2f}x (goal >= {GOAL_VS_COMPILED}x): "
                         f"{'PASS' if x >= GOAL_VS_COMPILED else 'FAIL'}")
        else:
            lines.append("  - vs torch.compile(reference): n/a (not measured)")
        lig = vs.get("liger-grpo")
        if lig:
            x = lig["ms_p50"] / best["ms_p50"]
            lines.append(f"  - MHPO vs liger-grpo (cost): {x:.2f}x (goal >= {GOAL_VS_LIGER}x): "
                         f"{'PASS' if x >= GOAL_VS_LIGER else 'FAIL'}")
            clip = next((r for n, r in vs.items() if n.startswith("clip:")), None)
            if clip:
                x = lig["ms_p50"] / clip["ms_p50"]
                lines.append(f"  - clip mode ({clip['variant']}) vs liger-grpo (same mode): {x:.2f}x")
        else:
            lines.append("  - vs liger-grpo: n/a (Liger did not run here)")
    return "\n".join(lines)


if __name__ == "__main__":
    H.run(sys.modules[__name__])
