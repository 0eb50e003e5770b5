"""The finishing kernel of the fused policy loss: everything O(N) after the pass
over the logits, in one launch (the C++ / CUDA twin is ``csrc/mhpo_finish.h``).

From the per-token log-probs (and entropy): the per-sequence sums, the ratio
control's surrogate at each token's (or its sequence's) log-ratio, the
aggregation weights, the loss, the per-token ``d loss / d logp`` that the
backward kernel scales by the upstream gradient, every metric, the optional
per-token rows ``token_out`` (loss term, KL, flag), and the first bad target id
/ bad ``cu_seqlens`` layout. The importance weights ``iw`` are read in the same
token loop; the KL estimator ``kl_est`` is a constexpr. One program: every reduction runs
in a fixed order (block-wide vectors, then ``tl.sum``), so the results are
deterministic. Ids, metric slots and the parameter layout: ``mhpo_kernels._constants``
(``constants.py`` here).
"""
import torch
import triton
import triton.language as tl

from .constants import (
    AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM, AGG_TOKEN_MEAN, AGG_TOKEN_SUM,
    BAD_CU_SEQLENS, BAD_NONE, BAD_TARGET,
    CLIP_LOG_RATIO_LIMIT, GSPO_LOG_RATIO_LIMIT, MET_CLIPFRAC, MET_CLIPFRAC_HIGH, MET_CLIPFRAC_LOW, MET_DUAL_CLIPFRAC,
    MET_ENTROPY_MEAN, MET_KL_OLD, MET_KL_REF, MET_LOW_SURVIVAL_FRAC, MET_PSI_MEAN, MET_RATIO_MAX, MET_RATIO_MIN,
    MET_SURVIVAL_MEAN, MET_ZETA_MEAN, MODE_CISPO, MODE_CLIP, MODE_GSPO, MODE_MHPO, MODE_NONE, MODE_SAPO, NUM_METRICS,
    TOK_FLAG, TOK_KL, TOK_LOSS,
)
from .constants import AGG_NORM_DEFAULT
from .._constants import KL_ESTIMATORS
from .epilogue import clip_fracs, clip_token_limits, cispo_token_parts, kl_estimate, mhpo_token_parts, sapo_token

FINISH_BLOCK = 128  # one warp, 4 tokens per thread: no stack frame in any shipped configuration
FINISH_WARPS = 1


@triton.jit
def _cu(cu_ptr, s, seq_len, HAS_CU: tl.constexpr):
    if HAS_CU:
        return tl.load(cu_ptr + s).to(tl.int32)
    else:
        return seq_len * s  # <= N < 2^31


@triton.jit
def _mask(target_ptr, mask_ptr, offs, inb, ignore_index, HAS_MASK: tl.constexpr):
    y = tl.load(target_ptr + offs, mask=inb, other=ignore_index)
    if HAS_MASK:
        m = tl.load(mask_ptr + offs, mask=inb, other=0.0)
    else:
        m = tl.full(offs.shape, 1.0, tl.float32)
    return tl.where(inb & (y != ignore_index), m, 0.0)


@triton.jit
def _store_row(tok_ptr, ROW: tl.constexpr, N, offs, inb, x):
    # row ROW of token_out [NUM_TOKEN_OUT, N] (the row offset in int64: 2N may pass 2^31)
    tl.store(tok_ptr + ROW * N.to(tl.int64) + offs, x, mask=inb)


@triton.jit(do_not_specialize=["N", "S", "seq_len"])
def _finish_kernel(
    logp_ptr, ent_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, target_ptr, cu_ptr, iw_ptr,
    loss_ptr, dlogp_ptr, metrics_ptr, bad_ptr, tok_ptr,
    N, S, seq_len, ignore_index, num_classes, beta,
    p0, p1, p2, p3, p4, p5, p6,
    global_count, loss_scale_factor, dp_size,
    MODE: tl.constexpr, HAS_ENT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_CU: tl.constexpr, SEQ_LEVEL: tl.constexpr, AGG: tl.constexpr, CHECK: tl.constexpr,
    HAS_IW: tl.constexpr, KL_EST: tl.constexpr, HAS_TOK: tl.constexpr,
    BLOCK: tl.constexpr, CLIP_LIMIT: tl.constexpr, GSPO_LIMIT: tl.constexpr,
):
    offs0 = tl.arange(0, BLOCK)
    # packed offsets: start at 0, end at N, never decrease (else nothing below reads them)
    if HAS_CU:
        # checked at the offsets' own width (int64 offsets beyond 2^31 are bad, not wrapped)
        ends_ok = (tl.load(cu_ptr).to(tl.int64) == 0) & (tl.load(cu_ptr + S).to(tl.int64) == N)
        dec = tl.zeros((BLOCK,), tl.int32)
        for c0 in range(0, S, BLOCK):
            co = c0 + offs0
            inc = co < S
            c_lo = tl.load(cu_ptr + co, mask=inc, other=0).to(tl.int64)
            c_hi = tl.load(cu_ptr + co + 1, mask=inc, other=0).to(tl.int64)
            dec = tl.maximum(dec, (inc & (c_hi < c_lo)).to(tl.int32))
        layout_ok = ends_ok & (tl.max(dec, 0) == 0)
        n_run = tl.where(layout_ok, N, 0)
        s_run = tl.where(layout_ok, S, 0)
    else:
        layout_ok = N >= 0
        n_run = N
        s_run = S

    first_bad = tl.zeros((), tl.int32) + N
    if CHECK:
        fb = tl.full((BLOCK,), N, tl.int32)
        for n0 in range(0, n_run, BLOCK):
            offs = n0 + offs0
            inb = offs < N
            y = tl.load(target_ptr + offs, mask=inb, other=ignore_index)
            bad = inb & (y != ignore_index) & ((y < 0) | (y >= num_classes))
            fb = tl.minimum(fb, tl.where(bad, offs.to(tl.int32), N))
        first_bad = tl.min(fb, 0)

    # pass 1: the batch-wide denominators (agg_norm's global_count may replace them)
    PER_SEQ_COUNT: tl.constexpr = (AGG == AGG_SEQ_MEAN_TOKEN_MEAN) | (AGG == AGG_SEQ_MEAN_TOKEN_SUM) | (
        AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM)
    total = tl.zeros((), tl.float32)
    n_seq = tl.zeros((), tl.float32)
    if PER_SEQ_COUNT:
        for s in range(0, s_run):
            b = _cu(cu_ptr, s, seq_len, HAS_CU)
            e = _cu(cu_ptr, s + 1, seq_len, HAS_CU)
            c = tl.zeros((BLOCK,), tl.float32)
            for n0 in range(b, e, BLOCK):
                offs = n0 + offs0
                c += _mask(target_ptr, mask_ptr, offs, offs < e, ignore_index, HAS_MASK)
            cs = tl.sum(c, 0)
            total += cs
            n_seq += tl.where(cs != 0.0, 1.0, 0.0)
    else:
        c = tl.zeros((BLOCK,), tl.float32)
        for n0 in range(0, n_run, BLOCK):
            offs = n0 + offs0
            c += _mask(target_ptr, mask_ptr, offs, offs < N, ignore_index, HAS_MASK)
        total = tl.sum(c, 0)
    if HAS_CU:
        tm = tl.zeros((BLOCK,), tl.int32)
        for s0 in range(0, s_run, BLOCK):
            so = s0 + offs0
            ins = so < S
            a = tl.load(cu_ptr + so, mask=ins, other=0).to(tl.int32)
            b = tl.load(cu_ptr + so + 1, mask=ins, other=0).to(tl.int32)
            tm = tl.maximum(tm, b - a)
        t_norm = tl.max(tm, 0).to(tl.float32)  # packed: the longest sequence
    else:
        t_norm = seq_len * 1.0
    # the aggregation weight w = m * factor (factor per sequence for seq-mean-token-mean)
    total = tl.where(global_count > 0.0, global_count, total)
    n_seq = tl.where(global_count > 0.0, global_count, n_seq)
    norm = n_seq * tl.where(loss_scale_factor > 0.0, loss_scale_factor, t_norm)

    # pass 2: each token (per sequence when its weight or log-ratio needs the sequence's sums)
    PER_SEQ: tl.constexpr = SEQ_LEVEL | (AGG == AGG_SEQ_MEAN_TOKEN_MEAN)
    a_loss = tl.zeros((BLOCK,), tl.float32)
    a_n = tl.zeros((BLOCK,), tl.float32)
    a_nd = tl.zeros((BLOCK,), tl.float32)
    a_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    a_min = tl.full((BLOCK,), float("inf"), tl.float32)
    a_psi = tl.zeros((BLOCK,), tl.float32)
    a_zeta = tl.zeros((BLOCK,), tl.float32)
    a_surv = tl.zeros((BLOCK,), tl.float32)
    a_low = tl.zeros((BLOCK,), tl.float32)
    a_clo = tl.zeros((BLOCK,), tl.float32)
    a_chi = tl.zeros((BLOCK,), tl.float32)
    a_dual = tl.zeros((BLOCK,), tl.float32)
    a_ent = tl.zeros((BLOCK,), tl.float32)
    a_kl = tl.zeros((BLOCK,), tl.float32)
    if PER_SEQ:
        n_outer = s_run
    else:
        n_outer = tl.minimum(n_run, 1)  # one flat sweep over the N tokens
    for s in range(0, n_outer):
        if PER_SEQ:
            b = _cu(cu_ptr, s, seq_len, HAS_CU)
            e = _cu(cu_ptr, s + 1, seq_len, HAS_CU)
            c = tl.zeros((BLOCK,), tl.float32)
            sd = tl.zeros((BLOCK,), tl.float32)
            for n0 in range(b, e, BLOCK):
                offs = n0 + offs0
                inb = offs < e
                m = _mask(target_ptr, mask_ptr, offs, inb, ignore_index, HAS_MASK)
                c += m
                if SEQ_LEVEL:
                    act = m != 0.0
                    lp = tl.load(logp_ptr + offs, mask=act, other=0.0)
                    od = tl.load(old_ptr + offs, mask=act, other=0.0)
                    sd += tl.where(act, m * (lp - od), 0.0)
            count = tl.sum(c, 0)
            seq_delta = tl.sum(sd, 0) / tl.where(count == 0.0, 1.0, count)
        else:
            b = 0
            e = N
            count = tl.zeros((), tl.float32)
            seq_delta = tl.zeros((), tl.float32)
        for n0 in range(b, e, BLOCK):
            offs = n0 + offs0
            inb = offs < e
            m = _mask(target_ptr, mask_ptr, offs, inb, ignore_index, HAS_MASK)
            act = m != 0.0  # old / adv / ref / iw are read only on active rows
            lp = tl.load(logp_ptr + offs, mask=act, other=0.0)
            if SEQ_LEVEL:
                delta = tl.where(act, seq_delta, 0.0)
            else:
                delta = tl.where(act, lp - tl.load(old_ptr + offs, mask=act, other=0.0), 0.0)
            adv = tl.load(adv_ptr + offs, mask=act, other=0.0)
            if AGG == AGG_TOKEN_MEAN:
                w = m * dp_size * (1.0 / tl.where(total == 0.0, 1.0, total))
            elif AGG == AGG_TOKEN_SUM:
                w = m * dp_size
            elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
                w = m * dp_size * (1.0 / tl.where(count == 0.0, 1.0, count)) * (
                    1.0 / tl.where(n_seq == 0.0, 1.0, n_seq))
            elif AGG == AGG_SEQ_MEAN_TOKEN_SUM:
                w = m * dp_size * (1.0 / tl.where(n_seq == 0.0, 1.0, n_seq))
            else:
                w = m * dp_size * (1.0 / tl.where(norm == 0.0, 1.0, norm))
            flag = tl.zeros((BLOCK,), tl.int1)  # token_out's flag: what the mode's fraction metric counts
            if MODE == MODE_MHPO:
                loss, coef, psi, zeta = mhpo_token_parts(delta, adv, p0, p1, p2, p3, p4, p5, p6)
                surv = tl.exp(-zeta)
                flag = act & (surv < 0.5)
                a_psi += tl.where(act, psi, 0.0)
                a_zeta += tl.where(act, zeta, 0.0)
                a_surv += tl.where(act, surv, 0.0)
                a_low += tl.where(flag, 1.0, 0.0)
            elif MODE == MODE_CLIP or MODE == MODE_GSPO:
                if MODE == MODE_CLIP:
                    loss, coef, pre, r = clip_token_limits(delta, adv, p0, p1, p2, p3, -CLIP_LIMIT, CLIP_LIMIT)
                else:
                    loss, coef, pre, r = clip_token_limits(delta, adv, p0, p1, p2, p3, float("-inf"), GSPO_LIMIT)
                clo, chi, dual = clip_fracs(r, adv, pre, p0, p1, p2)
                flag = act & (clo | chi)
                a_clo += tl.where(act & clo, 1.0, 0.0)
                a_chi += tl.where(act & chi, 1.0, 0.0)
                a_dual += tl.where(act & dual, 1.0, 0.0)
            elif MODE == MODE_CISPO:
                loss, coef, clo, chi = cispo_token_parts(delta, adv, p0, p1, lp, CLIP_LIMIT)
                flag = act & (clo | chi)
                a_clo += tl.where(act & clo, 1.0, 0.0)
                a_chi += tl.where(act & chi, 1.0, 0.0)
            elif MODE == MODE_SAPO:
                loss, coef = sapo_token(delta, adv, p0, p1, CLIP_LIMIT)
            else:
                loss = tl.zeros((BLOCK,), tl.float32)
                coef = tl.zeros((BLOCK,), tl.float32)
            if HAS_TOK:  # each row stored once known: fewer live registers (no stack frame on sm_90)
                _store_row(tok_ptr, TOK_FLAG, N, offs, inb, tl.where(flag, 1.0, 0.0))
            loss = loss.to(tl.float32)
            coef = coef.to(tl.float32)
            if HAS_IW and MODE != MODE_NONE:  # the ratio control's part only
                iw = tl.load(iw_ptr + offs, mask=act, other=0.0)
                loss = loss * iw
                coef = coef * iw
            if HAS_REF:
                kl, dkl = kl_estimate(tl.where(act, tl.load(ref_ptr + offs, mask=act, other=0.0) - lp, 0.0), KL_EST)
                kl = tl.where(act, kl, 0.0)
                a_kl += kl
                if HAS_TOK:
                    _store_row(tok_ptr, TOK_KL, N, offs, inb, kl)
                if beta != 0.0:  # with beta = 0, ref only feeds the metric
                    loss += beta * kl
                    coef += beta * dkl
            if HAS_ENT:
                a_ent += tl.where(act, tl.load(ent_ptr + offs, mask=act, other=0.0), 0.0)
            a_n += tl.where(act, 1.0, 0.0)
            a_nd -= delta
            a_max = tl.where(act & ((delta > a_max) | (delta != delta)), delta, a_max)
            a_min = tl.where(act & ((delta < a_min) | (delta != delta)), delta, a_min)
            wl = tl.where(act, w * loss, 0.0)
            a_loss += wl
            tl.store(dlogp_ptr + offs, tl.where(act, w * coef, 0.0), mask=inb)
            if HAS_TOK:
                _store_row(tok_ptr, TOK_LOSS, N, offs, inb, wl)
                if not HAS_REF:
                    _store_row(tok_ptr, TOK_KL, N, offs, inb, tl.zeros((BLOCK,), tl.float32))
    for n0 in range(0, N - n_run, BLOCK):  # a bad layout: d loss / d logp (and token_out) is all 0
        offs = n0 + offs0
        zero = tl.zeros((BLOCK,), tl.float32)
        tl.store(dlogp_ptr + offs, zero, mask=offs < N)
        if HAS_TOK:
            _store_row(tok_ptr, TOK_LOSS, N, offs, offs < N, zero)
            _store_row(tok_ptr, TOK_KL, N, offs, offs < N, zero)
            _store_row(tok_ptr, TOK_FLAG, N, offs, offs < N, zero)

    n_act = tl.sum(a_n, 0)
    n = tl.maximum(n_act, 1.0)
    dmax = tl.max(a_max, 0)
    dmin = tl.min(a_min, 0)
    tl.store(loss_ptr, tl.sum(a_loss, 0))
    tl.store(metrics_ptr + MET_KL_OLD, tl.sum(a_nd, 0) / n)
    tl.store(metrics_ptr + MET_RATIO_MAX, tl.exp(tl.where(n_act > 0.0, dmax, 0.0)))
    tl.store(metrics_ptr + MET_RATIO_MIN, tl.exp(tl.where(n_act > 0.0, dmin, 0.0)))
    tl.store(metrics_ptr + MET_PSI_MEAN, tl.sum(a_psi, 0) / n)
    tl.store(metrics_ptr + MET_ZETA_MEAN, tl.sum(a_zeta, 0) / n)
    tl.store(metrics_ptr + MET_SURVIVAL_MEAN, tl.sum(a_surv, 0) / n)
    tl.store(metrics_ptr + MET_LOW_SURVIVAL_FRAC, tl.sum(a_low, 0) / n)
    clo = tl.sum(a_clo, 0)
    chi = tl.sum(a_chi, 0)
    tl.store(metrics_ptr + MET_CLIPFRAC_LOW, clo / n)
    tl.store(metrics_ptr + MET_CLIPFRAC_HIGH, chi / n)
    tl.store(metrics_ptr + MET_CLIPFRAC, (clo + chi) / n)
    tl.store(metrics_ptr + MET_DUAL_CLIPFRAC, tl.sum(a_dual, 0) / n)
    tl.store(metrics_ptr + MET_ENTROPY_MEAN, tl.sum(a_ent, 0) / n)
    tl.store(metrics_ptr + MET_KL_REF, tl.sum(a_kl, 0) / n)
    kind = tl.where(layout_ok, tl.where(first_bad < N, BAD_TARGET, BAD_NONE), BAD_CU_SEQLENS)
    tl.store(bad_ptr, kind.to(tl.int64))
    tl.store(bad_ptr + 1, tl.where(kind == BAD_TARGET, first_bad, -1).to(tl.int64))


def finish(logp, entropy, old, adv, mask, ref, target, cu_seqlens, num_seqs, seq_len, mode, params, beta,
           seq_level, agg, ignore_index, num_classes, check, agg_norm=None, iw=None, kl_est=0, token_out=None):
    """-> (loss 0-d, dlogp [N], metrics [13], bad [2] int64), ``token_out`` (float32 [NUM_TOKEN_OUT, N],
    contiguous) filled when given; contract: ``mhpo_kernels.backends``."""
    N = logp.shape[0]
    dev = logp.device
    f32 = dict(device=dev, dtype=torch.float32)
    loss, dlogp, metrics = torch.empty((), **f32), torch.empty(N, **f32), torch.empty(NUM_METRICS, **f32)
    bad = torch.empty(2, device=dev, dtype=torch.int64)
    S = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else int(num_seqs)
    _finish_kernel[(1,)](
        logp, entropy if entropy is not None else logp, old, adv, mask if mask is not None else old,
        ref if ref is not None else old, target, cu_seqlens if cu_seqlens is not None else target,
        iw if iw is not None else logp, loss, dlogp, metrics, bad, token_out if token_out is not None else dlogp,
        N, S, int(seq_len), int(ignore_index), int(num_classes), float(beta),
        *[float(p) for p in params[:7]],
        *[float(v) for v in (AGG_NORM_DEFAULT if agg_norm is None else agg_norm)],
        MODE=int(mode), HAS_ENT=entropy is not None, HAS_MASK=mask is not None, HAS_REF=ref is not None,
        HAS_CU=cu_seqlens is not None, SEQ_LEVEL=bool(seq_level), AGG=int(agg), CHECK=bool(check),
        HAS_IW=iw is not None, HAS_TOK=token_out is not None,
        KL_EST=int(kl_est) if ref is not None else KL_ESTIMATORS["k3"],  # no ref: one compiled variant
        BLOCK=FINISH_BLOCK, CLIP_LIMIT=CLIP_LOG_RATIO_LIMIT, GSPO_LIMIT=GSPO_LOG_RATIO_LIMIT, num_warps=FINISH_WARPS,
    )
    return loss, dlogp, metrics, bad
