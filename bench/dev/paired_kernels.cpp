// The CPU kernels of two builds of src/ops/cpu/mix_cpu.cpp, alternating in one process (this host's
// speed swings 2x between runs): A = a revision's (namespace kernels_a), B = the working tree's
// (kernels_b). Forward, or backward from A's forward. Median of per-pair ratios A / B, and the
// largest difference of the outputs. Built and run by bench/dev/paired_rev.sh.
//   paired_kernels PATTERN T [REPS] [fwd|bwd] [D (64)]
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "paired_common.h"
#include "tokmix/pattern.h"
#define kernels kernels_a
#include "kernels_ab.h"  // kernels.h without its include guard (paired_rev.sh)
#undef kernels
#define kernels kernels_b
#include "kernels_ab.h"  // kernels.h without its include guard (paired_rev.sh)
#undef kernels
using namespace tokmix;
using Clock = std::chrono::steady_clock;
using paired::buffer;
template <class P>
P conv(const kernels::MixProblem& pb) {
  P p;
  std::memcpy((void*)&p, &pb, sizeof(p));
  return p;
}
int main(int argc, char** argv) {
  const Pattern pat = Pattern::parse(argv[1]);
  const int64_t T = std::atoll(argv[2]), H = 8, D = argc > 5 ? std::atoll(argv[5]) : 64;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 9;
  const bool bwd = argc > 4 && std::string(argv[4]) == "bwd";
  const PatternDesc pd = pat.desc();
  const kernels::MixProblem pb = paired::head_major_problem(T, H, D);
  auto pa = conv<kernels_a::MixProblem>(pb);
  auto pbb = conv<kernels_b::MixProblem>(pb);
  const size_t n = H * T * D;
  float *q = buffer(n), *k = buffer(n), *v = buffer(n), *y = buffer(n), *y2 = buffer(n), *lse = buffer(H * T), *lse2 = buffer(H * T),
        *dy = buffer(n), *g = buffer(n);
  float *dq1 = buffer(n), *dk1 = buffer(n), *dv1 = buffer(n), *dq2 = buffer(n), *dk2 = buffer(n), *dv2 = buffer(n);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < n; ++i) q[i] = nd(rng), k[i] = nd(rng), v[i] = nd(rng), dy[i] = nd(rng);
  kernels_a::mix_forward_cpu<float>(pd, pa, q, k, v, nullptr, nullptr, y, lse);
  kernels_b::mix_forward_cpu<float>(pd, pbb, q, k, v, nullptr, nullptr, y2, lse2);
  std::vector<double> ratio, t1, t2;
  for (int r = 0; r < reps; ++r) {
    const bool aFirst = r % 2 == 0;
    double ta = 0, tb = 0;
    for (int w = 0; w < 2; ++w) {
      const bool runA = (w == 0) == aFirst;
      if (bwd) {
        std::memcpy(g, dy, n * 4);
        std::memset(runA ? dk1 : dk2, 0, n * 4);
      }
      const auto a = Clock::now();
      if (runA) {
        if (bwd)
          kernels_a::mix_backward_cpu<float>(pd, pa, q, k, v, nullptr, nullptr, y, lse, g, dq1, dk1, dv1, nullptr, nullptr);
        else
          kernels_a::mix_forward_cpu<float>(pd, pa, q, k, v, nullptr, nullptr, y, lse);
      } else {
        if (bwd)
          kernels_b::mix_backward_cpu<float>(pd, pbb, q, k, v, nullptr, nullptr, y, lse, g, dq2, dk2, dv2, nullptr, nullptr);
        else
          kernels_b::mix_forward_cpu<float>(pd, pbb, q, k, v, nullptr, nullptr, y2, lse2);
      }
      const double t = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
      (runA ? ta : tb) = t;
    }
    t1.push_back(ta);
    t2.push_back(tb);
    ratio.push_back(ta / tb);
  }
  double diff = 0, mag = 0;
  if (bwd)
    for (size_t i = 0; i < n; ++i) {
      diff = std::max({diff, double(std::fabs(dq1[i] - dq2[i])), double(std::fabs(dk1[i] - dk2[i])), double(std::fabs(dv1[i] - dv2[i]))});
      mag = std::max(mag, double(std::fabs(dk1[i])));
    }
  else
    for (size_t i = 0; i < n; ++i) {
      diff = std::max(diff, double(std::fabs(y[i] - y2[i])));
      mag = std::max(mag, double(std::fabs(y[i])));
    }
  for (auto* x : {&t1, &t2, &ratio}) std::sort(x->begin(), x->end());
  std::printf("%s %-6s T=%-6lld D=%lld %d thr: A %8.3f ms  B %8.3f ms  A/B %.3f [%.2f..%.2f]  max|diff| %.1e (max %.1e)\n", bwd ? "bwd" : "fwd",
              argv[1], (long long)T, (long long)D, omp_get_max_threads(), t1[reps / 2], t2[reps / 2], ratio[reps / 2], ratio.front(), ratio.back(), diff,
              mag);
}
