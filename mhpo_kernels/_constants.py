"""The ids, layouts and limits every backend shares: the one place they are defined.

* Python reads them from here (``config``, ``_finish``, ``epilogue``, ``reference``);
* the Triton kernels as ``tl.constexpr`` globals (``triton_kernels/constants.py``);
* the C++ / CUDA kernels from ``csrc/mhpo_constants.h``, generated from this module
  and checked in, so a build needs no Python step (the file imports nothing of the package)::

      python mhpo_kernels/_constants.py --header > csrc/mhpo_constants.h

``tests/test_constants.py`` regenerates the header and fails on any difference, and
reads the Triton sources for literal copies and for parameters passed out of layout.
"""
from __future__ import annotations

import re
import struct
import sys

# Ratio-control ids: the epilogue compiled into the kernels. MODE_GSPO is finish only (GSPO's clip
# of the sequence log-ratio); the pass over the logits runs MODE_NONE for it.
MODE_NONE = 0  # log-probs (and entropy) only, no per-token loss
MODE_MHPO = 1
MODE_CLIP = 2
MODE_SAPO = 3
MODE_GSPO = 4
# CISPO (finish only): loss = -sg(clip(r, ratio_low, ratio_high)) * A * logp; the pass over the logits runs MODE_NONE.
MODE_CISPO = 5
MODES = {"NONE": MODE_NONE, "MHPO": MODE_MHPO, "CLIP": MODE_CLIP, "SAPO": MODE_SAPO, "GSPO": MODE_GSPO,
         "CISPO": MODE_CISPO}

# kernel_params(): KERNEL_PARAMS floats, the slots of each mode named here in order (the rest 0).
# GSPO's layout is a prefix of the clip's: the kernels run the clip code on it (dual clip and cap off).
KERNEL_PARAMS = 8
PARAM_LAYOUT = {
    MODE_MHPO: ("c", "k_pos", "lam_pos", "k_neg", "lam_neg", "use_lfm", "use_dhp"),
    MODE_CLIP: ("eps_low", "eps_high", "dual_clip_c", "ratio_cap"),  # 0: no dual clip / no cap
    MODE_SAPO: ("tau_pos", "tau_neg"),
    MODE_GSPO: ("eps_low", "eps_high"),
    MODE_CISPO: ("ratio_low", "ratio_high"),  # the clamp of r itself: [1 - eps_low or 0, 1 + eps_high]
}

# exp(20) ~ 4.85e8: the log-ratio clamp verl applies in its clip loss (SAPO caps r at exp(20) too).
CLIP_LOG_RATIO_LIMIT = 20.0
# verl's compute_policy_loss_gspo clamps the sequence log-ratio at max=10 (no lower clamp).
GSPO_LOG_RATIO_LIMIT = 10.0
# Below these |argument|s the kernels use a series (no cancellation): k3 = e^d - d - 1 (and
# e^d - 1 = k3 + d), tanh(u) = u (1 - u^2 / 3) in the LFM.
K3_SERIES_BELOW = 0.5
TANH_SERIES_BELOW = 1e-3

# KL estimators of the beta term and the kl_ref metric, at d = ref - logp (verl's kl_penalty names):
# k3 = e^d - d - 1; k1 = logp - ref = -d; k2 = d^2 / 2; low_var_kl = k3 with d clamped to
# [-LOW_VAR_KL_D_LIMIT, LOW_VAR_KL_D_LIMIT] and the value to [-LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT].
KL_ESTIMATORS = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}
LOW_VAR_KL_D_LIMIT = 20.0
LOW_VAR_KL_LIMIT = 10.0

# The finishing kernel's optional per-token output token_out[TOKEN_OUT, N] (reduce=False): row i holds TOKEN_OUT[i].
# "loss": the token's term w_n * L_n of the loss (sum = the loss); "kl": the KL estimate; "flag": 1 where the
# mode's fraction metric counts the token (clip / GSPO / CISPO: clipped; MHPO: survival < 0.5), else 0.
TOKEN_OUT = ("loss", "kl", "flag")

# Logits dtype codes of the native kernels.
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

# loss_agg_mode ids of the finishing kernel.
AGG_IDS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3,
           "token-sum": 4}
# The finishing kernel's agg_norm argument: these floats in order (global_count 0: the local count;
# loss_scale_factor 0: the padded length T, packed the longest sequence), from _inputs.agg_norm().
AGG_NORM = ("global_count", "loss_scale_factor", "dp_size")
AGG_NORM_DEFAULT = (0.0, 0.0, 1.0)  # local counts, T, one rank

# The finishing kernel's metrics tensor: slot i holds METRICS[i].
METRICS = ("kl_old", "ratio_max", "ratio_min", "psi_mean", "zeta_mean", "survival_mean", "low_survival_frac",
           "clipfrac_low", "clipfrac_high", "clipfrac", "dual_clipfrac", "entropy_mean", "kl_ref")
NUM_METRICS = len(METRICS)

# bad[0] of the finishing kernel: what the host raises about.
BAD_NONE, BAD_TARGET, BAD_CU_SEQLENS = 0, 1, 2
BAD_KINDS = {"NONE": BAD_NONE, "TARGET": BAD_TARGET, "CU_SEQLENS": BAD_CU_SEQLENS}

assert all(len(v) <= KERNEL_PARAMS for v in PARAM_LAYOUT.values())
assert PARAM_LAYOUT[MODE_CLIP][:len(PARAM_LAYOUT[MODE_GSPO])] == PARAM_LAYOUT[MODE_GSPO]
assert set(BAD_KINDS.values()) == set(range(len(BAD_KINDS)))


def param_slot(name: str) -> int:
    """The slot of a parameter name, the same in every layout that has it."""
    slots = {layout.index(name) for layout in PARAM_LAYOUT.values() if name in layout}
    if len(slots) != 1:
        raise KeyError(f"{name!r} is not a kernel parameter (or has two slots)")
    return slots.pop()


def _ident(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).upper()


def named() -> dict:
    """Every shared scalar by the name the C++ header and the Triton globals give it."""
    out = {f"MODE_{k}": v for k, v in MODES.items()}
    out.update(KERNEL_PARAMS=KERNEL_PARAMS, CLIP_LOG_RATIO_LIMIT=CLIP_LOG_RATIO_LIMIT,
               GSPO_LOG_RATIO_LIMIT=GSPO_LOG_RATIO_LIMIT, K3_SERIES_BELOW=K3_SERIES_BELOW,
               TANH_SERIES_BELOW=TANH_SERIES_BELOW, NUM_METRICS=NUM_METRICS, NUM_AGG=len(AGG_IDS),
               NUM_AGG_NORM=len(AGG_NORM), LOW_VAR_KL_D_LIMIT=LOW_VAR_KL_D_LIMIT,
               LOW_VAR_KL_LIMIT=LOW_VAR_KL_LIMIT, NUM_TOKEN_OUT=len(TOKEN_OUT))
    out.update({f"DTYPE_{_ident(k)}": v for k, v in DTYPE_CODES.items()})
    out.update({f"AGG_{_ident(k)}": v for k, v in AGG_IDS.items()})
    out.update({f"BAD_{k}": v for k, v in BAD_KINDS.items()})
    out.update({f"MET_{_ident(k)}": i for i, k in enumerate(METRICS)})
    out.update({f"KL_{_ident(k)}": v for k, v in KL_ESTIMATORS.items()})
    out.update({f"TOK_{_ident(k)}": i for i, k in enumerate(TOKEN_OUT)})
    return out


def _f32(x: float) -> str:
    """A C++ float literal of x rounded to fp32, exact (hex), with the decimal beside it."""
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite constant: {x}")
    h = struct.unpack("<f", struct.pack("<f", x))[0].hex()  # 0x1.4000000000000p+4
    h = re.sub(r"\.?0*p", "p", h) if "." in h else h
    return f"{h}f /* {x!r} */"


def _enum(name: str, items) -> list:
    return [f"enum {name} : int {{", *(f"  {k} = {v}," for k, v in items), "};"]


def header() -> str:
    """The text of ``csrc/mhpo_constants.h``."""
    c = named()

    def scalar(name, ctype="int"):
        return f"constexpr {ctype} {name} = {_f32(c[name]) if ctype == 'float' else c[name]};"

    def enum(name, prefix):
        return _enum(name, ((k, v) for k, v in c.items() if k.startswith(prefix)))

    out = [
        "// GENERATED by `python mhpo_kernels/_constants.py --header > csrc/mhpo_constants.h`",
        "// from mhpo_kernels/_constants.py. Do not edit: change the Python and regenerate",
        "// (tests/test_constants.py fails while the two differ).",
        "#pragma once",
        "",
        "#if defined(__CUDACC__) || defined(__HIPCC__)",
        "#define MHPO_HD __host__ __device__ __forceinline__",
        "#else",
        "#define MHPO_HD inline",
        "#endif",
        "",
        "namespace mhpo {",
        "",
        *enum("Mode", "MODE_"),
        scalar("KERNEL_PARAMS"),
        scalar("CLIP_LOG_RATIO_LIMIT", "float"),
        scalar("GSPO_LOG_RATIO_LIMIT", "float"),
        scalar("K3_SERIES_BELOW", "float"),
        scalar("TANH_SERIES_BELOW", "float"),
        scalar("LOW_VAR_KL_D_LIMIT", "float"),
        scalar("LOW_VAR_KL_LIMIT", "float"),
        "// KL estimators (kl_est of the finishing kernel), at d = ref - logp",
        *enum("KlEstimator", "KL_"),
        "// logits dtype codes",
        *enum("DType", "DTYPE_"),
        "// loss_agg_mode ids",
        *enum("Agg", "AGG_"),
        scalar("NUM_AGG"),
        "// agg_norm[] of the finishing kernel: (global count or 0: local, loss_scale_factor or 0: T, dp_size)",
        scalar("NUM_AGG_NORM"),
        "// bad[0] of the finishing kernel",
        *enum("BadKind", "BAD_"),
        "// metrics[] slots of the finishing kernel",
        *enum("Metric", "MET_"),
        scalar("NUM_METRICS"),
        "// rows of the finishing kernel's optional token_out[NUM_TOKEN_OUT, N]",
        *enum("TokenOutRow", "TOK_"),
        scalar("NUM_TOKEN_OUT"),
        "",
        "// The params[KERNEL_PARAMS] of each mode, named (a config's kernel_params()).",
    ]
    for mode, names in PARAM_LAYOUT.items():
        mode_name = next(k for k, v in MODES.items() if v == mode)
        struct_name = mode_name.capitalize() + "Params"
        out += [
            f"struct {struct_name} {{  // MODE_{mode_name}",
            f"  float {', '.join(names)};",
            f"  MHPO_HD static {struct_name} load(const float* p) {{ return {{"
            + ", ".join(f"p[{i}]" for i in range(len(names))) + "}; }",
            "};",
        ]
    out += ["", "}  // namespace mhpo", ""]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] != ["--header"]:
        sys.exit("usage: python mhpo_kernels/_constants.py --header > csrc/mhpo_constants.h")
    sys.stdout.write(header())
