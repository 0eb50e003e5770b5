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
from triton.language.extra.cuda import libdevice
from triton.runtime.interpreter import InterpretedFunction

from .constants import CLIP_LOG_RATIO_LIMIT, MODE_NONE
from .epilogue import scale_rn, token_loss


@triton.jit
def _exp2_ftz(x):
    # ex2.approx.ftz.f32 (libdevice's exp2f under Triton's ftz reflect): one MUFU.EX2. tl.exp and
    # tl.math.exp2 lower to the non-ftz ex2, which ptxas wraps in a denormal fix-up (FSETP and two
    # predicated FMULs per element). Flushed: results below 2^-126, which no sum here can see.
    return libdevice.exp2(x)


@triton.jit
def _exp2_ieee(x):
    return tl.math.exp2(x)


# The interpreter runs no libdevice: it gets the IEEE exp2 (the same values, denormals kept).
_exp2 = _exp2_ieee if isinstance(_exp2_ftz, InterpretedFunction) else _exp2_ftz


@triton.jit
def _fwd_block(z, m, s, t, c, WANT_ENT: tl.constexpr):
    # One [lanes, VEC] block into the per-lane state (m, s, t): see _fwd_kernel.
    m_new = tl.maximum(m, tl.max(z, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep it finite
    # z - m_ref is exactly 0 at the maximum: its 2^d is exactly 1 (V = 1 gives log p = 0)
    d = (z - m_ref[:, None]) * c
    e = _exp2(d)
    dm = (m - m_ref) * c
    alpha = _exp2(dm)
    if WANT_ENT:
        # sum 2^{d'} d' (d' relative to m_new) = alpha (t + s dm) + this block; 2^d d is 0 where
        # 2^d is (d = -inf included): max(d, -1e4) changes no d with 2^d > 0 and keeps NaN in s
        t = alpha * (t + s * tl.where(s > 0.0, dm, 0.0)) + tl.sum(e * tl.maximum(d, -1e4), 1)
    s = s * alpha + tl.sum(e, 1)
    return m_new, s, t


@triton.jit
def _fwd_kernel(
    logits_ptr, stride_n, target_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
    logp_ptr, ent_ptr, lse_ptr, loss_ptr, coef_ptr,
    V, vocab_start, T, ignore_index, beta,
    p0, p1, p2, p3, p4, p5, p6,
    MODE: tl.constexpr, HAS_REF: tl.constexpr, WANT_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, LIMIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    # The block as [BLOCK_V // VEC, VEC]: a thread holds whole VEC-wide chunks (VEC = one 16-byte
    # load), so the online max / sum-exp runs per chunk lane with no cross-thread reduction (no
    # barrier) in the loop; the lanes are combined once, after it.
    offs = tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    # Per lane: m = max of the raw logits z, s = sum 2^d and t = sum 2^d d with d = (z - m) c the
    # log2-domain logit relative to m (c = log2(e) / T folds the temperature in: one multiply).
    m = tl.full((BLOCK_V // VEC,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V // VEC,), tl.float32)
    t = tl.zeros((BLOCK_V // VEC,), tl.float32)
    inv_t = tl.math.div_rn(1.0, T)
    c = inv_t * 1.4426950408889634
    # whole blocks unmasked (no -inf fill, no bound test), then the tail, if any, masked
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        z = tl.load(row_ptr + start + offs).to(tl.float32)
        m, s, t = _fwd_block(z, m, s, t, c, WANT_ENT)
    if v_full < V:
        cols = v_full + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, t = _fwd_block(z, m, s, t, c, WANT_ENT)
    # combine the lanes: the same update, once
    m_row = tl.max(m, 0)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    dm = (m - m_ref) * c
    w = _exp2(dm)
    s_row = tl.sum(s * w, 0)
    log_s = tl.log(s_row)
    # the maximum scaled as every x below (and the backward) scales z: max(z) / T == max(z / T)
    m_fin = scale_rn(m_ref, inv_t)
    lse = m_fin + log_s

    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    # a vocabulary shard holds ids [vocab_start, vocab_start + V); logp is the shard-local one
    y_loc = y - vocab_start
    owned = valid & (y_loc >= 0) & (y_loc < V)
    x_y = scale_rn(tl.load(row_ptr + tl.where(owned, y_loc, 0)).to(tl.float32), inv_t)
    # (x - m) - log s, not x - (m + log s): exactly 0 when the row has one element
    logp = tl.where(owned, (x_y - m_fin) - log_s, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if WANT_ENT:
        t_row = tl.sum(w * (t + s * tl.where(s > 0.0, dm, 0.0)), 0)
        # H = log s - sum p (x - m), t in log2 units: times ln 2
        tl.store(ent_ptr + row, tl.where(valid, log_s - (t_row * 0.6931471805599453) / s_row, 0.0))

    if MODE != MODE_NONE:
        active = valid & (tl.load(mask_ptr + row) != 0.0)
        loss, coef = token_loss(MODE, HAS_REF, LIMIT, active, logp, old_ptr + row, adv_ptr + row, ref_ptr + row,
                                p0, p1, p2, p3, p4, p5, p6, beta)
        tl.store(loss_ptr + row, loss)
        tl.store(coef_ptr + row, coef)
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
    y_loc = y - vocab_start
    # the target's column as int32 (columns are int32), -1 when it is in another shard
    y_col = tl.where((y_loc >= 0) & (y_loc < V), y_loc, -1).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    inv_t = tl.math.div_rn(1.0, T)
    # dx = dz / T: 1/T folded into the row's upstream gradients, not applied per element
    g = tl.load(dlogp_ptr + row) * inv_t
    if HAS_SCALE:  # the loss's upstream gradient, one value for every row
        g = g * tl.load(scale_ptr)
    if HAS_DENT:
        ge = tl.load(dent_ptr + row) * inv_t
        gh = g + ge * tl.load(ent_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    # an ignored row runs the zero-filling loop instead (no per-element select; its logits may be
    # anything, NaN included, and its gradient is still exactly 0)
    v_live = tl.where(valid, V, 0)
    for start in range(0, v_live, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        logp = scale_rn(tl.load(row_ptr + cols, mask=inb, other=0.0).to(tl.float32), inv_t) - lse
        p = _exp2(logp * 1.4426950408889634)  # exactly 1 where logp is exactly 0 (V = 1)
        # d logp_y / dx = onehot - p ;  d H / dx = -p (log p + H)
        if HAS_DENT:
            # p (g + ge (log p + H)), 0 where p is: max(logp, -1e4) changes no logp with p > 0
            grad = tl.where(cols == y_col, g, 0.0) - p * (ge * tl.maximum(logp, -1e4) + gh)
        else:
            grad = tl.where(cols == y_col, g, 0.0) - g * p
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inb)
    for start in range(0, V - v_live, BLOCK_V):
        cols = start + cols0
        tl.store(out_row + cols, tl.zeros((BLOCK_V,), out_ptr.dtype.element_ty), mask=cols < V)


# The configurations we ship (mhpo_kernels.triton_kernels.aot compiles every one of them for sm_80 / sm_90).
BLOCKS_V = (128, 256, 512, 1024, 2048, 4096)


def block_v(V: int) -> int:
    return min(max(triton.next_power_of_2(V), BLOCKS_V[0]), BLOCKS_V[-1])


def vec_width(itemsize: int, aligned: bool = True) -> int:
    """The forward's chunk width: the elements of one 16-byte load (fp32 4, bf16 / fp16 8) where
    Triton's specialisation proves every row 16-byte aligned, else 1 (a lane per element: wider
    chunks of unaligned rows would be reduced across threads in the loop)."""
    return 16 // itemsize if aligned else 1


def rows_aligned(logits) -> bool:
    """What Triton's launch specialisation sees: base address % 16 bytes and row stride % 16 elements."""
    return logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0


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
        BLOCK_V=block, VEC=vec_width(logits.element_size(), rows_aligned(logits)), LIMIT=CLIP_LOG_RATIO_LIMIT,
        num_warps=num_warps(block),
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
