"""Fused log-prob / entropy / policy-loss kernels over a [N, V] logits buffer.

Forward: one read of each row (online max and sum-exp in fp32, plus the
entropy accumulator), the target gather, and the per-token epilogue of the
ratio control. Backward: one more read and one write of each row. No [N, V]
temporary. One program per row (grid axis 0 allows 2^31 - 1 programs).
Launcher contract: ``mhpo_kernels.backends``.
"""
import torch
import triton
import triton.language as tl

from .epilogue import clip_token, mhpo_token, sapo_token

MODE_NONE, MODE_MHPO, MODE_CLIP, MODE_SAPO = 0, 1, 2, 3
CLIP_LOG_RATIO_LIMIT = 20.0


@triton.jit
def _k3(d, ed):
    # exp(d) - d - 1 without the cancellation near d = 0 (Taylor series below |d| = 0.5)
    series = d * d * (0.5 + d * (1.0 / 6 + d * (1.0 / 24 + d * (1.0 / 120 + d * (1.0 / 720 + d / 5040.0)))))
    return tl.where(tl.abs(d) < 0.5, series, ed - d - 1.0)


@triton.jit
def _scale(z, inv_t):
    # x = z * inv_t rounded once, in every kernel alike (CPU and CUDA backends too). An
    # explicit fma with a zero addend: a plain multiply may be fused by ptxas into the
    # subtraction that follows (z * inv_t - lse), which leaves the product's rounding
    # error in log p where it must be exactly 0 (V = 1).
    return tl.math.fma(z, inv_t, 0.0)


@triton.jit
def _fwd_kernel(
    logits_ptr, stride_n, target_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
    logp_ptr, ent_ptr, lse_ptr, loss_ptr, coef_ptr,
    V, vocab_start, T, ignore_index, beta,
    p0, p1, p2, p3, p4, p5, p6,
    MODE: tl.constexpr, HAS_REF: tl.constexpr, WANT_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr, LIMIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    cols0 = tl.arange(0, BLOCK_V)
    # running max m, sum-exp s = sum e^{x-m}, and t = sum e^{x-m} (x-m) for the entropy
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    inv_t = tl.math.div_rn(1.0, T)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = _scale(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32), inv_t)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep it finite
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)
        if WANT_ENT:
            # sum e^{x-m_new}(x-m_new) = alpha * (t + s (m - m_new)) + this block
            shift = s * tl.where(s > 0.0, m - m_ref, 0.0)
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, x - m_ref, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    lse = m_fin + log_s

    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    # a vocabulary shard holds ids [vocab_start, vocab_start + V); logp is the shard-local one
    y_loc = y - vocab_start
    owned = valid & (y_loc >= 0) & (y_loc < V)
    x_y = _scale(tl.load(row_ptr + tl.where(owned, y_loc, 0)).to(tl.float32), inv_t)
    # (x - m) - log s, not x - (m + log s): exactly 0 when the row has one element
    logp = tl.where(owned, (x_y - m_fin) - log_s, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if WANT_ENT:
        tl.store(ent_ptr + row, tl.where(valid, log_s - t / s, 0.0))

    if MODE != 0:
        active = valid & (tl.load(mask_ptr + row) != 0.0)
        delta = tl.where(active, logp - tl.load(old_ptr + row), 0.0)
        adv = tl.where(active, tl.load(adv_ptr + row), 0.0)
        if MODE == 1:
            loss, coef = mhpo_token(delta, adv, p0, p1, p2, p3, p4, p5, p6)
        elif MODE == 2:
            loss, coef = clip_token(delta, adv, p0, p1, p2, p3, LIMIT)
        else:
            loss, coef = sapo_token(delta, adv, p0, p1, LIMIT)
        if HAS_REF:
            # k3 KL: exp(ref - logp) - (ref - logp) - 1
            d = tl.where(active, tl.load(ref_ptr + row) - logp, 0.0)
            ed = tl.exp(d)
            loss += beta * _k3(d, ed)
            coef += beta * (1.0 - ed)
        tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
        tl.store(coef_ptr + row, tl.where(active, coef, 0.0))
    else:  # log-probs only: loss and coef are 0 (written here, not by a separate fill launch)
        tl.store(loss_ptr + row, 0.0)
        tl.store(coef_ptr + row, 0.0)


@triton.jit
def _bwd_kernel(
    logits_ptr, stride_n, out_ptr, stride_out, target_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, scale_ptr,
    V, vocab_start, T, ignore_index,
    HAS_DENT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    out_row = out_ptr + row * stride_out
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    y_loc = y - vocab_start  # never equal to a column when the target is in another shard
    lse = tl.load(lse_ptr + row)
    g = tl.load(dlogp_ptr + row)
    if HAS_SCALE:  # the loss's upstream gradient, one value for every row
        g = g * tl.load(scale_ptr)
    if HAS_DENT:
        ge = tl.load(dent_ptr + row)
        H = tl.load(ent_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    inv_t = tl.math.div_rn(1.0, T)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        logp = _scale(tl.load(row_ptr + cols, mask=inb, other=0.0).to(tl.float32), inv_t) - lse
        p = tl.exp(logp)
        # d logp_y / dx = onehot - p ;  d H / dx = -p (log p + H)
        grad = tl.where(cols == y_loc, g, 0.0) - g * p
        if HAS_DENT:
            grad -= ge * p * tl.where(p > 0.0, logp + H, 0.0)
        grad = tl.where(valid, grad * inv_t, 0.0)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inb)


# The configurations we ship (triton_kernels.aot compiles every one of them for sm_80 / sm_90).
BLOCKS_V = (128, 256, 512, 1024, 2048, 4096)


def block_v(V: int) -> int:
    return min(max(triton.next_power_of_2(V), BLOCKS_V[0]), BLOCKS_V[-1])


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


def fwd(logits, target, old, adv, mask, ref, mode, params, beta, temperature, ignore_index, want_entropy,
        vocab_start=0):
    N, V = logits.shape
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N if want_entropy else 0, **f32)
    loss, coef = torch.empty(N, **f32), torch.empty(N, **f32)  # the kernel writes 0 for MODE_NONE
    if N == 0:
        return logp, entropy, lse, loss, coef
    block = block_v(V)
    _fwd_kernel[(N,)](
        logits, logits.stride(0), target, old, adv, mask, ref if ref is not None else old,
        logp, entropy if want_entropy else logp, lse, loss, coef,
        V, int(vocab_start), float(temperature), int(ignore_index), float(beta),
        *[float(p) for p in params[:7]],
        MODE=int(mode), HAS_REF=ref is not None, WANT_ENT=bool(want_entropy),
        BLOCK_V=block, LIMIT=CLIP_LOG_RATIO_LIMIT, num_warps=num_warps(block),
    )
    return logp, entropy, lse, loss, coef


def bwd(logits, target, lse, entropy, dlogp, dent, temperature, ignore_index, out, vocab_start=0, scale=None):
    N, V = logits.shape
    if N == 0:
        return
    has_dent = dent is not None
    block = block_v(V)
    _bwd_kernel[(N,)](
        logits, logits.stride(0), out, out.stride(0), target, lse,
        entropy if has_dent else lse, dlogp, dent if has_dent else dlogp, scale if scale is not None else lse,
        V, int(vocab_start), float(temperature), int(ignore_index),
        HAS_DENT=has_dent, HAS_SCALE=scale is not None, BLOCK_V=block, num_warps=num_warps(block),
    )
