// CPU kernels of the mixing op: forward, backward and the decode step.
//
// Each (sequence, head) pair is one unit of work, run by one thread; inside a unit rows are
// processed in order (forward) or in reverse (backward), with the head width as the inner,
// vectorized loop. Coefficients are never stored: forward keeps one log-sum-exp per row and
// backward recomputes the scores, so memory is O(n) per head whatever the support.
//
// Backward scatters instead of gathering over the transposed pattern: processing rows m in
// decreasing order, g_m is final once every later row has added beta_mi * g_m into it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "tokmix/kernels.h"

namespace tokmix::kernels {
namespace {

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
  auto side = [&](const SideDesc& s, bool is_b) -> int64_t {
    switch (s.kind) {
      case SupportKind::Self: return 1;
      case SupportKind::Window: return s.window > 0 ? std::min<int64_t>(s.window, n) : n;
      case SupportKind::Offsets:
      case SupportKind::Lattice: return s.count;
      default: return 0;
    }
    (void)is_b;
  };
  return side(pat.A, false) + side(pat.B, true) + 1;
}

template <class T>
inline void scores(const MixProblem& pb, const RowEntries& re, const T* qi, const T* kbase, int64_t kst,
                   const T* bias_h, const T* gate_h, T* s) {
  const int64_t ne = re.na + re.nb;
  const T scale = static_cast<T>(pb.scale);
  if (pb.mode == Mode::Softmax) {
    for (int64_t e = 0; e < ne; ++e) s[e] = scale * dot(qi, kbase + re.pos[e] * kst, pb.Dk);
  } else {
    for (int64_t e = 0; e < ne; ++e) s[e] = dot(qi, gate_h + int64_t(re.lvl[e]) * pb.Dk, pb.Dk);
  }
  if (bias_h)
    for (int64_t e = 0; e < ne; ++e) s[e] += bias_h[re.lvl[e]];
}

}  // namespace

template <class T>
void mix_forward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v, const T* bias,
                     const T* gate_w, T* y, T* lse) {
  const int64_t units = pb.num_units();
  const int64_t cap = max_entries(pat, pb.T);
#pragma omp parallel
  {
    RowEntries re;
    re.reserve(cap);
    std::vector<T> s(cap), acc(pb.Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const Unit un = unit_of(pb, u);
      const T* qb = q + un.off_q;
      const T* kb = k + un.off_k;
      const T* vb = v + un.off_v;
      T* yb = y + un.off_y;
      const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
      const T* gate_h = gate_w ? gate_w + un.h * pb.levels * pb.Dk : nullptr;
      const T gamma = static_cast<T>(pb.gamma);
      for (int64_t i = 0; i < un.n; ++i) {
        re.collect(pat, i);
        const int64_t ne = re.na + re.nb;
        scores(pb, re, qb + i * pb.sq.st, kb, pb.sk.st, bias_h, gate_h, s.data());
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t e = 0; e < ne; ++e) mx = std::max(mx, s[e]);
        T sum = 0;
        for (int64_t e = 0; e < ne; ++e) {
          s[e] = std::exp(s[e] - mx);
          sum += s[e];
        }
        const T inv = T(1) / sum;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t e = 0; e < re.na; ++e) axpy(acc.data(), s[e] * inv, vb + re.pos[e] * pb.sv.st, pb.Dv);
        for (int64_t e = re.na; e < ne; ++e) axpy(acc.data(), gamma * s[e] * inv, yb + re.pos[e] * pb.sy.st, pb.Dv);
        std::memcpy(yb + i * pb.sy.st, acc.data(), sizeof(T) * pb.Dv);
        lse[un.lse_off + i] = mx + std::log(sum);
      }
    }
  }
}

template <class T>
void mix_backward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v, const T* bias,
                      const T* gate_w, const T* y, const T* lse, const T* dy, T* dq, T* dk, T* dv, T* dbias_units,
                      T* dgate_units) {
  const int64_t units = pb.num_units();
  const int64_t cap = max_entries(pat, pb.T);
#pragma omp parallel
  {
    RowEntries re;
    re.reserve(cap);
    std::vector<T> p(cap), dp(cap), G;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const Unit un = unit_of(pb, u);
      const T* qb = q + un.off_q;
      const T* kb = k + un.off_k;
      const T* vb = v + un.off_v;
      const T* yb = y + un.off_y;
      T* dqb = dq + un.off_q;
      T* dkb = dk ? dk + un.off_k : nullptr;
      T* dvb = dv + un.off_v;
      const T* bias_h = bias ? bias + un.h * pb.levels : nullptr;
      const T* gate_h = gate_w ? gate_w + un.h * pb.levels * pb.Dk : nullptr;
      T* db = dbias_units ? dbias_units + u * pb.levels : nullptr;
      T* dg = dgate_units ? dgate_units + u * pb.levels * pb.Dk : nullptr;
      const T gamma = static_cast<T>(pb.gamma);
      const T scale = static_cast<T>(pb.scale);
      const int64_t Dv = pb.Dv, Dk = pb.Dk;
      // G holds g = (I - B)^{-T} dy, row-contiguous; filled from dy, completed by scatter.
      G.assign(un.n * Dv, T(0));
      for (int64_t i = 0; i < un.n; ++i) std::memcpy(&G[i * Dv], dy + un.off_y + i * pb.sy.st, sizeof(T) * Dv);
      for (int64_t m = un.n - 1; m >= 0; --m) {
        re.collect(pat, m);
        const int64_t ne = re.na + re.nb;
        const T* qm = qb + m * pb.sq.st;
        const T* gm = &G[m * Dv];
        scores(pb, re, qm, kb, pb.sk.st, bias_h, gate_h, p.data());
        const T l = lse[un.lse_off + m];
        T delta = 0;
        for (int64_t e = 0; e < ne; ++e) {
          p[e] = std::exp(p[e] - l);
          const bool isb = e >= re.na;
          const T* src = isb ? yb + re.pos[e] * pb.sy.st : vb + re.pos[e] * pb.sv.st;
          dp[e] = (isb ? gamma : T(1)) * dot(gm, src, Dv);
          delta += p[e] * dp[e];
        }
        T* dqm = dqb + m * pb.sq.st;
        for (int64_t e = 0; e < ne; ++e) {
          const T ds = p[e] * (dp[e] - delta);
          const int64_t j = re.pos[e];
          if (pb.mode == Mode::Softmax) {
            axpy(dqm, scale * ds, kb + j * pb.sk.st, Dk);
            axpy(dkb + j * pb.sk.st, scale * ds, qm, Dk);
          } else {
            axpy(dqm, ds, gate_h + int64_t(re.lvl[e]) * Dk, Dk);
            axpy(dg + int64_t(re.lvl[e]) * Dk, ds, qm, Dk);
          }
          if (db) db[re.lvl[e]] += ds;
          if (e < re.na)
            axpy(dvb + j * pb.sv.st, p[e], gm, Dv);
          else
            axpy(&G[j * Dv], gamma * p[e], gm, Dv);
        }
      }
    }
  }
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

#define TOKMIX_INSTANTIATE(T)                                                                                         \
  template void mix_forward_cpu<T>(const PatternDesc&, const MixProblem&, const T*, const T*, const T*, const T*,   \
                                   const T*, T*, T*);                                                                \
  template void mix_backward_cpu<T>(const PatternDesc&, const MixProblem&, const T*, const T*, const T*, const T*,  \
                                    const T*, const T*, const T*, const T*, T*, T*, T*, T*, T*);                     \
  template void decode_step_cpu<T>(const PatternDesc&, const DecodeProblem&, const T*, const T*, const T*, const T*, \
                                   const T*, T*, T*, T*, T*, T*);
TOKMIX_INSTANTIATE(float)
TOKMIX_INSTANTIATE(double)

}  // namespace tokmix::kernels
