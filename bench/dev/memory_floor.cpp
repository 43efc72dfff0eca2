// The memory floor of the pow2 row kernels on this host: the forward's and backward's loads and
// stores of whole rows, in the kernels' order (per head, rows ascending / descending, one row of
// k and one of y (v for the row itself) per entry; the backward also reads and writes dk and g
// rows), with one vector add per row loaded and no other arithmetic. Printed against the time
// the op may take to reach 20% of the matrix-product rate measured in the same run (the FLOP
// count of `tokmix bench mix`). If the floor alone is near that budget, the target needs fewer
// bytes per entry, not faster arithmetic (perf-notes v21). Build after `make test`:
//   g++ -std=c++17 -O3 -march=native -fopenmp -I/usr/include/torch/csrc/api/include \
//     bench/dev/memory_floor.cpp -ltorch -ltorch_cpu -lc10 -o /tmp/memory_floor
//   OMP_NUM_THREADS=2 /tmp/memory_floor [REPS]
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using Clock = std::chrono::steady_clock;
constexpr int64_t H = 8, D = 64;

static float *buffer(size_t n) {  // as the op's block cache gives them: 2 MB aligned, huge pages
  const size_t bytes = ((n * 4 + (2 << 20) - 1) / (2 << 20)) * (2 << 20);
  float *p = static_cast<float *>(aligned_alloc(2 << 20, bytes));
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0, bytes);
  return p;
}
static inline __m512 add_row(__m512 a, const float *r) {
  return _mm512_add_ps(_mm512_add_ps(a, _mm512_loadu_ps(r)),
                       _mm512_add_ps(_mm512_loadu_ps(r + 16), _mm512_add_ps(_mm512_loadu_ps(r + 32), _mm512_loadu_ps(r + 48))));
}
static inline void bump_row(float *r, __m512 c) {  // read-modify-write, as the backward's scatters
  for (int c4 = 0; c4 < 64; c4 += 16) _mm512_storeu_ps(r + c4, _mm512_add_ps(_mm512_loadu_ps(r + c4), c));
}

int main(int argc, char **argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 7;
  torch::set_num_threads(omp_get_max_threads());
  auto matmul_rate = [] {
    auto a = torch::randn({1024, 1024}), b = torch::randn({1024, 1024});
    std::vector<double> t;
    for (int r = 0; r < 9; ++r) {
      const auto s = Clock::now();
      auto c = torch::mm(a, b);
      t.push_back(std::chrono::duration<double>(Clock::now() - s).count());
    }
    std::sort(t.begin(), t.end());
    return 2.0 * 1024 * 1024 * 1024 / t[4] / 1e9;
  };
  std::printf(
      "pow2 row kernels' memory floor, B=1 H=%lld D=%lld fp32, %d "
      "threads, median of %d\n",
      (long long)H, (long long)D, omp_get_max_threads(), reps);
  std::printf("%7s %12s %12s %14s %14s %12s %10s\n", "T", "fwd floor", "fwd budget", "f+b (scatter)", "f+b (gather)", "f+b budget",
              "matmul");
  for (int64_t T : {1024, 4096, 16384, 65536}) {
    const size_t n = size_t(H) * T * D;
    float *q = buffer(n), *k = buffer(n), *v = buffer(n), *y = buffer(n), *g = buffer(n), *dk = buffer(n), *dq = buffer(n), *dv = buffer(n);
    int64_t entries = 0;  // per head: the row itself and i - 2^l for 2^l <= i
    for (int64_t i = 0; i < T; ++i)
      for (int64_t d = 0; d <= i; d = d ? 2 * d : 1) ++entries;
    std::vector<double> tf, tb, tg;
    float sink = 0;
    for (int r = 0; r < reps; ++r) {
      auto s = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
      for (int64_t h = 0; h < H; ++h) {
        const float *qh = q + h * T * D, *kh = k + h * T * D, *vh = v + h * T * D;
        float *yh = y + h * T * D;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < T; ++i) {
          __m512 a = add_row(add_row(add_row(_mm512_setzero_ps(), qh + i * D), kh + i * D), vh + i * D);
          for (int64_t d = 1; d <= i; d *= 2) a = add_row(add_row(a, kh + (i - d) * D), yh + (i - d) * D);
          for (int c = 0; c < 64; c += 16) _mm512_storeu_ps(yh + i * D + c, a);
          acc = _mm512_add_ps(acc, a);
        }
        sink += _mm512_reduce_add_ps(acc);
      }
      tf.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
      s = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
      for (int64_t h = 0; h < H; ++h) {
        const float *qh = q + h * T * D, *kh = k + h * T * D, *vh = v + h * T * D, *yh = y + h * T * D;
        float *gh = g + h * T * D, *dkh = dk + h * T * D, *dqh = dq + h * T * D, *dvh = dv + h * T * D;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t m = T - 1; m >= 0; --m) {
          __m512 a = add_row(add_row(add_row(_mm512_setzero_ps(), qh + m * D), gh + m * D), kh + m * D);
          a = add_row(a, vh + m * D);
          bump_row(dkh + m * D, a);
          for (int c = 0; c < 64; c += 16) _mm512_storeu_ps(dvh + m * D + c, a);
          for (int64_t d = 1; d <= m; d *= 2) {
            a = add_row(add_row(a, kh + (m - d) * D), yh + (m - d) * D);
            bump_row(dkh + (m - d) * D, a);
            bump_row(gh + (m - d) * D, a);
          }
          for (int c = 0; c < 64; c += 16) _mm512_storeu_ps(dqh + m * D + c, a);
          acc = _mm512_add_ps(acc, a);
        }
        sink += _mm512_reduce_add_ps(acc);
      }
      tb.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
      // the gathering backward (perf-notes v6): row j reads q_m and g_m of the
      // later rows m = j + 2^l (final by then) instead of having them write
      // into its dk_j and g_j, so each entry moves four rows (k_j, y_j at row
      // m; q_m, g_m at row j) instead of six
      s = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
      for (int64_t h = 0; h < H; ++h) {
        const float *qh = q + h * T * D, *kh = k + h * T * D, *vh = v + h * T * D, *yh = y + h * T * D;
        float *gh = g + h * T * D, *dkh = dk + h * T * D, *dqh = dq + h * T * D, *dvh = dv + h * T * D;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t m = T - 1; m >= 0; --m) {
          __m512 a = add_row(add_row(add_row(_mm512_setzero_ps(), qh + m * D), gh + m * D), kh + m * D), b = a;
          for (int64_t d = 1; m + d < T; d *= 2) b = add_row(add_row(b, qh + (m + d) * D), gh + (m + d) * D);
          for (int c = 0; c < 64; c += 16) _mm512_storeu_ps(gh + m * D + c, b), _mm512_storeu_ps(dkh + m * D + c, b);
          a = add_row(a, vh + m * D);
          for (int64_t d = 1; d <= m; d *= 2) a = add_row(add_row(a, kh + (m - d) * D), yh + (m - d) * D);
          for (int c = 0; c < 64; c += 16) _mm512_storeu_ps(dqh + m * D + c, a), _mm512_storeu_ps(dvh + m * D + c, a);
          acc = _mm512_add_ps(acc, a);
        }
        sink += _mm512_reduce_add_ps(acc);
      }
      tg.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
    }
    const double rate = matmul_rate();
    std::sort(tf.begin(), tf.end());
    std::sort(tb.begin(), tb.end());
    std::sort(tg.begin(), tg.end());
    const double fwd_flop = double(entries) * H * 4 * D, bwd_flop = double(entries) * H * 10 * D;
    const double fwd_budget = fwd_flop / (0.2 * rate * 1e9) * 1e3, fb_budget = (fwd_flop + bwd_flop) / (0.2 * rate * 1e9) * 1e3;
    std::printf("%7lld %9.2f ms %9.2f ms %11.2f ms %11.2f ms %9.2f ms %10.1f%s\n", (long long)T, tf[reps / 2], fwd_budget,
                tf[reps / 2] + tb[reps / 2], tf[reps / 2] + tg[reps / 2], fb_budget, rate, sink == 12345.f ? "!" : "");
    for (float *p : {q, k, v, y, g, dk, dq, dv}) std::free(p);
  }
  std::printf(
      "floor: loads and stores only; budget: the time at 20%% of the "
      "matrix rate (GFLOP/s, last column)\n");
}
