"""One source of truth for the ids, layouts and limits: mhpo_kernels/_constants.py.

The C++ header is generated from it and checked in (regenerated here, any difference fails);
the Triton kernels read it as constexpr globals and pass the ratio-control parameters to
functions whose parameter names spell the layout (read here from the source). Each checker is
also run on a copy with one constant changed on one side, and must fail there.
"""
import ast
import math
import os
import re

import pytest
import torch

import mhpo_kernels as mk
from mhpo_kernels import _constants as C
from mhpo_kernels import backends
from mhpo_kernels.config import ClipConfig, GSPOConfig, MHPOConfig, SAPOConfig, from_kernel_params
from util import device_for, fused_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "mhpo_constants.h")
TRITON_DIR = os.path.join(ROOT, "triton_kernels")
REGEN = "python mhpo_kernels/_constants.py --header > csrc/mhpo_constants.h"


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------- C++

def test_header_is_generated_from_the_python():
    assert _read(HEADER) == C.header(), f"csrc/mhpo_constants.h is stale: run `{REGEN}`"


@pytest.mark.parametrize("change", ["limit", "layout", "metric", "agg"])
def test_header_changes_when_a_python_constant_does(monkeypatch, change):
    if change == "limit":
        monkeypatch.setattr(C, "GSPO_LOG_RATIO_LIMIT", 11.0)
    elif change == "layout":  # two MHPO slots swapped
        m = C.PARAM_LAYOUT[C.MODE_MHPO]
        monkeypatch.setitem(C.PARAM_LAYOUT, C.MODE_MHPO, (m[1], m[0]) + m[2:])
    elif change == "metric":
        monkeypatch.setattr(C, "METRICS", C.METRICS[1:] + C.METRICS[:1])
    else:
        monkeypatch.setitem(C.AGG_IDS, "token-mean", 7)
    assert C.header() != _read(HEADER)


def _csrc_files():
    for d, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in sorted(files):
            if f.endswith((".h", ".cpp", ".cu", ".inc")) and f != "mhpo_constants.h":
                yield os.path.join(d, f)


# a literal copy of a shared constant: a definition of a generated name, a numeric
# parameter slot, a limit, a numeric dtype / mode / aggregation / metric id
_CPP_COPIES = [
    (re.compile(r"\b(?:%s)\s*=(?!=)" % "|".join(C.named())), "defines a generated name"),
    (re.compile(r"(?<![\w.])(?:p|params|pr)\[\d+\]"), "reads a parameter slot by number (use the *Params view)"),
    (re.compile(r"(?<![\w.])(?:20|10)\.0f\b"), "spells a log-ratio limit"),
    (re.compile(r"\b(?:dtype|dt|mode|agg)\s*[=!]=\s*\d"), "compares an id with a number"),
    (re.compile(r"\bElem<\d>"), "names a dtype by number"),
    (re.compile(r"\b(?:metrics|m)\[\d+\]\s*="), "writes a metric slot by number"),
    (re.compile(r"\bbad\[0\]\s*=\s*-?\d"), "writes a bad-input kind by number"),
    (re.compile(r"\b(?:kNumParams|kNumMetrics|kLogRatioLimit|kGspoLogRatioLimit)\b"), "uses a retired name"),
]


def _cpp_copies(text):
    hits = []
    for i, line in enumerate(text.splitlines(), 1):
        code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line.split("//")[0])  # no comments, no strings
        hits += [f"{i}: {why}: {line.strip()}" for rx, why in _CPP_COPIES if rx.search(code)]
    return hits


def test_csrc_has_no_copy_of_a_shared_constant():
    hits = {os.path.relpath(p, ROOT): _cpp_copies(_read(p)) for p in _csrc_files()}
    assert not {k: v for k, v in hits.items() if v}


@pytest.mark.parametrize("line", [
    "constexpr float kGspo = 10.0f;", "if (p[5] != 0.0f) psi = delta;", "enum Agg : int { AGG_TOKEN_MEAN = 0 };",
    "if (a.dtype == 1) return;", "m[3] = a.s[ACC_PSI] / n;", "struct Elem<2> {", "a.bad[0] = 2, a.bad[1] = -1;",
])
def test_the_csrc_check_catches_a_copy(line):
    assert _cpp_copies(line)


def test_every_csrc_kernel_file_includes_the_generated_header():
    # directly or through mhpo_epilogue.h / mhpo_finish.h, which include it
    for p in ("mhpo_epilogue.h", "mhpo_cuda.h", os.path.join("cpu", "rows.h")):
        assert re.search(r'#include "(\.\./)?mhpo_constants\.h"', _read(os.path.join(ROOT, "csrc", p))), p


# ---------------------------------------------------------------------------- Triton

def test_triton_globals_are_the_python_values():
    from mhpo_kernels.triton_kernels import constants as tc

    named = C.named()
    seen = {}
    for k, v in vars(tc).items():
        if k in named:
            seen[k] = getattr(v, "value", v)
    assert seen == {k: named[k] for k in seen}
    # every id a kernel branches on or writes has its global
    need = [k for k in named if k.startswith(("MODE_", "AGG_", "BAD_", "MET_"))]
    assert sorted(set(need) - set(seen)) == []


def _triton_sources():
    return {f: _read(os.path.join(TRITON_DIR, f)) for f in sorted(os.listdir(TRITON_DIR))
            if f.endswith(".py") and f != "constants.py"}


def _jit_functions(sources):
    out = {}
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                out[node.name] = node
    return out


_PARAM = re.compile(r"p(\d)$")
_LIMITS = {C.CLIP_LOG_RATIO_LIMIT, C.GSPO_LOG_RATIO_LIMIT, C.TANH_SERIES_BELOW}


def _triton_copies(sources):
    """Literal copies of shared constants in the Triton sources, and ratio-control parameters
    ``p<i>`` used anywhere but as the i-th layout argument of an epilogue function."""
    fns = _jit_functions(sources)
    named = C.named()
    hits = []
    for fname, text in sources.items():
        tree = ast.parse(text)
        for node in tree.body:  # module-level copies: MODE_X = 1, CLIP_LOG_RATIO_LIMIT = 20.0
            if isinstance(node, ast.Assign):
                names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                if names & set(named) and isinstance(node.value, (ast.Constant, ast.Tuple)):
                    hits.append(f"{fname}:{node.lineno}: defines {sorted(names & set(named))}")
        ok_uses = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):  # MODE == 1, AGG == 2
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Name) and s.id in ("MODE", "AGG") for s in sides) and \
                        any(isinstance(s, ast.Constant) for s in sides):
                    hits.append(f"{fname}:{node.lineno}: compares an id with a number: {ast.unparse(node)}")
            if isinstance(node, ast.BinOp) and isinstance(node.right, ast.Constant) and \
                    isinstance(node.left, ast.Name) and node.left.id in ("metrics_ptr", "bad_ptr"):
                if node.left.id == "metrics_ptr" or node.right.value != 1:  # bad_ptr + 1: the position
                    hits.append(f"{fname}:{node.lineno}: a slot by number: {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value in _LIMITS:
                hits.append(f"{fname}:{node.lineno}: spells a shared limit: {node.value}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in fns:
                params = [a.arg for a in fns[node.func.id].args.args]
                for pos, arg in enumerate(node.args):
                    m = _PARAM.match(arg.id) if isinstance(arg, ast.Name) else None
                    if not m:
                        continue
                    ok_uses.add(id(arg))
                    if pos < len(params) and params[pos] == arg.id:
                        continue  # forwarded unchanged to a helper's own p<i> (whose calls are checked here too)
                    try:
                        slot = C.param_slot(params[pos])
                    except (KeyError, IndexError):
                        slot = None
                    if slot != int(m.group(1)):
                        hits.append(f"{fname}:{node.lineno}: {arg.id} passed as {node.func.id}'s "
                                    f"{params[pos] if pos < len(params) else '?'} (layout slot {slot})")
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and _PARAM.match(node.id) and isinstance(node.ctx, ast.Load) and \
                    id(node) not in ok_uses:
                hits.append(f"{fname}:{node.lineno}: {node.id} used by number, not through a named parameter")
    return hits


def test_triton_sources_have_no_copy_and_pass_parameters_in_layout():
    assert _triton_copies(_triton_sources()) == []


@pytest.mark.parametrize("old,new", [
    ("mhpo_token(delta, adv, p0, p1, p2", "mhpo_token(delta, adv, p1, p0, p2"),  # two slots swapped
    ("clip_fracs(r, adv, pre, p0, p1, p2)", "clip_fracs(r, adv, pre, p0, p1, p3)"),
    ("if MODE == MODE_MHPO:", "if MODE == 1:"),
    ("metrics_ptr + MET_KL_REF", "metrics_ptr + 12"),
    ("CLIP_LIMIT=CLIP_LOG_RATIO_LIMIT,", "CLIP_LIMIT=20.0,"),
    ("a_clo += tl.where(act & clo, 1.0, 0.0)", "a_clo += tl.where(act & (r < 1.0 - p0), 1.0, 0.0)"),
])
def test_the_triton_check_catches_a_change_on_one_side(old, new):
    src = _triton_sources()
    where = [f for f, t in src.items() if old in t]
    assert where, old
    src[where[0]] = src[where[0]].replace(old, new, 1)
    assert _triton_copies(src)


# ---------------------------------------------------------------------------- Python

def test_kernel_params_follow_the_layout():
    cfgs = {C.MODE_MHPO: MHPOConfig(1.1, 1.2, 1.3, 1.4, 1.5, use_lfm=True, use_dhp=False),
            C.MODE_CLIP: ClipConfig(0.11, 0.22, dual_clip_c=3.3, delta=4.4),
            C.MODE_SAPO: SAPOConfig(1.7, 1.9), C.MODE_GSPO: GSPOConfig(0.01, 0.02)}
    field = {"ratio_cap": "delta"}  # ClipConfig.delta's slot
    for mode, cfg in cfgs.items():
        p = cfg.kernel_params()
        assert len(p) == C.KERNEL_PARAMS and set(p[len(C.PARAM_LAYOUT[mode]):]) <= {0.0}
        for i, name in enumerate(C.PARAM_LAYOUT[mode]):
            assert p[i] == float(getattr(cfg, field.get(name, name))), (mode, name)
        if mode != C.MODE_GSPO:
            assert from_kernel_params(mode, p) == cfg


def test_finish_ids_and_slots_come_from_the_constants():
    from mhpo_kernels import _finish
    from mhpo_kernels.config import CLIP_LOG_RATIO_LIMIT, MODE_MHPO

    assert (_finish.METRICS, _finish.AGG_IDS, _finish.MODE_GSPO) == (C.METRICS, C.AGG_IDS, C.MODE_GSPO)
    assert (MODE_MHPO, CLIP_LOG_RATIO_LIMIT) == (C.MODE_MHPO, C.CLIP_LOG_RATIO_LIMIT)


# ---------------------------------------------------------------------------- the built kernels agree

def _finish(name, dev, logp, old, adv, ref, target, cu, mode, params, agg=0):
    N = logp.shape[0]
    def f(t):
        return t.to(dev)

    return backends.get(name).finish(
        f(logp), None, f(old), f(adv), None, None if ref is None else f(ref), f(target),
        None if cu is None else f(cu), 1, N, mode, list(params), 0.0, False, agg, -100, 10, True)


@pytest.mark.parametrize("name", fused_backends())
def test_bad_kinds_and_metric_slots_of_the_built_kernels(name):
    dev = device_for(name)
    N = 5
    z = torch.zeros(N)
    target = torch.tensor([1, 2, 99, 3, -100])
    loss, dlogp, metrics, bad = _finish(name, dev, z - 1, z - 1, z + 1, None, target, None, C.MODE_CLIP,
                                        ClipConfig().kernel_params())
    assert metrics.shape == (C.NUM_METRICS,)
    assert bad.tolist() == [C.BAD_TARGET, 2]
    assert metrics[C.METRICS.index("ratio_max")].item() == 1.0  # log-ratio 0 everywhere
    cu = torch.tensor([0, 3, 2, N], dtype=torch.int32)  # decreasing: a bad layout
    assert _finish(name, dev, z, z, z, None, target.clamp(0, 3), cu, C.MODE_CLIP,
                   ClipConfig().kernel_params())[3][0].item() == C.BAD_CU_SEQLENS


def _f64_k3(d):
    return math.expm1(d) - d


@pytest.mark.parametrize("name", fused_backends() + ["torch"])
def test_k3_and_lfm_near_zero_are_accurate(name):
    # the series below K3_SERIES_BELOW / TANH_SERIES_BELOW in every backend: e^d - d - 1 through
    # expm1 loses ~1e-4 relative at d = 1e-3, the unguarded (1 - t) / (1 + t) ~3e-4 at u = 1e-4
    dev = device_for(name)
    for d in ([1e-3, -2e-3, 3e-4, -5e-4, 1.5e-3, -1e-3], [0.3, -0.45, 0.49, 0.7, -0.6, 2.0]):
        d = torch.tensor(d)
        N = d.numel()
        logp, adv, target = torch.full((N,), -2.0), torch.ones(N), torch.ones(N, dtype=torch.long)
        ref = logp + d
        d = (ref - logp).double()  # exact: what the kernels see
        out = _finish(name, dev, logp, logp, adv, ref, target, None, C.MODE_CLIP, ClipConfig().kernel_params())
        want = sum(_f64_k3(x) for x in d.tolist()) / N
        assert abs(out[2][C.METRICS.index("kl_ref")].item() - want) <= 2e-6 * want, d.tolist()
    # MHPO "LFM only": psi = c tanh(delta / c) at tiny delta
    cfg = MHPOConfig(c=1.5, use_dhp=False)
    delta = torch.tensor([1e-4, 2e-4, 1.5e-4, 3e-5, 1e-5, 2e-4])
    old = logp - delta
    delta = (logp - old).double()
    out = _finish(name, dev, logp, old, adv, None, target, None, C.MODE_MHPO, cfg.kernel_params())
    want = sum(1.5 * math.tanh(x / 1.5) for x in delta.tolist()) / N
    assert abs(out[2][C.METRICS.index("psi_mean")].item() - want) <= 1e-6 * want


def test_torch_k3_matches_float64():
    from mhpo_kernels.epilogue import k3

    d = torch.tensor([-3.0, -0.5, -0.4999, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 0.4999, 0.5, 2.0])
    kl, em1 = k3(d)
    want_kl = torch.tensor([_f64_k3(x) for x in d.double().tolist()], dtype=torch.float64)
    want_em1 = torch.expm1(d.double())
    assert torch.allclose(kl.double(), want_kl, rtol=4e-7, atol=1e-30)
    assert torch.allclose(em1.double(), want_em1, rtol=4e-7, atol=1e-30)
    assert mk is not None
