// Prototype (perf-notes v22): the forward and backward of A = {i}, B = offsets f (sq1, f:...), softmax, D = 64,
// fp32, in blocks of R rows that stream each far source row once per block instead of once per
// level. The row kernel reads k_j and y_j once per (row, level): about T * levels far rows per head.
// Here a block of R rows first computes its near scores row by row, then walks the sources
// j < a once (descending), scoring every (row, level) pair that lands on j; then the softmax of
// each row; then a second walk mixes y_j into the block's accumulators; then the near entries,
// rows in order. About T^2 / (2R) far rows per head: for sq1 at T = 65536 and R = 2048, ~6x fewer.
// Not in the library: plain libm exp, no prefetch, D = 64 only, no bias. Compared with the library's row
// kernel in one process (median of per-pair ratios). Build after `make test`:
//   g++ -std=c++17 -O3 -march=native -fopenmp -Iinclude -Ibench/dev bench/dev/blocked_offsets.cpp \
//     src/ops/cpu/mix_cpu.cpp build/libtokmix_core.a -o /tmp/blocked_offsets
//   OMP_NUM_THREADS=2 /tmp/blocked_offsets sq1 T REPS R
#include "paired_common.h"
#include "tokmix/kernels.h"
#include "tokmix/pattern.h"
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <immintrin.h>
#include <omp.h>
#include <random>
#include <vector>
using namespace tokmix;
using Clock = std::chrono::steady_clock;
using paired::buffer;
constexpr int D = 64;
static inline float dot64(const float *a, const float *b) {
  __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)), s1 = _mm512_mul_ps(_mm512_loadu_ps(a + 16), _mm512_loadu_ps(b + 16));
  s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 32), _mm512_loadu_ps(b + 32), s0);
  s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 48), _mm512_loadu_ps(b + 48), s1);
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
static inline void axpy64(float *y, float c, const float *x) {
  __m512 cc = _mm512_set1_ps(c);
  for (int i = 0; i < 64; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(cc, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
}
// one head: q,k,v,y [n][D]
void head_forward(const float *q, const float *k, const float *v, float *y, float *lse, int64_t n, const std::vector<int64_t> &f, int64_t R,
                  float scale, std::vector<float> &S, std::vector<float> &acc) {
  const int64_t L = f.size(), W = L + 1;  // entry 0 = self, entry 1+l = level l
  S.resize(R * W);
  acc.resize(R * D);
  for (int64_t a = 0; a < n; a += R) {
    const int64_t Rb = std::min(R, n - a);
    std::fill(S.begin(), S.begin() + Rb * W, -INFINITY);
    std::fill(acc.begin(), acc.begin() + Rb * D, 0.f);
    // near scores (source >= a) and self
    for (int64_t r = 0; r < Rb; r++) {
      const int64_t i = a + r;
      const float *qi = q + i * D;
      S[r * W] = scale * dot64(qi, k + i * D);
      for (int64_t l = 0; l < L && f[l] <= r; l++) S[r * W + 1 + l] = scale * dot64(qi, k + (i - f[l]) * D);
    }
    // far scores: stream sources j < a, descending; level window [lo,hi): f in
    // [a-j, a-j+Rb)
    int64_t lo = 0, hi = 0;
    for (int64_t j = a - 1; j >= 0; j--) {
      const int64_t dmin = a - j, dmax = a - j + Rb;
      while (lo < L && f[lo] < dmin) lo++;
      while (hi < L && f[hi] < dmax) hi++;
      if (lo >= L) break;
      const float *kj = k + j * D;
      for (int64_t l = lo; l < hi; l++) {
        const int64_t r = j + f[l] - a;
        S[r * W + 1 + l] = scale * dot64(q + (a + r) * D, kj);
      }
    }
    // softmax per row
    for (int64_t r = 0; r < Rb; r++) {
      float *s = S.data() + r * W;
      const int64_t ne = 1 + (int64_t)(std::upper_bound(f.begin(), f.end(), a + r) - f.begin());
      float mx = s[0];
      for (int64_t e = 1; e < ne; e++) mx = std::max(mx, s[e]);
      float sum = 0;
      for (int64_t e = 0; e < ne; e++) {
        s[e] = std::exp(s[e] - mx);
        sum += s[e];
      }
      const float inv = 1.f / sum;
      for (int64_t e = 0; e < ne; e++) s[e] *= inv;
      lse[a + r] = mx + std::log(sum);
    }
    // far mix: stream y_j
    lo = 0;
    hi = 0;
    for (int64_t j = a - 1; j >= 0; j--) {
      const int64_t dmin = a - j, dmax = a - j + Rb;
      while (lo < L && f[lo] < dmin) lo++;
      while (hi < L && f[hi] < dmax) hi++;
      if (lo >= L) break;
      const float *yj = y + j * D;
      for (int64_t l = lo; l < hi; l++) {
        const int64_t r = j + f[l] - a;
        axpy64(acc.data() + r * D, S[r * W + 1 + l], yj);
      }
    }
    // near mix, rows in order
    for (int64_t r = 0; r < Rb; r++) {
      const int64_t i = a + r;
      float *a_ = acc.data() + r * D;
      const float *s = S.data() + r * W;
      axpy64(a_, s[0], v + i * D);
      for (int64_t l = 0; l < L && f[l] <= r; l++) axpy64(a_, s[1 + l], y + (i - f[l]) * D);
      std::memcpy(y + i * D, a_, D * 4);
    }
  }
}
// The backward in the same blocks, blocks descending. Row m's g_m is final when its block is
// reached (later blocks scattered into it during their walks); phase 1 runs the near entries
// (sources in the block) row by row, descending; the walk then takes every far (row, level)
// pair per source j once, with ds from delta_m = g_m . y_m, dk_j and g_j summed in registers and
// written once, dq_m summed in the block.
static inline float exp_lse(float s, float l) { return std::exp(s - l); }
void head_backward(const float* q, const float* k, const float* v, const float* y, const float* lse, float* g, float* dq, float* dk, float* dv,
                   int64_t n, const std::vector<int64_t>& f, int64_t R, float scale, std::vector<float>& acc, std::vector<float>& delta) {
  const int64_t L = f.size();
  acc.resize(R * D);
  delta.resize(R);
  const int64_t nb = (n + R - 1) / R;
  for (int64_t b = nb - 1; b >= 0; --b) {
    const int64_t a = b * R, Rb = std::min(R, n - a);
    std::fill(acc.begin(), acc.begin() + Rb * D, 0.f);
    for (int64_t r = Rb - 1; r >= 0; --r) {
      const int64_t m = a + r;
      const float *qm = q + m * D, *gm = g + m * D;
      const float dl = dot64(gm, y + m * D);
      delta[r] = dl;
      float* dqm = acc.data() + r * D;
      // self entry
      {
        const float p = exp_lse(scale * dot64(qm, k + m * D), lse[m]);
        const float ds = p * (dot64(gm, v + m * D) - dl), c = scale * ds;
        for (int d = 0; d < D; ++d) dv[m * D + d] = p * gm[d];
        axpy64(dqm, c, k + m * D);
        axpy64(dk + m * D, c, qm);
      }
      for (int64_t l = 0; l < L && f[l] <= r; ++l) {
        const int64_t j = m - f[l];
        const float p = exp_lse(scale * dot64(qm, k + j * D), lse[m]);
        const float ds = p * (dot64(gm, y + j * D) - dl), c = scale * ds;
        axpy64(dqm, c, k + j * D);
        axpy64(dk + j * D, c, qm);
        axpy64(g + j * D, p, gm);
      }
    }
    int64_t lo = 0, hi = 0;
    for (int64_t j = a - 1; j >= 0; --j) {
      const int64_t dmin = a - j, dmax = a - j + Rb;
      while (lo < L && f[lo] < dmin) lo++;
      while (hi < L && f[hi] < dmax) hi++;
      if (lo >= L) break;
      if (lo == hi) continue;
      const float *kj = k + j * D, *yj = y + j * D;
      alignas(64) float dkj[D] = {}, gj[D] = {};
      for (int64_t l = lo; l < hi; ++l) {
        const int64_t r = j + f[l] - a, m = a + r;
        const float *qm = q + m * D, *gm = g + m * D;
        const float p = exp_lse(scale * dot64(qm, kj), lse[m]);
        const float ds = p * (dot64(gm, yj) - delta[r]), c = scale * ds;
        axpy64(acc.data() + r * D, c, kj);
        axpy64(dkj, c, qm);
        axpy64(gj, p, gm);
      }
      for (int d = 0; d < D; ++d) dk[j * D + d] += dkj[d], g[j * D + d] += gj[d];
    }
    std::memcpy(dq + a * D, acc.data(), Rb * D * 4);
  }
}

int main(int argc, char **argv) {
  const Pattern pat = Pattern::parse(argv[1]);
  const int64_t T = atoll(argv[2]), H = 8;
  int reps = atoi(argv[3]);
  int64_t R = atoll(argv[4]);
  const PatternDesc pd = pat.desc();
  auto pb = paired::head_major_problem(T, H, D);
  size_t n = H * T * D;
  std::vector<int64_t> f;
  for (int l = 0; l < pd.B.count && pd.B.f[l] < T; l++) f.push_back(pd.B.f[l]);
  float *q = buffer(n), *k = buffer(n), *v = buffer(n), *y1 = buffer(n), *y2 = buffer(n), *l1 = buffer(H * T), *l2 = buffer(H * T);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < n; i++) q[i] = nd(g), k[i] = nd(g), v[i] = nd(g);
  std::vector<double> t1, t2, rt;
  for (int rep = 0; rep < reps; rep++) {
    auto a = Clock::now();
    kernels::mix_forward_cpu<float>(pd, pb, q, k, v, nullptr, nullptr, y1, l1);
    auto b = Clock::now();
#pragma omp parallel
    {
      std::vector<float> S, acc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t h = 0; h < H; h++)
        head_forward(q + h * T * D, k + h * T * D, v + h * T * D, y2 + h * T * D, l2 + h * T, T, f, R, (float)pb.scale, S, acc);
    }
    auto c = Clock::now();
    t1.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    t2.push_back(std::chrono::duration<double, std::milli>(c - b).count());
    rt.push_back(t1.back() / t2.back());
  }
  double diff = 0;
  for (size_t i = 0; i < n; i++) diff = std::max(diff, (double)std::fabs(y1[i] - y2[i]));
  std::sort(t1.begin(), t1.end());
  std::sort(t2.begin(), t2.end());
  std::sort(rt.begin(), rt.end());
  printf(
      "%s T=%lld R=%lld: row kernel %.2f ms, blocked %.2f ms, ratio %.3f "
      "[%.2f..%.2f], max|dy| %.1e\n",
      argv[1], (long long)T, (long long)R, t1[reps / 2], t2[reps / 2], rt[reps / 2], rt[0], rt.back(), diff);
  // backward: both from the row kernel's y and lse, dy fresh per run
  float *dy = buffer(n), *g1 = buffer(n), *g2 = buffer(n), *dq1 = buffer(n), *dk1 = buffer(n), *dv1 = buffer(n), *dq2 = buffer(n),
        *dk2 = buffer(n), *dv2 = buffer(n);
  for (size_t i = 0; i < n; i++) dy[i] = nd(g);
  t1.clear(), t2.clear(), rt.clear();
  for (int rep = 0; rep < reps; rep++) {
    std::memcpy(g1, dy, n * 4), std::memcpy(g2, dy, n * 4), std::memset(dk1, 0, n * 4), std::memset(dk2, 0, n * 4);
    auto a = Clock::now();
    kernels::mix_backward_cpu<float>(pd, pb, q, k, v, nullptr, nullptr, y1, l1, g1, dq1, dk1, dv1, nullptr, nullptr);
    auto b = Clock::now();
#pragma omp parallel
    {
      std::vector<float> acc, delta;
#pragma omp for schedule(dynamic, 1)
      for (int64_t h = 0; h < H; h++) {
        const int64_t o = h * T * D;
        head_backward(q + o, k + o, v + o, y1 + o, l1 + h * T, g2 + o, dq2 + o, dk2 + o, dv2 + o, T, f, R, (float)pb.scale, acc, delta);
      }
    }
    auto c = Clock::now();
    t1.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    t2.push_back(std::chrono::duration<double, std::milli>(c - b).count());
    rt.push_back(t1.back() / t2.back());
  }
  double dd = 0, mag = 0;
  for (size_t i = 0; i < n; i++) {
    dd = std::max({dd, double(std::fabs(dq1[i] - dq2[i])), double(std::fabs(dk1[i] - dk2[i])), double(std::fabs(dv1[i] - dv2[i]))});
    mag = std::max({mag, double(std::fabs(dq1[i])), double(std::fabs(dk1[i]))});
  }
  std::sort(t1.begin(), t1.end());
  std::sort(t2.begin(), t2.end());
  std::sort(rt.begin(), rt.end());
  printf("%s T=%lld R=%lld backward: row kernel %.2f ms, blocked %.2f ms, ratio %.3f [%.2f..%.2f], max|d(dq,dk,dv)| %.1e (of %.1e)\n",
         argv[1], (long long)T, (long long)R, t1[reps / 2], t2[reps / 2], rt[reps / 2], rt[0], rt.back(), dd, mag);
}
