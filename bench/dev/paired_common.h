// Shared by the drivers in bench/dev: buffers as the op's block cache gives them, and the
// kernel problem of one batch row of H heads laid out by head ([1, H, T, D]).
#pragma once
#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "tokmix/kernels.h"

namespace paired {

// n floats, zeroed, 2 MB aligned and on huge pages
inline float* buffer(size_t n) {
  const size_t bytes = ((n * 4 + (2 << 20) - 1) / (2 << 20)) * (2 << 20);
  float* p = static_cast<float*>(aligned_alloc(2 << 20, bytes));
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0, bytes);
  return p;
}

inline tokmix::kernels::MixProblem head_major_problem(int64_t T, int64_t H, int64_t D) {
  tokmix::kernels::MixProblem pb;
  pb.batch = 1;
  pb.T = T;
  pb.H = H;
  pb.Dk = pb.Dv = D;
  pb.sq = pb.sk = pb.sv = pb.sy = {H * T * D, D, T * D};
  pb.scale = 1.0 / std::sqrt(double(D));
  return pb;
}

}  // namespace paired
