// The memory floor of the pow2 row kernels on this host: the forward's and backward's loads and
// stores of whole rows, in the kernels' order (per head, rows ascending / descending, one row of
// k and one of y (v for the row itself) per entry; the backward also reads and writes dk and g
// rows), with one vector add per row loaded and no other arithmetic. Printed against the time
// the op may take to reach 20% of the matrix-product rate measured in the same run (the FLOP
// count of `tokmix bench mix`). If the floor alone is near that budget, the target needs fewer
// bytes per entry, not faster arithmetic (perf-notes v21). Build after `make test`:
//   g++ -std=c++17 -O3 -march=native -fopenmp -Iinclude -I/usr/include/torch/csrc/api/include \
//     bench/dev/memory_floor.cpp -ltorch -ltorch_cpu -lc10 -o /tmp/memory_floor
//   OMP_NUM_THREADS=2 /tmp/memory_floor [REPS]
#include <immintrin.h>
#include <omp.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "paired_common.h"

using Clock = std::chrono::steady_clock;
constexpr int64_t H = 8, D = 64;

static inline __m512 add_row(__m512 a, const float* r) {
  return _mm512_add_ps(_mm512_add_ps(a, _mm512_loadu_ps(r)),
                       _mm512_add_ps(_mm512_loadu_ps(r + 16), _mm512_add_ps(_mm512_loadu_ps(r + 32), _mm512_loadu_ps(r + 48))));
}
static inline void store_row(float* r, __m512 c) {
  for (int c4 = 0; c4 < 64; c4 += 16) _mm512_storeu_ps(r + c4, c);
}
static inline void bump_row(float* r, __m512 c) {  // read-modify-write, as the backward's scatters
  for (int c4 = 0; c4 < 64; c4 += 16) _mm512_storeu_ps(r + c4, _mm512_add_ps(_mm512_loadu_ps(r + c4), c));
}

static double matmul_rate() {  // GFLOP/s of a 1024^3 product through LibTorch, median of 9
  auto a = torch::randn({1024, 1024}), b = torch::randn({1024, 1024});
  std::vector<double> t;
  for (int r = 0; r < 9; ++r) {
    const auto s = Clock::now();
    auto c = torch::mm(a, b);
    t.push_back(std::chrono::duration<double>(Clock::now() - s).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * 1024 * 1024 * 1024 / t[4] / 1e9;
}

// One head's rows of every array the kernels touch.
struct Head {
  float *q, *k, *v, *y, *g, *dk, *dq, *dv;
};

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 7;
  torch::set_num_threads(omp_get_max_threads());
  std::printf("pow2 row kernels' memory floor, B=1 H=%lld D=%lld fp32, %d threads, median of %d\n", (long long)H, (long long)D,
              omp_get_max_threads(), reps);
  std::printf("%7s %12s %12s %14s %14s %12s %10s\n", "T", "fwd floor", "fwd budget", "f+b (scatter)", "f+b (gather)", "f+b budget",
              "matmul");
  for (int64_t T : {1024, 4096, 16384, 65536}) {
    const size_t n = size_t(H) * T * D;
    float* buf[8];
    for (float*& p : buf) p = paired::buffer(n);
    auto head = [&](int64_t h) {
      const size_t o = size_t(h) * T * D;
      return Head{buf[0] + o, buf[1] + o, buf[2] + o, buf[3] + o, buf[4] + o, buf[5] + o, buf[6] + o, buf[7] + o};
    };
    int64_t entries = 0;  // per head: the row itself and i - 2^l for 2^l <= i
    for (int64_t i = 0; i < T; ++i)
      for (int64_t d = 0; d <= i; d = d ? 2 * d : 1) ++entries;
    float sink = 0;  // keeps the loads live
    // ms of one pass: per_head(Head) over the heads, in parallel as the op's units
    auto timed = [&](auto&& per_head) {
      const auto s = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
      for (int64_t h = 0; h < H; ++h) sink += _mm512_reduce_add_ps(per_head(head(h)));
      return std::chrono::duration<double, std::milli>(Clock::now() - s).count();
    };
    std::vector<double> tf, tb, tg;
    for (int r = 0; r < reps; ++r) {
      tf.push_back(timed([&](const Head& x) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < T; ++i) {
          __m512 a = add_row(add_row(add_row(_mm512_setzero_ps(), x.q + i * D), x.k + i * D), x.v + i * D);
          for (int64_t d = 1; d <= i; d *= 2) a = add_row(add_row(a, x.k + (i - d) * D), x.y + (i - d) * D);
          store_row(x.y + i * D, a);
          acc = _mm512_add_ps(acc, a);
        }
        return acc;
      }));
      tb.push_back(timed([&](const Head& x) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t m = T - 1; m >= 0; --m) {
          __m512 a = add_row(add_row(add_row(add_row(_mm512_setzero_ps(), x.q + m * D), x.g + m * D), x.k + m * D), x.v + m * D);
          bump_row(x.dk + m * D, a);
          store_row(x.dv + m * D, a);
          for (int64_t d = 1; d <= m; d *= 2) {
            a = add_row(add_row(a, x.k + (m - d) * D), x.y + (m - d) * D);
            bump_row(x.dk + (m - d) * D, a);
            bump_row(x.g + (m - d) * D, a);
          }
          store_row(x.dq + m * D, a);
          acc = _mm512_add_ps(acc, a);
        }
        return acc;
      }));
      // the gathering backward (perf-notes v6): row j reads q_m and g_m of the later rows
      // m = j + 2^l (final by then) instead of having them write into its dk_j and g_j, so each
      // entry moves four rows (k_j, y_j at row m; q_m, g_m at row j) instead of six
      tg.push_back(timed([&](const Head& x) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t m = T - 1; m >= 0; --m) {
          __m512 a = add_row(add_row(add_row(_mm512_setzero_ps(), x.q + m * D), x.g + m * D), x.k + m * D), b = a;
          for (int64_t d = 1; m + d < T; d *= 2) b = add_row(add_row(b, x.q + (m + d) * D), x.g + (m + d) * D);
          store_row(x.g + m * D, b);
          store_row(x.dk + m * D, b);
          a = add_row(a, x.v + m * D);
          for (int64_t d = 1; d <= m; d *= 2) a = add_row(add_row(a, x.k + (m - d) * D), x.y + (m - d) * D);
          store_row(x.dq + m * D, a);
          store_row(x.dv + m * D, a);
          acc = _mm512_add_ps(acc, a);
        }
        return acc;
      }));
    }
    const double rate = matmul_rate();
    for (auto* t : {&tf, &tb, &tg}) std::sort(t->begin(), t->end());
    const double fwd_flop = double(entries) * H * 4 * D, bwd_flop = double(entries) * H * 10 * D;
    const double fwd_budget = fwd_flop / (0.2 * rate * 1e9) * 1e3, fb_budget = (fwd_flop + bwd_flop) / (0.2 * rate * 1e9) * 1e3;
    std::printf("%7lld %9.2f ms %9.2f ms %11.2f ms %11.2f ms %9.2f ms %10.1f%s\n", (long long)T, tf[reps / 2], fwd_budget,
                tf[reps / 2] + tb[reps / 2], tf[reps / 2] + tg[reps / 2], fb_budget, rate, sink == 12345.f ? "!" : "");
    for (float* p : buf) std::free(p);
  }
  std::printf("floor: loads and stores only; budget: the time at 20%% of the matrix rate (GFLOP/s, last column)\n");
}
