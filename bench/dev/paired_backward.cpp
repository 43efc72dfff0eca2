// Paired timing of the CPU backward against an older revision's (perf-notes v16): the old kernel
// (namespace kernels_old, built from `git show REV:src/ops/cpu/mix_cpu.cpp` by paired.sh) with the
// fills its contract asks for (dq, dk, dv zero, dy read-only), the current one with its own (dk
// zero; dq and, for A = {i}, dv written row by row; dy overwritten, so a fresh copy each time,
// outside the timing, as the op's relayout gives it). dv's first page is NaN before the current
// kernel runs, to show every element is written. Median of per-pair ratios, old / new.
//   paired_backward PATTERN T [REPS]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "paired_common.h"
#include "tokmix/kernels.h"
#include "tokmix/pattern.h"
#define kernels kernels_old
#include "kernels_old.h"  // the old revision's kernels.h, include guard removed (paired.sh)
#undef kernels

using namespace tokmix;
using Clock = std::chrono::steady_clock;

using paired::buffer;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PATTERN T [REPS]\n", argv[0]);
    return 2;
  }
  const Pattern pat = Pattern::parse(argv[1]);
  const int64_t T = std::atoll(argv[2]), H = 8, D = 64;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 9;
  const PatternDesc pd = pat.desc();
  const kernels::MixProblem pb = paired::head_major_problem(T, H, D);
  kernels_old::MixProblem po;
  static_assert(sizeof(po) == sizeof(pb), "MixProblem changed layout: adapt the copy below");
  std::memcpy(static_cast<void*>(&po), &pb, sizeof(pb));
  const size_t n = H * T * D;
  float *q = buffer(n), *k = buffer(n), *v = buffer(n), *y = buffer(n), *lse = buffer(H * T), *dy = buffer(n), *g = buffer(n);
  float *dq1 = buffer(n), *dk1 = buffer(n), *dv1 = buffer(n), *dq2 = buffer(n), *dk2 = buffer(n), *dv2 = buffer(n);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < n; ++i) q[i] = nd(rng), k[i] = nd(rng), v[i] = nd(rng), dy[i] = nd(rng);
  kernels::mix_forward_cpu<float>(pd, pb, q, k, v, nullptr, nullptr, y, lse);
  const bool dv_written = pd.A.kind == SupportKind::Self;
  std::vector<double> ratio, t1, t2;
  for (int r = 0; r < reps; ++r) {
    std::memcpy(g, dy, n * 4);
    const auto a = Clock::now();
    std::memset(dq1, 0, n * 4);
    std::memset(dk1, 0, n * 4);
    std::memset(dv1, 0, n * 4);
    kernels_old::mix_backward_cpu<float>(pd, po, q, k, v, nullptr, nullptr, y, lse, dy, dq1, dk1, dv1, nullptr, nullptr);
    const auto b = Clock::now();
    std::memset(dk2, 0, n * 4);
    if (dv_written)
      std::memset(dv2, 0xff, 4096);
    else
      std::memset(dv2, 0, n * 4);
    kernels::mix_backward_cpu<float>(pd, pb, q, k, v, nullptr, nullptr, y, lse, g, dq2, dk2, dv2, nullptr, nullptr);
    const auto c = Clock::now();
    t1.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    t2.push_back(std::chrono::duration<double, std::milli>(c - b).count());
    ratio.push_back(t1.back() / t2.back());
  }
  double diff = 0;
  for (size_t i = 0; i < n; ++i)
    diff = std::max({diff, double(std::fabs(dq1[i] - dq2[i])), double(std::fabs(dk1[i] - dk2[i])), double(std::fabs(dv1[i] - dv2[i]))});
  for (auto* x : {&t1, &t2, &ratio}) std::sort(x->begin(), x->end());
  std::printf("backward %-8s T=%-6lld %d threads: old %8.2f ms, new %8.2f ms, paired old/new %.3f [%.2f..%.2f], max|diff| %.1e\n", argv[1],
              (long long)T, omp_get_max_threads(), t1[reps / 2], t2[reps / 2], ratio[reps / 2], ratio.front(), ratio.back(), diff);
  return diff == 0 ? 0 : 1;
}
