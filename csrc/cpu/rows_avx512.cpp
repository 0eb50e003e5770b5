// CPU row kernels compiled for avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2 (see rows_impl.inc).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../mhpo_epilogue.h"  // before the target pragma: baseline code in every TU
#include "rows.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#endif

#include "rows_impl.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

mhpo::cpu::RowKernels mhpo::cpu::row_kernels_avx512() { return {"avx512", &fwd_any, &bwd_any}; }

#else
mhpo::cpu::RowKernels mhpo::cpu::row_kernels_avx512() { return {nullptr, nullptr, nullptr}; }
#endif
