"""The per-token corrections of the policy losses: ``importance_weights`` (verl's
``rollout_is_weights``, TRL's ``importance_sampling_ratio``), ``kl_estimator`` (k3, k1, k2,
low_var_kl), ``reduce=False`` (per-token loss terms and metrics) and :class:`CISPOConfig`.

Every backend and entry point (policy_loss, mhpo_loss, policy_loss_from_logprobs,
fused_linear_mhpo_loss) against the float64 reference; identities that need no reference
(weights scale the advantage only, per-token terms carry the aggregation weights, both
gradient paths agree); the reference itself against closed forms, CISPO's exact gradient
and gradcheck.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from util import SCALAR_TOL, TOL, assert_close, check_outputs, device_for, fused_backends, make_case

import mhpo_kernels as mk
from mhpo_kernels import backends
from mhpo_kernels import reference as R
from mhpo_kernels._inputs import LOSS_AGG_MODES

FUSED = fused_backends()  # each on its own device (util.device_for)
BACKENDS = FUSED + ["torch"]
INTERPRETED = ("triton",) if device_for("triton").type == "cpu" else ()  # Triton's interpreter: few, small cases
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
KL_ESTIMATORS = ("k3", "k1", "k2", "low_var_kl")

# name -> (ratio_control, importance_sampling_level)
CONTROLS = {
    "mhpo": (mk.MHPOConfig(), "token"),
    "mhpo_seq": (mk.MHPOConfig(), "sequence"),
    "clip_dual": (mk.ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0), "token"),
    "clip_seq": (mk.ClipConfig(eps_low=0.2, eps_high=0.28), "sequence"),
    "sapo": (mk.SAPOConfig(), "token"),
    "gspo": (mk.GSPOConfig(eps_low=0.05, eps_high=0.08), "sequence"),
    "cispo": (mk.CISPOConfig(), "token"),
    "cispo_dapo": (mk.CISPOConfig(eps_low=0.2, eps_high=0.28), "token"),
    "cispo_trl": (mk.CISPOConfig(eps_low=None), "token"),  # TRL's loss_type="cispo": no lower bound
    "cispo_seq": (mk.CISPOConfig(eps_low=None, eps_high=0.3), "sequence"),  # TRL's, importance_sampling_level
}
# token shape, cu_seqlens (packed: an empty sequence and a fully masked one, MASKED_SEQ)
SHAPES = {"N29": ((29,), None), "B3T11": ((3, 11), None), "packed29": ((29,), [0, 4, 4, 13, 22, 29])}
MASKED_SEQ = slice(13, 22)
GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)  # what inactive positions of the weights hold


def slow_unless(quick):
    return () if quick else (pytest.mark.slow,)


# ---------------------------------------------------------------------------- cases

class Case:
    """One call's inputs on one device: logits, ids, old, adv, mask, ref, iw (importance
    weights or None), cu (cu_seqlens or None)."""

    def __init__(self, logits, ids, old, adv, mask, ref, iw, cu):
        self.logits, self.ids, self.old, self.adv, self.mask, self.ref, self.iw, self.cu = (
            logits, ids, old, adv, mask, ref, iw, cu)

    def map(self, f):
        return Case(*(None if t is None else f(t) for t in (self.logits, self.ids, self.old, self.adv, self.mask,
                                                            self.ref, self.iw, self.cu)))

    def double(self):
        return self.map(lambda t: t.double() if t.is_floating_point() else t)

    @property
    def active(self):
        return (self.mask != 0) & (self.ids != -100)


def importance_weights(ids, mask, g, dtype):
    """Weights in [0, 3) (values above 1, a few exact zeros) on active tokens; NaN / inf / huge
    garbage on inactive ones, which no backend may read."""
    shape = ids.shape
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    w[torch.rand(shape, generator=g) < 0.15] = 0.0
    inactive = (mask == 0) | (ids == -100)
    w[inactive] = torch.tensor(GARBAGE, dtype=torch.float64)[torch.arange(int(inactive.sum())) % len(GARBAGE)]
    return w.to(dtype)


def build(shape_name, V, dtype, seed, *, backend, iw="fp32", float_mask=False, ratio_spread=0.6):
    """make_case for a named shape (+ cu_seqlens), importance weights of dtype ``iw`` (a DTYPES
    key, or "none"), a float mask (values in [0.25, 1.25) where active) when ``float_mask``."""
    shape, cu = SHAPES[shape_name]
    logits, ids, old, adv, mask, ref = make_case(shape, V, dtype, seed=seed, device="cpu", ratio_spread=ratio_spread)
    if cu is not None:
        mask[MASKED_SEQ] = 0
        old[MASKED_SEQ], adv[MASKED_SEQ], ref[MASKED_SEQ] = float("inf"), float("nan"), float("-inf")
        cu = torch.tensor(cu, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed + 101)
    if float_mask:
        mask = mask * (0.25 + torch.rand(shape, generator=g))
    w = None if iw == "none" else importance_weights(ids, mask, g, DTYPES[iw])
    return Case(logits, ids, old, adv, mask, ref, w, cu).map(lambda t: t.to(device_for(backend)))


def backward(out, seed, leaf):
    """Backpropagate with random upstream gradients: a scalar for a reduced loss, one per token for
    ``reduce=False``, one per token for the entropy (``seed`` None: 1 for the reduced loss). Returns
    ``leaf.grad``."""
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if out.loss.dim():
        up = rand(out.loss.shape)
    elif seed is None:
        up = torch.ones((), dtype=torch.float64)
    else:
        up = 1 + torch.rand((), generator=g, dtype=torch.float64)
    total = (out.loss * up.to(out.loss)).sum()
    if out.entropy is not None:
        total = total + (out.entropy * rand(out.entropy.shape).to(out.entropy)).sum()
    total.backward()
    return leaf.grad


def call(fn, c, z, control, **kw):
    """``fn`` (an entry point of mk or R) on case ``c`` with logits ``z``."""
    cfg, level = CONTROLS[control]
    if fn in (mk.mhpo_loss, R.mhpo_loss):
        assert level == "token" and c.cu is None
        return fn(z, c.ids, c.old, c.adv, c.mask, config=cfg, ref_logprobs=c.ref, importance_weights=c.iw, **kw)
    return fn(z, c.ids, c.old, c.adv, c.mask, ratio_control=cfg, importance_sampling_level=level, cu_seqlens=c.cu,
              ref_logprobs=c.ref, importance_weights=c.iw, **kw)


def run(fn, c, control, seed, **kw):
    z = c.logits.clone().requires_grad_()
    out = call(fn, c, z, control, **kw)
    return out, backward(out, seed, z)


def token_metric_names(control, has_ref):
    cfg = CONTROLS[control][0]
    names = {"token_kl"} if has_ref else set()
    if isinstance(cfg, mk.MHPOConfig):
        names.add("token_low_survival")
    elif isinstance(cfg, (mk.ClipConfig, mk.GSPOConfig, mk.CISPOConfig)):
        names.add("token_clipped")
    return names


def check_token_outputs(out, reduced, c, control):
    """``reduce=False``'s outputs against the reduced call's: the shape, the sum, 0 on inactive
    tokens, the per-token metrics (0/1 flags, 0 on inactive tokens) whose means are the scalar metrics."""
    active = c.active
    assert out.loss.shape == c.ids.shape and out.loss.dtype == reduced.loss.dtype
    assert_close(out.loss.sum(), reduced.loss, *SCALAR_TOL, "sum of the per-token terms", floor=1e-3)
    assert torch.equal(out.loss[~active], torch.zeros_like(out.loss[~active])), "a term on an inactive token"
    assert {k for k in out.metrics if k.startswith("token_")} == token_metric_names(control, c.ref is not None)
    for k in reduced.metrics:
        assert_close(out.metrics[k], reduced.metrics[k], 1e-6, 1e-6, f"metric {k}", floor=1e-2)
    n = max(int(active.sum()), 1)
    pairs = {"token_kl": "kl_ref", "token_clipped": "clipfrac", "token_low_survival": "low_survival_frac"}
    for k, scalar in pairs.items():
        if k not in out.metrics:
            continue
        t = out.metrics[k]
        assert t.shape == c.ids.shape, k
        assert torch.equal(t[~active], torch.zeros_like(t[~active])), f"{k} on an inactive token"
        if k != "token_kl":
            assert ((t == 0) | (t == 1)).all(), f"{k} is not a 0/1 flag"
        assert_close(t.double().sum() / n, out.metrics[scalar], 1e-5, 1e-5, f"mean {k} vs {scalar}", floor=1e-2)


# ---------------------------------------------------------------------------- every backend vs the reference

def P(control, shape, dtype="fp32", V=37, T=1.0, agg="token-mean", beta=0.1, kl="k3", iw="fp32", reduce=True,
      ec=0.0, fmask=False, entry="policy_loss", seed=0):
    return dict(control=control, shape=shape, dtype=dtype, V=V, T=T, agg=agg, beta=beta, kl=kl, iw=iw, reduce=reduce,
                ec=ec, fmask=fmask, entry=entry, seed=seed)


def spell(p):
    return (f"{p['control']}-{p['shape']}-{p['dtype']}-V{p['V']}-T{p['T']}-{p['agg']}-beta{p['beta']}-{p['kl']}-"
            f"iw_{p['iw']}-{'tokens' if not p['reduce'] else 'reduced'}-ec{p['ec']}-"
            f"{'floatmask' if p['fmask'] else 'mask01'}-{p['entry']}-seed{p['seed']}")


QUICK = [  # every control once, every option somewhere; the first three also on interpreted Triton
    P("mhpo", "B3T11", "bf16", T=0.7, kl="k3", reduce=False, ec=0.01, entry="mhpo_loss", seed=1),
    P("cispo", "B3T11", V=101, T=0.7, kl="low_var_kl", reduce=False, ec=0.01, seed=2),
    P("gspo", "packed29", agg="seq-mean-token-mean", kl="k1", seed=3),
    P("mhpo_seq", "packed29", V=101, agg="seq-mean-token-mean", kl="low_var_kl", fmask=True, seed=4),
    P("clip_dual", "N29", agg="token-sum", kl="k2", iw="bf16", reduce=False, fmask=True, seed=5),
    P("clip_seq", "B3T11", V=1, agg="seq-mean-token-sum", kl="k1", iw="fp64", reduce=False, ec=0.01, seed=6),
    P("sapo", "packed29", "bf16", V=101, T=0.7, agg="seq-mean-token-sum-norm", beta=0.0, ec=0.01, reduce=False,
      seed=7),
    P("cispo_dapo", "N29", "bf16", agg="seq-mean-token-sum-norm", beta=0.0, kl="k2", iw="none", fmask=True, seed=8),
    P("cispo_trl", "packed29", kl="k3", reduce=False, seed=9),
    P("mhpo", "N29", "fp16", V=1031, kl="k2", iw="fp16", seed=10),
]


def full_grid():
    """control x shape, the other options cycled over it."""
    for i, (control, shape) in enumerate(itertools.product(CONTROLS, SHAPES)):
        entry = "mhpo_loss" if control == "mhpo" and shape != "packed29" and i % 2 else "policy_loss"
        yield P(control, shape, ("fp32", "bf16", "fp16")[i % 3], (37, 1, 101, 1031)[(i // 2) % 4], (1.0, 0.7)[i % 2],
                LOSS_AGG_MODES[(i // 3) % 5], (0.1, 0.0, 0.5)[(i // 4) % 3], KL_ESTIMATORS[i % 4],
                ("fp32", "none", "fp64", "bf16", "fp16")[i % 5], (i // 3) % 2 == 1, (0.0, 0.01, -0.02)[(i // 2) % 3],
                (i // 5) % 2 == 1, entry, 100 + i)


def vs_reference_params():
    for backend in BACKENDS:
        for k, p in enumerate(QUICK):
            quick = backend not in INTERPRETED or k < 3
            yield pytest.param(backend, p, id=f"{backend}-{spell(p)}", marks=slow_unless(quick))
        for p in full_grid():
            yield pytest.param(backend, p, id=f"{backend}-{spell(p)}", marks=pytest.mark.slow)


@pytest.mark.parametrize("backend,p", list(vs_reference_params()))
def test_vs_reference(backend, p):
    """Loss, logits gradient (random upstream gradients: one per token with reduce=False), log-probs,
    entropy, every metric (the per-token ones included) against reference.policy_loss in float64."""
    dtype = DTYPES[p["dtype"]]
    c = build(p["shape"], p["V"], dtype, p["seed"], backend=backend, iw=p["iw"], float_mask=p["fmask"])
    kw = dict(loss_agg_mode=p["agg"], temperature=p["T"], beta=p["beta"], kl_estimator=p["kl"],
              entropy_coeff=p["ec"], return_entropy=p["ec"] != 0 or p["seed"] % 2 == 0)
    fn, ref_fn = (mk.mhpo_loss, R.mhpo_loss) if p["entry"] == "mhpo_loss" else (mk.policy_loss, R.policy_loss)
    out, grad = run(fn, c, p["control"], p["seed"], backend=backend, reduce=p["reduce"], **kw)
    want, want_grad = run(ref_fn, c.double(), p["control"], p["seed"], reduce=p["reduce"], **kw)
    check_outputs(out, grad, want, want_grad, dtype)
    assert p["V"] == 1 or (want.loss != 0).any(), "the case must not be trivially 0"  # V = 1: logp = 0
    if not p["reduce"]:
        with torch.no_grad():
            reduced = call(fn, c, c.logits, p["control"], backend=backend, **kw)
        check_token_outputs(out, reduced, c, p["control"])


# ---------------------------------------------------------------------------- importance weights: identities

IW_CONTROLS = ["mhpo", "clip_dual", "sapo", "cispo_trl", "gspo", "mhpo_seq"]


def iw_params():
    for path in BACKENDS + ["reference"]:
        for i, (control, reduce) in enumerate(itertools.product(IW_CONTROLS, [True, False])):
            quick = path not in INTERPRETED or (control, reduce) == ("cispo_trl", False)
            yield pytest.param(path, control, reduce, i, id=f"{path}-{control}-{('tokens', 'reduced')[reduce]}",
                               marks=slow_unless(quick))


@pytest.mark.parametrize("path,control,reduce,i", list(iw_params()))
def test_importance_weights_weight_the_ratio_control_only(path, control, reduce, i):
    """Every ratio control's token loss is positively homogeneous in the advantage
    (iw * L(A) = L(iw * A) for iw >= 0), so a call with importance weights must equal the call
    with the advantages multiplied by them in loss and gradient, while the KL term and the entropy
    bonus stay unweighted; its metrics are the unweighted call's; weights of 1 change nothing. Every
    call takes the two-kernel path (with weights and a KL term the fused one does not apply, without it
    does, and it may compute the log-probs in other bits: tests/test_fused_grad.py)."""
    shape = "packed29" if CONTROLS[control][1] == "sequence" else "B3T11"
    dtype = torch.float64 if path == "reference" else torch.float32
    c = build(shape, 31, dtype, seed=40 + i, backend=path)
    c = c.map(lambda t: t.double() if path == "reference" and t.is_floating_point() else t)
    kw = dict(backend=path, reduce=reduce, loss_agg_mode=LOSS_AGG_MODES[i % 5], beta=0.1,
              kl_estimator=KL_ESTIMATORS[i % 4], entropy_coeff=0.02, return_entropy=True, temperature=0.9,
              fused_gradient=False)
    weighted = run(mk.policy_loss, c, control, i, **kw)
    scaled_adv = torch.where(c.active, c.adv.double() * c.iw.double(), c.adv.double()).to(c.adv.dtype)
    scaled = run(mk.policy_loss, Case(c.logits, c.ids, c.old, scaled_adv, c.mask, c.ref, None, c.cu), control, i,
                 **kw)
    plain = run(mk.policy_loss, Case(c.logits, c.ids, c.old, c.adv, c.mask, c.ref, None, c.cu), control, i, **kw)
    ones = torch.where(c.active, torch.ones_like(c.iw), c.iw)  # garbage stays where inactive
    unit = run(mk.policy_loss, Case(c.logits, c.ids, c.old, c.adv, c.mask, c.ref, ones, c.cu), control, i, **kw)
    tol = (TOL[torch.float64],) * 2 if dtype == torch.float64 else (SCALAR_TOL, TOL[torch.float32])
    for what, (out, grad), (want, want_grad) in [("iw vs iw * A", weighted, scaled), ("iw = 1 vs none", unit, plain)]:
        assert_close(out.loss, want.loss, *tol[0], f"{what}: loss", floor=1e-3)
        assert_close(grad, want_grad, *tol[1], f"{what}: grad")
    assert weighted[0].metrics.keys() == plain[0].metrics.keys()
    for k in plain[0].metrics:
        assert torch.equal(weighted[0].metrics[k], plain[0].metrics[k]), f"metric {k} changed by the weights"
    assert not torch.allclose(weighted[1], plain[1]), "the weights must change the gradient"


def fwd_grad_backends():
    return [b for b in BACKENDS if b in mk.available_backends(device_for(b))
            and getattr(backends.get(b), "fwd_grad", None) is not None]


# name -> (importance weights?, beta, kl_estimator, entropy_coeff): the first four run the fused path (weights with
# no KL term and no entropy bonus; k3 in the loss; another estimator as a metric only), the last two fall back
FUSED_SETUPS = {
    "iw": (True, 0.0, "k3", 0.0),
    "iw_kl_metric": (True, 0.0, "low_var_kl", 0.0),
    "k3_entropy": (False, 0.1, "k3", 0.01),
    "k2_metric_entropy": (False, 0.0, "k2", 0.01),
    "iw_k1_entropy": (True, 0.1, "k1", 0.01),
    "iw_low_var_kl": (True, 0.1, "low_var_kl", 0.0),
}


def fused_params():
    for backend in fwd_grad_backends():
        for i, (control, setup, reduce) in enumerate(itertools.product(["mhpo", "clip_dual", "sapo", "cispo"],
                                                                      FUSED_SETUPS, [True, False])):
            quick = (backend not in INTERPRETED and i % 3 == 0) or (backend in INTERPRETED and i == 0)
            yield pytest.param(backend, control, setup, reduce, i,
                               id=f"{backend}-{control}-{setup}-{('tokens', 'reduced')[reduce]}",
                               marks=slow_unless(quick))


@pytest.mark.parametrize("backend,control,setup,reduce,i", list(fused_params()))
def test_fused_gradient_paths_agree(backend, control, setup, reduce, i, monkeypatch):
    """fused_gradient=True (the forward writes the gradient) and False (two kernels) give the same
    loss, gradient and metrics with importance weights, a KL estimator and the entropy bonus (the
    same bits on the backends whose fwd_grad reuses their row code), and the float64 reference's;
    the fused path really runs for a reduced token-level loss with weights alone, k3 in the loss, or
    another estimator as a metric only."""
    with_iw, beta, kl, ec = FUSED_SETUPS[setup]
    c = build(("B3T11", "N29")[i % 2], 23, torch.float32, seed=60 + i, backend=backend)
    if not with_iw:
        c.iw = None
    kw = dict(backend=backend, reduce=reduce, loss_agg_mode=LOSS_AGG_MODES[i % 5], beta=beta, kl_estimator=kl,
              entropy_coeff=ec, return_entropy=False, temperature=0.8)
    seed = None if reduce else i  # a unit upstream gradient: bitwise, the scale is applied at different points
    two = run(mk.policy_loss, c, control, seed, fused_gradient=False, **kw)
    kb = backends.get(backend)
    calls = []
    fwd_grad = kb.fwd_grad
    monkeypatch.setattr(kb, "fwd_grad", lambda *a, **k: calls.append(1) or fwd_grad(*a, **k))
    fused = run(mk.policy_loss, c, control, seed, fused_gradient=True, **kw)
    if reduce and control != "cispo" and setup in ("iw", "iw_kl_metric", "k3_entropy", "k2_metric_entropy"):
        assert calls, "fused_gradient=True did not run fwd_grad"
    (oa, ga), (ob, gb) = fused, two
    # the fused path folds the weights into the aggregation weights, (w iw) coef, where the finishing step
    # computes w (iw coef): the gradient rounds differently (an ulp or two), the loss and metrics do not
    folded = with_iw and reduce and control != "cispo" and calls
    if backend in ("cpu", "torch") and folded:
        assert torch.equal(oa.loss, ob.loss), f"loss {oa.loss} != {ob.loss}"
        assert_close(ga, gb, *TOL[torch.float32], "grad")
        for k in ob.metrics:
            assert torch.equal(oa.metrics[k], ob.metrics[k]), f"metric {k}"
    elif backend in ("cpu", "torch"):
        assert torch.equal(oa.loss, ob.loss), f"loss {oa.loss} != {ob.loss}"
        assert torch.equal(ga, gb), f"grad: max diff {(ga.double() - gb.double()).abs().max().item():.3e}"
        for k in ob.metrics:
            assert torch.equal(oa.metrics[k], ob.metrics[k]), f"metric {k}"
    else:
        assert_close(oa.loss, ob.loss, *SCALAR_TOL, "loss")
        assert_close(ga, gb, *TOL[torch.float32], "grad")
        for k in ob.metrics:
            assert_close(oa.metrics[k], ob.metrics[k], *TOL["metric"], f"metric {k}", floor=1e-2)
    assert oa.metrics.keys() == ob.metrics.keys()
    want, want_grad = run(R.policy_loss, c.double(), control, seed, **{k: v for k, v in kw.items() if k != "backend"})
    assert_close(oa.loss, want.loss, *SCALAR_TOL, "loss vs reference", floor=1e-3)
    assert_close(ga, want_grad, *TOL[torch.float32], "grad vs reference")


# ---------------------------------------------------------------------------- per-token terms: the weights

def agg_factor(c, agg, T_pad, dp_size=1, n_tokens=None, n_seqs=None):
    """w_n / m_n of loss_agg_mode ``agg`` (docs/mhpo.md's table, verl's agg_loss), per token, in float64:
    token-sum 1, token-mean 1 / sum(m), seq-mean-token-mean 1 / (sum_t m_i * S), seq-mean-token-sum 1 / S,
    seq-mean-token-sum-norm 1 / (S * T) (S: sequences with an active token), times dp_size; the global
    counts ``n_tokens`` / ``n_seqs`` replace sum(m) / S."""
    m = torch.where(c.ids == -100, 0.0, c.mask.double()).cpu()
    flat = m.reshape(-1)
    if c.cu is not None:
        bounds = c.cu.long().cpu().tolist()
        seqs = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    elif m.dim() == 2:
        seqs = [slice(i * m.shape[1], (i + 1) * m.shape[1]) for i in range(m.shape[0])]
    else:
        seqs = [slice(0, flat.numel())]
    n_seq = sum(1 for s in seqs if flat[s].sum() != 0) if n_seqs is None else n_seqs
    n_tok = flat.sum().item() if n_tokens is None else n_tokens
    f = torch.zeros_like(flat)
    for s in seqs:
        count = flat[s].sum().item()
        f[s] = {"token-sum": 1.0, "token-mean": 1 / n_tok,
                "seq-mean-token-mean": 1 / (count * n_seq) if count else 0.0,
                "seq-mean-token-sum": 1 / n_seq, "seq-mean-token-sum-norm": 1 / (n_seq * T_pad)}[agg]
    return (f * dp_size).reshape(m.shape)


def weights_params():
    for path in BACKENDS + ["reference"]:
        for shape in ["B3T11", "packed29"]:
            yield pytest.param(path, shape, id=f"{path}-{shape}", marks=slow_unless(path not in INTERPRETED))


@pytest.mark.parametrize("path,shape", list(weights_params()))
def test_per_token_terms_carry_the_aggregation_weights(path, shape):
    """reduce=False: each loss_agg_mode's per-token term is token-sum's term (mask * L_n) times the
    mode's weight per unit of mask, its sum the reduced loss (a float mask, importance weights,
    the KL term and the entropy bonus included); with dp_size = 2 and global counts, those counts
    replace the batch's and dp_size multiplies every term."""
    dtype = torch.float64 if path == "reference" else torch.float32
    c = build(shape, 19, torch.float32, seed=7, backend=path, float_mask=True)
    c = c.map(lambda t: t.double() if path == "reference" and t.is_floating_point() else t)
    kw = dict(backend=path, beta=0.1, kl_estimator="k2", entropy_coeff=0.03)
    T_pad = 11 if shape == "B3T11" else 9  # packed: the longest sequence
    base = call(mk.policy_loss, c, c.logits, "cispo_dapo", reduce=False, loss_agg_mode="token-sum", **kw).loss
    tol = TOL[torch.float64] if dtype == torch.float64 else SCALAR_TOL
    for agg, dp in itertools.product(LOSS_AGG_MODES, [1, 2]):
        norm = dict(dp_size=dp, global_num_tokens=None if dp == 1 else 50.0,
                    global_batch_size=None if dp == 1 else 5)
        want = base.double().cpu() * agg_factor(c, agg, T_pad, dp, norm["global_num_tokens"],
                                                norm["global_batch_size"])
        out = call(mk.policy_loss, c, c.logits, "cispo_dapo", reduce=False, loss_agg_mode=agg, **kw, **norm)
        assert_close(out.loss, want, *tol, f"{agg} dp_size={dp}: per-token terms")
        reduced = call(mk.policy_loss, c, c.logits, "cispo_dapo", loss_agg_mode=agg, **kw, **norm)
        assert_close(out.loss.sum(), reduced.loss, *tol, f"{agg} dp_size={dp}: sum", floor=1e-3)


# ---------------------------------------------------------------------------- CISPO and the KL estimators by formula

def kl_closed_form(est, d):
    """(kl, d kl / d logp) at d = ref - logp: k3 e^d - d - 1, k1 -d, k2 d^2 / 2, low_var_kl verl's
    clamp(k3(clamp(d, -20, 20)), -10, 10) (derivative 0 where a clamp bites)."""
    if est == "k3":
        return torch.expm1(d) - d, -torch.expm1(d)
    if est == "k1":
        return -d, torch.ones_like(d)
    if est == "k2":
        return d * d / 2, -d
    dc = d.clamp(-20, 20)
    k3 = torch.expm1(dc) - dc
    live = (d.abs() <= 20) & (k3 <= 10)
    return k3.clamp(max=10), torch.where(live, -torch.expm1(dc), 0.0)


def cispo_formula(cfg, logits, c, beta, est, temperature, agg):
    """CISPO written out in float64 on the logits (the package not used): per-token terms
    w_n (iw_n (-sg(clip(r_n)) A_n logp_n) + beta kl_n), the metrics, the per-token flags."""
    z = logits.detach().double().cpu().requires_grad_()
    ids, active = c.ids.cpu(), c.active.cpu()
    lsm = torch.log_softmax(z / temperature, -1)
    logp = torch.where(ids != -100, lsm.gather(-1, ids.clamp(min=0)[..., None])[..., 0], 0.0)
    clean = lambda t: torch.where(active, t.double().cpu(), 0.0)  # no garbage in the graph (0 * NaN)
    old, adv, ref = clean(c.old), clean(c.adv), clean(c.ref)
    iw = torch.ones_like(old) if c.iw is None else clean(c.iw)
    delta = torch.where(active, logp.detach() - old, 0.0)
    r = torch.exp(delta.clamp(-20, 20))
    clipped = r.clamp(cfg.ratio_low, cfg.ratio_high)
    d = torch.where(active, ref - logp, 0.0)
    kl = kl_closed_form(est, d)[0]
    L = torch.where(active, iw * (-clipped * adv * logp) + beta * kl, 0.0)
    m = torch.where(ids == -100, 0.0, c.mask.double().cpu())
    w = m / m.sum() if agg == "token-mean" else m
    terms = w * L
    n = active.sum()
    mean = lambda x: torch.where(active, x, 0.0).sum() / n
    low, high = (r < cfg.ratio_low) & active, (r > cfg.ratio_high) & active
    metrics = {"kl_old": mean(-delta), "ratio_max": delta[active].max().exp(), "ratio_min": delta[active].min().exp(),
               "clipfrac_low": mean(low.double()), "clipfrac_high": mean(high.double()),
               "clipfrac": mean((low | high).double()), "kl_ref": mean(kl.detach()),
               "token_clipped": (low | high).double(), "token_kl": torch.where(active, kl.detach(), 0.0)}
    return terms, z, metrics


def cispo_params():
    for path in BACKENDS + ["reference"]:
        for i, (control, est) in enumerate(itertools.product(["cispo", "cispo_dapo", "cispo_trl"], KL_ESTIMATORS)):
            quick = path not in INTERPRETED or i == 7
            yield pytest.param(path, control, est, i, id=f"{path}-{control}-{est}", marks=slow_unless(quick))


@pytest.mark.parametrize("path,control,est,i", list(cispo_params()))
def test_cispo_by_formula(path, control, est, i):
    """CISPO's per-token terms, logits gradient (per-token upstream), metrics and flags against the
    formula written out here (verl's compute_policy_loss_cispo; TRL's for eps_low=None), with importance
    weights and each KL estimator; wide ratios so that both bounds are hit."""
    cfg = CONTROLS[control][0]
    c = build("B3T11", 29, torch.float32, seed=80 + i, backend=path, ratio_spread=0.8)
    if path == "reference":
        c = c.double()
    agg, T = ("token-sum", "token-mean")[i % 2], (1.0, 0.8)[i % 2]
    lsm = lambda t: torch.log_softmax(c.logits.double() / t, -1).gather(-1, c.ids.clamp(min=0)[..., None])[..., 0]
    c.old = (c.old.double() + lsm(T) - lsm(1.0)).to(c.old.dtype)  # ratios around 1 at temperature T too
    out, grad = run(mk.policy_loss, c, control, i, backend=path, reduce=False, loss_agg_mode=agg, beta=0.2,
                    kl_estimator=est, temperature=T)
    terms, z, metrics = cispo_formula(cfg, c.logits, c, 0.2, est, T, agg)
    g = torch.Generator().manual_seed(i)  # backward()'s upstream gradient
    (terms * torch.randn(terms.shape, generator=g, dtype=torch.float64)).sum().backward()
    dtype = out.loss.dtype
    tol = TOL[torch.float64] if dtype == torch.float64 else SCALAR_TOL
    assert_close(out.loss, terms, *tol, "per-token terms")
    assert_close(grad, z.grad, *(TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]), "grad")
    assert metrics["clipfrac_low"] > 0 or cfg.eps_low is None, "the case must hit the lower bound"
    assert metrics["clipfrac_high"] > 0, "the case must hit the upper bound"
    assert "dual_clipfrac" not in out.metrics
    for k, v in metrics.items():
        assert_close(out.metrics[k], v, *TOL["metric"], f"metric {k}", floor=1e-2)


FAR = [-30.0, -25.0, -21.0, -12.0, -5.0, -1.0, -1e-3, 0.0, 1e-4, 0.5, 2.0, 3.0, 8.0, 19.5, 21.0, 25.0]


def far_params():
    for backend in BACKENDS:
        for est in KL_ESTIMATORS:
            quick = backend not in INTERPRETED or est == "low_var_kl"
            yield pytest.param(backend, est, id=f"{backend}-{est}", marks=slow_unless(quick))


@pytest.mark.parametrize("backend,est", list(far_params()))
def test_kl_far_from_the_reference_policy(backend, est):
    """|ref - logp| up to 30 (past low_var_kl's clamp of d at 20 and of the value at 10): the loss,
    each row's logits gradient (rows compared one by one: k3's rows span 1e-2 to 1e12) and the KL
    metrics against the float64 reference, with beta > 0; with beta = 0 the KL is a metric only,
    and the loss and gradient are those of the call without a reference."""
    g = torch.Generator().manual_seed(5)
    N, V = len(FAR), 13
    logits = torch.randn(N, V, generator=g) * 2
    ids = torch.randint(0, V, (N,), generator=g)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, None])[:, 0]
    old = (logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref = (logp + torch.tensor(FAR, dtype=torch.float64)).float()
    adv, mask = torch.randn(N, generator=g), torch.ones(N)
    iw = torch.rand(N, generator=g) * 2
    c = Case(logits, ids, old, adv, mask, ref, iw, None).map(lambda t: t.to(device_for(backend)))
    for beta in (0.5, 0.0):
        kw = dict(loss_agg_mode="token-sum", beta=beta, kl_estimator=est, reduce=True)
        out, grad = run(mk.policy_loss, c, "clip_dual", 0, backend=backend, **kw)
        want, want_grad = run(R.policy_loss, c.double(), "clip_dual", 0, **kw)
        assert_close(out.loss, want.loss, *SCALAR_TOL, f"beta={beta}: loss")
        for n in range(N):
            assert_close(grad[n], want_grad[n], *TOL[torch.float32], f"beta={beta}: grad row {n} (d = {FAR[n]})")
        assert_close(out.metrics["kl_ref"], want.metrics["kl_ref"], *TOL["metric"], "kl_ref")
        if beta == 0:
            plain = run(mk.policy_loss, Case(*[c.logits, c.ids, c.old, c.adv, c.mask, None, c.iw, None]),
                        "clip_dual", 0, backend=backend, **kw)
            assert_close(out.loss, plain[0].loss, *SCALAR_TOL, "beta=0: loss with vs without ref")
            assert_close(grad, plain[1], *TOL[torch.float32], "beta=0: grad with vs without ref")
        tok = call(mk.policy_loss, c, c.logits, "clip_dual", backend=backend, **{**kw, "reduce": False})
        d = (c.ref.double() - tok.logprobs.double()).cpu()
        assert_close(tok.metrics["token_kl"], kl_closed_form(est, d)[0], *SCALAR_TOL, "token_kl vs closed form")


# ---------------------------------------------------------------------------- policy_loss_from_logprobs

def logprob_case(shape_name, seed, backend, dtype):
    """A Case whose ``logits`` slot holds [B, T] or [N] log-probs of ``dtype`` (-inf where masked),
    old / adv / mask / ref of ``dtype``, float32 importance weights."""
    c = build(shape_name, 17, torch.float64, seed, backend=backend)
    logp = torch.log_softmax(c.logits, -1).gather(-1, c.ids.clamp(min=0)[..., None])[..., 0]
    mask = torch.where(c.ids == -100, 0.0, c.mask.double())  # the log-probs do not know the ignored ids
    logp = torch.where(mask != 0, logp, float("-inf"))
    return Case(logp.to(dtype), c.ids, c.old.to(dtype), c.adv.to(dtype), mask.to(dtype), c.ref.to(dtype), c.iw, c.cu)


def from_logprobs_params():
    for path in BACKENDS + ["fp64"]:
        for i, control in enumerate(CONTROLS):
            quick = path not in INTERPRETED or control == "cispo"
            yield pytest.param(path, control, i, id=f"{path}-{control}", marks=slow_unless(quick))


@pytest.mark.parametrize("path,control,i", list(from_logprobs_params()))
def test_from_logprobs_vs_reference(path, control, i):
    """policy_loss_from_logprobs (float32 log-probs on each backend's finishing step, float64 ones
    on the default path) against reference.policy_loss_from_logprobs in float64: loss, gradient
    w.r.t. the log-probs (per-token upstream with reduce=False), metrics; the weights get no gradient."""
    dtype = torch.float64 if path == "fp64" else torch.float32
    backend = "auto" if path == "fp64" else path
    shape = ("B3T11", "packed29")[i % 2]
    c = logprob_case(shape, 20 + i, None if path == "fp64" else path, dtype)
    c.iw.requires_grad_()
    cfg, level = CONTROLS[control]
    kw = dict(ratio_control=cfg, importance_sampling_level=level, cu_seqlens=c.cu, loss_agg_mode=LOSS_AGG_MODES[i % 5],
              beta=0.0 if i % 3 == 2 else 0.1, kl_estimator=KL_ESTIMATORS[i % 4], importance_weights=c.iw,
              reduce=i % 4 < 2)
    x = c.logits.clone().requires_grad_()
    out = mk.policy_loss_from_logprobs(x, c.old, c.adv, c.mask, ref_logprobs=c.ref, backend=backend, **kw)
    grad = backward(out, i, x)
    c64 = c.double()
    c64.iw = c64.iw.detach()
    x64 = c64.logits.clone().requires_grad_()
    want = R.policy_loss_from_logprobs(x64, c64.old, c64.adv, c64.mask, ref_logprobs=c64.ref, **kw)
    want_grad = backward(want, i, x64)
    assert c.iw.grad is None, "importance weights got a gradient"
    tol = TOL[torch.float64] if dtype == torch.float64 else SCALAR_TOL
    assert out.loss.shape == want.loss.shape == (c.ids.shape if not kw["reduce"] else ())
    assert_close(out.loss, want.loss, *tol, "loss", floor=1e-3)
    assert_close(grad, want_grad, *(TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]), "grad")
    assert torch.equal(grad[c.mask == 0], torch.zeros_like(grad[c.mask == 0])), "a gradient on a masked token"
    assert out.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert_close(out.metrics[k], want.metrics[k], *TOL["metric"], f"metric {k}", floor=1e-2)


@pytest.mark.parametrize("path", BACKENDS + ["fp64"])
def test_cispo_gradient_is_minus_clipped_ratio_times_advantage(path):
    """d loss / d logp of CISPO is -clip(r) A per token (token-sum, unit mask): exactly in float64
    (reference and the float64 path), to float32 rounding on each backend; r's log is clamped at ±20."""
    dtype = torch.float64 if path == "fp64" else torch.float32
    dev = device_for("torch" if path == "fp64" else path)
    g = torch.Generator().manual_seed(3)
    delta = torch.tensor([-25.0, -21.0, -1.0, -0.3, -0.2231, -0.1, 0.0, 0.1, 0.2, 0.25, 0.5, 1.6, 21.0, 25.0],
                         dtype=torch.float64)
    logp = -1.0 - torch.rand(delta.shape, generator=g, dtype=torch.float64)
    old, adv = logp - delta, torch.randn(delta.shape, generator=g, dtype=torch.float64)
    for cfg in (mk.CISPOConfig(), mk.CISPOConfig(0.2, 0.28), mk.CISPOConfig(eps_low=None),
                mk.CISPOConfig(eps_low=None, eps_high=4.0)):
        paths = [(mk.policy_loss_from_logprobs, dtype, {"backend": "auto" if path == "fp64" else path})]
        if path == "fp64":
            paths.append((R.policy_loss_from_logprobs, torch.float64, {}))
        for fn, dt, extra in paths:
            x = logp.to(dt).to(dev).clone().requires_grad_()
            o, a = old.to(dt).to(dev), adv.to(dt).to(dev)
            out = fn(x, o, a, ratio_control=cfg, loss_agg_mode="token-sum", **extra)
            out.loss.backward()
            d = (x.detach() - o).double().cpu()
            r = torch.exp(d.clamp(-20, 20))
            want = -r.clamp(cfg.ratio_low, cfg.ratio_high) * a.double().cpu()
            if dt == torch.float64:
                assert torch.equal(x.grad.cpu(), want), f"{fn.__module__} {cfg}: {(x.grad.cpu() - want).abs().max()}"
            else:
                assert_close(x.grad, want, *TOL[torch.float32], f"{cfg}: grad")
            assert_close(out.loss, (want * x.detach().double().cpu()).sum(), *SCALAR_TOL, f"{cfg}: loss")
            low, high = r < cfg.ratio_low, r > cfg.ratio_high
            assert out.metrics["clipfrac_low"].item() == pytest.approx(low.double().mean().item(), abs=1e-6)
            assert out.metrics["clipfrac_high"].item() == pytest.approx(high.double().mean().item(), abs=1e-6)
            assert out.metrics["clipfrac"].item() == pytest.approx((low | high).double().mean().item(), abs=1e-6)


# ---------------------------------------------------------------------------- fused_linear_mhpo_loss

def linear_case(shape_name, V, H, seed, backend, iw="fp32"):
    """hidden, weight, bias and the Case of their logits (``logits`` = hidden @ weight.T + bias, float64)."""
    g = torch.Generator().manual_seed(seed)
    shape, _ = SHAPES[shape_name]
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.5
    c = build(shape_name, V, torch.float32, seed, backend="cpu", iw=iw)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    logp = torch.log_softmax(logits, -1).gather(-1, c.ids.clamp(min=0)[..., None])[..., 0]
    active = c.active
    old = torch.where(active, logp + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64), float("inf")).float()
    ref = torch.where(active, logp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64), -float("inf")).float()
    c = Case(logits, c.ids, old, c.adv, c.mask, ref, c.iw, c.cu)
    dev = device_for(backend)
    return hidden.to(dev), weight.to(dev), bias.to(dev), c.map(lambda t: t.to(dev))


def fused_linear_params():
    cases = [("cispo_trl", "B3T11", "low_var_kl", False), ("mhpo_seq", "packed29", "k2", True),
             ("clip_dual", "N29", "k1", False), ("gspo", "packed29", "k3", False), ("sapo", "B3T11", "k3", True),
             ("mhpo", "N29", "low_var_kl", False)]
    for backend in BACKENDS:
        for i, (control, shape, kl, reduce) in enumerate(cases):
            quick = i < 3 if backend not in INTERPRETED else i == 0
            yield pytest.param(backend, control, shape, kl, reduce, i,
                               id=f"{backend}-{control}-{shape}-{kl}-{('tokens', 'reduced')[reduce]}",
                               marks=slow_unless(quick))


@pytest.mark.parametrize("backend,control,shape,kl,reduce,i", list(fused_linear_params()))
def test_fused_linear_vs_reference(backend, control, shape, kl, reduce, i):
    """fused_linear_mhpo_loss with importance weights, a KL estimator and reduce=False (per-token
    upstream gradient) against reference.policy_loss on hidden @ weight.T + bias in float64: loss,
    log-probs, entropy, gradients of hidden / weight / bias, metrics."""
    hidden, weight, bias, c = linear_case(shape, 41, 12, 30 + i, backend)
    cfg, level = CONTROLS[control]
    kw = dict(ratio_control=cfg, importance_sampling_level=level, cu_seqlens=c.cu, ref_logprobs=c.ref, beta=0.1,
              kl_estimator=kl, importance_weights=c.iw, reduce=reduce, loss_agg_mode=LOSS_AGG_MODES[i % 5],
              return_entropy=True, temperature=0.9)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = mk.fused_linear_mhpo_loss(leaves[0], leaves[1], c.ids, c.old, c.adv, c.mask, bias=leaves[2], chunk_size=16,
                                    backend=backend, **kw)
    backward(out, i, leaves[0])
    want_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = R.policy_loss(F.linear(*want_leaves), c.ids, c.old.double(), c.adv.double(), c.mask.double(),
                         **{**kw, "ref_logprobs": c.ref.double(), "importance_weights": c.iw.double()})
    backward(want, i, want_leaves[0])
    assert out.loss.shape == want.loss.shape
    assert_close(out.loss, want.loss, *SCALAR_TOL, "loss", floor=1e-3)
    assert_close(out.logprobs, want.logprobs, *SCALAR_TOL, "logprobs")
    assert_close(out.entropy, want.entropy, *SCALAR_TOL, "entropy")
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, want_leaves):
        assert_close(a.grad, b.grad, *TOL[torch.float32], f"grad {name}")
    assert out.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert_close(out.metrics[k], want.metrics[k], *TOL["metric"], f"metric {k}", floor=1e-2)


# ---------------------------------------------------------------------------- empty, fully masked, bad input

@pytest.mark.parametrize("backend,control", [
    pytest.param(b, c, marks=slow_unless(b not in INTERPRETED or c == "cispo_trl"))
    for b in BACKENDS for c in ["cispo_trl", "mhpo", "gspo"]])
def test_empty_and_fully_masked(backend, control):
    """N = 0 (with and without cu_seqlens) and every token masked, with garbage weights: loss 0,
    per-token terms and flags 0, zero gradient, finite metrics, for every KL estimator."""
    dev = device_for(backend)
    cfg, level = CONTROLS[control]
    for cu in (None, [0], [0, 0]):
        logits = torch.randn(0, 17, device=dev, requires_grad=True)
        z = torch.zeros(0, device=dev)
        for reduce in (True, False):
            out = mk.policy_loss(logits, z.long(), z, z, z, ratio_control=cfg, importance_sampling_level=level,
                                 cu_seqlens=None if cu is None else torch.tensor(cu, device=dev), ref_logprobs=z,
                                 beta=0.1, importance_weights=z, reduce=reduce, backend=backend)
            assert out.loss.shape == (() if reduce else (0,))
            out.loss.sum().backward()
            assert out.loss.sum().item() == 0.0 and logits.grad.shape == logits.shape
    c = build("packed29", 17, torch.float32, 6, backend=backend)
    mask = torch.zeros_like(c.mask)
    iw = torch.full_like(c.iw, float("nan"))
    c = Case(c.logits, c.ids, c.old, c.adv, mask, c.ref, iw, c.cu)
    for est in KL_ESTIMATORS:
        for reduce in (True, False):
            out, grad = run(mk.policy_loss, c, control, 0, backend=backend, reduce=reduce, beta=0.1, kl_estimator=est,
                            entropy_coeff=0.01)
            assert torch.equal(out.loss, torch.zeros_like(out.loss)), f"{est}: loss"
            assert torch.equal(grad, torch.zeros_like(grad)), f"{est}: grad"
            assert all(torch.isfinite(v).all() for v in out.metrics.values()), f"{est}: metrics"
            for k in (k for k in out.metrics if k.startswith("token_")):
                assert torch.equal(out.metrics[k], torch.zeros_like(out.metrics[k])), k


BAD = {
    "kl_name": (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    "kl_type": (dict(kl_estimator=3), ValueError, "kl_estimator must be one of"),
    "reduce": (dict(reduce="none"), TypeError, "reduce must be a bool"),
    "iw_shape": (dict(importance_weights=lambda a: a["old_logprobs"][:5]), ValueError, "importance_weights has shape"),
    "iw_int": (dict(importance_weights=lambda a: a["target_ids"]), TypeError, "importance_weights must have a float"),
    "iw_list": (dict(importance_weights=lambda a: [1.0] * 29), TypeError, "importance_weights must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(backend, case, no_launch):
    c = build("packed29", 11, torch.float32, 0, backend=backend)
    a = dict(logits=c.logits, target_ids=c.ids, old_logprobs=c.old, advantages=c.adv, mask=c.mask, cu_seqlens=c.cu)
    edit, exc, msg = BAD[case]
    a.update({k: v(a) if callable(v) else v for k, v in edit.items()})
    with pytest.raises(exc, match=msg):
        mk.policy_loss(**a, backend=backend)


# ---------------------------------------------------------------------------- the reference itself

def test_reference_kl_estimators_are_the_closed_forms():
    """With A = 0 (no ratio-control term) and token-sum, the loss is beta * sum_n kl_n: its value,
    gradient w.r.t. the log-probs, token_kl and kl_ref are the closed forms at every d, past the
    clamps included; beta = 0 leaves the loss 0 and kl_ref unchanged."""
    d = torch.tensor(FAR + [-19.9, -10.9, 2.6, 20.0 - 1e-9], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    logp = -1.0 - torch.rand(d.shape, generator=g, dtype=torch.float64)
    ref, zeros = logp + d, torch.zeros_like(d)
    for est, beta, reduce in itertools.product(KL_ESTIMATORS, [0.7, 0.0], [True, False]):
        x = logp.clone().requires_grad_()
        out = R.policy_loss_from_logprobs(x, logp, zeros, ref_logprobs=ref, beta=beta, kl_estimator=est,
                                          loss_agg_mode="token-sum", reduce=reduce, ratio_control=mk.ClipConfig())
        out.loss.sum().backward()
        kl, dkl = kl_closed_form(est, d)
        torch.testing.assert_close(out.loss.sum(), beta * kl.sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(x.grad, beta * dkl, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out.metrics["kl_ref"].double(), kl.mean(), rtol=1e-6, atol=0)  # metrics are fp32
        if not reduce:
            # atol: e^d - d - 1 near d = 0 cancels to 1e-16 (the closed form here uses expm1)
            torch.testing.assert_close(out.loss, beta * kl, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(out.metrics["token_kl"].double(), kl, rtol=1e-6, atol=1e-12)
    assert kl_closed_form("low_var_kl", d)[0].max() == 10 and (kl_closed_form("low_var_kl", d)[1] == 0).sum() >= 8


def test_reference_kl_estimators_as_verl_and_trl():
    """The estimators against verl's kl_penalty (core_algos.py, low_var_kl transcribed) and TRL's
    per_token_kl (grpo_trainer.py: exp(ref - logp) - (ref - logp) - 1) for k3."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(50, generator=g, dtype=torch.float64) * 5
    ref = logp + torch.randn(50, generator=g, dtype=torch.float64) * 12
    verl = {"k1": logp - ref, "k2": 0.5 * (logp - ref).square()}
    kl = torch.clamp(ref - logp, min=-20, max=20)
    verl["low_var_kl"] = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    verl["k3"] = torch.exp(ref - logp) - (ref - logp) - 1  # TRL's; verl's "k3" is its low_var_kl
    for est, want in verl.items():
        torch.testing.assert_close(R.kl_estimate(logp, ref, est), want, rtol=1e-12, atol=1e-12)


GRADCHECK = {  # smooth where sampled: token-level controls without a stop-gradient in their value
    "clip_dual": ("clip_dual", 0.3),
    "sapo": ("sapo", 0.5),
    "cispo_clipped": ("cispo_dapo", None),  # every ratio outside [0.8, 1.28]: sg(clip(r)) is a constant
    "cispo_trl_clipped": ("cispo_trl", None),  # every ratio above 1.2
}


def gradcheck_params():
    for i, (name, est, reduce) in enumerate(itertools.product(GRADCHECK, KL_ESTIMATORS, [True, False])):
        quick = i in (0, 11, 21, 30)  # every control, estimator and reduce once
        yield pytest.param(name, est, reduce, id=f"{name}-{est}-{('tokens', 'reduced')[reduce]}",
                           marks=slow_unless(quick))


@pytest.mark.parametrize("name,est,reduce", list(gradcheck_params()))
def test_reference_gradcheck(name, est, reduce):
    """torch.autograd.gradcheck of reference.policy_loss in float64 w.r.t. the logits with importance
    weights, a KL estimator (d up to ±25: low_var_kl's clamps), the entropy bonus, a float mask,
    temperature and reduce=False (the Jacobian of the per-token terms)."""
    control, spread = GRADCHECK[name]
    g = torch.Generator().manual_seed(len(name) * 10 + KL_ESTIMATORS.index(est))
    B, T, V = 2, 4, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = -100
    logp = torch.log_softmax(logits / 0.8, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    if spread is None:
        sign = torch.tensor([1.0, -1.0] * (B * T // 2), dtype=torch.float64).reshape(B, T)
        if control == "cispo_trl":
            sign = torch.ones_like(sign)
        old = logp - sign * (0.6 + torch.rand(B, T, generator=g, dtype=torch.float64))
    else:
        old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    # d = ref - logp past both of low_var_kl's clamps; k3's e^25 would drown every other derivative in rounding
    far = 4.0 if est == "k3" else 25.0
    ref = logp + torch.tensor([-25.0, -12.0, -3.0, 0.3, 1.5, 3.5, far, -0.7], dtype=torch.float64).reshape(B, T)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.5, 1.0, 1.0, 0.25]], dtype=torch.float64)
    iw = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    iw[0, 1], iw[0, 3] = float("inf"), float("nan")  # an ignored id, a masked token: never read
    cfg, level = CONTROLS[control]

    def f(z):
        return R.policy_loss(z, ids, old, adv, mask, ratio_control=cfg, importance_sampling_level=level,
                             ref_logprobs=ref, beta=0.2, kl_estimator=est, importance_weights=iw,
                             entropy_coeff=0.05, temperature=0.8, loss_agg_mode="seq-mean-token-mean",
                             reduce=reduce).loss

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)
