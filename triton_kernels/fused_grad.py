"""The forward that writes the gradient: the ``fwd_grad`` and ``scale_grad`` launchers of
the ``triton`` backend (contract: ``mhpo_kernels.backends``; the algorithm: ``mhpo_kernels._fused_grad``).

One program per row: the forward's sweep (online max / sum-exp / entropy), the per-token epilogue
of the ratio control (``epilogue.py``), then a second sweep over the same row, right after the
first and in the same program, that writes ``(w coef (1[v == y] - p) + ent_coef w p (log p + H)) / T``.
The second read hits L2 at best: 2 reads + 1 write of the logits like the two-kernel path, one
launch less and the backward free. Not yet run on a GPU (tested under the interpreter, compiled
ahead of time for sm_80 / sm_90 by ``aot.py``): ``fused_gradient=None`` leaves it off on CUDA.
"""
import torch
import triton
import triton.language as tl

from .constants import CLIP_LOG_RATIO_LIMIT
from .epilogue import scale_rn, token_loss

BLOCKS_V = (128, 256, 512, 1024, 2048, 4096)
SCALE_BLOCK = 1024


@triton.jit
def _fwd_grad_kernel(
    logits_ptr, stride_n, out_ptr, stride_out, target_ptr, old_ptr, adv_ptr, ref_ptr, w_ptr,
    logp_ptr, ent_ptr, lse_ptr, loss_ptr, coef_ptr,
    V, T, ignore_index, beta, ent_coef,
    p0, p1, p2, p3, p4, p5, p6,
    MODE: tl.constexpr, HAS_REF: tl.constexpr, WANT_ENT: tl.constexpr, HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr, LIMIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    out_row = out_ptr + row * stride_out
    cols0 = tl.arange(0, BLOCK_V)
    inv_t = tl.math.div_rn(1.0, T)
    # sweep 1: running max m, s = sum e^{x-m}, t = sum e^{x-m} (x-m) (the entropy)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = scale_rn(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32), inv_t)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)
        if WANT_ENT or HAS_ENT:
            shift = s * tl.where(s > 0.0, m - m_ref, 0.0)
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, x - m_ref, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    lse = m_fin + log_s
    H = log_s - t / s

    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    owned = valid & (y >= 0) & (y < V)
    x_y = scale_rn(tl.load(row_ptr + tl.where(owned, y, 0)).to(tl.float32), inv_t)  # before sweep 2 writes
    logp = tl.where(owned, (x_y - m_fin) - log_s, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if WANT_ENT:
        tl.store(ent_ptr + row, tl.where(valid, H, 0.0))

    # the epilogue: the aggregation weight w is 0 on inactive rows (their old / adv / ref, padding
    # that may hold inf / NaN, are loaded but never used)
    w = tl.load(w_ptr + row)
    active = valid & (w != 0.0)
    loss, coef = token_loss(MODE, HAS_REF, LIMIT, active, logp, old_ptr + row, adv_ptr + row, ref_ptr + row,
                            p0, p1, p2, p3, p4, p5, p6, beta)
    tl.store(loss_ptr + row, loss)
    tl.store(coef_ptr + row, coef)

    # sweep 2, the same row right after sweep 1: the gradient of w (loss - ent_coef H) for an
    # upstream gradient of 1 (the backward kernel's formula with dlogp = w coef, dent = -ent_coef w)
    g = w * coef
    ge = -ent_coef * w
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        lp = scale_rn(tl.load(row_ptr + cols, mask=inb, other=0.0).to(tl.float32), inv_t) - lse
        p = tl.exp(lp)
        grad = tl.where(cols == y, g, 0.0) - g * p
        if HAS_ENT:
            grad -= ge * p * tl.where(p > 0.0, lp + H, 0.0)
        grad = tl.where(valid, grad * inv_t, 0.0)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scale_grad_kernel(out_ptr, stride_out, scale_ptr, V, BLOCK_V: tl.constexpr):
    # out *= scale, every program exits at once when scale == 1 (decided here: no host sync)
    sc = tl.load(scale_ptr)
    if sc != 1.0:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        ptr = out_ptr + row * stride_out + cols
        x = tl.load(ptr, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(ptr, (x * sc).to(out_ptr.dtype.element_ty), mask=cols < V)


def block_v(V: int) -> int:
    return min(max(triton.next_power_of_2(V), BLOCKS_V[0]), BLOCKS_V[-1])


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


def fwd_grad(logits, target, old, adv, ref, weight, mode, params, beta, temperature, ignore_index, want_entropy,
             ent_coef, grad):
    N, V = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp, lse, loss, coef = (torch.empty(N, **f32) for _ in range(4))
    entropy = torch.empty(N if want_entropy else 0, **f32)
    if N == 0:
        return logp, entropy, lse, loss, coef
    block = block_v(V)
    _fwd_grad_kernel[(N,)](
        logits, logits.stride(0), grad, grad.stride(0), target, old, adv, ref if ref is not None else old, weight,
        logp, entropy if want_entropy else logp, lse, loss, coef,
        V, float(temperature), int(ignore_index), float(beta), float(ent_coef),
        *[float(p) for p in params[:7]],
        MODE=int(mode), HAS_REF=ref is not None, WANT_ENT=bool(want_entropy), HAS_ENT=ent_coef != 0,
        BLOCK_V=block, LIMIT=float(CLIP_LOG_RATIO_LIMIT), num_warps=num_warps(block),
    )
    return logp, entropy, lse, loss, coef


def scale_grad(grad, scale):
    N, V = grad.shape
    if N == 0 or V == 0:
        return
    _scale_grad_kernel[(N, triton.cdiv(V, SCALE_BLOCK))](grad, grad.stride(0), scale, V, BLOCK_V=SCALE_BLOCK,
                                                         num_warps=4)
