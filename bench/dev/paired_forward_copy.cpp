// Paired timing of the CPU forward's two ways to get q, k, v into head-major order (perf-notes
// v17): one relayout of every head before the kernel, or each unit copying its own rows right
// before it runs (HeadCopy). Both run alternately in one process; the figure is the median of
// the per-pair ratios, which this host's 2x speed swings do not move much. Built and run by
// bench/dev/paired.sh.   paired_forward_copy PATTERN T [REPS]
#include <omp.h>

#include <algorithm>
#include <array>
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
  const size_t n = H * T * D;
  float *q = buffer(n), *k = buffer(n), *v = buffer(n), *qh = buffer(n), *kh = buffer(n), *vh = buffer(n);
  float *y1 = buffer(n), *y2 = buffer(n), *lse = buffer(H * T);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < n; ++i) q[i] = nd(g), k[i] = nd(g), v[i] = nd(g);
  const kernels::Strides src{H * T * D, H * D, D};  // the caller's [B, T, H, D]
  std::vector<double> ratio, t1, t2;
  for (int r = 0; r < reps; ++r) {
    const auto a = Clock::now();
    for (int i = 0; i < 3; ++i)
      kernels::relayout_to_heads_cpu<float>(std::array{q, k, v}[i], 1, T, H, D, src.sb, src.st, src.sh, std::array{qh, kh, vh}[i]);
    kernels::mix_forward_cpu<float>(pd, pb, qh, kh, vh, nullptr, nullptr, y1, lse);
    const auto b = Clock::now();
    bool bad[3] = {false, false, false};
    const kernels::HeadCopy<float> copies[3] = {{q, src, qh, &bad[0]}, {k, src, kh, &bad[1]}, {v, src, vh, &bad[2]}};
    kernels::mix_forward_cpu<float>(pd, pb, qh, kh, vh, nullptr, nullptr, y2, lse, copies);
    const auto c = Clock::now();
    t1.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    t2.push_back(std::chrono::duration<double, std::milli>(c - b).count());
    ratio.push_back(t1.back() / t2.back());
  }
  double diff = 0;
  for (size_t i = 0; i < n; ++i) diff = std::max(diff, double(std::fabs(y1[i] - y2[i])));
  for (auto* x : {&t1, &t2, &ratio}) std::sort(x->begin(), x->end());
  std::printf("forward %-8s T=%-6lld %d threads: relayout first %8.2f ms, copy per unit %8.2f ms, paired ratio %.3f [%.2f..%.2f], max|dy| %.1e\n",
              argv[1], (long long)T, omp_get_max_threads(), t1[reps / 2], t2[reps / 2], ratio[reps / 2], ratio.front(), ratio.back(), diff);
  return diff == 0 ? 0 : 1;
}
