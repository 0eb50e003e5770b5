// Row kernels of the CPU backend: the two passes over one row of logits.
//
// This header declares the per-ISA entry points. Their body is
// rows_impl.inc, compiled once per instruction set (rows_default.cpp,
// rows_avx2.cpp, rows_avx512.cpp) with no torch header in sight, and picked at
// run time (mhpo_cpu.cpp): the wheel is built without -march=native and still
// uses AVX-512 where the CPU has it.
#pragma once

#include <cstdint>

#include "../mhpo_constants.h"

namespace mhpo::cpu {

constexpr int kF32 = DTYPE_FLOAT32, kBF16 = DTYPE_BFLOAT16, kF16 = DTYPE_FLOAT16;

// lse and entropy of one row x = row / T (entropy left untouched when !want_entropy).
using FwdRowFn = void (*)(const void* row, int64_t V, int dtype, float T, bool want_entropy,
                          float* lse, float* entropy);

// out[v] = (-dlogp * p - dent * p * (log p + H)) / T for every v (no one-hot term:
// the caller fixes up the target), p = exp(row[v] / T - lse). out may be row.
using BwdRowFn = void (*)(const void* row, void* out, int64_t V, int dtype, float inv_t, float lse,
                          float entropy, float dlogp, float dent, bool has_entropy);

struct RowKernels {
  const char* isa;  // nullptr when this ISA was not compiled for the target
  FwdRowFn fwd;
  BwdRowFn bwd;
};

RowKernels row_kernels_default();
RowKernels row_kernels_avx2();
RowKernels row_kernels_avx512();

}  // namespace mhpo::cpu
