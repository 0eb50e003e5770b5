"""The shared ids and limits (:mod:`mhpo_kernels._constants`) as ``tl.constexpr`` globals,
which ``@triton.jit`` code may read (and which Triton folds into each kernel's cache key).

The ratio-control parameters reach the kernels as scalars ``p0 .. p6`` in the slots of
``_constants.PARAM_LAYOUT``; each kernel passes them on, in order, to the epilogue function
whose parameters carry the layout's names (``tests/test_constants.py`` checks both).
"""
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import _constants as _c


@triton.jit
def _probe():
    pass


# Triton's interpreter runs the kernels as Python, where a tl.constexpr global does not mix with
# the plain values its constexpr arguments are (bool | constexpr is a TypeError): plain values there
_cx = (lambda v: v) if isinstance(_probe, InterpretedFunction) else tl.constexpr

MODE_NONE = _cx(_c.MODE_NONE)
MODE_MHPO = _cx(_c.MODE_MHPO)
MODE_CLIP = _cx(_c.MODE_CLIP)
MODE_SAPO = _cx(_c.MODE_SAPO)
MODE_GSPO = _cx(_c.MODE_GSPO)
MODE_CISPO = _cx(_c.MODE_CISPO)

K3_SERIES_BELOW = _cx(_c.K3_SERIES_BELOW)
TANH_SERIES_BELOW = _cx(_c.TANH_SERIES_BELOW)

AGG_TOKEN_MEAN = _cx(_c.AGG_IDS["token-mean"])
AGG_SEQ_MEAN_TOKEN_MEAN = _cx(_c.AGG_IDS["seq-mean-token-mean"])
AGG_SEQ_MEAN_TOKEN_SUM = _cx(_c.AGG_IDS["seq-mean-token-sum"])
AGG_SEQ_MEAN_TOKEN_SUM_NORM = _cx(_c.AGG_IDS["seq-mean-token-sum-norm"])
AGG_TOKEN_SUM = _cx(_c.AGG_IDS["token-sum"])

BAD_NONE = _cx(_c.BAD_NONE)
BAD_TARGET = _cx(_c.BAD_TARGET)
BAD_CU_SEQLENS = _cx(_c.BAD_CU_SEQLENS)

MET_KL_OLD = _cx(_c.METRICS.index("kl_old"))
MET_RATIO_MAX = _cx(_c.METRICS.index("ratio_max"))
MET_RATIO_MIN = _cx(_c.METRICS.index("ratio_min"))
MET_PSI_MEAN = _cx(_c.METRICS.index("psi_mean"))
MET_ZETA_MEAN = _cx(_c.METRICS.index("zeta_mean"))
MET_SURVIVAL_MEAN = _cx(_c.METRICS.index("survival_mean"))
MET_LOW_SURVIVAL_FRAC = _cx(_c.METRICS.index("low_survival_frac"))
MET_CLIPFRAC_LOW = _cx(_c.METRICS.index("clipfrac_low"))
MET_CLIPFRAC_HIGH = _cx(_c.METRICS.index("clipfrac_high"))
MET_CLIPFRAC = _cx(_c.METRICS.index("clipfrac"))
MET_DUAL_CLIPFRAC = _cx(_c.METRICS.index("dual_clipfrac"))
MET_ENTROPY_MEAN = _cx(_c.METRICS.index("entropy_mean"))
MET_KL_REF = _cx(_c.METRICS.index("kl_ref"))

KL_K3 = _cx(_c.KL_ESTIMATORS["k3"])
KL_K1 = _cx(_c.KL_ESTIMATORS["k1"])
KL_K2 = _cx(_c.KL_ESTIMATORS["k2"])
KL_LOW_VAR_KL = _cx(_c.KL_ESTIMATORS["low_var_kl"])
LOW_VAR_KL_D_LIMIT = _cx(_c.LOW_VAR_KL_D_LIMIT)
LOW_VAR_KL_LIMIT = _cx(_c.LOW_VAR_KL_LIMIT)

TOK_LOSS = _cx(_c.TOKEN_OUT.index("loss"))
TOK_KL = _cx(_c.TOKEN_OUT.index("kl"))
TOK_FLAG = _cx(_c.TOKEN_OUT.index("flag"))

# Launch arguments (plain Python: the launchers pass them as constexpr kernel arguments)
CLIP_LOG_RATIO_LIMIT = _c.CLIP_LOG_RATIO_LIMIT
GSPO_LOG_RATIO_LIMIT = _c.GSPO_LOG_RATIO_LIMIT
NUM_METRICS = _c.NUM_METRICS
AGG_NORM_DEFAULT = _c.AGG_NORM_DEFAULT
