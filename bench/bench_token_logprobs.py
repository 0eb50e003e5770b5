"""Benchmark ``mk.token_logprobs(..., return_entropy=True)`` vs eager log_softmax + gather + entropy.

    python bench/bench_token_logprobs.py --N 4096 --V 151936 --dtype bf16 --out bench/results/run

The backward gets random upstream gradients for both the log-probs and the
entropy. Byte floor: as the logits op (fwd 1 read; fwd+bwd 2 reads + 1 write).
Peers: torch.compile of the eager version. (Liger's fused_selective_log_softmax
has no backward and Cut Cross-Entropy takes hidden states: not comparable here.)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H
import torch
import torch.nn.functional as F

import mhpo_kernels as mk
from mhpo_kernels.tools import bench_utils as bu

OP = "token_logprobs"


def parser():
    return H.base_parser(__doc__.splitlines()[0])



shapes, input_bytes, bytes_floor, flops = H.logits_shapes, H.logits_input_bytes, H.logits_bytes_floor, H.no_flops


def _setup(shape, dtype, device, seed):
    s = bu.make_policy_inputs(shape.N, shape.V, dtype, device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1000)
    s["w_logp"] = torch.randn(shape.N, generator=g, device=device)
    s["w_ent"] = torch.randn(shape.N, generator=g, device=device)
    return s


def _eager(s):
    logp_all = F.log_softmax(s["logits"].float(), -1)
    logp = logp_all.gather(1, s["ids"][:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return (logp * s["w_logp"]).sum() + (ent * s["w_ent"]).sum()


def _compiled():
    fn = torch.compile(_eager)
    return lambda s: fn(s)


def _ours(backend):
    def fwd(s):
        logp, ent = mk.token_logprobs(s["logits"], s["ids"], return_entropy=True, backend=backend)
        return (logp * s["w_logp"]).sum() + (ent * s["w_ent"]).sum()
    return fwd


def variants(args, shape):
    device = args.device
    out = [H.Variant(H.EAGER, "reference", _setup, _eager, note="log_softmax(fp32) + gather + entropy, eager")]
    for b in H.wanted_backends(args, device):
        skip = H.interpreter_skip(b, device, shape.N * shape.V)
        if b not in mk.available_backends(device):
            skip = f"backend {b!r} not available on {device.type}"
        out.append(H.Variant(b, "ours", _setup, _ours(b), skip=skip))
    if "compile" in args.peers:
        out.append(H.Variant(H.COMPILED, "compiled", _setup, _compiled(), compiled=True,
                             note="torch.compile of the eager version"))
    return out


if __name__ == "__main__":
    H.run(sys.modules[__name__])
