// CPU kernels of the mixing op: forward, backward and the decode step.
//
// Each (sequence, head) pair is one unit of work, run by one thread; inside a unit rows are
// processed in order (forward) or in reverse (backward), with the head width as the inner,
// vectorized loop. Coefficients are never stored: forward keeps one log-sum-exp per row and
// backward recomputes the scores, so memory is O(n) per head whatever the support.
//
// Backward scatters instead of gathering over the transposed pattern: processing rows m in
// decreasing order, g_m is final once every later row has added beta_mi * g_m into it.
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tokmix/kernels.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace tokmix::kernels {
namespace {

// Head rows of D floats held in vector registers (fp32 fast path). GCC's own vectorisation of
// the per-entry dot products used gathers across entries and a serial scalar reduction; the
// explicit form keeps q_i (or the output accumulator) in registers for the whole row.
#if defined(__AVX512F__)
using vf = __m512;
constexpr int kW = 16;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int kW = 8;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#else
constexpr int kW = 0;
#endif

template <class T, int D>
constexpr bool kSimdRow = kW > 0 && std::is_same<T, float>::value && D > 0 && D % (kW > 0 ? kW : 1) == 0;

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
template <int D>
struct Row {
  static constexpr int N = D / kW;
  vf r[N];
  inline void load(const float* p) {
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) r[v] = vload(p + v * kW);
  }
  inline void zero() {
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) r[v] = vzero();
  }
  inline float dot(const float* p) const {
    vf a0 = vzero(), a1 = vzero();
#pragma GCC unroll 16
    for (int v = 0; v < N; v += 2) {
      a0 = vfma(r[v], vload(p + v * kW), a0);
      if (v + 1 < N) a1 = vfma(r[v + 1], vload(p + (v + 1) * kW), a1);
    }
    return vsum(vadd(a0, a1));
  }
  inline void fma(float c, const float* p) {  // r += c * p
    const vf cv = vset1(c);
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) r[v] = vfma(cv, vload(p + v * kW), r[v]);
  }
  inline void store(float* p) const {
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) vstore(p + v * kW, r[v]);
  }
  inline void scaled_store(float* dst, float c) const {  // dst = c * r
    const vf cv = vset1(c);
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) vstore(dst + v * kW, vmul(cv, r[v]));
  }
  inline void axpy_into(float* dst, float c) const {  // dst += c * r
    const vf cv = vset1(c);
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) vstore(dst + v * kW, vfma(cv, r[v], vload(dst + v * kW)));
  }
};
#else
template <int D>
struct Row {  // unused: kSimdRow is false without a vector ISA
  inline void load(const float*) {}
  inline void zero() {}
  inline float dot(const float*) const { return 0; }
  inline void fma(float, const float*) {}
  inline void store(float*) const {}
  inline void scaled_store(float*, float) const {}
  inline void axpy_into(float*, float) const {}
};
#endif

template <class T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

template <class T>
inline void axpy(T* __restrict y, T alpha, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

struct Unit {
  int64_t off_q, off_k, off_v, off_y;  // element offset of the unit's row 0, per tensor
  int64_t n;                           // rows
  int64_t h;
  int64_t lse_off;                     // offset of the unit's row 0 in lse ([B*H or N*H] x T)
  int64_t b, t0;                       // batch row and first token of the unit
};

inline Unit unit_of(const MixProblem& pb, int64_t u) {
  const int64_t h = u % pb.H, s = u / pb.H;
  int64_t b = s, t0 = 0, n = pb.T;
  if (pb.cu_seqlens) {
    b = 0;
    t0 = pb.cu_seqlens[s];
    n = pb.cu_seqlens[s + 1] - t0;
  }
  Unit un;
  un.off_q = b * pb.sq.sb + t0 * pb.sq.st + h * pb.sq.sh;
  un.off_k = b * pb.sk.sb + t0 * pb.sk.st + h * pb.sk.sh;
  un.off_v = b * pb.sv.sb + t0 * pb.sv.st + h * pb.sv.sh;
  un.off_y = b * pb.sy.sb + t0 * pb.sy.st + h * pb.sy.sh;
  un.n = n;
  un.h = h;
  un.b = b;
  un.t0 = t0;
  // lse is [batch, H, T] (packed: [1, H, T]) so a unit's rows are contiguous
  un.lse_off = (b * pb.H + h) * pb.T + t0;
  return un;
}

// Entries of one row: A entries first, then B entries.
struct RowEntries {
  std::vector<int64_t> pos;
  std::vector<int32_t> lvl;
  int64_t na = 0, nb = 0;
  void reserve(int64_t n) {
    pos.resize(n);
    lvl.resize(n);
  }
  void collect(const PatternDesc& pat, int64_t i) {
    int64_t c = 0;
    na = visit_side(pat.A, false, i, [&](int64_t p, int32_t l) { pos[c] = p; lvl[c] = l; ++c; });
    nb = visit_side(pat.B, true, i, [&](int64_t p, int32_t l) { pos[c] = p; lvl[c] = l; ++c; });
  }
};

int64_t max_entries(const PatternDesc& pat, int64_t n) {
  // Upper bound of |SA(i)| + |SB(i)| over i < n, from the descriptor alone.
  auto side = [&](const SideDesc& s) -> int64_t {
    switch (s.kind) {
      case SupportKind::Self: return 1;
      case SupportKind::Window: return s.window > 0 ? std::min<int64_t>(s.window, n) : n;
      case SupportKind::Offsets:
      case SupportKind::Lattice: return s.count;
      default: return 0;
    }
  };
  return side(pat.A) + side(pat.B) + 1 + 16;  // + padding for whole-vector loops
}

// exp over an array. float: 2^x with a degree-7 polynomial (relative error ~1e-7, below the
// float rounding of the sums it feeds), vectorised by hand: the libm call per entry cost more
// than a row's dot products at D = 64, and GCC does not vectorise the bit-level scaling.
inline float exp_poly(float f) {  // e^f for f in [-ln2/2, ln2/2]
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  return p * f + 1.f;
}
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
inline vf vexp_shifted(vf x, vf shift) {
  vf t = vfma(vadd(x, shift), vset1(1.4426950408889634f), vzero());
#if defined(__AVX512F__)
  t = _mm512_max_ps(t, vset1(-126.f));
  const vf fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm512_mul_ps(_mm512_sub_ps(t, fi), vset1(0.6931471805599453f));
#else
  t = _mm256_max_ps(t, vset1(-126.f));
  const vf fi = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm256_mul_ps(_mm256_sub_ps(t, fi), vset1(0.6931471805599453f));
#endif
  vf p = vset1(1.f / 5040.f);
  p = vfma(p, f, vset1(1.f / 720.f));
  p = vfma(p, f, vset1(1.f / 120.f));
  p = vfma(p, f, vset1(1.f / 24.f));
  p = vfma(p, f, vset1(1.f / 6.f));
  p = vfma(p, f, vset1(0.5f));
  p = vfma(p, f, vset1(1.f));
  p = vfma(p, f, vset1(1.f));
#if defined(__AVX512F__)
  return _mm512_scalef_ps(p, fi);
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#endif
}
#endif
inline void exp_inplace(float* x, int64_t n, float shift) {
  int64_t e = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // whole vectors: buffers are padded to a multiple of kW, lanes past n are never read
  const vf sh = vset1(-shift);
  for (; e < n; e += kW) vstore(x + e, vexp_shifted(vload(x + e), sh));
#endif
  for (; e < n; ++e) {
    float t = (x[e] - shift) * 1.4426950408889634f;
    t = t < -126.f ? -126.f : t;
    const float fi = std::nearbyint(t);
    x[e] = std::ldexp(exp_poly((t - fi) * 0.6931471805599453f), static_cast<int>(fi));
  }
}
inline void exp_inplace(double* x, int64_t n, double shift) {
  for (int64_t e = 0; e < n; ++e) x[e] = std::exp(x[e] - shift);
}

// Prefetch the rows that the entries of row i +/- dist will touch: for translation-invariant
// patterns row i + dist reads exactly pos + dist, for the lattice nearly. Far levels are
// otherwise each a separate stream, more than the hardware prefetchers follow.
template <class T>
inline void prefetch_row(const T* base, int64_t row, int64_t stride, int64_t width, int64_t n) {
  if (row < 0 || row >= n) return;
  const char* p = reinterpret_cast<const char*>(base + row * stride);
  for (int64_t b = 0; b < width * int64_t(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 3);
}
#ifndef PF
#define PF 6
#endif
constexpr int64_t kPrefetchRows = PF;
constexpr int64_t kNearRows = 32;

// Blocked form for A = {i}, B = offsets (perf-notes v22). The row kernels read a far source row
// once per (row, level); a block of R rows reads each far source once, in one walk over j < a
// that serves every (row, level) pair of the block landing on j. The plan says which units run in
// blocks and how many rows a block has, from measurements against the row kernels in one process: the forward gains for offsets whose levels beyond a block lie
// close together (sq1: 1.4-2.9x from T = 2048; pow2, an octave apart, not: 0.98-1.10x); the
// backward gains for every offset list from T = 1024 with blocks of T / 8 (pow2 1.0-1.5x at head
// width 64 and more, sq1 1.1-4x, more at longer T).
struct BlockedPlan {
  bool applies = false;  // A = {i}, B = offsets, softmax, float32
  int64_t forced = -1;   // TOKMIX_CPU_BLOCK_ROWS (tests, measurements): R for every unit longer than R; 0: off
  const int64_t* f = nullptr;  // B's offsets
  int32_t count = 0;
  int64_t L = 0;  // offsets below T
  int64_t W = 0;  // row stride of the score table: L + 1 rounded up to whole vectors

  // the levels a unit of n rows uses: offsets f < n
  int64_t levels_below(int64_t n) const {
    int64_t l = 0;
    while (l < count && f[l] < n) ++l;
    return l;
  }

  // most levels from R on lie less than R / 2 from the next
  bool close_levels(int64_t R, int64_t n) const {
    int64_t far = 0, close = 0;
    for (int64_t l = 0; l < L && f[l] < n; ++l) {
      if (f[l] < R) continue;
      ++far;
      if (l + 1 < L && f[l + 1] < n && f[l + 1] - f[l] < R / 2) ++close;
    }
    return far >= 8 && 2 * close >= far;
  }
  int64_t forward_rows(int64_t n) const {  // 0: the row kernel
    if (!applies) return 0;
    if (forced >= 0) return forced > 0 && n > forced ? forced : 0;
    if (n < 2048) return 0;
    const int64_t R = std::min<int64_t>(2048, std::max<int64_t>(512, n / 4));
    return close_levels(R, n) ? R : 0;
  }
  int64_t backward_rows(int64_t n, int64_t D) const {
    if (!applies) return 0;
    if (forced >= 0) return forced > 0 && n > forced ? forced : 0;
    if (n < 1024) return 0;
    const int64_t R = std::min<int64_t>(4096, std::max<int64_t>(256, n / 8));
    // levels far apart (pow2) gain only with wide rows: 0.89-0.98x at D = 16, 0.94x at 32 (T = 4096)
    if (D < 64 && !close_levels(R, n)) return 0;
    return R;
  }
};

template <class T>
BlockedPlan blocked_plan(const PatternDesc& pat, const MixProblem& pb) {
  BlockedPlan bp;
  bp.applies = std::is_same<T, float>::value && pb.mode == Mode::Softmax && pat.A.kind == SupportKind::Self &&
               pat.B.kind == SupportKind::Offsets;
  if (!bp.applies) return bp;
  if (const char* e = std::getenv("TOKMIX_CPU_BLOCK_ROWS")) bp.forced = std::max<int64_t>(0, std::atoll(e));
  bp.f = pat.B.f;
  bp.count = pat.B.count;
  bp.L = bp.levels_below(pb.T);
  const int64_t w = kW > 0 ? kW : 1;
  bp.W = (bp.L + 1 + w - 1) / w * w;
  return bp;
}

// Per thread, sized for the largest block it has run.
// Per thread, sized for the largest block it has run: the forward's score table (R x W), the
// block's accumulators (the mix, or dq), and the backward's per-row deltas and per-source pairs.
template <class T>
struct BlockedScratch {
  std::vector<T> S, acc, delta, ps, pdp;
  void ensure(int64_t R, int64_t W, int64_t D, bool scores) {  // scores: the forward's table
    if (scores && int64_t(S.size()) < R * W) S.resize(R * W);
    if (int64_t(acc.size()) < R * D) acc.resize(R * D);
    if (int64_t(delta.size()) < R) delta.resize(R);
    if (int64_t(ps.size()) < W + 16) ps.resize(W + 16), pdp.resize(W + 16);
  }
};

// The walk of a block [a, a + Rb) over its far sources: fn(j, lo, hi) for each source j < a,
// descending, that a row of the block reads at a level in [lo, hi) (row j + f[l] - a; its levels
// are far: f[l] > that row). The windows [lo, hi) only move up as j goes down.
template <class Fn>
inline void walk_far_sources(const int64_t* f, int64_t L, int64_t a, int64_t Rb, Fn&& fn) {
  int64_t lo = 0, hi = 0;
  for (int64_t j = a - 1; j >= 0; --j) {
    while (lo < L && f[lo] < a - j) ++lo;
    while (hi < L && f[hi] < a - j + Rb) ++hi;
    if (lo >= L) break;  // farther sources are beyond every level
    if (lo < hi) fn(j, lo, hi);
  }
}

// The work of one (sequence, head) unit. DK/DV > 0 fix the head widths at compile time (the
// common widths), so that the accumulators of a row live in registers; 0 reads them from pb.
template <class T, int DK, int DV>
struct UnitKernel {
  const PatternDesc& pat;
  const MixProblem& pb;
  RowEntries& re;
  T* s;  // scores / probabilities of the current row
  T* dp;

  int64_t dk() const { return DK > 0 ? DK : pb.Dk; }
  int64_t dv() const { return DV > 0 ? DV : pb.Dv; }

  // Scores of row i's entries (s_e), returns the entry count.
  inline int64_t row_scores(int64_t i, const T* qi, const T* kb, int64_t kst, const T* bias_h, const T* gate_h) {
    re.collect(pat, i);
    const int64_t ne = re.na + re.nb, Dk = dk();
    const T scale = static_cast<T>(pb.scale);
    if constexpr (kSimdRow<T, DK>) {
      Row<DK> qr;
      qr.load(qi);
      if (pb.mode == Mode::Softmax) {
        for (int64_t e = 0; e < ne; ++e) s[e] = scale * qr.dot(kb + re.pos[e] * kst);
      } else {
        for (int64_t e = 0; e < ne; ++e) s[e] = qr.dot(gate_h + int64_t(re.lvl[e]) * Dk);
      }
    } else if (pb.mode == Mode::Softmax) {
      for (int64_t e = 0; e < ne; ++e) {
        const T* kj = kb + re.pos[e] * kst;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < Dk; ++d) acc += qi[d] * kj[d];
        s[e] = scale * acc;
      }
    } else {
      for (int64_t e = 0; e < ne; ++e) {
        const T* w = gate_h + int64_t(re.lvl[e]) * Dk;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < Dk; ++d) acc += qi[d] * w[d];
        s[e] = acc;
      }
    }
    if (bias_h)
      for (int64_t e = 0; e < ne; ++e) s[e] += bias_h[re.lvl[e]];
    return ne;
  }

  void forward(const Unit& un, const T* q, const T* k, const T* v, const T* bias, const T* gate_w, T* y, T* lse) {
    const T* qb = q + un.off_q;
    const T* kb = k + un.off_k;
    const T* vb = v + un.off_v;
    T* yb = y + un.off_y;
    const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
    const T* gate_h = gate_w ? gate_w + un.h * pb.levels * pb.Dk : nullptr;
    const T gamma = static_cast<T>(pb.gamma);
    const int64_t Dv = dv(), Dk = dk();
    const bool softmax = pb.mode == Mode::Softmax;
    alignas(64) T acc_fixed[DV > 0 ? DV : 1];
    std::vector<T> acc_dyn(DV > 0 ? 0 : Dv);
    T* acc = DV > 0 ? acc_fixed : acc_dyn.data();
    for (int64_t i = 0; i < un.n; ++i) {
      const int64_t ne = row_scores(i, qb + i * pb.sq.st, kb, pb.sk.st, bias_h, gate_h);
      T mx = s[0];
      for (int64_t e = 1; e < ne; ++e) mx = s[e] > mx ? s[e] : mx;
      exp_inplace(s, ne, mx);
      T sum = 0;
      for (int64_t e = 0; e < ne; ++e) sum += s[e];
      const T inv = T(1) / sum;
      auto prefetch_next = [&](int64_t e) {
        const int64_t j = re.pos[e];
        if (i - j < kNearRows) return;  // recent rows are still in L1/L2
        if (e >= re.na) {
          prefetch_row(yb, j + kPrefetchRows, pb.sy.st, Dv, i);
        } else if (j != i) {
          prefetch_row(vb, j + kPrefetchRows, pb.sv.st, Dv, un.n);
        }
        if (softmax && j != i) prefetch_row(kb, j + kPrefetchRows, pb.sk.st, Dk, un.n);
      };
      T* yi = yb + i * pb.sy.st;
      if constexpr (kSimdRow<T, DV>) {
        Row<DV> ar;
        ar.zero();
        // B entries farthest first: y_{i-1}, written by the previous row, is the last term, so
        // the row's other terms need not wait for it
        for (int64_t x = 0; x < ne; ++x) {
          const int64_t e = x < re.na ? x : ne - 1 - (x - re.na);
          const bool isb = e >= re.na;
          prefetch_next(e);
          ar.fma((isb ? gamma : T(1)) * s[e] * inv, isb ? yb + re.pos[e] * pb.sy.st : vb + re.pos[e] * pb.sv.st);
        }
        ar.store(yi);
      } else {
        for (int64_t d = 0; d < Dv; ++d) acc[d] = 0;
        for (int64_t e = 0; e < ne; ++e) {
          const int64_t j = re.pos[e];
          const bool isb = e >= re.na;
          const T c = (isb ? gamma : T(1)) * s[e] * inv;
          const T* src = isb ? yb + j * pb.sy.st : vb + j * pb.sv.st;
          prefetch_next(e);
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) acc[d] += c * src[d];
        }
#pragma omp simd
        for (int64_t d = 0; d < Dv; ++d) yi[d] = acc[d];
      }
      lse[un.lse_off + i] = mx + std::log(sum);
    }
  }

  // Forward in blocks of R rows (perf-notes v22): the block's near scores row by row, one walk
  // over the sources j < a for its far scores, each row's softmax, a second walk mixing y_j into
  // the block's accumulators, then the near entries row by row (they need the rows just written).
  void forward_blocked(const Unit& un, const T* q, const T* k, const T* v, const T* bias, T* y, T* lse, int64_t R, const BlockedPlan& bp,
                       BlockedScratch<T>& bs) {
    if constexpr (kSimdRow<T, DK> && kSimdRow<T, DV>) {
      const T* qb = q + un.off_q;
      const T* kb = k + un.off_k;
      const T* vb = v + un.off_v;
      T* yb = y + un.off_y;
      const int64_t qs = pb.sq.st, ks = pb.sk.st, vs = pb.sv.st, ys = pb.sy.st, n = un.n, W = bp.W;
      bs.ensure(R, W, DV, true);
      const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
      const int64_t* f = pat.B.f;
      const int64_t L = bp.levels_below(n);
      const int32_t lvA = pat.A.level_base, lvB = pat.B.level_base;
      const T gamma = static_cast<T>(pb.gamma), scale = static_cast<T>(pb.scale);
      T* S = bs.S.data();
      T* acc = bs.acc.data();
      int64_t nb_row = 0;  // levels with f <= row, for the softmax pass
      for (int64_t a = 0; a < n; a += R) {
        const int64_t Rb = std::min(R, n - a);
        for (int64_t r = 0; r < Rb; ++r) {
          const int64_t i = a + r;
          Row<DK> qr;
          qr.load(qb + i * qs);
          T* sr = S + r * W;
          sr[0] = scale * qr.dot(kb + i * ks);
          for (int64_t l = 0; l < L && f[l] <= r; ++l) sr[1 + l] = scale * qr.dot(kb + (i - f[l]) * ks);
        }
        walk_far_sources(f, L, a, Rb, [&](int64_t j, int64_t lo, int64_t hi) {
          Row<DK> kr;
          kr.load(kb + j * ks);
          for (int64_t l = lo; l < hi; ++l) {
            const int64_t r = j + f[l] - a;
            S[r * W + 1 + l] = scale * kr.dot(qb + (a + r) * qs);
          }
        });
        for (int64_t r = 0; r < Rb; ++r) {
          const int64_t i = a + r;
          while (nb_row < L && f[nb_row] <= i) ++nb_row;
          const int64_t ne = 1 + nb_row;
          T* sr = S + r * W;
          if (bias_h) {
            sr[0] += bias_h[lvA];
            for (int64_t l = 0; l < nb_row; ++l) sr[1 + l] += bias_h[lvB + l];
          }
          T mx = sr[0];
          for (int64_t e = 1; e < ne; ++e) mx = sr[e] > mx ? sr[e] : mx;
          exp_inplace(sr, ne, mx);
          T sum = 0;
          for (int64_t e = 0; e < ne; ++e) sum += sr[e];
          const T inv = T(1) / sum, ginv = gamma * inv;
          sr[0] *= inv;
          for (int64_t e = 1; e < ne; ++e) sr[e] *= ginv;  // the coefficients of the mix
          lse[un.lse_off + i] = mx + std::log(sum);
        }
        std::fill(acc, acc + Rb * DV, T(0));
        walk_far_sources(f, L, a, Rb, [&](int64_t j, int64_t lo, int64_t hi) {
          Row<DV> yr;
          yr.load(yb + j * ys);
          for (int64_t l = lo; l < hi; ++l) {
            const int64_t r = j + f[l] - a;
            yr.axpy_into(acc + r * DV, S[r * W + 1 + l]);
          }
        });
        for (int64_t r = 0; r < Rb; ++r) {
          const int64_t i = a + r;
          const T* sr = S + r * W;
          int64_t near = 0;
          while (near < L && f[near] <= r) ++near;
          Row<DV> ar;
          ar.load(acc + r * DV);
          ar.fma(sr[0], vb + i * vs);
          for (int64_t l = near - 1; l >= 0; --l) ar.fma(sr[1 + l], yb + (i - f[l]) * ys);  // y_{i-1} last, as in forward()
          ar.store(yb + i * ys);
        }
      }
    }
  }

  // Backward in the same blocks, last block first. A row's g_m is final when its block is reached
  // (later blocks added into it during their walks, later rows of the block before it), so: the
  // block's own entries (the row itself and sources inside the block) row by row, descending;
  // then one walk over the sources j < a that takes every far pair of j, with
  // sum_e p_e dp_e = g_m . y_m (the forward's output) for ds, dk_j and g_j summed while j is
  // walked and written once, dq_m summed in the block and stored at the end.
  void backward_blocked(const Unit& un, int64_t u, const T* q, const T* k, const T* v, const T* bias, const T* y, const T* lse, T* dy,
                        T* dq, T* dkp, T* dvp, T* dbias_units, int64_t R, const BlockedPlan& bp, BlockedScratch<T>& bs) {
    if constexpr (kSimdRow<T, DK> && kSimdRow<T, DV>) {
      const T* qb = q + un.off_q;
      const T* kb = k + un.off_k;
      const T* vb = v + un.off_v;
      const T* yb = y + un.off_y;
      T* Gb = dy + un.off_y;
      T* dqb = dq + un.off_q;
      T* dkb = dkp + un.off_k;
      T* dvb = dvp + un.off_v;
      const int64_t qs = pb.sq.st, ks = pb.sk.st, vs = pb.sv.st, ys = pb.sy.st, n = un.n;
      bs.ensure(R, bp.W, DK, false);
      const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
      T* db = dbias_units ? dbias_units + u * pb.levels : nullptr;
      const int64_t* f = pat.B.f;
      const int64_t L = bp.levels_below(n);
      const int32_t lvA = pat.A.level_base, lvB = pat.B.level_base;
      const T gamma = static_cast<T>(pb.gamma), scale = static_cast<T>(pb.scale);
      T* acc = bs.acc.data();
      T* delta = bs.delta.data();
      T* ps = bs.ps.data();
      T* pdp = bs.pdp.data();
      const T* lse_u = lse + un.lse_off;
      for (int64_t a = (n - 1) / R * R; a >= 0; a -= R) {
        const int64_t Rb = std::min(R, n - a);
        for (int64_t r = Rb - 1; r >= 0; --r) {
          const int64_t m = a + r;
          Row<DK> qr, dqr;
          Row<DV> gr;
          qr.load(qb + m * qs);
          gr.load(Gb + m * ys);
          dqr.zero();
          const T dl = gr.dot(yb + m * ys), lm = lse_u[m];
          delta[r] = dl;
          int64_t near = 0;
          while (near < L && f[near] <= r) ++near;
          ps[0] = scale * qr.dot(kb + m * ks) + (bias_h ? bias_h[lvA] : T(0)) - lm;
          pdp[0] = gr.dot(vb + m * vs);
          for (int64_t l = 0; l < near; ++l) {
            const int64_t j = m - f[l];
            ps[1 + l] = scale * qr.dot(kb + j * ks) + (bias_h ? bias_h[lvB + l] : T(0)) - lm;
            pdp[1 + l] = gamma * gr.dot(yb + j * ys);
          }
          exp_inplace(ps, 1 + near, T(0));
          {
            const T p = ps[0], ds = p * (pdp[0] - dl), c = scale * ds;
            dqr.fma(c, kb + m * ks);
            qr.axpy_into(dkb + m * ks, c);
            gr.scaled_store(dvb + m * vs, p);  // A = {i}: dv_m's one contribution
            if (db) db[lvA] += ds;
          }
          for (int64_t l = 0; l < near; ++l) {
            const int64_t j = m - f[l];
            const T p = ps[1 + l], ds = p * (pdp[1 + l] - dl), c = scale * ds;
            dqr.fma(c, kb + j * ks);
            qr.axpy_into(dkb + j * ks, c);
            gr.axpy_into(Gb + j * ys, gamma * p);
            if (db) db[lvB + l] += ds;
          }
          dqr.store(acc + r * DK);
        }
        walk_far_sources(f, L, a, Rb, [&](int64_t j, int64_t lo, int64_t hi) {
          // pair e is level lo + e, row j + f[lo + e] - a
          Row<DK> kr, dkr;
          Row<DV> yr, gjr;
          kr.load(kb + j * ks);
          yr.load(yb + j * ys);
          const int64_t np = hi - lo;
          for (int64_t e = 0; e < np; ++e) {
            const int64_t l = lo + e, m = j + f[l];
            ps[e] = scale * kr.dot(qb + m * qs) + (bias_h ? bias_h[lvB + l] : T(0)) - lse_u[m];
            pdp[e] = gamma * yr.dot(Gb + m * ys);
          }
          exp_inplace(ps, np, T(0));
          dkr.zero();
          gjr.zero();
          for (int64_t e = 0; e < np; ++e) {
            const int64_t l = lo + e, m = j + f[l], r = m - a;
            const T p = ps[e], ds = p * (pdp[e] - delta[r]), c = scale * ds;
            kr.axpy_into(acc + r * DK, c);
            dkr.fma(c, qb + m * qs);
            gjr.fma(gamma * p, Gb + m * ys);
            if (db) db[lvB + l] += ds;
          }
          dkr.axpy_into(dkb + j * ks, T(1));
          gjr.axpy_into(Gb + j * ys, T(1));
        });
        for (int64_t r = 0; r < Rb; ++r) std::memcpy(dqb + (a + r) * qs, acc + r * DK, DK * sizeof(T));
      }
    }
  }

  void backward(const Unit& un, int64_t u, const T* q, const T* k, const T* v, const T* bias, const T* gate_w, const T* y,
                const T* lse, T* dy, T* dq, T* dkp, T* dvp, T* dbias_units, T* dgate_units) {
    const T* qb = q + un.off_q;
    const T* kb = k + un.off_k;
    const T* vb = v + un.off_v;
    const T* yb = y + un.off_y;
    T* dqb = dq + un.off_q;
    T* dkb = dkp ? dkp + un.off_k : nullptr;
    T* dvb = dvp + un.off_v;
    const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
    const T* gate_h = gate_w ? gate_w + un.h * pb.levels * pb.Dk : nullptr;
    T* db = dbias_units ? dbias_units + u * pb.levels : nullptr;
    T* dg = dgate_units ? dgate_units + u * pb.levels * pb.Dk : nullptr;
    const T gamma = static_cast<T>(pb.gamma), scale = static_cast<T>(pb.scale);
    const int64_t Dv = dv(), Dk = dk();
    const bool softmax = pb.mode == Mode::Softmax;
    // g = (I - B)^{-T} dy is built in dy's own rows (the op's private copy): row m holds dy_m plus
    // what later rows scattered into it, final when m is reached. No copy of dy (a pass over
    // memory, which bounds this kernel with two threads).
    T* Gb = dy + un.off_y;
    const int64_t gst = pb.sy.st;
    // A = {i}: dv_m has one contribution, from row m itself, so it is stored, not added
    const bool dv_once = pat.A.kind == SupportKind::Self;
    alignas(64) T dq_fixed[DK > 0 ? DK : 1];
    std::vector<T> dq_dyn(DK > 0 ? 0 : Dk);
    T* dqa = DK > 0 ? dq_fixed : dq_dyn.data();
    for (int64_t m = un.n - 1; m >= 0; --m) {
      const T* qm = qb + m * pb.sq.st;
      const int64_t ne = row_scores(m, qm, kb, pb.sk.st, bias_h, gate_h);
      exp_inplace(s, ne, lse[un.lse_off + m]);
      const T* gm = Gb + m * gst;
      if constexpr (kSimdRow<T, DK> && kSimdRow<T, DV>) {
        if (softmax) {
          // q_m, g_m and the dq_m accumulator stay in registers for the whole row
          Row<DK> qr, dqr;
          Row<DV> gr;
          qr.load(qm);
          gr.load(gm);
          dqr.zero();
          T delta = 0;
          for (int64_t e = 0; e < ne; ++e) {
            const bool isb = e >= re.na;
            const T* src = isb ? yb + re.pos[e] * pb.sy.st : vb + re.pos[e] * pb.sv.st;
            dp[e] = (isb ? gamma : T(1)) * gr.dot(src);
            delta += s[e] * dp[e];
          }
          for (int64_t e = 0; e < ne; ++e) {
            const T p = s[e], ds = p * (dp[e] - delta), c = scale * ds;
            const int64_t j = re.pos[e];
            const bool isb = e >= re.na;
            if (m - j >= kNearRows) {
              const int64_t jn = j - kPrefetchRows;
              prefetch_row(kb, jn, pb.sk.st, Dk, un.n);
              prefetch_row(dkb, jn, pb.sk.st, Dk, un.n);
              if (isb) {
                prefetch_row(yb, jn, pb.sy.st, Dv, un.n);
                prefetch_row(Gb, jn, gst, Dv, un.n);
              }
            }
            dqr.fma(c, kb + j * pb.sk.st);
            qr.axpy_into(dkb + j * pb.sk.st, c);
            if (db) db[re.lvl[e]] += ds;
            if (isb)
              gr.axpy_into(Gb + j * gst, gamma * p);
            else if (dv_once)
              gr.scaled_store(dvb + j * pb.sv.st, p);
            else
              gr.axpy_into(dvb + j * pb.sv.st, p);
          }
          dqr.store(dqb + m * pb.sq.st);  // the only write to dq_m: no zero-fill needed
          continue;
        }
      }
      T delta = 0;
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t j = re.pos[e];
        const bool isb = e >= re.na;
        const T* src = isb ? yb + j * pb.sy.st : vb + j * pb.sv.st;
        T acc = 0;
        if constexpr (kSimdRow<T, DV>) {
          // g_m is re-read per entry from L1; a register copy would be the same loads
          Row<DV> gr;
          gr.load(gm);
          acc = gr.dot(src);
        } else {
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < Dv; ++d) acc += gm[d] * src[d];
        }
        dp[e] = (isb ? gamma : T(1)) * acc;
        delta += s[e] * dp[e];
      }
      for (int64_t d = 0; d < Dk; ++d) dqa[d] = 0;
      for (int64_t e = 0; e < ne; ++e) {
        const T p = s[e], ds = p * (dp[e] - delta);
        const int64_t j = re.pos[e];
        const bool isb = e >= re.na;
        if (m - j >= kNearRows) {  // rows that earlier rows (m - dist) will touch
          const int64_t jn = j - kPrefetchRows;
          if (softmax) {
            prefetch_row(kb, jn, pb.sk.st, Dk, un.n);
            prefetch_row(dkb, jn, pb.sk.st, Dk, un.n);
          }
          if (isb) {
            prefetch_row(yb, jn, pb.sy.st, Dv, un.n);
            prefetch_row(Gb, jn, gst, Dv, un.n);
          } else {
            prefetch_row(vb, jn, pb.sv.st, Dv, un.n);
            prefetch_row(dvb, jn, pb.sv.st, Dv, un.n);
          }
        }
        if (softmax && kSimdRow<T, DK>) {
          if constexpr (kSimdRow<T, DK>) {
            Row<DK> qr, dqr;
            qr.load(qm);
            dqr.load(dqa);
            const T c = scale * ds;
            dqr.fma(c, kb + j * pb.sk.st);
            dqr.store(dqa);
            qr.axpy_into(dkb + j * pb.sk.st, c);
          }
        } else if (softmax) {
          const T* kj = kb + j * pb.sk.st;
          T* dkj = dkb + j * pb.sk.st;
          const T c = scale * ds;
#pragma omp simd
          for (int64_t d = 0; d < Dk; ++d) {
            dqa[d] += c * kj[d];
            dkj[d] += c * qm[d];
          }
        } else {
          const T* w = gate_h + int64_t(re.lvl[e]) * Dk;
          T* dw = dg + int64_t(re.lvl[e]) * Dk;
#pragma omp simd
          for (int64_t d = 0; d < Dk; ++d) {
            dqa[d] += ds * w[d];
            dw[d] += ds * qm[d];
          }
        }
        if (db) db[re.lvl[e]] += ds;
        T* dst = isb ? Gb + j * gst : dvb + j * pb.sv.st;
        const T c = isb ? gamma * p : p;
        if (!isb && dv_once) {
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) dst[d] = c * gm[d];
        } else {
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) dst[d] += c * gm[d];
        }
      }
      T* dqm = dqb + m * pb.sq.st;
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) dqm[d] = dqa[d];
    }
  }
};

}  // namespace

void advise_huge_pages(void* p, size_t bytes) {
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~uintptr_t(kHugePage - 1),
                  e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t(kHugePage - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
}

// Calls fn.template operator()<DK, DV>() with the compile-time widths that match.
template <class Fn>
void with_widths(int64_t Dk, int64_t Dv, Fn&& fn) {
  if (Dk == Dv && Dk == 64) return fn(std::integral_constant<int, 64>{});
  if (Dk == Dv && Dk == 128) return fn(std::integral_constant<int, 128>{});
  if (Dk == Dv && Dk == 32) return fn(std::integral_constant<int, 32>{});
  if (Dk == Dv && Dk == 16) return fn(std::integral_constant<int, 16>{});
  return fn(std::integral_constant<int, 0>{});
}

// Copies one unit's rows of x (caller's [B, T, H, D]) into dst (the unit's rows, stride st);
// false if any value is NaN or Inf.
template <class T>
bool copy_unit_rows(const HeadCopy<T>& c, const Unit& un, int64_t D, T* dst, int64_t st) {
  const T* src = c.src + un.b * c.s.sb + un.t0 * c.s.st + un.h * c.s.sh;
  T acc = 0;
  for (int64_t t = 0; t < un.n; ++t) {
    T* w = dst + t * st;
    std::memcpy(w, src + t * c.s.st, sizeof(T) * D);  // faster than a copying loop here
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += w[d] * T(0);  // NaN or Inf anywhere turns the sum into NaN
  }
  return acc == acc;
}

template <class T>
void mix_forward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v, const T* bias,
                     const T* gate_w, T* y, T* lse, const HeadCopy<T>* copies) {
  const int64_t units = pb.num_units();
  const int64_t cap = max_entries(pat, pb.T);
  // the unit's own rows of q, k, v, copied just before it runs (see kernels.h)
  auto fill = [&](const Unit& un) {
    if (!copies) return true;
    bool ok = true;
    const int64_t off[3] = {un.off_q, un.off_k, un.off_v}, st[3] = {pb.sq.st, pb.sk.st, pb.sv.st},
                  D[3] = {pb.Dk, pb.Dk, pb.Dv};
    for (int i = 0; i < 3; ++i) {
      if (!copies[i].src) continue;
      if (!copy_unit_rows(copies[i], un, D[i], copies[i].dst + off[i], st[i])) {
        __atomic_store_n(copies[i].bad, true, __ATOMIC_RELAXED);  // several units may report
        ok = false;
      }
    }
    return ok;
  };
  with_widths(pb.Dk, pb.Dv, [&](auto W) {
    constexpr int D = decltype(W)::value;
    const BlockedPlan bp = blocked_plan<T>(pat, pb);
    const bool blocked = bp.applies && kSimdRow<T, D>;
#pragma omp parallel
    {
      RowEntries re;
      re.reserve(cap);
      std::vector<T> s(cap), dp;
      UnitKernel<T, D, D> kern{pat, pb, re, s.data(), nullptr};
      BlockedScratch<T> bs;
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) {
        const Unit un = unit_of(pb, u);
        if (!fill(un)) continue;
        const int64_t R = blocked ? bp.forward_rows(un.n) : 0;
        if (R > 0)
          kern.forward_blocked(un, q, k, v, bias, y, lse, R, bp, bs);
        else
          kern.forward(un, q, k, v, bias, gate_w, y, lse);
      }
    }
  });
}

template <class T>
void mix_backward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v, const T* bias,
                      const T* gate_w, const T* y, const T* lse, T* dy, T* dq, T* dk, T* dv, T* dbias_units,
                      T* dgate_units) {
  const int64_t units = pb.num_units();
  const int64_t cap = max_entries(pat, pb.T);
  with_widths(pb.Dk, pb.Dv, [&](auto W) {
    constexpr int D = decltype(W)::value;
    const BlockedPlan bp = blocked_plan<T>(pat, pb);
    const bool blocked = bp.applies && kSimdRow<T, D>;
#pragma omp parallel
    {
      RowEntries re;
      re.reserve(cap);
      std::vector<T> s(cap), dp(cap);
      UnitKernel<T, D, D> kern{pat, pb, re, s.data(), dp.data()};
      BlockedScratch<T> bs;
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) {
        const Unit un = unit_of(pb, u);
        const int64_t R = blocked ? bp.backward_rows(un.n, std::min(pb.Dk, pb.Dv)) : 0;
        if (R > 0)
          kern.backward_blocked(un, u, q, k, v, bias, y, lse, dy, dq, dk, dv, dbias_units, R, bp, bs);
        else
          kern.backward(un, u, q, k, v, bias, gate_w, y, lse, dy, dq, dk, dv, dbias_units, dgate_units);
      }
    }
  });
}

template <class T>
void decode_step_cpu(const PatternDesc& pat, const DecodeProblem& pb, const T* q, const T* k, const T* v, const T* bias,
                     const T* gate_w, T* kA, T* vA, T* kB, T* yB, T* y) {
  const int64_t units = pb.batch * pb.H;
  const int64_t Dk = pb.Dk, Dv = pb.Dv;
#pragma omp parallel for schedule(static) if (units * (pb.max_entries + 1) * (Dk + Dv) > 32768)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / pb.H, h = u % pb.H;
    const int64_t i = pb.pos[b];
    const T* qi = q + u * Dk;
    const T* ki = k + u * Dk;
    const T* vi = v + u * Dv;
    T* yi = y + u * Dv;
    const T* bias_h = bias ? bias + h * pb.levels : nullptr;
    const T* gate_h = gate_w ? gate_w + h * pb.levels * Dk : nullptr;
    T* kAu = kA ? kA + u * pb.capA * Dk : nullptr;
    T* vAu = vA ? vA + u * pb.capA * Dv : nullptr;
    T* kBu = kB ? kB + u * pb.capB * Dk : nullptr;
    T* yBu = yB ? yB + u * pb.capB * Dv : nullptr;
    // Row entries resolved to (key, value) pointers.
    thread_local std::vector<const T*> keys, vals;
    thread_local std::vector<int32_t> lvls;
    thread_local std::vector<T> s;
    keys.clear();
    vals.clear();
    lvls.clear();
    const int64_t na = visit_side(pat.A, false, i, [&](int64_t p, int32_t l) {
      if (p == i) {
        keys.push_back(ki);
        vals.push_back(vi);
      } else {
        const int64_t slot = p % pb.capA;
        keys.push_back(kAu + slot * Dk);
        vals.push_back(vAu + slot * Dv);
      }
      lvls.push_back(l);
    });
    int64_t e_b = 0;
    visit_side(pat.B, true, i, [&](int64_t p, int32_t l) {
      const int64_t slot = pb.b_slot_of ? pb.b_slot_of[b * pb.max_entries + e_b] : p % pb.capB;
      ++e_b;
      keys.push_back(kBu + slot * Dk);
      vals.push_back(yBu + slot * Dv);
      lvls.push_back(l);
    });
    const int64_t ne = static_cast<int64_t>(keys.size());
    s.resize(ne);
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t e = 0; e < ne; ++e) {
      T sc = pb.mode == Mode::Softmax ? static_cast<T>(pb.scale) * dot(qi, keys[e], Dk) : dot(qi, gate_h + int64_t(lvls[e]) * Dk, Dk);
      if (bias_h) sc += bias_h[lvls[e]];
      s[e] = sc;
      mx = std::max(mx, sc);
    }
    T sum = 0;
    for (int64_t e = 0; e < ne; ++e) {
      s[e] = std::exp(s[e] - mx);
      sum += s[e];
    }
    const T inv = T(1) / sum, gamma = static_cast<T>(pb.gamma);
    std::vector<T> acc(Dv, T(0));
    for (int64_t e = 0; e < ne; ++e) axpy(acc.data(), (e < na ? T(1) : gamma) * s[e] * inv, vals[e], Dv);
    std::memcpy(yi, acc.data(), sizeof(T) * Dv);
    // Store the new token where future rows will look for it (after all reads of this row).
    if (pb.new_a_slot && pb.new_a_slot[b] >= 0) {
      std::memcpy(kAu + pb.new_a_slot[b] * Dk, ki, sizeof(T) * Dk);
      std::memcpy(vAu + pb.new_a_slot[b] * Dv, vi, sizeof(T) * Dv);
    }
    if (pb.new_b_slot && pb.new_b_slot[b] >= 0) {
      std::memcpy(kBu + pb.new_b_slot[b] * Dk, ki, sizeof(T) * Dk);
      std::memcpy(yBu + pb.new_b_slot[b] * Dv, yi, sizeof(T) * Dv);
    }
  }
}

template <class T>
bool relayout_to_heads_cpu(const T* x, int64_t B, int64_t Tn, int64_t H, int64_t D, int64_t sb, int64_t st, int64_t sh, T* dst) {
  // Token-major traversal: each source row [H, D] is read once, contiguously.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (Tn + kBlock - 1) / kBlock;
  int bad = 0;
#pragma omp parallel for collapse(2) schedule(static) reduction(| : bad) if (B * Tn * H * D > 65536)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t tb = 0; tb < blocks; ++tb) {
      T acc = 0;
      for (int64_t t = tb * kBlock; t < std::min(Tn, (tb + 1) * kBlock); ++t)
        for (int64_t h = 0; h < H; ++h) {
          const T* r = x + b * sb + t * st + h * sh;
          T* w = dst + ((b * H + h) * Tn + t) * D;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) {
            w[d] = r[d];
            acc += r[d] * T(0);  // NaN or Inf anywhere turns the sum into NaN
          }
        }
      bad |= !(acc == acc);
    }
  return !bad;
}

#define TOKMIX_INSTANTIATE(T)                                                                                         \
  template void mix_forward_cpu<T>(const PatternDesc&, const MixProblem&, const T*, const T*, const T*, const T*,   \
                                   const T*, T*, T*, const HeadCopy<T>*);                                            \
  template void mix_backward_cpu<T>(const PatternDesc&, const MixProblem&, const T*, const T*, const T*, const T*,  \
                                    const T*, const T*, const T*, T*, T*, T*, T*, T*, T*);                           \
  template void decode_step_cpu<T>(const PatternDesc&, const DecodeProblem&, const T*, const T*, const T*, const T*, \
                                   const T*, T*, T*, T*, T*, T*);
TOKMIX_INSTANTIATE(float)
template bool relayout_to_heads_cpu<float>(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
template bool relayout_to_heads_cpu<double>(const double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*);
TOKMIX_INSTANTIATE(double)

}  // namespace tokmix::kernels
