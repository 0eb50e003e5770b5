"""A small case for ``compute-sanitizer --tool memcheck``: every GPU backend, odd shapes, fwd + bwd.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitizer_case.py

Odd V (not a multiple of any block), ignore_index and masked rows, KL and
entropy, both gradient paths (new buffer and in-place), strided rows, and the forward
that writes the gradient (``fused_gradient=True``, the entropy bonus inside the op as
``entropy_coeff``) wherever a backend has it; then the finishing step's per-token inputs and
outputs (importance weights with NaN on masked rows, the k2 KL, ``reduce=False``, CISPO,
packed sequences) and the weights folded into the fused-gradient forward. Each
result is also compared with the reference, so the run fails on a wrong value as
well as on an out-of-bounds access. Without a GPU it runs the same on CPU
backends (``--device cpu``), which checks the script itself.
"""
from __future__ import annotations

import argparse
import sys

import torch

import mhpo_kernels as mk

CASES = [((1,), 1), ((37,), 1031), ((3, 5), 4099), ((17,), 32781)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the two smallest shapes only")
    a = ap.parse_args(argv)
    cases = CASES[:2] if a.quick else CASES
    device = torch.device(a.device)
    backends = [b for b in mk.available_backends(device) if b not in ("torch", "reference")]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not what memcheck is for
    print(f"sanitizer case on {device}: backends {backends}")
    bad = 0
    for bi, backend in enumerate(backends):
        for ci, (shape, V) in enumerate(cases):
            for dtype in (torch.bfloat16, torch.float32):
                for inplace, fused in ((False, False), (True, False), (False, True), (True, True)):
                    if fused and not hasattr(mk.backends.get(backend), "fwd_grad"):
                        continue
                    g = torch.Generator().manual_seed(100 * bi + 10 * ci)
                    wide = (torch.randn(*shape, V + 3, generator=g) * 2).to(dtype)
                    logits = wide[..., :V].to(device)  # rows strided by V + 3
                    ids = torch.randint(0, V, shape, generator=g)
                    ids.view(-1)[::4] = -100
                    old = torch.randn(shape, generator=g) - 5
                    adv = torch.randn(shape, generator=g)
                    mask = (torch.rand(shape, generator=g) > 0.2).float()
                    ref = old + 0.1 * torch.randn(shape, generator=g)
                    ids, old, adv, mask, ref = (t.to(device) for t in (ids, old, adv, mask, ref))
                    kw = dict(ref_logprobs=ref, beta=0.05, return_entropy=not fused, temperature=0.9)
                    ent = dict(entropy_coeff=0.01, fused_gradient=True) if fused else dict(fused_gradient=False)
                    x = logits.detach().clone().requires_grad_(True)
                    x_ref = logits.detach().double().requires_grad_(True)
                    out = mk.mhpo_loss(x.clone() if inplace else x, ids, old, adv, mask, backend=backend,
                                       inplace_backward=inplace, **kw, **ent)
                    want = mk.reference.mhpo_loss(x_ref, ids, old.double(), adv.double(), mask.double(),
                                                  ref_logprobs=ref.double(), beta=0.05, return_entropy=not fused,
                                                  temperature=0.9, entropy_coeff=0.01 if fused else 0.0)
                    if fused:
                        out.loss.backward()
                        want.loss.backward()
                    else:
                        (out.loss + 0.01 * out.entropy.sum()).backward()
                        (want.loss + 0.01 * want.entropy.sum()).backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                    scale = max(x_ref.grad.abs().max().item(), 1e-12)
                    err = (x.grad.double() - x_ref.grad).abs().max().item() / scale
                    lerr = abs(out.loss.item() - want.loss.item()) / max(abs(want.loss.item()), 1e-6)
                    ok = err <= tol and lerr <= 1e-4 and torch.isfinite(x.grad).all().item()
                    bad += not ok
                    print(f"  {backend:6s} shape={shape} V={V} {str(dtype)[6:]:8s} inplace={inplace!s:5s} "
                          f"fused={fused!s:5s} grad err {err:.1e} loss err {lerr:.1e} {'ok' if ok else 'FAIL'}")
    for backend in backends:
        for ci, (shape, V) in enumerate(cases):
            bad += not _per_token_case(backend, device, (shape[-1] if len(shape) == 1 else shape[0] * shape[1],), V,
                                       seed=7 + ci)
    print(f"{'FAIL' if bad else 'OK'}: {bad} failing case(s)")
    return 1 if bad else 0


def _per_token_case(backend, device, shape, V, seed) -> bool:
    """Packed CISPO with importance weights (NaN where masked), the k2 KL, per-token terms and a
    per-token upstream gradient; then the weights alone through the fused-gradient forward."""
    g = torch.Generator().manual_seed(seed)
    N = shape[0]
    logits = (torch.randn(N, V, generator=g) * 2).to(device)
    ids = torch.randint(0, V, shape, generator=g)
    old, adv = torch.randn(shape, generator=g) - 5, torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    ref = old + 0.1 * torch.randn(shape, generator=g)
    iw = torch.where(mask > 0, torch.rand(shape, generator=g) * 2, torch.full(shape, float("nan")))
    up = torch.rand(shape, generator=g)
    cu = torch.tensor(sorted({0, N // 3, N}), dtype=torch.int32)
    ids, old, adv, mask, ref, iw, up, cu = (t.to(device) for t in (ids, old, adv, mask, ref, iw, up, cu))
    ok = True
    for kw in (dict(ratio_control=mk.CISPOConfig(0.2, 0.28), ref_logprobs=ref, beta=0.05, kl_estimator="k2",
                    reduce=False, cu_seqlens=cu, loss_agg_mode="seq-mean-token-mean"),
               dict(fused_gradient=True)):
        x, x_ref = logits.clone().requires_grad_(True), logits.double().requires_grad_(True)
        out = mk.policy_loss(x, ids, old, adv, mask, importance_weights=iw, backend=backend, **kw)
        kw.pop("fused_gradient", None)
        want = mk.reference.policy_loss(x_ref, ids, old.double(), adv.double(), mask.double(),
                                        importance_weights=iw.double(), **kw)
        w = up if out.loss.dim() else 1.0
        (out.loss * w).sum().backward()
        (want.loss * (up.double() if want.loss.dim() else 1.0)).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        err = (x.grad.double() - x_ref.grad).abs().max().item() / max(x_ref.grad.abs().max().item(), 1e-12)
        lerr = (out.loss.double() - want.loss).abs().max().item() / max(want.loss.abs().max().item(), 1e-6)
        good = err <= 1e-4 and lerr <= 1e-4 and bool(torch.isfinite(x.grad).all())
        ok &= good
        what = "per-token CISPO" if "reduce" in kw else "IS-weights fused"
        print(f"  {backend:6s} N={N} V={V} {what:16s} grad err {err:.1e} loss err {lerr:.1e} "
              f"{'ok' if good else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
