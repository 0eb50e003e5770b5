// CPU row kernels for the baseline ISA of the build target (x86-64: SSE2; aarch64: NEON).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../mhpo_epilogue.h"
#include "rows.h"

#include "rows_impl.inc"

mhpo::cpu::RowKernels mhpo::cpu::row_kernels_default() { return {"default", &fwd_any, &bwd_any}; }
