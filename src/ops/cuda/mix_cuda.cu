// CUDA kernels of the mixing op: forward, backward and the decode step. No LibTorch here: raw
// pointers, a dtype tag and a cudaStream_t passed as void*. Arithmetic is float32 whatever the
// storage type (float32, bfloat16, float16); outputs are written in the storage type.
//
// Two solvers.
//  * Generic (every pattern): one block per (sequence, head), rows in order (backward: in
//    reverse), the head width across threads; scores recomputed in backward from the saved
//    log-sum-exp; g scattered row by row as on the CPU. Right for attention, windows, dense B.
//  * Chunked (A = self, B = offsets or lattice: first-order, recurrence:K, pow2, sq1, lattices):
//    the coefficients do not depend on y, so all scores, probabilities and, per chunk of C rows,
//    M_c = (I - B_cc)^{-1} are computed in parallel first. What stays sequential is one short
//    step per chunk: w = alpha*x + (taps that reach earlier chunks), y_c = M_c w, run by one
//    block per (sequence, head, slice of 8 channels) since channels are independent given the
//    coefficients. Backward runs the same chain on (I - B)^T with M_c^T, then the coefficient
//    gradients in parallel. Transposed taps are gathered for offsets (m = i + f(k)); for the
//    lattice, whose readers of a position form runs of consecutive rows, they are summed along
//    each run and added with one atomic per run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifndef TOKMIX_WITH_CUDA
#define TOKMIX_WITH_CUDA  // this file is the CUDA half of the seam, whatever the build says
#endif
#include "tokmix/kernels.h"

namespace tokmix::kernels {
namespace {

constexpr int kC = 64;                // rows per chunk
constexpr int kDS = 8;                // channels per chain block
constexpr int kChainThreads = kC * kDS;
constexpr int kMaxFastLevels = 512;   // more B levels than this: generic solver
constexpr int kGenThreads = 128;
constexpr int kRowWarps = 8;          // warps per block in the row-parallel kernels

void cu_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("tokmix CUDA: ") + what + ": " + cudaGetErrorString(e));
}
#define TOKMIX_CU(x) cu_check((x), #x)
#define TOKMIX_LAUNCHED(name) cu_check(cudaGetLastError(), name)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Eight consecutive elements as floats; p must be 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float* o) {
  float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
// Eight bfloat16 (or float16) values, given as their raw bits, as floats.
template <class T>
__device__ __forceinline__ void raw8_to_float(uint4 u, float* o) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f;
    if constexpr (std::is_same<T, __half>::value) f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
    else f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* o) {
  raw8_to_float<__nv_bfloat16>(*reinterpret_cast<const uint4*>(p), o);
}
__device__ __forceinline__ void load8(const __half* p, float* o) { raw8_to_float<__half>(*reinterpret_cast<const uint4*>(p), o); }

// Eight consecutive elements stored from floats; p must be 16-byte aligned.
__device__ __forceinline__ void store8(float* p, const float* o) {
  *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(o[4], o[5], o[6], o[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* o) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(__half* p, const float* o) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
// Four consecutive elements; p aligned to 4 elements.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __half* p) {
  uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 x) {
  uint2 u;
  *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(x.x, x.y);
  *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(x.z, x.w);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(__half* p, float4 x) {
  uint2 u;
  *reinterpret_cast<__half2*>(&u.x) = __floats2half2_rn(x.x, x.y);
  *reinterpret_cast<__half2*>(&u.y) = __floats2half2_rn(x.z, x.w);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void fma4(float4& acc, float s, const float4& x) {
  acc.x = fmaf(s, x.x, acc.x);
  acc.y = fmaf(s, x.y, acc.y);
  acc.z = fmaf(s, x.z, acc.z);
  acc.w = fmaf(s, x.w, acc.w);
}
__device__ __forceinline__ bool finite8(const float* x) {
  bool ok = true;
#pragma unroll
  for (int j = 0; j < 8; ++j) ok = ok && isfinite(x[j]);
  return ok;
}

// Lane groups: a warp splits into groups of `lpe` lanes (a power of two, D / 8), lane `sub` of a
// group holding channels [8 sub, 8 sub + 8) of one row, so that one row is one coalesced read.
__device__ __forceinline__ float group_sum(float v, int lpe) {
  for (int o = lpe >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sums eight per-lane partials over the groups of a warp (lanes equal modulo lpe).
__device__ __forceinline__ void across_groups(float* acc, int lpe) {
  for (int o = lpe; o < 32; o <<= 1)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
}
__device__ __forceinline__ float dot8(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s = fmaf(a[j], b[j], s);
  return s;
}

// Eight elements as loaded (16 bytes of bfloat16 / float16, 32 of float32), converted where
// they are used, so that a batch of gathers in flight holds half the registers at 16 bits.
template <class T>
struct Piece {
  uint4 u;
};
template <>
struct Piece<float> {
  float4 a, b;
};
template <class T>
__device__ __forceinline__ Piece<T> load_piece(const T* p) {
  return Piece<T>{*reinterpret_cast<const uint4*>(p)};
}
template <>
__device__ __forceinline__ Piece<float> load_piece(const float* p) {
  return Piece<float>{*reinterpret_cast<const float4*>(p), *reinterpret_cast<const float4*>(p + 4)};
}
__device__ __forceinline__ void piece_floats(const Piece<float>& x, float* o) {
  o[0] = x.a.x; o[1] = x.a.y; o[2] = x.a.z; o[3] = x.a.w; o[4] = x.b.x; o[5] = x.b.y; o[6] = x.b.z; o[7] = x.b.w;
}
__device__ __forceinline__ void piece_floats(const Piece<__nv_bfloat16>& x, float* o) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&x.u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void piece_floats(const Piece<__half>& x, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(&x.u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
template <class T>
__device__ __forceinline__ float dot_piece(const float* a, const Piece<T>& x) {
  float f[8];
  piece_floats(x, f);
  return dot8(a, f);
}
template <class T>
__device__ __forceinline__ void fma_piece(float* acc, float s, const Piece<T>& x) {
  float f[8];
  piece_floats(x, f);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = fmaf(s, f[j], acc[j]);
}
template <class T>
__device__ __forceinline__ bool finite_piece(const Piece<T>& x) {
  float f[8];
  piece_floats(x, f);
  return finite8(f);
}

// Dot of a float vector (shared memory) with a row in storage type.
template <class T>
__device__ __forceinline__ float dot_row(const float* a, const T* b, int n) {
  float acc = 0.f;
  if ((n & 7) == 0 && (reinterpret_cast<uintptr_t>(b) & 15) == 0) {
    for (int d = 0; d < n; d += 8) {
      float x[8];
      load8(b + d, x);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc = fmaf(a[d + j], x[j], acc);
    }
  } else {
    for (int d = 0; d < n; ++d) acc = fmaf(a[d], to_f(b[d]), acc);
  }
  return acc;
}

__host__ __device__ __forceinline__ int64_t lmin(int64_t x, int64_t y) { return x < y ? x : y; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reduction (every thread gets the result); red holds 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float r = lane < nw ? red[lane] : (kMax ? -INFINITY : 0.f);
  r = kMax ? warp_max(r) : warp_sum(r);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Supports by slot: slot e of a side is its e-th candidate (window distance, or level), so that
// threads can visit a row's entries in any order. Matches visit_side entry for entry.

__device__ __forceinline__ int64_t side_slots(const SideDesc& s, bool is_b, int64_t i, int32_t nbl) {
  switch (s.kind) {
    case SupportKind::Self: return 1;
    case SupportKind::Window: {
      int64_t dmax = i;
      if (s.window > 0) dmax = lmin(dmax, is_b ? s.window : s.window - 1);
      const int64_t n = dmax - (is_b ? 1 : 0) + 1;
      return n > 0 ? n : 0;
    }
    case SupportKind::Offsets:
    case SupportKind::Lattice: return nbl;
    default: return 0;
  }
}

// Lattice source (1-indexed) of row r at level k: a_k * ceil((r - f_k) / a_k); needs f_k < r.
__device__ __forceinline__ int64_t lattice_p1(const SideDesc& s, int64_t r, int32_t k) {
  const int64_t ak = s.a[k], x = r - s.f[k];
  if (ak <= 0x7fffffff && x <= 0x7fffffff) {
    const uint32_t a32 = static_cast<uint32_t>(ak);
    return static_cast<int64_t>(((static_cast<uint32_t>(x) + a32 - 1) / a32)) * ak;
  }
  return ak * ((x + ak - 1) / ak);
}

__device__ __forceinline__ bool side_entry(const SideDesc& s, bool is_b, int64_t i, int64_t e, int64_t& pos, int32_t& lvl) {
  switch (s.kind) {
    case SupportKind::Self:
      pos = i;
      lvl = s.level_base;
      return e == 0;
    case SupportKind::Window: {
      const int64_t d = e + (is_b ? 1 : 0);
      pos = i - d;
      lvl = s.level_base + window_level(is_b ? d - 1 : d);
      return pos >= 0;
    }
    case SupportKind::Offsets:
      if (e >= s.count || s.f[e] > i) return false;
      pos = i - s.f[e];
      lvl = s.level_base + static_cast<int32_t>(e);
      return true;
    case SupportKind::Lattice: {
      const int64_t r = i + 1;
      const int32_t k = static_cast<int32_t>(e);
      if (k >= s.count || s.f[k] >= r) return false;
      const int64_t p1 = lattice_p1(s, r, k);
      if (k > 0 && lattice_p1(s, r, k - 1) == p1) return false;  // merged into the lower level
      pos = p1 - 1;
      lvl = s.level_base + k;
      return true;
    }
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description on the device.

struct SeqInfo {
  int64_t b, t0, n, cbase;  // batch row, first token, length, first chunk (over all sequences)
  int64_t sbase;            // first superchunk (over all sequences; superchunk chains)
};

struct KArgs {
  PatternDesc pat;
  int64_t H, T, Dk, Dv, levels;
  Strides sq, sk, sv, sy;
  int32_t mode;  // Mode
  float scale, gamma;
  int32_t nbl, kin;  // B levels; levels that can land inside a chunk (prefix)
  int64_t cap;       // generic: entries per row, at most
  // Lanes per row in the lane-group paths (Dk / 8, Dv / 8; 0 when the widths, strides or
  // pointers do not allow 16-byte pieces) and whether rows allow 4-wide pieces (Dv % 4 == 0).
  int32_t lpk, lpv;
  int32_t* bad;  // bit 0: q, 1: k, 2: v, 3: dy held NaN/Inf (null: not checked here)
  int32_t tc;    // chains may form the chunk product on tensor cores (16-bit storage)
};

__device__ __forceinline__ int64_t eoff(const Strides& s, const SeqInfo& q, int64_t t, int64_t h) {
  return q.b * s.sb + (q.t0 + t) * s.st + h * s.sh;
}
// Row id of (sequence, head, token) in [B, H, T] arrays (lse, coefficient tables).
__device__ __forceinline__ int64_t rid(const KArgs& a, const SeqInfo& q, int64_t h, int64_t t) {
  return (q.b * a.H + h) * a.T + q.t0 + t;
}

template <class T>
__device__ __forceinline__ float score_of(const KArgs& a, const float* qs, const T* kbase, const SeqInfo& sq, int64_t h,
                                          int64_t pos, int32_t lvl, const T* bias, const T* gw) {
  float s;
  if (a.mode == static_cast<int32_t>(Mode::Softmax))
    s = a.scale * dot_row(qs, kbase + eoff(a.sk, sq, pos, h), static_cast<int>(a.Dk));
  else
    s = dot_row(qs, gw + (h * a.levels + lvl) * a.Dk, static_cast<int>(a.Dk));
  if (bias) s += to_f(bias[h * a.levels + lvl]);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Generic solver

template <class T>
__global__ void __launch_bounds__(kGenThreads) gen_forward(KArgs a, const SeqInfo* seqs, const T* q, const T* k, const T* v,
                                                           const T* bias, const T* gw, T* y, float* yf, float* lse,
                                                           float* pbuf, int64_t* posbuf) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* red = sm + a.Dk;
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y, unit = static_cast<int64_t>(blockIdx.x) * a.H + h;
  float* pb = pbuf + unit * a.cap;
  int64_t* ps = posbuf + unit * a.cap;
  const int tid = threadIdx.x;
  for (int64_t i = 0; i < sq.n; ++i) {
    const T* qi = q + eoff(a.sq, sq, i, h);
    for (int d = tid; d < a.Dk; d += kGenThreads) qs[d] = to_f(qi[d]);
    __syncthreads();
    const int64_t nA = side_slots(a.pat.A, false, i, a.nbl), ne = nA + side_slots(a.pat.B, true, i, a.nbl);
    float mx = -INFINITY;
    for (int64_t e = tid; e < ne; e += kGenThreads) {
      int64_t pos;
      int32_t lvl;
      const bool isb = e >= nA;
      const bool ok = isb ? side_entry(a.pat.B, true, i, e - nA, pos, lvl) : side_entry(a.pat.A, false, i, e, pos, lvl);
      float s = -INFINITY;
      if (ok) s = score_of(a, qs, k, sq, h, pos, lvl, bias, gw);
      pb[e] = s;
      ps[e] = ok ? pos : -1;
      mx = fmaxf(mx, s);
    }
    mx = block_reduce<true>(mx, red);
    float sum = 0.f;
    for (int64_t e = tid; e < ne; e += kGenThreads)
      if (ps[e] >= 0) sum += __expf(pb[e] - mx);
    sum = block_reduce<false>(sum, red);
    const float l = mx + logf(sum);
    for (int64_t e = tid; e < ne; e += kGenThreads) pb[e] = ps[e] >= 0 ? __expf(pb[e] - l) * (e >= nA ? a.gamma : 1.f) : 0.f;
    if (tid == 0) lse[rid(a, sq, h, i)] = l;
    __syncthreads();
    for (int64_t d = tid; d < a.Dv; d += kGenThreads) {
      float acc = 0.f;
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t pos = ps[e];
        if (pos < 0) continue;
        acc = fmaf(pb[e], e < nA ? to_f(v[eoff(a.sv, sq, pos, h) + d]) : yf[eoff(a.sy, sq, pos, h) + d], acc);
      }
      yf[eoff(a.sy, sq, i, h) + d] = acc;
      y[eoff(a.sy, sq, i, h) + d] = from_f<T>(acc);
    }
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kGenThreads)
    gen_backward(KArgs a, const SeqInfo* seqs, const T* q, const T* k, const T* v, const T* bias, const T* gw, const T* y,
                 const float* lse, const T* dy, T* dq, T* dk, T* dv, float* dbias_u, float* dgate_u, float* G, float* dkacc,
                 float* dvacc, float* pbuf, float* ubuf, int64_t* posbuf, int32_t* lvlbuf) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* gs = sm + a.Dk;
  float* red = gs + a.Dv;
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y, unit = static_cast<int64_t>(blockIdx.x) * a.H + h;
  float* pb = pbuf + unit * a.cap;
  float* ub = ubuf + unit * a.cap;
  int64_t* ps = posbuf + unit * a.cap;
  int32_t* lv = lvlbuf + unit * a.cap;
  const int tid = threadIdx.x;
  const bool softmax = a.mode == static_cast<int32_t>(Mode::Softmax);
  for (int64_t i = 0; i < sq.n; ++i) {
    for (int64_t d = tid; d < a.Dv; d += kGenThreads) {
      G[eoff(a.sy, sq, i, h) + d] = to_f(dy[eoff(a.sy, sq, i, h) + d]);
      dvacc[eoff(a.sv, sq, i, h) + d] = 0.f;
    }
    if (softmax)
      for (int64_t d = tid; d < a.Dk; d += kGenThreads) dkacc[eoff(a.sk, sq, i, h) + d] = 0.f;
  }
  __syncthreads();
  for (int64_t m = sq.n - 1; m >= 0; --m) {
    const T* qm = q + eoff(a.sq, sq, m, h);
    for (int d = tid; d < a.Dk; d += kGenThreads) qs[d] = to_f(qm[d]);
    for (int d = tid; d < a.Dv; d += kGenThreads) gs[d] = G[eoff(a.sy, sq, m, h) + d];
    __syncthreads();
    const float l = lse[rid(a, sq, h, m)];
    const int64_t nA = side_slots(a.pat.A, false, m, a.nbl), ne = nA + side_slots(a.pat.B, true, m, a.nbl);
    float part = 0.f;
    for (int64_t e = tid; e < ne; e += kGenThreads) {
      int64_t pos;
      int32_t lvl;
      const bool isb = e >= nA;
      const bool ok = isb ? side_entry(a.pat.B, true, m, e - nA, pos, lvl) : side_entry(a.pat.A, false, m, e, pos, lvl);
      float p = 0.f, cu = 0.f;
      if (ok) {
        p = __expf(score_of(a, qs, k, sq, h, pos, lvl, bias, gw) - l);
        const float u = isb ? dot_row(gs, y + eoff(a.sy, sq, pos, h), static_cast<int>(a.Dv))
                            : dot_row(gs, v + eoff(a.sv, sq, pos, h), static_cast<int>(a.Dv));
        cu = p * (isb ? a.gamma : 1.f) * u;
      }
      pb[e] = p;
      ub[e] = cu;
      ps[e] = ok ? pos : -1;
      lv[e] = lvl;
      part += cu;
    }
    const float delta = block_reduce<false>(part, red);
    for (int64_t e = tid; e < ne; e += kGenThreads) {
      if (ps[e] < 0) continue;
      const float ds = ub[e] - pb[e] * delta;
      ub[e] = ds;
      if (dbias_u) atomicAdd(&dbias_u[unit * a.levels + lv[e]], ds);
    }
    __syncthreads();
    for (int64_t d = tid; d < a.Dk; d += kGenThreads) {
      float acc = 0.f;
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t pos = ps[e];
        if (pos < 0) continue;
        const float ds = ub[e];
        if (softmax) {
          acc = fmaf(ds, to_f(k[eoff(a.sk, sq, pos, h) + d]), acc);
          dkacc[eoff(a.sk, sq, pos, h) + d] += a.scale * ds * qs[d];
        } else {
          acc = fmaf(ds, to_f(gw[(h * a.levels + lv[e]) * a.Dk + d]), acc);
          dgate_u[(unit * a.levels + lv[e]) * a.Dk + d] += ds * qs[d];
        }
      }
      dq[eoff(a.sq, sq, m, h) + d] = from_f<T>(softmax ? a.scale * acc : acc);
    }
    for (int64_t d = tid; d < a.Dv; d += kGenThreads) {
      const float g = gs[d];
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t pos = ps[e];
        if (pos < 0) continue;
        if (e < nA)
          dvacc[eoff(a.sv, sq, pos, h) + d] += pb[e] * g;
        else
          G[eoff(a.sy, sq, pos, h) + d] += a.gamma * pb[e] * g;
      }
    }
    __syncthreads();
  }
  for (int64_t i = 0; i < sq.n; ++i) {
    for (int64_t d = tid; d < a.Dv; d += kGenThreads) dv[eoff(a.sv, sq, i, h) + d] = from_f<T>(dvacc[eoff(a.sv, sq, i, h) + d]);
    if (softmax)
      for (int64_t d = tid; d < a.Dk; d += kGenThreads) dk[eoff(a.sk, sq, i, h) + d] = from_f<T>(dkacc[eoff(a.sk, sq, i, h) + d]);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunked solver. Tables per row R = (b*H + h)*T + t: P[R][0] = alpha_ii, P[R][1+k] = gamma *
// beta of level k (0 when absent or merged); SRC[R][k] = source row within the sequence (-1
// when absent). M[(chunk*H + h)][C][C] = (I - B_cc)^{-1} (or its transpose for backward).

template <class T>
__global__ void __launch_bounds__(kRowWarps * 32, 3)
    coef_kernel(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const T* k, const T* bias, const T* gw,
                float* lse, float* P, int32_t* SRC, float* M) {
  extern __shared__ float sm[];
  const int S = 1 + a.nbl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qs = sm + warp * a.Dk;
  float* ss = sm + kRowWarps * a.Dk + warp * S;
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  const int64_t c0 = (cg - sq.cbase) * kC;
  const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
  for (int t = warp; t < nvalid; t += kRowWarps) {
    const int64_t i = c0 + t, R = rid(a, sq, h, i);
    const T* qi = q + eoff(a.sq, sq, i, h);
    const bool softmax = a.mode == static_cast<int32_t>(Mode::Softmax);
    float mx = -INFINITY;
    if (a.lpk && a.pat.B.kind == SupportKind::Offsets && S <= 32) {
      // v12: lane e resolves entry e (source, level bias) once and writes its SRC; the lane
      // groups get the source by shuffle and gather kGB iterations of k rows at a time
      constexpr int kGB = 2;
      const int lpe = a.lpk, epp = 32 / lpe, sub = lane & (lpe - 1), grp = lane / lpe;
      const int32_t i32 = static_cast<int32_t>(i);
      const int32_t fe = lane >= 1 && lane < S ? static_cast<int32_t>(lmin(a.pat.B.f[lane - 1], INT32_MAX)) : 0;
      const int32_t pe = lane < S && fe <= i32 ? i32 - fe : -1;  // source of entry `lane`
      const int32_t le = lane == 0 ? a.pat.A.level_base : a.pat.B.level_base + lane - 1;
      const float be = bias && pe >= 0 ? to_f(bias[h * a.levels + le]) : 0.f;
      if (lane >= 1 && lane < S) SRC[R * a.nbl + lane - 1] = pe;
      const T* kb = softmax ? k + eoff(a.sk, sq, 0, h) + 8 * sub : nullptr;
      const int32_t kst = static_cast<int32_t>(a.sk.st);
      float qv[8];
      load8(qi + 8 * sub, qv);
      if (a.bad && grp == 0 && !finite8(qv)) atomicOr(a.bad, 1);
      for (int e0 = 0; e0 < S; e0 += kGB * epp) {
        float x[kGB][8];
        int32_t ps[kGB];
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * epp + grp;
          ps[u] = __shfl_sync(0xffffffffu, pe, e & 31);
          if (e >= S) ps[u] = -1;
          if (ps[u] >= 0) {
            const T* row = softmax ? kb + static_cast<int64_t>(ps[u]) * kst
                                   : gw + (h * a.levels + (e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1)) * a.Dk + 8 * sub;
            load8(row, x[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * epp + grp;
          const float bu = __shfl_sync(0xffffffffu, be, e & 31);
          float s = group_sum(ps[u] >= 0 ? dot8(qv, x[u]) : 0.f, lpe);
          if (ps[u] >= 0) {
            s = (softmax ? a.scale * s : s) + bu;
            if (e == 0 && softmax && a.bad && !finite8(x[u])) atomicOr(a.bad, 2);
          } else {
            s = -INFINITY;
          }
          if (sub == 0 && e < S) ss[e] = s;
        }
      }
      __syncwarp();
      for (int e = lane; e < S; e += 32) mx = fmaxf(mx, ss[e]);
    } else if (a.lpk && a.pat.B.kind == SupportKind::Offsets) {
      // lane groups: one row of k (or of the gate table) per group, 16 bytes per lane (offsets
      // only: a lattice row has many merged levels, and resolving each once per lane costs more)
      const int lpe = a.lpk, epp = 32 / lpe, sub = lane & (lpe - 1), grp = lane / lpe;
      float qv[8];
      load8(qi + 8 * sub, qv);
      if (a.bad && grp == 0 && !finite8(qv)) atomicOr(a.bad, 1);
      for (int e0 = 0; e0 < S; e0 += 2 * epp) {
        float x[2][8];
        int32_t lv[2];
        bool ok[2];
        int64_t ps[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * epp + grp;
          int64_t pos = i;
          int32_t lvl = a.pat.A.level_base;
          ok[u] = e < S && (e == 0 || side_entry(a.pat.B, true, i, e - 1, pos, lvl));
          ps[u] = pos;
          lv[u] = lvl;
          if (ok[u]) {
            const T* row = softmax ? k + eoff(a.sk, sq, pos, h) : gw + (h * a.levels + lvl) * a.Dk;
            load8(row + 8 * sub, x[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * epp + grp;
          float s = group_sum(ok[u] ? dot8(qv, x[u]) : 0.f, lpe);
          if (ok[u]) {
            s = softmax ? a.scale * s : s;
            if (bias) s += to_f(bias[h * a.levels + lv[u]]);
            if (e == 0 && softmax && a.bad && !finite8(x[u])) atomicOr(a.bad, 2);
          } else {
            s = -INFINITY;
          }
          if (sub == 0 && e < S) {
            ss[e] = s;
            if (e > 0) SRC[R * a.nbl + e - 1] = ok[u] ? static_cast<int32_t>(ps[u]) : -1;
          }
        }
      }
      __syncwarp();
      for (int e = lane; e < S; e += 32) mx = fmaxf(mx, ss[e]);
    } else {
      bool fin = true;
      for (int d = lane; d < a.Dk; d += 32) {
        qs[d] = to_f(qi[d]);
        fin = fin && isfinite(qs[d]);
      }
      if (a.bad && !fin) atomicOr(a.bad, 1);
      if (a.bad && softmax) {
        const T* ki = k + eoff(a.sk, sq, i, h);
        fin = true;
        for (int d = lane; d < a.Dk; d += 32) fin = fin && isfinite(to_f(ki[d]));
        if (!fin) atomicOr(a.bad, 2);
      }
      __syncwarp();
      for (int e = lane; e < S; e += 32) {
        int64_t pos = i;
        int32_t lvl = a.pat.A.level_base;
        const bool ok = e == 0 || side_entry(a.pat.B, true, i, e - 1, pos, lvl);
        const float s = ok ? score_of(a, qs, k, sq, h, pos, lvl, bias, gw) : -INFINITY;
        ss[e] = s;
        mx = fmaxf(mx, s);
        if (e > 0) SRC[R * a.nbl + e - 1] = ok ? static_cast<int32_t>(pos) : -1;
      }
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < S; e += 32)
      if (ss[e] != -INFINITY) sum += __expf(ss[e] - mx);
    sum = warp_sum(sum);
    const float l = mx + logf(sum);
    if (lane == 0) lse[R] = l;
    for (int e = lane; e < S; e += 32) P[R * S + e] = ss[e] != -INFINITY ? __expf(ss[e] - l) * (e > 0 ? a.gamma : 1.f) : 0.f;
    __syncwarp();
  }
}

// M_c = (I - B_cc)^{-1} of every chunk, from the P and SRC tables (v12: its own kernel; inside
// coef_kernel, 6 of 8 warps waited for the 2 that swept the columns, and held the block).
// kInvChunks chunks per block, 64 threads each: column j of M depends only on column j, so one
// thread per column and no barrier in the sweep. The chunk's in-chunk taps (levels < kin) are
// staged in shared memory first, so that the sweep waits on shared memory only.
constexpr int kInvChunks = 2;
__global__ void __launch_bounds__(kInvChunks * kC)
    chunk_inverse(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, int64_t total_chunks, const float* P,
                  const int32_t* SRC, float* M) {
  extern __shared__ float sm[];
  const int part = threadIdx.x / kC, j = threadIdx.x % kC;
  const int64_t cg = static_cast<int64_t>(blockIdx.x) * kInvChunks + part, h = blockIdx.y;
  const bool live = cg < total_chunks;
  float* Ms = sm + part * (kC * (kC + 1) + 2 * kC * a.kin);
  int32_t* tsrc = reinterpret_cast<int32_t*>(Ms + kC * (kC + 1));
  float* tp = reinterpret_cast<float*>(tsrc + kC * a.kin);
  const int S = 1 + a.nbl;
  if (live) {
    const SeqInfo sq = seqs[chunk_seq[cg]];
    const int64_t c0 = (cg - sq.cbase) * kC;
    const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
    for (int idx = j; idx < kC * a.kin; idx += kC) {
      const int t = idx / a.kin, kk = idx % a.kin;
      int32_t sl = -1;
      float pv = 0.f;
      if (t < nvalid) {
        const int64_t R = rid(a, sq, h, c0 + t);
        const int64_t src = SRC[R * a.nbl + kk];
        if (src >= c0) {
          sl = static_cast<int32_t>(src - c0);
          pv = P[R * S + 1 + kk];
        }
      }
      tsrc[idx] = sl;
      tp[idx] = pv;
    }
  }
  __syncthreads();
  if (live) {
    if (a.kin <= 8) {
      // unrolled so that a row's loads go out together (pow2 has 6 in-chunk levels); the next
      // row's taps are read before this row's store, so only the M reads wait on the sweep
      int sln[8];
      float tpn[8];
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        sln[kk] = kk < a.kin ? tsrc[kk] : -1;
        tpn[kk] = kk < a.kin ? tp[kk] : 0.f;
      }
      for (int t = 0; t < kC; ++t) {
        int sl[8];
        float tv[8];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
          sl[kk] = sln[kk];
          tv[kk] = tpn[kk];
          sln[kk] = kk < a.kin && t + 1 < kC ? tsrc[(t + 1) * a.kin + kk] : -1;
          tpn[kk] = kk < a.kin && t + 1 < kC ? tp[(t + 1) * a.kin + kk] : 0.f;
        }
        float mval = t == j ? 1.f : 0.f;
        if (t > j) {
          float part_[8];
#pragma unroll
          for (int kk = 0; kk < 8; ++kk) part_[kk] = sl[kk] >= j && sl[kk] < t ? tv[kk] * Ms[sl[kk] * (kC + 1) + j] : 0.f;
#pragma unroll
          for (int kk = 0; kk < 8; ++kk) mval += part_[kk];
        }
        Ms[t * (kC + 1) + j] = mval;
      }
    } else {
      for (int t = 0; t < kC; ++t) {
        float mval = t == j ? 1.f : 0.f;
        if (t > j)
          for (int kk = 0; kk < a.kin; ++kk) {
            const int sl = tsrc[t * a.kin + kk];
            if (sl >= j && sl < t) mval = fmaf(tp[t * a.kin + kk], Ms[sl * (kC + 1) + j], mval);
          }
        Ms[t * (kC + 1) + j] = mval;
      }
    }
  }
  __syncthreads();
  if (live) {
    float* Mg = M + (cg * a.H + h) * kC * kC;
    for (int idx = j; idx < kC * kC; idx += kC) Mg[idx] = Ms[(idx / kC) * (kC + 1) + idx % kC];
  }
}

// Sequential chain over chunks, forward: y_c = M_c (alpha x + long taps). Each thread owns
// one row of the chunk and kV channels (kDS apart). The step is bound by memory latency, so
// every load that does not depend on the previous chunk is issued in batches of kBatch (one
// round trip per batch instead of one per level), and M_c is loaded into registers meanwhile.
constexpr int kBatch = 16;

template <class T, int kV>
__global__ void __launch_bounds__(kChainThreads)
    chain_forward(KArgs a, const SeqInfo* seqs, const T* v, const float* P, const int32_t* SRC, const float* M, T* y, float* yf) {
  __shared__ float Ms[kC][kC + 1];
  __shared__ float W[kC][kDS * kV];
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int t = threadIdx.x / kDS, dd = threadIdx.x % kDS;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * kDS * kV + dd;  // channels d0 + j*kDS
  const int S = 1 + a.nbl;
  const int64_t nch = (sq.n + kC - 1) / kC;
  constexpr int kMPer = kC * kC / kChainThreads;
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t c0 = c * kC, i = c0 + t;
    const bool row = i < sq.n;
    const float* Mg = M + ((sq.cbase + c) * a.H + h) * kC * kC;
    float mreg[kMPer];
#pragma unroll
    for (int r = 0; r < kMPer; ++r) mreg[r] = Mg[threadIdx.x + r * kChainThreads];
    float w[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) w[j] = 0.f;
    if (row) {
      const int64_t R = rid(a, sq, h, i);
      const float alpha = P[R * S];
      const T* vi = v + eoff(a.sv, sq, i, h);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int64_t d = d0 + j * kDS;
        if (d < a.Dv) {
          const float x = to_f(vi[d]);
          if (a.bad && !isfinite(x)) atomicOr(a.bad, 4);
          w[j] = alpha * x;
        }
      }
      const int32_t* src = SRC + R * a.nbl;
      const float* pr = P + R * S + 1;
      const float* ybase = yf + eoff(a.sy, sq, 0, h);
      for (int k0 = 0; k0 < a.nbl; k0 += kBatch) {
        int64_t so[kBatch];
        float pv[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int kk = k0 + b;
          const int64_t s = kk < a.nbl ? src[kk] : -1;
          pv[b] = kk < a.nbl ? pr[kk] : 0.f;
          so[b] = s >= 0 && s < c0 ? s * a.sy.st : -1;
        }
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          const int64_t d = d0 + j * kDS;
          if (d >= a.Dv) continue;
          float yv[kBatch];
#pragma unroll
          for (int b = 0; b < kBatch; ++b) yv[b] = so[b] >= 0 ? ybase[so[b] + d] : 0.f;
#pragma unroll
          for (int b = 0; b < kBatch; ++b) w[j] = fmaf(pv[b], yv[b], w[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) W[t][dd + j * kDS] = w[j];
#pragma unroll
    for (int r = 0; r < kMPer; ++r) {
      const int idx = threadIdx.x + r * kChainThreads;
      Ms[idx / kC][idx % kC] = mreg[r];
    }
    __syncthreads();
    if (row) {
      float acc[kV];
#pragma unroll
      for (int j = 0; j < kV; ++j) acc[j] = 0.f;
      for (int s2 = 0; s2 <= t; ++s2) {
        const float m = Ms[t][s2];
#pragma unroll
        for (int j = 0; j < kV; ++j) acc[j] = fmaf(m, W[s2][dd + j * kDS], acc[j]);
      }
      const int64_t o = eoff(a.sy, sq, i, h);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int64_t d = d0 + j * kDS;
        if (d >= a.Dv) continue;
        yf[o + d] = acc[j];
        y[o + d] = from_f<T>(acc[j]);
      }
    }
    __syncthreads();
  }
}

// Chain with 4 channels per thread (Dv % 4 == 0): kS threads (consecutive lanes) own row t of
// the chunk and channels 4 g .. 4 g + 3 of the block's slice of 4 kG; they split the row's taps
// and its 64-long product with M_c and add their parts with shuffles, so that the step's
// dependent chain is short. Taps are 16-byte reads. What a step needs from global memory is
// fetched one step ahead: M of the next chunk by cp.async into the other half of a
// double-buffered tile, and per row alpha, v, the first kPF levels' coefficients and sources and
// the outputs they read that lie two or more chunks back, issued before the product so that its
// time covers their latency. The previous chunk's outputs stay in shared memory
// (double-buffered). Levels past kPF (long lattices) are read during the step.
constexpr int kPF = 16;          // levels a chain's prefetch covers (near + far) when all fit
constexpr int kNear = 8;         // near slots: levels with f <= kC (the first a.kin levels)
constexpr int kFarSlots = 16;    // far slots, split over a row's kS threads
constexpr int kChain4Threads = 256;  // kC * kG * kS

__device__ __forceinline__ void copy_tile_async(float (*dst)[kC + 4], const float* src, int tid, int nthreads) {
  for (int idx = tid; idx < kC * kC / 4; idx += nthreads)
    __pipeline_memcpy_async(&dst[idx / (kC / 4)][4 * (idx % (kC / 4))], src + 4 * idx, 16);
  __pipeline_commit();
}
// Sum over the kS consecutive lanes that share a row (every lane of the warp must call it).
template <int kS>
__device__ __forceinline__ float4 parts_sum(float4 x) {
#pragma unroll
  for (int o = 1; o < kS; o <<= 1) {
    x.x += __shfl_xor_sync(0xffffffffu, x.x, o);
    x.y += __shfl_xor_sync(0xffffffffu, x.y, o);
    x.z += __shfl_xor_sync(0xffffffffu, x.z, o);
    x.w += __shfl_xor_sync(0xffffffffu, x.w, o);
  }
  return x;
}

// The chunk product on tensor cores (v13, chains of 16 or 8 channels a block, 16-bit storage):
// warp w forms rows 16 (w % 4) .. + 15 and channels 8 (w / 4) .. + 7 of M_c W (or
// M_c^T W) with mma m16n8k8 in TF32 (10-bit mantissa: far below bfloat16's rounding of y),
// skipping the k-steps where the triangular M_c is zero. bfloat16 only: float16 keeps 10
// mantissa bits, as many as TF32, so its y would carry the product's rounding. Fragment layout (PTX ISA): lane = 4 gq
// + tq; A rows gq, gq + 8 and columns tq, tq + 4; B rows tq, tq + 4, column gq; C rows gq, gq + 8,
// columns 2 tq, 2 tq + 1.
__device__ __forceinline__ uint32_t tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma_tf32(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// c (4 floats, C fragment) = rows [16 mi, 16 mi + 16) of Mc W (kTrans: Mc^T W), channels
// [8 ni, 8 ni + 8) of W.
template <bool kTrans, int kWP>
__device__ __forceinline__ void chunk_product_tc(const float (*Mc)[kC + 4], const float (*W)[kWP], int mi, int ni, int lane, float* c) {
  const int gq = lane >> 2, tq = lane & 3, r0 = 16 * mi + gq, n = 8 * ni + gq;
  c[0] = c[1] = c[2] = c[3] = 0.f;
  const int ks0 = kTrans ? 2 * mi : 0, ks1 = kTrans ? kC / 8 : 2 * mi + 2;  // M_c lower triangular
  for (int ks = ks0; ks < ks1; ++ks) {
    const int k0 = 8 * ks + tq;
    uint32_t a0, a1, a2, a3;
    if (kTrans) {
      a0 = tf32(Mc[k0][r0]);
      a1 = tf32(Mc[k0][r0 + 8]);
      a2 = tf32(Mc[k0 + 4][r0]);
      a3 = tf32(Mc[k0 + 4][r0 + 8]);
    } else {
      a0 = tf32(Mc[r0][k0]);
      a1 = tf32(Mc[r0 + 8][k0]);
      a2 = tf32(Mc[r0][k0 + 4]);
      a3 = tf32(Mc[r0 + 8][k0 + 4]);
    }
    mma_tf32(c, a0, a1, a2, a3, tf32(W[k0][n]), tf32(W[k0 + 4][n]));
  }
}
__device__ __forceinline__ void store2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store2(__half* p, float x, float y) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y); }

template <class T, int kG, int kS>
__global__ void __launch_bounds__(kC * kG * kS, 2)
    chain_forward4(KArgs a, const SeqInfo* seqs, const T* v, const float* P, const int32_t* SRC, const float* M, T* y, float* yf) {
  constexpr int kW = 4 * kG, kN = kC * kG * kS, kNP = kNear / kS, kFP = kS == 1 ? kFarSlots / 2 : kFarSlots / kS;
  __shared__ __align__(16) float Ms[2][kC][kC + 4];
  constexpr bool kTC = kS * kG == 4 && kG >= 2 && std::is_same<T, __nv_bfloat16>::value;  // tensor cores: chunk_product_tc
  constexpr int kWP = kTC ? kW + 4 : kW;                        // padded: B fragments at most 2-way conflicts
  __shared__ __align__(16) float W[kC][kWP];
  __shared__ __align__(16) float Yp[2][kC][kW];
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int part = threadIdx.x % kS, g = (threadIdx.x / kS) % kG, t = threadIdx.x / (kS * kG);
  const int64_t d = static_cast<int64_t>(blockIdx.z) * kW + 4 * g;
  const bool dok = d < a.Dv;
  const int S = 1 + a.nbl;
  const bool offsets = a.pat.B.kind == SupportKind::Offsets;
  const int64_t nch = (sq.n + kC - 1) / kC;
  const float* ybase = yf + eoff(a.sy, sq, 0, h) + d;
  const bool copy = static_cast<const void*>(yf) != static_cast<const void*>(y);
  const float* Mh = M + (sq.cbase * a.H + h) * kC * kC;  // chunk c at Mh + c * H * kC * kC
  // Levels in three ranges (v13): near [0, nn), whose sources lie in this chunk or the previous
  // one (shared memory) for offsets, so only their coefficients are fetched ahead; far [nn, nf),
  // whose outputs are fetched ahead too; the rest (long lattices) read during the step. fl[l]:
  // f(l) (offsets), 0 (lattice), -1: no such level. 32-bit index math (v12).
  const int nn = a.kin < kNear ? a.kin : kNear, nf = nn + kFP * kS;  // one thread a row: 8 far slots (registers)
  __shared__ int32_t fl[kNear + kFarSlots];
  if (threadIdx.x < kNear + kFarSlots)
    fl[threadIdx.x] = threadIdx.x < a.nbl ? (offsets ? static_cast<int32_t>(lmin(a.pat.B.f[threadIdx.x], INT32_MAX)) : 0) : -1;
  __syncthreads();
  const int64_t R0 = rid(a, sq, h, 0);
  const float* P0 = P + R0 * S + 1;  // row i, level l: P0[i S + l]; alpha: P0[i S - 1]
  const int32_t* S0 = SRC + R0 * a.nbl;
  const T* v0 = v + eoff(a.sv, sq, 0, h) + d;
  const int32_t yst = static_cast<int32_t>(a.sy.st), vst = static_cast<int32_t>(a.sv.st), n32 = static_cast<int32_t>(sq.n);
  // prefetched for the next chunk: near levels part + j kS (j < kNP), far levels nn + part + j kS
  float4 xv = make_float4(0.f, 0.f, 0.f, 0.f), yv[kFP];
  float alpha = 0.f, pn[kNP], pv[kFP];
  int32_t sn[kNP], sv[kFP];  // source row, -1: none or inside the chunk
  auto source = [&](int32_t i, int l, const int32_t* Si) -> int32_t {
    const int32_t fb = fl[l];
    return fb < 0 ? -1 : (offsets ? i - fb : Si[l]);
  };
  auto prefetch = [&](int64_t c) {
    const int32_t c0 = static_cast<int32_t>(c) * kC, i = c0 + t;
    alpha = 0.f;
#pragma unroll
    for (int j = 0; j < kNP; ++j) sn[j] = -1;
#pragma unroll
    for (int j = 0; j < kFP; ++j) sv[j] = -1;
    if (i < n32 && dok) {
      const float* Pi = P0 + static_cast<int64_t>(i) * S;
      if (part == 0) {
        xv = load4(v0 + static_cast<int64_t>(i) * vst);
        alpha = Pi[-1];
      }
      const int32_t* Si = offsets ? nullptr : S0 + static_cast<int64_t>(i) * a.nbl;
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        const int l = part + j * kS;
        const int32_t sidx = l < nn ? source(i, l, Si) : -1;
        sn[j] = sidx < c0 ? sidx : -1;  // taps inside the chunk are in M
        pn[j] = sn[j] >= 0 ? Pi[l] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j) {
        const int l = nn + part + j * kS;
        const int32_t sidx = l < nf ? source(i, l, Si) : -1;
        sv[j] = sidx < c0 ? sidx : -1;
        pv[j] = sv[j] >= 0 ? Pi[l] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j)
        if (sv[j] >= 0 && sv[j] < c0 - kC) yv[j] = *reinterpret_cast<const float4*>(ybase + static_cast<int64_t>(sv[j]) * yst);
    }
  };
  if (nch > 0) {
    copy_tile_async(Ms[0], Mh, threadIdx.x, kN);
    prefetch(0);
  }
  const int64_t o0 = eoff(a.sy, sq, 0, h) + d;
  for (int64_t c = 0; c < nch; ++c) {
    const int32_t c0 = static_cast<int32_t>(c) * kC, i = c0 + t;
    const bool row = i < n32 && dok;
    float4 w = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row) {
      if (part == 0) {
        if (a.bad && !(isfinite(xv.x) && isfinite(xv.y) && isfinite(xv.z) && isfinite(xv.w))) atomicOr(a.bad, 4);
        fma4(w, alpha, xv);
      }
      const float(*yp)[kW] = Yp[(c + 1) & 1];  // chunk c - 1
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        if (sn[j] < 0) continue;
        // offsets: always in chunk c - 1; a lattice's near level may reach further back
        fma4(w, pn[j], sn[j] >= c0 - kC ? *reinterpret_cast<const float4*>(&yp[sn[j] - (c0 - kC)][4 * g])
                                        : *reinterpret_cast<const float4*>(ybase + static_cast<int64_t>(sn[j]) * yst));
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j) {
        if (sv[j] < 0) continue;
        fma4(w, pv[j], sv[j] >= c0 - kC ? *reinterpret_cast<const float4*>(&yp[sv[j] - (c0 - kC)][4 * g]) : yv[j]);
      }
      if (a.nbl > nf) {
        const int64_t R = rid(a, sq, h, i);
        for (int kk = nf + part; kk < a.nbl; kk += kS) {
          const int64_t sidx = offsets ? (a.pat.B.f[kk] <= i ? i - a.pat.B.f[kk] : -1) : SRC[R * a.nbl + kk];
          if (sidx < 0 || sidx >= c0) continue;
          const float p = P[R * S + 1 + kk];
          fma4(w, p, sidx >= c0 - kC ? *reinterpret_cast<const float4*>(&yp[sidx - (c0 - kC)][4 * g])
                                     : *reinterpret_cast<const float4*>(ybase + sidx * a.sy.st));
        }
      }
    }
    w = parts_sum<kS>(w);
    if (part == 0) *reinterpret_cast<float4*>(&W[t][4 * g]) = w;
    __pipeline_wait_prior(0);  // M of this chunk
    __syncthreads();
    // next chunk's loads go out before the product, whose time covers their latency; the other
    // tile was last read in step c - 1, before its closing barrier
    if (c + 1 < nch) {
      copy_tile_async(Ms[(c + 1) & 1], Mh + (c + 1) * a.H * kC * kC, threadIdx.x, kN);
      prefetch(c + 1);
    }
    const float(*Mc)[kC + 4] = Ms[c & 1];
    if (kTC && a.tc) {
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, mi = warp & 3, ni = warp >> 2;
      float cf[4];
      if (8 * ni < kW) chunk_product_tc<false, kWP>(Mc, W, mi, ni, lane, cf);
      const int ch = 8 * ni + 2 * (lane & 3);
      const int64_t dch = static_cast<int64_t>(blockIdx.z) * kW + ch;
#pragma unroll
      for (int half = 0; half < 2 && 8 * ni < kW; ++half) {
        const int r = 16 * mi + (lane >> 2) + 8 * half;
        *reinterpret_cast<float2*>(&Yp[c & 1][r][ch]) = make_float2(cf[2 * half], cf[2 * half + 1]);
        if (c0 + r < n32 && dch < a.Dv) {
          const int64_t o = eoff(a.sy, sq, c0 + r, h) + dch;
          if (copy) store2(yf + o, cf[2 * half], cf[2 * half + 1]);
          store2(y + o, cf[2 * half], cf[2 * half + 1]);
        }
      }
    } else {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row) {
#pragma unroll 4
        for (int s2 = part; s2 <= t; s2 += kS) fma4(acc, Mc[t][s2], *reinterpret_cast<const float4*>(&W[s2][4 * g]));
      }
      acc = parts_sum<kS>(acc);
      if (row && part == 0) {
        const int64_t o = o0 + static_cast<int64_t>(i) * yst;
        if (copy) *reinterpret_cast<float4*>(yf + o) = acc;
        store4(y + o, acc);
      }
      if (part == 0) *reinterpret_cast<float4*>(&Yp[c & 1][t][4 * g]) = acc;
    }
    __syncthreads();
  }
}

// Backward chain for offsets (see chain_forward4): readers of row i are m = i + f(k); those in
// chunk c + 1 come from shared memory, farther ones were fetched one step ahead. M_c^T is read
// from the tile of M_c by column.
template <class T, int kG, int kS>
__global__ void __launch_bounds__(kC * kG * kS, 2)
    chain_backward4(KArgs a, const SeqInfo* seqs, const T* dy, const float* P, const float* M, float* G) {
  constexpr int kW = 4 * kG, kN = kC * kG * kS, kNP = kNear / kS, kFP = kS == 1 ? kFarSlots / 2 : kFarSlots / kS;
  __shared__ __align__(16) float Ms[2][kC][kC + 4];
  constexpr bool kTC = kS * kG == 4 && kG >= 2 && std::is_same<T, __nv_bfloat16>::value;  // tensor cores: chunk_product_tc
  constexpr int kWP = kTC ? kW + 4 : kW;                        // padded: B fragments at most 2-way conflicts
  __shared__ __align__(16) float W[kC][kWP];
  __shared__ __align__(16) float Gp[2][kC][kW];
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int part = threadIdx.x % kS, g = (threadIdx.x / kS) % kG, t = threadIdx.x / (kS * kG);
  const int64_t d = static_cast<int64_t>(blockIdx.z) * kW + 4 * g;
  const bool dok = d < a.Dv;
  const int S = 1 + a.nbl;
  const int64_t nch = (sq.n + kC - 1) / kC;
  float* gbase = G + eoff(a.sy, sq, 0, h) + d;
  const int64_t* f = a.pat.B.f;
  const float* Mh = M + (sq.cbase * a.H + h) * kC * kC;
  // near, far and remaining levels as in chain_forward4 (v13): a near level's readers lie in
  // this chunk or the next one, so only their coefficients are fetched ahead
  const int nn = a.kin < kNear ? a.kin : kNear, nf = nn + kFP * kS;
  __shared__ int32_t fl[kNear + kFarSlots];
  if (threadIdx.x < kNear + kFarSlots)
    fl[threadIdx.x] = threadIdx.x < a.nbl ? static_cast<int32_t>(lmin(f[threadIdx.x], INT32_MAX)) : -1;
  __syncthreads();
  const float* P0 = P + rid(a, sq, h, 0) * S + 1;  // reader m, level l: P0[m S + l]
  const T* dy0 = dy + eoff(a.sy, sq, 0, h) + d;
  const int32_t yst = static_cast<int32_t>(a.sy.st), n32 = static_cast<int32_t>(sq.n);
  float4 xv = make_float4(0.f, 0.f, 0.f, 0.f), gv[kFP];
  float pn[kNP], pv[kFP];
  int32_t mn[kNP], mv[kFP];  // reader row, -1: none or inside the chunk
  auto prefetch = [&](int64_t c) {
    const int32_t c0 = static_cast<int32_t>(c) * kC, i = c0 + t, cend = c0 + kC;
#pragma unroll
    for (int j = 0; j < kNP; ++j) mn[j] = -1;
#pragma unroll
    for (int j = 0; j < kFP; ++j) mv[j] = -1;
    if (i < n32 && dok) {
      if (part == 0) xv = load4(dy0 + static_cast<int64_t>(i) * yst);
      const float* Pi = P0 + static_cast<int64_t>(i) * S;
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        const int l = part + j * kS;
        const int32_t fb = l < nn ? fl[l] : -1;
        const int32_t mrow = fb >= 0 && fb < n32 - i ? i + fb : -1;
        mn[j] = mrow >= cend ? mrow : -1;
        pn[j] = mn[j] >= 0 ? Pi[fb * S + l] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j) {
        const int l = nn + part + j * kS;
        const int32_t fb = l < nf ? fl[l] : -1;
        const int32_t mrow = fb >= 0 && fb < n32 - i ? i + fb : -1;
        mv[j] = mrow >= cend ? mrow : -1;
        pv[j] = mv[j] >= 0 ? Pi[fb * S + l] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j)
        if (mv[j] >= cend + kC) gv[j] = *reinterpret_cast<const float4*>(gbase + static_cast<int64_t>(mv[j]) * yst);
    }
  };
  if (nch > 0) {
    copy_tile_async(Ms[(nch - 1) & 1], Mh + (nch - 1) * a.H * kC * kC, threadIdx.x, kN);
    prefetch(nch - 1);
  }
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int32_t c0 = static_cast<int32_t>(c) * kC, i = c0 + t, cend = c0 + kC;
    const bool row = i < n32 && dok;
    const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
    float4 w = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row) {
      if (part == 0) {
        w = xv;
        if (a.bad && !(isfinite(w.x) && isfinite(w.y) && isfinite(w.z) && isfinite(w.w))) atomicOr(a.bad, 8);
      }
      const float(*gp)[kW] = Gp[(c + 1) & 1];  // chunk c + 1
#pragma unroll
      for (int j = 0; j < kNP; ++j) {
        if (mn[j] < 0) continue;
        fma4(w, pn[j], *reinterpret_cast<const float4*>(&gp[mn[j] - cend][4 * g]));  // f <= kC: chunk c + 1
      }
#pragma unroll
      for (int j = 0; j < kFP; ++j) {
        if (mv[j] < 0) continue;
        fma4(w, pv[j], mv[j] < cend + kC ? *reinterpret_cast<const float4*>(&gp[mv[j] - cend][4 * g]) : gv[j]);
      }
      for (int kk = nf + part; kk < a.nbl; kk += kS) {
        const int64_t mrow = i + f[kk];
        if (mrow >= sq.n) break;
        if (mrow < cend) continue;
        const float p = P[rid(a, sq, h, mrow) * S + 1 + kk];
        fma4(w, p, mrow < cend + kC ? *reinterpret_cast<const float4*>(&gp[mrow - cend][4 * g])
                                    : *reinterpret_cast<const float4*>(gbase + mrow * a.sy.st));
      }
    }
    w = parts_sum<kS>(w);
    if (part == 0) *reinterpret_cast<float4*>(&W[t][4 * g]) = w;
    __pipeline_wait_prior(0);
    __syncthreads();
    if (c > 0) {
      copy_tile_async(Ms[(c - 1) & 1], Mh + (c - 1) * a.H * kC * kC, threadIdx.x, kN);
      prefetch(c - 1);
    }
    const float(*Mc)[kC + 4] = Ms[c & 1];
    if (kTC && a.tc) {
      // rows past the sequence have W = 0 and finite M rows (chunk_inverse), so the full
      // k-range is safe
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, mi = warp & 3, ni = warp >> 2;
      float cf[4];
      if (8 * ni < kW) chunk_product_tc<true, kWP>(Mc, W, mi, ni, lane, cf);
      const int ch = 8 * ni + 2 * (lane & 3);
      const int64_t dch = static_cast<int64_t>(blockIdx.z) * kW + ch;
#pragma unroll
      for (int half = 0; half < 2 && 8 * ni < kW; ++half) {
        const int r = 16 * mi + (lane >> 2) + 8 * half;
        *reinterpret_cast<float2*>(&Gp[c & 1][r][ch]) = make_float2(cf[2 * half], cf[2 * half + 1]);
        if (r < nvalid && dch < a.Dv) store2(G + eoff(a.sy, sq, c0 + r, h) + dch, cf[2 * half], cf[2 * half + 1]);
      }
    } else {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row) {
#pragma unroll 4
        for (int s2 = t + part; s2 < nvalid; s2 += kS) fma4(acc, Mc[s2][t], *reinterpret_cast<const float4*>(&W[s2][4 * g]));  // (M_c^T)[t][s2]
      }
      acc = parts_sum<kS>(acc);
      if (row && part == 0) *reinterpret_cast<float4*>(gbase + static_cast<int64_t>(i) * yst) = acc;
      if (part == 0) *reinterpret_cast<float4*>(&Gp[c & 1][t][4 * g]) = acc;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Superchunk chains (v14), offsets in B, bfloat16 storage: steps of kSC = 256 rows instead of
// 64, so a quarter of the sequential steps. M2_S = (I - B_SS)^{-1} of a whole superchunk is
// computed for all superchunks at once (super_inverse) and stored in float16 (its entries lie
// in [0, 1]: M[t][j] is 0, 1 or a weighted sum of earlier entries with weights summing to at
// most 1; float16 keeps TF32's 10 mantissa bits); a step is then the taps that reach
// earlier superchunks and one 256 x 256 triangular product on tensor cores (TF32), so the
// 256 rows of a step depend on nothing inside the step.
constexpr int kSC = 256;                                       // rows a superchunk, threads a chain block
constexpr int kSCTiles = kSC / 16;                             // M2 in 16 x 16 tiles of its lower triangle
constexpr int kSCElems = kSCTiles * (kSCTiles + 1) / 2 * 256;  // float16 entries a superchunk (69632 bytes)
constexpr int kSCW = 8;                                        // channels a chain block
constexpr int kSCNear = 16;                                    // levels with f <= kSC: sources in this superchunk or the previous
constexpr int kSCFar = 8;                                      // further levels whose outputs are fetched a step ahead
constexpr int kSCPW = 1 + kSCNear + kSCFar;                    // coefficient row in shared memory (odd: no bank conflicts)
constexpr int kSCInvCols = 128;                                // columns of M2 a super_inverse block

// Where M2[r][c] (c / 16 <= r / 16) sits in a superchunk's table: tile (r / 16, c / 16) of the
// lower triangle, row-major inside; the columns of rows 4-7 and 12-15 of a tile are XORed with 8
// so that the A fragments of M2 (lanes over rows) and of M2^T (lanes over columns) are both
// read without bank conflicts.
__host__ __device__ __forceinline__ int sc_off(int r, int c) {
  const int tr = r >> 4, tc = c >> 4;
  return ((tr * (tr + 1) / 2 + tc) << 8) + ((r & 15) << 4) + ((c & 15) ^ ((r & 4) << 1));
}

// Columns [128 half, +128) of M2 for superchunk blockIdx.z / 2 of sequence blockIdx.x, head
// blockIdx.y: column j by a sweep down the rows, M[t][j] = [t == j] + sum_l p(t, l) M[t - f_l][j]
// over the levels whose source lies inside the superchunk (kNin slots, unused ones with
// coefficient 0). The column's last `ring` values (a power of two >= the largest such f) stay in
// shared memory, zero before the sweep, so rows above j come out 0 without a test and an
// out-of-range source reads a finite value times a zero coefficient. Rows past the sequence get
// identity rows.
template <int kNin>
__global__ void __launch_bounds__(kSCInvCols)
    super_inverse(KArgs a, const SeqInfo* seqs, const float* P, __half* M2, int32_t nin, int32_t ring_log) {
  extern __shared__ float sm[];
  const int ring = 1 << ring_log, mask = ring - 1;
  float* hist = sm;                      // [ring][kSCInvCols]
  float* tp = hist + ring * kSCInvCols;  // [kSC][kNin]
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y, sc = blockIdx.z >> 1;
  const int64_t r0 = sc * kSC;
  if (r0 >= sq.n) return;  // the whole block: sequences shorter than the longest
  const int nvalid = static_cast<int>(lmin(kSC, sq.n - r0)), S = 1 + a.nbl;
  int32_t f[kNin];
#pragma unroll
  for (int l = 0; l < kNin; ++l) f[l] = l < nin ? static_cast<int32_t>(a.pat.B.f[l]) : 0;
  for (int idx = threadIdx.x; idx < ring * kSCInvCols; idx += kSCInvCols) hist[idx] = 0.f;
  for (int idx = threadIdx.x; idx < kSC * kNin; idx += kSCInvCols) {
    const int t = idx / kNin, l = idx % kNin;
    const int32_t fl = l < nin ? static_cast<int32_t>(a.pat.B.f[l]) : kSC;
    tp[idx] = t < nvalid && fl <= t ? P[rid(a, sq, h, r0 + t) * S + 1 + l] : 0.f;
  }
  __syncthreads();
  const int c = threadIdx.x, j = (blockIdx.z & 1) * kSCInvCols + c;
  __half* Mg = M2 + ((sq.sbase + sc) * a.H + h) * kSCElems;
  float* col = hist + c;
  for (int t = j & ~15; t < kSC; ++t) {
    const float* pt = tp + t * kNin;
    float s0 = t == j ? 1.f : 0.f, s1 = 0.f;
#pragma unroll
    for (int l = 0; l < kNin; l += 2) {
      s0 = fmaf(pt[l], col[((t - f[l]) & mask) * kSCInvCols], s0);
      s1 = fmaf(pt[l + 1], col[((t - f[l + 1]) & mask) * kSCInvCols], s1);
    }
    const float mv = s0 + s1;
    col[(t & mask) * kSCInvCols] = mv;
    Mg[sc_off(t, j)] = __float2half_rn(mv);
  }
}

// One 16 x 16 tile product step pair on tensor cores (TF32; float16 entries of M2 are exact in
// TF32): c += A(tile at `tile`, k-half h) x B, with A's lane offsets o (a0 .. a3) precomputed.
__device__ __forceinline__ void sc_mma(float* c, const __half* tile, const int* o, uint32_t b0, uint32_t b1) {
  mma_tf32(c, __float_as_uint(__half2float(tile[o[0]])), __float_as_uint(__half2float(tile[o[1]])),
           __float_as_uint(__half2float(tile[o[2]])), __float_as_uint(__half2float(tile[o[3]])), b0, b1);
}

// Rows of tiles ma and mb of M2 W (kTrans: M2^T W), the block's 8 channels; the two tiles share
// each k-step's B fragment, and each tile keeps one accumulator per k-half (shorter mma chains).
template <bool kTrans>
__device__ __forceinline__ void super_product(const __half* Ms, const float (*W)[kSCW], int ma, int mb, int lane, float* ca, float* cb) {
  const int gq = lane >> 2, tq = lane & 3;
  // A fragment offsets inside a tile (sc_off's layout), k-half 0 and 1
  int o[2][4];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (kTrans) {
      const int b = 128 * hh + 16 * tq + gq;  // M[16 kt + 8 hh + tq][16 mi + gq]
      o[hh][0] = b;
      o[hh][1] = b + 8;
      o[hh][2] = b + 72;
      o[hh][3] = b + 64;
    } else {
      const int b = (16 * gq + 8 * hh + tq) ^ ((gq & 4) << 1);  // M[16 mi + gq][16 kt + 8 hh + tq]
      o[hh][0] = b;
      o[hh][1] = b + 128;
      o[hh][2] = b + 4;
      o[hh][3] = b + 132;
    }
  }
  float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f}, b0[4] = {0.f, 0.f, 0.f, 0.f}, b1[4] = {0.f, 0.f, 0.f, 0.f};
  // forward: k-tiles 0 .. mi; transposed: mi .. 15
  const int lo = kTrans ? min(ma, mb) : 0, hi = kTrans ? kSCTiles - 1 : max(ma, mb);
  for (int kt = lo; kt <= hi; ++kt) {
    const bool use_a = kTrans ? kt >= ma : kt <= ma, use_b = kTrans ? kt >= mb : kt <= mb;
    const __half* ta = Ms + ((kTrans ? kt * (kt + 1) / 2 + ma : ma * (ma + 1) / 2 + kt) << 8);
    const __half* tb = Ms + ((kTrans ? kt * (kt + 1) / 2 + mb : mb * (mb + 1) / 2 + kt) << 8);
    const int k0 = 16 * kt + tq;
    const uint32_t w00 = tf32(W[k0][gq]), w01 = tf32(W[k0 + 4][gq]), w10 = tf32(W[k0 + 8][gq]), w11 = tf32(W[k0 + 12][gq]);
    if (use_a) {
      sc_mma(a0, ta, o[0], w00, w01);
      sc_mma(a1, ta, o[1], w10, w11);
    }
    if (use_b) {
      sc_mma(b0, tb, o[0], w00, w01);
      sc_mma(b1, tb, o[1], w10, w11);
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    ca[e] = a0[e] + a1[e];
    cb[e] = b0[e] + b1[e];
  }
}

// PT[e][R] = P[R S + e]: the coefficient table level-major, so that a chain block's 256 rows
// read one level's coefficients as one coalesced run (row-major, each 4-byte coefficient costs a
// 32-byte sector; v14c: backward chain 2.63 -> 2.44 ms at (1, 65536, 16, 64), forward unchanged).
__global__ void transpose_coef(const float* P, float* PT, int64_t rows, int32_t S) {
  const int64_t R = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (R >= rows) return;
  for (int e = 0; e < S; ++e) PT[e * rows + R] = P[R * S + e];
}

// Eight channels of a row in storage type as floats; vec: 16-byte aligned.
template <class T>
__device__ __forceinline__ void load8_any(const T* p, bool vec, float* o) {
  if (vec) {
    load8(p, o);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = to_f(p[j]);
  }
}
__device__ __forceinline__ void fma8(float* w, float p, const float* x) {
  const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  w[0] = fmaf(p, a.x, w[0]); w[1] = fmaf(p, a.y, w[1]); w[2] = fmaf(p, a.z, w[2]); w[3] = fmaf(p, a.w, w[3]);
  w[4] = fmaf(p, b.x, w[4]); w[5] = fmaf(p, b.y, w[5]); w[6] = fmaf(p, b.z, w[6]); w[7] = fmaf(p, b.w, w[7]);
}

// Shared memory of the superchunk chains: M2 of this step and the next (double buffered), W,
// the neighbouring superchunk's outputs (forward: y of S - 1; backward: g of S + 1), the step's
// coefficient rows (level-major: alpha, then one row a level, kSCPR floats each).
constexpr int kSCPR = kSC + 4;  // a coefficient row: 256 rows from a 16-byte aligned start up to 3 floats early
constexpr int kSCPC = kSCPR / 4;  // its 16-byte pieces
constexpr size_t kSCSmem = 2 * sizeof(__half) * kSCElems + sizeof(float) * (2 * kSC * kSCW + kSCPW * kSCPR);

// mbarrier and bulk copy (v14h): M2 of a step arrives as one bulk copy issued by one thread,
// completion counted in bytes, instead of 17 16-byte cp.async a thread with their address math.
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* m, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(m)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* m, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(m)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* m, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_u32(m)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* m) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(m)) : "memory");
}
// Eight bfloat16 (or float16) values kept as raw bits until they are used: a conversion right
// after the load would wait for the load there.
template <class T>
__device__ __forceinline__ uint4 load8_raw(const T* p, bool vec) {
  if (vec) return *reinterpret_cast<const uint4*>(p);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  uint16_t v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = q[j];
  return make_uint4(v[0] | (uint32_t(v[1]) << 16), v[2] | (uint32_t(v[3]) << 16), v[4] | (uint32_t(v[5]) << 16), v[6] | (uint32_t(v[7]) << 16));
}

// One block per (sequence, head, 8 channels), 256 threads, thread t = row t of the step; one
// block a SM (the caller launches it only when all blocks are resident at once).
// Forward (kBack = false), superchunks in order: y_S = M2_S (alpha x + taps into S - 1 and
// earlier). Backward (kBack = true), in reverse: g_S = M2_S^T (dy + taps from readers m = i + f
// in S + 1 and later, with the reader's coefficient). Levels: near [0, nn) (f <= kSC: the
// neighbour superchunk, shared memory), far slots [nn, nf) (values fetched one step ahead into
// registers), the rest read inside the step. The next step's coefficients (16-byte cp.async
// over the level-major table, all threads) and M2 (one bulk copy) arrive during this step's
// product. vbits: TOKMIX_CUDA_VARIANT (64: M2 by per-thread cp.async; 128: coefficients by one
// 4-byte cp.async a row and level), for measuring what each part gives.
template <class T, bool kBack>
__global__ void __launch_bounds__(kSC, 1)
    chain_super(KArgs a, const SeqInfo* seqs, const T* x, const float* PT, int64_t rows, const __half* M2, T* y, float* out,
                int32_t nn, int32_t vec, int32_t vbits) {
  extern __shared__ __align__(16) unsigned char smraw[];
  __half* Ms0 = reinterpret_cast<__half*>(smraw);
  float(*W)[kSCW] = reinterpret_cast<float(*)[kSCW]>(smraw + 2 * sizeof(__half) * kSCElems);
  float(*Nb)[kSCW] = W + kSC;                          // neighbour superchunk's outputs
  float* Pc = reinterpret_cast<float*>(Nb + kSC);      // coefficient rows: row 0 alpha, row 1 + l level l
  __shared__ int32_t fl[kSCNear + kSCFar];
  __shared__ int32_t po[kSCPW];                         // where row t's value sits in each coefficient row
  __shared__ __align__(8) uint64_t mbar[2];             // M2 buffer 0 / 1 complete
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y, d = static_cast<int64_t>(blockIdx.z) * kSCW;
  const int t = threadIdx.x;
  const int nf = min(a.nbl, nn + kSCFar);
  const bool bulk = !(vbits & 64), wide = !(vbits & 128);
  const float* PT0 = PT + rid(a, sq, h, 0);        // row i: alpha PT0[i], level l PT0[(1 + l) rows + i]
  // coefficient row r (0: alpha, 1 + l: level l) of the step at r0 starts at PT0 + r rows + r0 + shift(r)
  auto prow = [&](int r) { return PT0 + r * rows + (kBack && r > 0 ? fl[r - 1] : 0); };
  if (t < kSCNear + kSCFar) fl[t] = t < nf ? static_cast<int32_t>(a.pat.B.f[t]) : 0;
  if (t == 0 && bulk) {
    mbar_init(&mbar[0], 1);
    mbar_init(&mbar[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // r0 is a multiple of kSC, so a row's misalignment is the same at every step
  if (t < kSCPW) po[t] = t <= nf ? static_cast<int32_t>((reinterpret_cast<uintptr_t>(prow(t)) >> 2) & 3) : 0;
  __syncthreads();
  const int64_t nsc = (sq.n + kSC - 1) / kSC;
  const int32_t n32 = static_cast<int32_t>(sq.n), yst = static_cast<int32_t>(a.sy.st);
  const int64_t xst = kBack ? a.sy.st : a.sv.st;
  const T* x0 = x + (kBack ? eoff(a.sy, sq, 0, h) : eoff(a.sv, sq, 0, h)) + d;
  float* obase = out + eoff(a.sy, sq, 0, h) + d;  // yf or G, float32, y's strides
  const __half* Mh = M2 + (sq.sbase * a.H + h) * kSCElems;  // superchunk s at Mh + s * H * kSCElems
  uint4 xr;
  float fv[kSCFar][8];
  // row t's coefficient of row r (0: alpha, 1 + l: level l)
  auto coef = [&](int r) { return wide ? Pc[r * kSCPR + po[r] + t] : Pc[r * kSCPR + t]; };
  // Fetches for step `it` (superchunk s): the coefficient rows and M2 into buffer it & 1 (one
  // cp.async group and, with `bulk`, the bulk copy); into registers, x and the far slots' values
  // that lie two or more superchunks away (final by now).
  auto prefetch = [&](int64_t it, int64_t s) {
    const int32_t r0 = static_cast<int32_t>(s) * kSC, i = r0 + t;
    const int r_first = kBack ? 1 : 0, nrow = 1 + nf - r_first;
    if (wide) {
      // 16-byte pieces of each row from its aligned start; pieces wholly past the sequence skipped
      for (int idx = t; idx < nrow * kSCPC; idx += kSC) {
        const int r = r_first + idx / kSCPC, c = idx % kSCPC;
        const int32_t shift = kBack && r > 0 ? fl[r - 1] : 0;
        if (r0 + shift + 4 * c - po[r] >= n32) continue;
        const float* src = prow(r) + r0 - po[r] + 4 * c;
        __pipeline_memcpy_async(Pc + r * kSCPR + 4 * c, src, 16);
      }
    } else if (i < n32) {
      if (!kBack) __pipeline_memcpy_async(Pc + t, PT0 + i, 4);
      for (int l = 0; l < nf; ++l) {
        const int32_t f = fl[l];
        if (kBack ? f >= n32 - i : f > i) break;
        __pipeline_memcpy_async(Pc + (1 + l) * kSCPR + t, PT0 + (1 + l) * rows + (kBack ? i + f : i), 4);
      }
    }
    if (i < n32) {
      xr = load8_raw(x0 + static_cast<int64_t>(i) * xst, vec);
#pragma unroll
      for (int j = 0; j < kSCFar; ++j) {
        const int l = nn + j;
        if (l >= nf) break;
        const int32_t src = kBack ? i + fl[l] : i - fl[l];
        if (kBack ? (src < n32 && src >= r0 + 2 * kSC) : (src >= 0 && src < r0 - kSC))
          load8(obase + static_cast<int64_t>(src) * yst, fv[j]);
      }
    }
    const char* msrc = reinterpret_cast<const char*>(Mh + s * a.H * kSCElems);
    char* mdst = reinterpret_cast<char*>(Ms0 + (it & 1) * kSCElems);
    if (bulk) {
      if (t == 0) {
        // the buffer's last reads (the product two steps back) are ordered before the copy by the
        // block barrier that precedes this call; the proxy fence carries that order to the copy
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        mbar_expect_tx(&mbar[it & 1], kSCElems * 2);
        bulk_copy(mdst, msrc, kSCElems * 2, &mbar[it & 1]);
      }
    } else {
      for (int idx = t; idx < kSCElems * 2 / 16; idx += kSC) __pipeline_memcpy_async(mdst + 16 * idx, msrc + 16 * idx, 16);
    }
    __pipeline_commit();
  };
  if (nsc > 0) prefetch(0, kBack ? nsc - 1 : 0);
  const int warp = t >> 5, lane = t & 31;
  for (int64_t it = 0; it < nsc; ++it) {
    const int64_t s = kBack ? nsc - 1 - it : it;
    const int32_t r0 = static_cast<int32_t>(s) * kSC, i = r0 + t;
    const int nvalid = static_cast<int>(lmin(kSC, sq.n - r0));
    __pipeline_wait_prior(0);  // this step's coefficients (and M2 without `bulk`)
    // the coefficient rows were copied by other threads (wide): visible after the barrier
    if (wide) __syncthreads();
    float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (i < n32) {
      float xv[8];
      raw8_to_float<T>(xr, xv);
      if (a.bad && !finite8(xv)) atomicOr(a.bad, kBack ? 8 : 4);
      const float x_w = kBack ? 1.f : coef(0);
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = x_w * xv[j];
      // neighbour superchunk: forward [r0 - kSC, r0), backward [r0 + kSC, r0 + 2 kSC)
      const int32_t nb0 = kBack ? r0 + kSC : r0 - kSC;
      for (int l = 0; l < nn; ++l) {
        const int32_t f = fl[l];
        const int32_t src = kBack ? i + f : i - f;
        if (kBack ? src >= n32 : src < 0) break;
        if (static_cast<uint32_t>(src - nb0) < static_cast<uint32_t>(kSC)) fma8(w, coef(1 + l), Nb[src - nb0]);  // else in M2
      }
#pragma unroll
      for (int j = 0; j < kSCFar; ++j) {
        const int l = nn + j;
        if (l >= nf) break;
        const int32_t src = kBack ? i + fl[l] : i - fl[l];
        if (kBack ? src >= n32 : src < 0) break;
        if (static_cast<uint32_t>(src - nb0) < static_cast<uint32_t>(kSC)) fma8(w, coef(1 + l), Nb[src - nb0]);
        else fma8(w, coef(1 + l), fv[j]);
      }
      for (int l = nf; l < a.nbl; ++l) {
        const int64_t f = a.pat.B.f[l];
        const int64_t src = kBack ? i + f : i - f;
        if (kBack ? src >= sq.n : src < 0) break;
        const float p = PT0[(1 + l) * rows + (kBack ? src : i)];
        float v8[8];
        if (src - nb0 >= 0 && src - nb0 < kSC) {
          fma8(w, p, Nb[src - nb0]);
        } else {
          load8(obase + src * a.sy.st, v8);
          fma8(w, p, v8);
        }
      }
    }
    *reinterpret_cast<float4*>(&W[t][0]) = make_float4(w[0], w[1], w[2], w[3]);
    *reinterpret_cast<float4*>(&W[t][4]) = make_float4(w[4], w[5], w[6], w[7]);
    __syncthreads();
    // the next step's fetches go out before the product, whose time covers their latency; the
    // other M2 buffer was last read by the previous step's product
    if (it + 1 < nsc) prefetch(it + 1, kBack ? s - 1 : s + 1);
    if (bulk) mbar_wait(&mbar[it & 1], static_cast<uint32_t>(it >> 1) & 1);  // this step's M2
    // warp w: row tiles w and 15 - w (34 k-steps either way)
    const int ma = warp, mb = kSCTiles - 1 - warp;
    float ca[4], cb[4];
    super_product<kBack>(Ms0 + (it & 1) * kSCElems, W, ma, mb, lane, ca, cb);
    const int ch = 2 * (lane & 3);
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const int mi = pass == 0 ? ma : mb;
      const float* c = pass == 0 ? ca : cb;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 16 * mi + (lane >> 2) + 8 * half;
        *reinterpret_cast<float2*>(&Nb[r][ch]) = make_float2(c[2 * half], c[2 * half + 1]);
        if (r < nvalid) {
          const int64_t o = eoff(a.sy, sq, r0 + r, h) + d + ch;
          store2(out + o, c[2 * half], c[2 * half + 1]);
          if (!kBack) store2(y + o, c[2 * half], c[2 * half + 1]);
        }
      }
    }
    __syncthreads();
  }
}

// Sequential chain over chunks in reverse, backward: g_c = M_c^T (dy + transposed long taps).
template <class T, bool kLattice, int kV>
__global__ void __launch_bounds__(kChainThreads)
    chain_backward(KArgs a, const SeqInfo* seqs, const T* dy, const float* P, const int32_t* SRC, const float* M, float* G) {
  __shared__ float Ms[kC][kC + 1];
  __shared__ float W[kC][kDS * kV];
  __shared__ float Gs[kC][kDS * kV];
  __shared__ int64_t fsm[kMaxFastLevels];
  const SeqInfo sq = seqs[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int t = threadIdx.x / kDS, dd = threadIdx.x % kDS;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * kDS * kV + dd;
  const int S = 1 + a.nbl;
  const int64_t nch = (sq.n + kC - 1) / kC;
  constexpr int kMPer = kC * kC / kChainThreads;
  if (!kLattice)
    for (int kk = threadIdx.x; kk < a.nbl; kk += kChainThreads) fsm[kk] = a.pat.B.f[kk];
  __syncthreads();
  float* gbase = G + eoff(a.sy, sq, 0, h);
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t c0 = c * kC, i = c0 + t;
    const bool row = i < sq.n;
    const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
    const float* Mg = M + ((sq.cbase + c) * a.H + h) * kC * kC;
    float mreg[kMPer];
#pragma unroll
    for (int r = 0; r < kMPer; ++r) mreg[r] = Mg[threadIdx.x + r * kChainThreads];
    float w[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) w[j] = 0.f;
    if (row) {
      const int64_t o = i * a.sy.st;
      const T* dyi = dy + eoff(a.sy, sq, i, h);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int64_t d = d0 + j * kDS;
        if (d >= a.Dv) continue;
        w[j] = to_f(dyi[d]);
        if (a.bad && !isfinite(w[j])) atomicOr(a.bad, 8);
        if (kLattice) w[j] += __ldcg(&gbase[o + d]);  // sums added by later chunks
      }
      if (!kLattice) {
        for (int k0 = 0; k0 < a.nbl; k0 += kBatch) {
          int64_t mo[kBatch];
          float pv[kBatch];
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            const int kk = k0 + b;
            const int64_t mrow = kk < a.nbl ? i + fsm[kk] : sq.n;
            const bool ok = mrow < sq.n && mrow >= c0 + kC;
            pv[b] = ok ? P[rid(a, sq, h, mrow) * S + 1 + kk] : 0.f;
            mo[b] = ok ? mrow * a.sy.st : -1;
          }
#pragma unroll
          for (int j = 0; j < kV; ++j) {
            const int64_t d = d0 + j * kDS;
            if (d >= a.Dv) continue;
            float gv[kBatch];
#pragma unroll
            for (int b = 0; b < kBatch; ++b) gv[b] = mo[b] >= 0 ? gbase[mo[b] + d] : 0.f;
#pragma unroll
            for (int b = 0; b < kBatch; ++b) w[j] = fmaf(pv[b], gv[b], w[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) W[t][dd + j * kDS] = w[j];
#pragma unroll
    for (int r = 0; r < kMPer; ++r) {
      const int idx = threadIdx.x + r * kChainThreads;
      Ms[idx % kC][idx / kC] = mreg[r];  // M_c^T
    }
    __syncthreads();
    float g[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) g[j] = 0.f;
    if (row) {
      for (int s2 = t; s2 < nvalid; ++s2) {
        const float m = Ms[t][s2];
#pragma unroll
        for (int j = 0; j < kV; ++j) g[j] = fmaf(m, W[s2][dd + j * kDS], g[j]);
      }
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int64_t d = d0 + j * kDS;
        if (d < a.Dv) gbase[i * a.sy.st + d] = g[j];
      }
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) Gs[t][dd + j * kDS] = g[j];
    __syncthreads();
    if (kLattice) {
      // readers of one source form runs of consecutive rows: one atomic per run
      for (int pair = threadIdx.x; pair < a.nbl * kDS * kV; pair += kChainThreads) {
        const int kk = pair / (kDS * kV), c2 = pair % (kDS * kV);
        const int64_t dch = static_cast<int64_t>(blockIdx.z) * kDS * kV + c2;
        if (dch >= a.Dv) continue;
        int64_t cur = -1;
        float acc = 0.f;
        for (int t0 = 0; t0 < nvalid; t0 += 8) {
          int32_t sv[8];
          float pv[8];
#pragma unroll
          for (int b = 0; b < 8; ++b) {
            const int t2 = t0 + b;
            const int64_t R2 = rid(a, sq, h, c0 + t2);
            sv[b] = t2 < nvalid ? SRC[R2 * a.nbl + kk] : -1;
            pv[b] = t2 < nvalid ? P[R2 * S + 1 + kk] : 0.f;
          }
#pragma unroll
          for (int b = 0; b < 8; ++b) {
            const int64_t s = sv[b];
            if (s < 0 || s >= c0) continue;
            if (s != cur) {
              if (cur >= 0) atomicAdd(&gbase[cur * a.sy.st + dch], acc);
              cur = s;
              acc = 0.f;
            }
            acc = fmaf(pv[b], Gs[t0 + b][c2], acc);
          }
        }
        if (cur >= 0) atomicAdd(&gbase[cur * a.sy.st + dch], acc);
      }
      __threadfence();
      __syncthreads();
    }
  }
}

// Row-parallel coefficient gradients once g is known: dq, dv, ds (kept for dk), bias, gate.
template <class T>
__global__ void __launch_bounds__(kRowWarps * 32, 3)
    grad_rows(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const T* k, const T* v, const T* gw,
              const T* y, const float* P, const int32_t* SRC, const float* G, T* dq, T* dv, float* DS, float* dbias_u,
              float* dgate_u) {
  extern __shared__ float sm[];
  const int S = 1 + a.nbl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* gs = sm + warp * a.Dv;
  float* es = sm + kRowWarps * a.Dv + warp * S;
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const int64_t s_idx = chunk_seq[cg];
  const SeqInfo sq = seqs[s_idx];
  const int64_t unit = s_idx * a.H + h;
  const int64_t c0 = (cg - sq.cbase) * kC;
  const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
  const bool softmax = a.mode == static_cast<int32_t>(Mode::Softmax);
  if (softmax && a.lpk && a.lpv && S <= 32) {
    // v12: a row's coefficients and sources are read once, one entry per lane, and passed to
    // the lane groups by shuffles, so no gather waits on a table load; gathers go out
    // kGB iterations at a time; 32-bit row indices (one wide multiply per address).
    constexpr int kGB = 2;
    const int lpv = a.lpv, eppv = 32 / lpv, subv = lane & (lpv - 1), grpv = lane / lpv;
    const int lpk = a.lpk, eppk = 32 / lpk, subk = lane & (lpk - 1), grpk = lane / lpk;
    const int64_t R0 = rid(a, sq, h, 0);
    const T* v0 = v + eoff(a.sv, sq, 0, h) + 8 * subv;
    const T* y0 = y + eoff(a.sy, sq, 0, h) + 8 * subv;
    const T* k0 = k + eoff(a.sk, sq, 0, h) + 8 * subk;
    const float* g0 = G + eoff(a.sy, sq, 0, h) + 8 * subv;
    const int32_t vst = static_cast<int32_t>(a.sv.st), yst = static_cast<int32_t>(a.sy.st), kst = static_cast<int32_t>(a.sk.st);
    for (int t = warp; t < nvalid; t += kRowWarps) {
      const int32_t i = static_cast<int32_t>(c0) + t;
      const int64_t R = R0 + i;
      const float ce = lane < S ? P[R * S + lane] : 0.f;
      const int32_t se = lane == 0 ? i : (lane < S ? SRC[R * a.nbl + lane - 1] : -1);
      float gv[8];
      load8(g0 + static_cast<int64_t>(i) * yst, gv);
      float part = 0.f;
      for (int e0 = 0; e0 < S; e0 += kGB * eppv) {
        float x[kGB][8], cc[kGB];
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * eppv + grpv;
          cc[u] = __shfl_sync(0xffffffffu, ce, e & 31);
          const int32_t src = __shfl_sync(0xffffffffu, se, e & 31);
          if (e >= S) cc[u] = 0.f;
          if (cc[u] != 0.f) load8(e == 0 ? v0 + static_cast<int64_t>(i) * vst : y0 + static_cast<int64_t>(src) * yst, x[u]);
        }
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * eppv + grpv;
          const float cu = cc[u] * group_sum(cc[u] != 0.f ? dot8(gv, x[u]) : 0.f, lpv);
          if (subv == 0 && e < S) {
            es[e] = cu;
            part += cu;
          }
        }
      }
      const float delta = warp_sum(part);
      __syncwarp();
      float dse = 0.f;  // lane e: ds of entry e
      if (lane < S) {
        const float p = lane == 0 ? ce : ce / a.gamma;
        dse = ce != 0.f ? es[lane] - p * delta : 0.f;
        DS[R * S + lane] = dse;
        if (dbias_u && ce != 0.f)
          atomicAdd(&dbias_u[unit * a.levels + (lane == 0 ? a.pat.A.level_base : a.pat.B.level_base + lane - 1)], dse);
      }
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.f;
      for (int e0 = 0; e0 < S; e0 += kGB * eppk) {
        float x[kGB][8], dd[kGB];
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * eppk + grpk;
          dd[u] = __shfl_sync(0xffffffffu, dse, e & 31);
          const int32_t src = __shfl_sync(0xffffffffu, se, e & 31);
          if (e >= S) dd[u] = 0.f;
          if (dd[u] != 0.f) load8(k0 + static_cast<int64_t>(src) * kst, x[u]);
        }
#pragma unroll
        for (int u = 0; u < kGB; ++u)
          if (dd[u] != 0.f)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = fmaf(dd[u], x[u][j], acc[j]);
      }
      across_groups(acc, lpk);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] *= a.scale;
      if (grpk == 0) store8(dq + eoff(a.sq, sq, i, h) + 8 * subk, acc);
      const float alpha = __shfl_sync(0xffffffffu, ce, 0);
      if (grpv == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) gv[j] *= alpha;
        store8(dv + eoff(a.sv, sq, i, h) + 8 * subv, gv);
      }
      __syncwarp();
    }
    return;
  }
  if (softmax && a.lpk && a.lpv) {
    // lane groups (see group_sum): one gathered row of y or k per group, 16 bytes per lane
    const int lpv = a.lpv, eppv = 32 / lpv, subv = lane & (lpv - 1), grpv = lane / lpv;
    const int lpk = a.lpk, eppk = 32 / lpk, subk = lane & (lpk - 1), grpk = lane / lpk;
    for (int t = warp; t < nvalid; t += kRowWarps) {
      const int64_t i = c0 + t, R = rid(a, sq, h, i);
      float gv[8];
      load8(G + eoff(a.sy, sq, i, h) + 8 * subv, gv);
      float part = 0.f;
      for (int e0 = 0; e0 < S; e0 += 2 * eppv) {
        float x[2][8];
        float cc[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * eppv + grpv;
          cc[u] = e < S ? P[R * S + e] : 0.f;
          if (cc[u] != 0.f) {
            const T* row = e == 0 ? v + eoff(a.sv, sq, i, h) : y + eoff(a.sy, sq, SRC[R * a.nbl + e - 1], h);
            load8(row + 8 * subv, x[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * eppv + grpv;
          const float cu = cc[u] * group_sum(cc[u] != 0.f ? dot8(gv, x[u]) : 0.f, lpv);
          if (subv == 0 && e < S) {
            es[e] = cu;
            part += cu;
          }
        }
      }
      const float delta = warp_sum(part);
      __syncwarp();
      for (int e = lane; e < S; e += 32) {
        const float c = P[R * S + e];
        const float p = e == 0 ? c : c / a.gamma;
        const float ds = c != 0.f ? es[e] - p * delta : 0.f;
        es[e] = ds;
        DS[R * S + e] = ds;
        if (dbias_u && c != 0.f) atomicAdd(&dbias_u[unit * a.levels + (e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1)], ds);
      }
      __syncwarp();
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.f;
      for (int e0 = 0; e0 < S; e0 += 2 * eppk) {
        float x[2][8];
        float dd[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * eppk + grpk;
          dd[u] = e < S ? es[e] : 0.f;
          if (dd[u] != 0.f) load8(k + eoff(a.sk, sq, e == 0 ? i : SRC[R * a.nbl + e - 1], h) + 8 * subk, x[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; ++u)
          if (dd[u] != 0.f)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = fmaf(dd[u], x[u][j], acc[j]);
      }
      across_groups(acc, lpk);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] *= a.scale;
      if (grpk == 0) store8(dq + eoff(a.sq, sq, i, h) + 8 * subk, acc);
      const float alpha = P[R * S];
      if (grpv == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) gv[j] *= alpha;
        store8(dv + eoff(a.sv, sq, i, h) + 8 * subv, gv);
      }
      __syncwarp();
    }
    return;
  }
  for (int t = warp; t < nvalid; t += kRowWarps) {
    const int64_t i = c0 + t, R = rid(a, sq, h, i);
    for (int d = lane; d < a.Dv; d += 32) gs[d] = G[eoff(a.sy, sq, i, h) + d];
    __syncwarp();
    float part = 0.f;
    for (int e = lane; e < S; e += 32) {
      const float c = P[R * S + e];
      float cu = 0.f;
      if (c != 0.f) {
        const float u = e == 0 ? dot_row(gs, v + eoff(a.sv, sq, i, h), static_cast<int>(a.Dv))
                               : dot_row(gs, y + eoff(a.sy, sq, SRC[R * a.nbl + e - 1], h), static_cast<int>(a.Dv));
        cu = c * u;
      }
      es[e] = cu;
      part += cu;
    }
    const float delta = warp_sum(part);
    for (int e = lane; e < S; e += 32) {
      const float c = P[R * S + e];
      const float p = e == 0 ? c : c / a.gamma;
      const float ds = c != 0.f ? es[e] - p * delta : 0.f;
      es[e] = ds;
      DS[R * S + e] = ds;
      if (dbias_u && c != 0.f) atomicAdd(&dbias_u[unit * a.levels + (e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1)], ds);
    }
    __syncwarp();
    const T* qi = q + eoff(a.sq, sq, i, h);
    for (int d = lane; d < a.Dk; d += 32) {
      float acc = 0.f;
      const float qd = to_f(qi[d]);
      for (int e = 0; e < S; ++e) {
        const float ds = es[e];
        if (ds == 0.f) continue;
        const int32_t lvl = e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1;
        if (softmax) {
          const int64_t src = e == 0 ? i : SRC[R * a.nbl + e - 1];
          acc = fmaf(ds, to_f(k[eoff(a.sk, sq, src, h) + d]), acc);
        } else {
          acc = fmaf(ds, to_f(gw[(h * a.levels + lvl) * a.Dk + d]), acc);
          atomicAdd(&dgate_u[(unit * a.levels + lvl) * a.Dk + d], ds * qd);
        }
      }
      dq[eoff(a.sq, sq, i, h) + d] = from_f<T>(softmax ? a.scale * acc : acc);
    }
    const float alpha = P[R * S];
    for (int d = lane; d < a.Dv; d += 32) dv[eoff(a.sv, sq, i, h) + d] = from_f<T>(alpha * gs[d]);
    __syncwarp();
  }
}

// dk for offsets: gather over the transposed pattern (readers of j are j + f(k)).
template <class T>
__global__ void __launch_bounds__(kRowWarps * 32, 4)
    dk_gather(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const float* DS, T* dk) {
  const int S = 1 + a.nbl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  const int64_t c0 = (cg - sq.cbase) * kC;
  const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
  const int64_t* f = a.pat.B.f;
  if (a.lpk && S <= 32) {
    // v12: lane e finds entry e's reader and its ds (one round trip for the row), the lane
    // groups get them by shuffles and gather q rows kGB iterations at a time
    constexpr int kGB = 4;
    const int lpe = a.lpk, epp = 32 / lpe, sub = lane & (lpe - 1), grp = lane / lpe;
    const int64_t R0 = rid(a, sq, h, 0);
    const T* q0 = q + eoff(a.sq, sq, 0, h) + 8 * sub;
    const int32_t qst = static_cast<int32_t>(a.sq.st), n32 = static_cast<int32_t>(sq.n);
    const int32_t fl = lane >= 1 && lane < S ? static_cast<int32_t>(lmin(f[lane - 1], INT32_MAX)) : 0;
    for (int t = warp; t < nvalid; t += kRowWarps) {
      const int32_t j = static_cast<int32_t>(c0) + t;
      const int32_t me = lane < S && fl < n32 - j ? j + fl : -1;  // reader of entry `lane`
      const float de = me >= 0 ? DS[(R0 + me) * S + lane] : 0.f;
      float acc[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = 0.f;
      for (int e0 = 0; e0 < S; e0 += kGB * epp) {
        float x[kGB][8], dd[kGB];
#pragma unroll
        for (int u = 0; u < kGB; ++u) {
          const int e = e0 + u * epp + grp;
          dd[u] = __shfl_sync(0xffffffffu, de, e & 31);
          const int32_t m = __shfl_sync(0xffffffffu, me, e & 31);
          if (e >= S) dd[u] = 0.f;
          if (dd[u] != 0.f) load8(q0 + static_cast<int64_t>(m) * qst, x[u]);
        }
#pragma unroll
        for (int u = 0; u < kGB; ++u)
          if (dd[u] != 0.f)
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) acc[jj] = fmaf(dd[u], x[u][jj], acc[jj]);
      }
      across_groups(acc, lpe);
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] *= a.scale;
      if (grp == 0) store8(dk + eoff(a.sk, sq, j, h) + 8 * sub, acc);
    }
    return;
  }
  if (a.lpk) {
    const int lpe = a.lpk, epp = 32 / lpe, sub = lane & (lpe - 1), grp = lane / lpe;
    for (int t = warp; t < nvalid; t += kRowWarps) {
      const int64_t j = c0 + t;
      float acc[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = 0.f;
      // slot 0: the row itself (alpha); slot 1 + kk: its reader at level kk
      for (int e0 = 0; e0 <= a.nbl; e0 += 2 * epp) {
        float x[2][8];
        float dd[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = e0 + u * epp + grp;
          const int64_t m = e == 0 ? j : (e <= a.nbl ? j + f[e - 1] : sq.n);
          dd[u] = m < sq.n ? DS[rid(a, sq, h, m) * S + e] : 0.f;
          if (dd[u] != 0.f) load8(q + eoff(a.sq, sq, m, h) + 8 * sub, x[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; ++u)
          if (dd[u] != 0.f)
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) acc[jj] = fmaf(dd[u], x[u][jj], acc[jj]);
      }
      across_groups(acc, lpe);
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] *= a.scale;
      if (grp == 0) store8(dk + eoff(a.sk, sq, j, h) + 8 * sub, acc);
    }
    return;
  }
  for (int t = warp; t < nvalid; t += kRowWarps) {
    const int64_t j = c0 + t;
    const float dsa = DS[rid(a, sq, h, j) * S];
    for (int d = lane; d < a.Dk; d += 32) {
      float acc = dsa * to_f(q[eoff(a.sq, sq, j, h) + d]);
      for (int kk = 0; kk < a.nbl; ++kk) {
        const int64_t m = j + f[kk];
        if (m >= sq.n) break;
        acc = fmaf(DS[rid(a, sq, h, m) * S + 1 + kk], to_f(q[eoff(a.sq, sq, m, h) + d]), acc);
      }
      dk[eoff(a.sk, sq, j, h) + d] = from_f<T>(a.scale * acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// v13: the row-parallel passes for offsets (A = the row itself, B = offsets, at most kSMax
// entries a row, D = 64 or 128). A warp holds 32 / kL rows (kL = D / 8 lanes a row, 16 bytes a
// lane) and every lane issues kSB gathers before it waits, so one round trip carries kSB
// entries of each of the warp's rows: 4x the loads in flight of the v12 layout (one row a warp)
// at D = 64. Entry e's distance comes from a per-block table (e = 0: the row itself, its A
// entry); f increases, so a row's entries are those below a count `cnt`, and no source table is
// read (the coefficient pass still writes SRC for chunk_inverse). Loads depend on where entries
// are, never on loaded values, so that a row's table reads and gathers share one round trip.
constexpr int kSB = 8;

// Entry distances (INT32_MAX: no such entry) and level biases of a head, for the slab passes.
template <class T>
__device__ __forceinline__ void slab_tables(const KArgs& a, int64_t h, const T* bias, int32_t* fl, float* bl, int nmax) {
  const int S = 1 + a.nbl, e = threadIdx.x;
  if (e < nmax) {
    fl[e] = e == 0 ? 0 : (e < S ? static_cast<int32_t>(lmin(a.pat.B.f[e - 1], INT32_MAX)) : INT32_MAX);
    if (bl) {
      const int32_t lvl = e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1;
      bl[e] = bias && e < S ? to_f(bias[h * a.levels + lvl]) : 0.f;
    }
  }
  __syncthreads();
}
// Entries with distance <= lim (entry 0 always): distances increase with e.
template <int kSMax>
__device__ __forceinline__ int slab_count(const int32_t* fl, int32_t lim) {
  int cnt = 1;
#pragma unroll
  for (int e = 1; e < kSMax; ++e) cnt += fl[e] <= lim ? 1 : 0;
  return cnt;
}
// x[j kL + sub] for this lane's sub (a select chain: no local memory for a register array).
template <int kL>
__device__ __forceinline__ float lane_pick(const float* x, int j, int sub) {
  float r = 0.f;
#pragma unroll
  for (int u = 0; u < kL; ++u)
    if (u == sub) r = x[j * kL + u];
  return r;
}

template <class T, int kSMax, int kL>
__global__ void __launch_bounds__(kRowWarps * 32, 2)
    coef_slab(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const T* k, const T* bias, const T* gw,
              float* lse, float* P, int32_t* SRC) {
  __shared__ int32_t fl[kSMax];
  __shared__ float bl[kSMax];
  constexpr int kRows = kRowWarps * 32 / kL;  // rows a pass
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  slab_tables(a, h, bias, fl, bl, kSMax);
  const int S = 1 + a.nbl, sub = threadIdx.x & (kL - 1);
  const bool softmax = a.mode == static_cast<int32_t>(Mode::Softmax);
  const int32_t c0 = static_cast<int32_t>((cg - sq.cbase) * kC), nvalid = static_cast<int32_t>(lmin(kC, sq.n - c0));
  const T* kb = softmax ? k + eoff(a.sk, sq, 0, h) + 8 * sub : nullptr;
  const T* gb = softmax ? nullptr : gw + h * a.levels * a.Dk + 8 * sub;
  const int32_t kst = static_cast<int32_t>(a.sk.st);
  const int64_t R0 = rid(a, sq, h, 0);
  for (int32_t t0 = 0; t0 < nvalid; t0 += kRows) {  // every lane of a warp runs the same passes (shuffles)
    const int32_t t = t0 + static_cast<int32_t>(threadIdx.x) / kL, i = c0 + t;
    const bool valid = t < nvalid;
    const int cnt = valid ? slab_count<kSMax>(fl, i) : 0;
    float qv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) qv[j] = 0.f;
    if (valid) {
      load8(q + eoff(a.sq, sq, i, h) + 8 * sub, qv);
      if (a.bad && !finite8(qv)) atomicOr(a.bad, 1);
    }
    float sc[kSMax];
#pragma unroll
    for (int e = 0; e < kSMax; ++e) sc[e] = -INFINITY;
#pragma unroll
    for (int b0 = 0; b0 < kSMax; b0 += kSB) {
      if (b0 >= S) break;
      Piece<T> x[kSB];
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        if (e < cnt) {
          const int32_t lvl = e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1;
          x[u] = load_piece(softmax ? kb + static_cast<int64_t>(i - fl[e]) * kst : gb + static_cast<int64_t>(lvl) * a.Dk);
        }
      }
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        const float s = group_sum(e < cnt ? dot_piece(qv, x[u]) : 0.f, kL);
        if (e < cnt) sc[e] = (softmax ? a.scale * s : s) + bl[e];
      }
      if (b0 == 0 && softmax && a.bad && cnt > 0 && !finite_piece(x[0])) atomicOr(a.bad, 2);
    }
    float mx = -INFINITY;
#pragma unroll
    for (int e = 0; e < kSMax; ++e) mx = fmaxf(mx, sc[e]);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < kSMax; ++e)
      if (e < cnt) sum += __expf(sc[e] - mx);
    const float l = mx + logf(sum);
    if (!valid) continue;
    const int64_t R = R0 + i;
    if (sub == 0) lse[R] = l;
#pragma unroll
    for (int j = 0; j < (kSMax + kL - 1) / kL; ++j) {  // lane sub writes entries sub, sub + kL, ...
      const int e = j * kL + sub;
      const float se = lane_pick<kL>(sc, j, sub);
      if (e < S) {
        P[R * S + e] = e < cnt ? __expf(se - l) * (e > 0 ? a.gamma : 1.f) : 0.f;
        if (e > 0) SRC[R * a.nbl + e - 1] = e < cnt ? i - fl[e] : -1;
      }
    }
  }
}

// Coefficient gradients of a row (softmax, Dk = Dv): dp_e = g_i . x_e with x_0 = v_i and x_e =
// y of entry e's source, ds = P (dp - delta), dq_i = scale sum ds_e k_src, dv_i = alpha g_i;
// DS kept for dk_slab; level-bias gradients summed per block in shared memory first (one global
// atomic per level and block instead of one per row).
template <class T, int kSMax, int kL>
__global__ void __launch_bounds__(kRowWarps * 32, 2)
    grad_slab(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* k, const T* v, const T* y, const float* P,
              const float* G, T* dq, T* dv, float* DS, float* dbias_u) {
  constexpr int kRows = kRowWarps * 32 / kL;
  __shared__ int32_t fl[kSMax];
  __shared__ float dbs[kSMax];
  __shared__ float cus[kRows][kSMax + 1];  // P_e (g . x_e) of each row of the pass
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const int64_t s_idx = chunk_seq[cg];
  const SeqInfo sq = seqs[s_idx];
  if (threadIdx.x < kSMax) dbs[threadIdx.x] = 0.f;
  slab_tables<T>(a, h, nullptr, fl, nullptr, kSMax);
  const int S = 1 + a.nbl, sub = threadIdx.x & (kL - 1), slot = static_cast<int>(threadIdx.x) / kL;
  const int32_t c0 = static_cast<int32_t>((cg - sq.cbase) * kC), nvalid = static_cast<int32_t>(lmin(kC, sq.n - c0));
  const T* kb = k + eoff(a.sk, sq, 0, h) + 8 * sub;
  const T* yb = y + eoff(a.sy, sq, 0, h) + 8 * sub;
  const T* vb = v + eoff(a.sv, sq, 0, h) + 8 * sub;
  const float* gb = G + eoff(a.sy, sq, 0, h) + 8 * sub;
  const int32_t kst = static_cast<int32_t>(a.sk.st), yst = static_cast<int32_t>(a.sy.st), vst = static_cast<int32_t>(a.sv.st);
  const int64_t R0 = rid(a, sq, h, 0);
  for (int32_t t0 = 0; t0 < nvalid; t0 += kRows) {
    const int32_t t = t0 + slot, i = c0 + t;
    const bool valid = t < nvalid;
    const int cnt = valid ? slab_count<kSMax>(fl, i) : 0;
    const float* Pr = P + (R0 + i) * S;
    float gv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) gv[j] = 0.f;
    if (valid) load8(gb + static_cast<int64_t>(i) * yst, gv);
    float delta = 0.f, alpha = 0.f;
#pragma unroll
    for (int b0 = 0; b0 < kSMax; b0 += kSB) {
      if (b0 >= S) break;
      Piece<T> x[kSB];
      float pe[kSB];
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        pe[u] = e < cnt ? Pr[e] : 0.f;
        if (e < cnt) x[u] = load_piece(e == 0 ? vb + static_cast<int64_t>(i) * vst : yb + static_cast<int64_t>(i - fl[e]) * yst);
      }
      if (b0 == 0) alpha = pe[0];
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        const float c = pe[u] * group_sum(e < cnt ? dot_piece(gv, x[u]) : 0.f, kL);
        delta += c;
        if (sub == 0) cus[slot][e] = c;
      }
    }
    __syncwarp();
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
#pragma unroll
    for (int b0 = 0; b0 < kSMax; b0 += kSB) {
      if (b0 >= S) break;
      Piece<T> x[kSB];
      float ds[kSB];
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        if (e < cnt) x[u] = load_piece(kb + static_cast<int64_t>(i - fl[e]) * kst);
        const float pv = e < cnt ? Pr[e] : 0.f;  // an L1 hit: read in the first sweep
        ds[u] = pv != 0.f ? cus[slot][e] - (e == 0 ? pv : pv / a.gamma) * delta : 0.f;
        if (e < cnt && (e & (kL - 1)) == sub) {
          DS[(R0 + i) * S + e] = ds[u];
          if (dbias_u && pv != 0.f) atomicAdd(&dbs[e], ds[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kSB; ++u)
        if (b0 + u < cnt) fma_piece(acc, ds[u], x[u]);
    }
    __syncwarp();
    if (valid) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc[j] *= a.scale;
        gv[j] *= alpha;
      }
      store8(dq + eoff(a.sq, sq, i, h) + 8 * sub, acc);
      store8(dv + eoff(a.sv, sq, i, h) + 8 * sub, gv);
    }
  }
  if (dbias_u) {
    __syncthreads();
    const int e = threadIdx.x;
    if (e < S && e < kSMax && dbs[e] != 0.f)
      atomicAdd(&dbias_u[(s_idx * a.H + h) * a.levels + (e == 0 ? a.pat.A.level_base : a.pat.B.level_base + e - 1)], dbs[e]);
  }
}

// dk_j = scale (ds_{j,0} q_j + sum over readers m = j + f(e - 1) of ds_{m,e} q_m).
template <class T, int kSMax, int kL>
__global__ void __launch_bounds__(kRowWarps * 32, 2)
    dk_slab(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const float* DS, T* dk) {
  constexpr int kRows = kRowWarps * 32 / kL;
  __shared__ int32_t fl[kSMax];
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  slab_tables<T>(a, h, nullptr, fl, nullptr, kSMax);
  const int S = 1 + a.nbl, sub = threadIdx.x & (kL - 1);
  const int32_t c0 = static_cast<int32_t>((cg - sq.cbase) * kC), nvalid = static_cast<int32_t>(lmin(kC, sq.n - c0));
  const int32_t n32 = static_cast<int32_t>(sq.n), qst = static_cast<int32_t>(a.sq.st);
  const T* qb = q + eoff(a.sq, sq, 0, h) + 8 * sub;
  const int64_t R0 = rid(a, sq, h, 0);
  for (int32_t t = static_cast<int32_t>(threadIdx.x) / kL; t < nvalid; t += kRows) {  // no shuffles here
    const int32_t j = c0 + t;
    const int cnt = slab_count<kSMax>(fl, n32 - 1 - j);  // readers j + f inside the sequence
    float acc[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[u] = 0.f;
#pragma unroll
    for (int b0 = 0; b0 < kSMax; b0 += kSB) {
      if (b0 >= S) break;
      Piece<T> x[kSB];
      float dd[kSB];
#pragma unroll
      for (int u = 0; u < kSB; ++u) {
        const int e = b0 + u;
        const int32_t m = j + (e < cnt ? fl[e] : 0);
        dd[u] = e < cnt ? DS[(R0 + m) * S + e] : 0.f;
        if (e < cnt) x[u] = load_piece(qb + static_cast<int64_t>(m) * qst);
      }
#pragma unroll
      for (int u = 0; u < kSB; ++u)
        if (b0 + u < cnt) fma_piece(acc, dd[u], x[u]);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[u] *= a.scale;
    store8(dk + eoff(a.sk, sq, j, h) + 8 * sub, acc);
  }
}

// dk for the lattice: readers grouped in runs, one atomic per run (warp per level).
template <class T>
__global__ void __launch_bounds__(kRowWarps * 32)
    dk_lattice_scatter(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const float* DS,
                       const int32_t* SRC, float* dkacc) {
  const int S = 1 + a.nbl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  const int64_t c0 = (cg - sq.cbase) * kC;
  const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
  for (int kk = warp; kk < a.nbl; kk += kRowWarps) {
    for (int d = lane; d < a.Dk; d += 32) {
      int64_t cur = -1;
      float acc = 0.f;
      for (int t = 0; t < nvalid; ++t) {
        const int64_t R = rid(a, sq, h, c0 + t);
        const int64_t s = SRC[R * a.nbl + kk];
        if (s < 0) continue;
        if (s != cur) {
          if (cur >= 0) atomicAdd(&dkacc[eoff(a.sk, sq, cur, h) + d], acc);
          cur = s;
          acc = 0.f;
        }
        acc = fmaf(DS[R * S + 1 + kk], to_f(q[eoff(a.sq, sq, c0 + t, h) + d]), acc);
      }
      if (cur >= 0) atomicAdd(&dkacc[eoff(a.sk, sq, cur, h) + d], acc);
    }
  }
}

template <class T>
__global__ void dk_lattice_finish(KArgs a, const SeqInfo* seqs, const int32_t* chunk_seq, const T* q, const float* DS,
                                  const float* dkacc, T* dk) {
  const int S = 1 + a.nbl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cg = blockIdx.x, h = blockIdx.y;
  const SeqInfo sq = seqs[chunk_seq[cg]];
  const int64_t c0 = (cg - sq.cbase) * kC;
  const int nvalid = static_cast<int>(lmin(kC, sq.n - c0));
  for (int t = warp; t < nvalid; t += kRowWarps) {
    const int64_t j = c0 + t;
    const float dsa = DS[rid(a, sq, h, j) * S];
    for (int d = lane; d < a.Dk; d += 32) {
      const int64_t o = eoff(a.sk, sq, j, h) + d;
      dk[o] = from_f<T>(a.scale * (dsa * to_f(q[eoff(a.sq, sq, j, h) + d]) + dkacc[o]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: one block per (sequence, head); entries in tiles with a running max (online softmax),
// so the scratch does not grow with the context. Positions and the lattice slot table live on
// the device (CudaDecodeState): every block resolves its row's slots from the old table, and
// block h = 0 writes the next table with the host's rule (evict what row i + 1 does not read,
// the new token into the lowest free slot), so host and device tables stay equal.

struct DecArgs {
  PatternDesc pat;
  DecodeProblem pb;
  CudaDecodeState st;
  int32_t nbl;
};
constexpr int kDecThreads = 128;
constexpr int kDecMaxLevels = 4096;
constexpr unsigned long long kDecInternal = 1ull << 63;

// Dynamic shared memory of decode_kernel, in bytes.
size_t decode_smem(const DecodeProblem& pb, int32_t nbl, bool lattice) {
  size_t f = sizeof(float) * (pb.Dk + kDecThreads + 32);
  f = (f + 15) & ~size_t(15);
  if (lattice) f += sizeof(int64_t) * (pb.capB + nbl) + sizeof(int32_t) * (nbl + pb.capB);
  return f;
}

template <class T>
__global__ void __launch_bounds__(kDecThreads) decode_kernel(DecArgs a, const T* q, const T* k, const T* v, const T* bias,
                                                             const T* gw, T* kA, T* vA, T* kB, T* yB, T* y) {
  extern __shared__ float sm[];
  const DecodeProblem& pb = a.pb;
  float* qs = sm;                    // Dk
  float* ptile = qs + pb.Dk;         // kDecThreads
  float* red = ptile + kDecThreads;  // 32
  __shared__ const T* kt[kDecThreads];
  __shared__ const T* vt[kDecThreads];
  __shared__ int s_free, s_ins, s_lost;
  const int64_t b = blockIdx.x, h = blockIdx.y, u = b * pb.H + h;
  const int64_t i = a.st.pos_in[b];
  const int tid = threadIdx.x;
  const int64_t Dk = pb.Dk, Dv = pb.Dv;
  const T* qi = q + u * Dk;
  const T* ki = k + u * Dk;
  const T* vi = v + u * Dv;
  const bool lattice = a.st.slot_in != nullptr;
  // Finiteness of this head's inputs, checked here instead of by host syncs; reported through
  // the mapped flag (the caller reads it at a later step).
  bool nonfinite = false;
  for (int64_t d = tid; d < Dk; d += kDecThreads) {
    qs[d] = to_f(qi[d]);
    nonfinite |= !isfinite(qs[d]) || !isfinite(to_f(ki[d]));
  }
  for (int64_t d = tid; d < Dv; d += kDecThreads) nonfinite |= !isfinite(to_f(vi[d]));
  if (__syncthreads_or(nonfinite) && tid == 0) {
    volatile unsigned long long* f = a.st.bad + b;
    if (*f == 0) *f = static_cast<unsigned long long>(i + 1);
  }
  int32_t* bslot = nullptr;
  int64_t new_b = -1;
  if (lattice) {
    const int64_t capB = pb.capB;
    char* base = reinterpret_cast<char*>(sm) + ((sizeof(float) * (Dk + kDecThreads + 32) + 15) & ~size_t(15));
    int64_t* S = reinterpret_cast<int64_t*>(base);  // capB: old table of sequence b
    int64_t* lpos = S + capB;                        // nbl: row i's source per level (-1: absent/merged)
    bslot = reinterpret_cast<int32_t*>(lpos + a.nbl);  // nbl: row i's slot per level
    int32_t* keep = bslot + a.nbl;                   // capB: slot still read by row i + 1
    for (int64_t s = tid; s < capB; s += kDecThreads) {
      S[s] = a.st.slot_in[b * capB + s];
      keep[s] = 0;
    }
    if (tid == 0) {
      s_free = static_cast<int>(capB);
      s_ins = 0;
      s_lost = 0;
    }
    __syncthreads();
    for (int32_t kk = tid; kk < a.nbl; kk += kDecThreads) {
      int64_t pos;
      int32_t lvl;
      int32_t slot = -1;
      const bool ok = side_entry(a.pat.B, true, i, kk, pos, lvl);
      if (ok) {
        for (int64_t s = 0; s < capB; ++s)
          if (S[s] == pos) {
            slot = static_cast<int32_t>(s);
            break;
          }
        if (slot < 0) s_lost = 1;
      }
      lpos[kk] = ok ? pos : -1;
      bslot[kk] = slot;
    }
    __syncthreads();
    // no row follows the last one the cache was made for: keep nothing (as the host does)
    if (i + 1 < a.st.max_context)
      for (int32_t kk = tid; kk < a.nbl; kk += kDecThreads) {
        int64_t pos;
        int32_t lvl;
        if (!side_entry(a.pat.B, true, i + 1, kk, pos, lvl)) continue;
        if (pos == i) {
          s_ins = 1;
          continue;
        }
        // a level keeps its source for a_k rows: the same level of row i is the usual match
        int32_t slot = lpos[kk] == pos ? bslot[kk] : -1;
        for (int64_t s = 0; slot < 0 && s < capB; ++s)
          if (S[s] == pos) slot = static_cast<int32_t>(s);
        if (slot >= 0)
          keep[slot] = 1;
        else
          s_lost = 1;
      }
    __syncthreads();
    for (int64_t s = tid; s < capB; s += kDecThreads)
      if (!keep[s]) atomicMin(&s_free, static_cast<int>(s));
    __syncthreads();
    if (s_ins) {
      if (s_free < capB)
        new_b = s_free;
      else if (tid == 0)
        s_lost = 1;
    }
    if (h == 0)
      for (int64_t s = tid; s < capB; s += kDecThreads)
        a.st.slot_out[b * capB + s] = s == new_b ? i : (keep[s] ? S[s] : -1);
    if (s_lost && tid == 0) {
      volatile unsigned long long* f = a.st.bad + b;
      *f = kDecInternal | static_cast<unsigned long long>(i + 1);
    }
  } else if (pb.capB > 0) {
    new_b = i % pb.capB;
  }
  if (h == 0 && tid == 0) a.st.pos_out[b] = i + 1;
  const int64_t new_a = pb.capA > 0 ? i % pb.capA : -1;
  const int64_t nA = side_slots(a.pat.A, false, i, a.nbl), ne = nA + side_slots(a.pat.B, true, i, a.nbl);
  const float gamma = static_cast<float>(pb.gamma), scale = static_cast<float>(pb.scale);
  constexpr int kMaxV = 4;  // Dv <= 4 * kDecThreads (checked by the caller)
  float acc[kMaxV];
#pragma unroll
  for (int j = 0; j < kMaxV; ++j) acc[j] = 0.f;
  float run_max = -INFINITY, run_sum = 0.f;
  for (int64_t e0 = 0; e0 < ne; e0 += kDecThreads) {
    const int64_t e = e0 + tid;
    float s = -INFINITY, wgt = 1.f;
    const T* kp = nullptr;
    const T* vp = nullptr;
    if (e < ne) {
      int64_t pos;
      int32_t lvl;
      const bool isb = e >= nA;
      bool ok = isb ? side_entry(a.pat.B, true, i, e - nA, pos, lvl) : side_entry(a.pat.A, false, i, e, pos, lvl);
      if (ok) {
        if (!isb) {
          if (pos == i) {
            kp = ki;
            vp = vi;
          } else {
            const int64_t slot = pos % pb.capA;
            kp = kA + (u * pb.capA + slot) * Dk;
            vp = vA + (u * pb.capA + slot) * Dv;
          }
        } else {
          const int64_t slot = lattice ? bslot[e - nA] : pos % pb.capB;
          ok = slot >= 0;  // a lost lattice slot is flagged above
          kp = kB + (u * pb.capB + slot) * Dk;
          vp = yB + (u * pb.capB + slot) * Dv;
          wgt = gamma;
        }
      }
      if (ok) {
        s = pb.mode == Mode::Softmax ? scale * dot_row(qs, kp, static_cast<int>(Dk)) : dot_row(qs, gw + (h * pb.levels + lvl) * Dk, static_cast<int>(Dk));
        if (bias) s += to_f(bias[h * pb.levels + lvl]);
      } else {
        kp = vp = nullptr;
      }
    }
    const float tmax = block_reduce<true>(s, red);
    const float new_max = fmaxf(run_max, tmax);
    const float rescale = run_max == -INFINITY ? 0.f : __expf(run_max - new_max);
    const float pe = s == -INFINITY ? 0.f : __expf(s - new_max);
    const float tsum = block_reduce<false>(pe, red);
    run_sum = run_sum * rescale + tsum;
    run_max = new_max;
    ptile[tid] = pe * wgt;
    kt[tid] = kp;
    vt[tid] = vp;
    __syncthreads();
    const int64_t nt = lmin(kDecThreads, ne - e0);
#pragma unroll
    for (int j = 0; j < kMaxV; ++j) {
      const int64_t d = tid + j * kDecThreads;
      if (d >= Dv) break;
      float x = acc[j] * rescale;
      for (int64_t t = 0; t < nt; ++t)
        if (vt[t]) x = fmaf(ptile[t], to_f(vt[t][d]), x);
      acc[j] = x;
    }
    __syncthreads();
  }
  const float inv = 1.f / run_sum;
  // every read of the old cache is done (last barrier above): store the new token
#pragma unroll
  for (int j = 0; j < kMaxV; ++j) {
    const int64_t d = tid + j * kDecThreads;
    if (d >= Dv) break;
    const T yv = from_f<T>(acc[j] * inv);
    y[u * Dv + d] = yv;
    if (new_a >= 0) vA[(u * pb.capA + new_a) * Dv + d] = vi[d];
    if (new_b >= 0) yB[(u * pb.capB + new_b) * Dv + d] = yv;
  }
  for (int64_t d = tid; d < Dk; d += kDecThreads) {
    if (new_a >= 0) kA[(u * pb.capA + new_a) * Dk + d] = ki[d];
    if (new_b >= 0) kB[(u * pb.capB + new_b) * Dk + d] = ki[d];
  }
}

// Split decode (flash-decoding) for rows of many entries: block (split, u) scores a slice of
// chunk (split_chunk) entries of row i of head u, one warp per entry (lanes over Dk, then over Dv),
// four entries in flight per warp, with its own running max; decode_split_combine merges the
// slices, writes y and the new cache entries. Used when a row of the cache's context can have
// kSplitMin entries or more and the pattern is not a lattice (lattices are small).
constexpr int kSplitChunk = 128;
constexpr int64_t kSplitMin = 1024;
constexpr int kSplitMaxV = 8;  // Dv <= 256 on this path
constexpr int kSplitMaxSplits = 8192;

// Entries per split: kSplitChunk, doubled until the grid holds about four blocks per resident
// slot of the machine (132 SMs x 16 blocks on an H200) or fewer than kSplitMaxSplits splits: a
// large batch needs fewer splits per row, and the workspace stays a few MB.
int64_t split_chunk(const DecodeProblem& pb) {
  const int64_t rows = pb.batch * pb.H, target = std::max<int64_t>(1, 4 * 132 * 16 / std::max<int64_t>(rows, 1));
  int64_t c = kSplitChunk;
  while ((pb.row_max + c - 1) / c > std::min<int64_t>(kSplitMaxSplits, target) && c < (int64_t(1) << 40)) c *= 2;
  return c;
}
int64_t split_count(const DecodeProblem& pb) { return std::max<int64_t>(1, (pb.row_max + split_chunk(pb) - 1) / split_chunk(pb)); }

template <class T>
__global__ void __launch_bounds__(128) decode_split_partial(DecArgs a, int32_t chunk, int32_t nsplit, const T* q, const T* k, const T* v,
                                                            const T* bias, const T* gw, const T* kA, const T* vA, const T* kB,
                                                            const T* yB, float* ws) {
  __shared__ float qs[256];
  __shared__ float wm[4], wl[4];
  __shared__ float wacc[4][32 * kSplitMaxV];
  const DecodeProblem& pb = a.pb;
  const int split = blockIdx.y;  // y: at most kSplitMaxSplits; x: batch * H, which may exceed 65535
  const int64_t u = blockIdx.x, b = u / pb.H, h = u % pb.H;
  const int64_t i = a.st.pos_in[b];
  const int64_t Dk = pb.Dk, Dv = pb.Dv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* ki = k + u * Dk;
  const T* vi = v + u * Dv;
  for (int64_t d = threadIdx.x; d < Dk; d += blockDim.x) qs[d] = to_f(q[u * Dk + d]);
  __syncthreads();
  const int64_t nA = side_slots(a.pat.A, false, i, a.nbl), ne = nA + side_slots(a.pat.B, true, i, a.nbl);
  const int64_t e0 = static_cast<int64_t>(split) * chunk, e1 = lmin(ne, e0 + chunk);
  const float gamma = static_cast<float>(pb.gamma), scale = static_cast<float>(pb.scale);
  float m = -INFINITY, l = 0.f, acc[kSplitMaxV];
#pragma unroll
  for (int j = 0; j < kSplitMaxV; ++j) acc[j] = 0.f;
  constexpr int kIn = 4;  // entries in flight per warp
  for (int64_t eb = e0 + warp * kIn; eb < e1; eb += 4 * kIn) {
    const T* kp[kIn];
    const T* vp[kIn];
    float s[kIn], wgt[kIn];
    int32_t lv[kIn];
#pragma unroll
    for (int t = 0; t < kIn; ++t) {
      const int64_t e = eb + t;
      kp[t] = vp[t] = nullptr;
      wgt[t] = 1.f;
      lv[t] = 0;
      if (e >= e1) continue;
      int64_t pos;
      const bool isb = e >= nA;
      if (!(isb ? side_entry(a.pat.B, true, i, e - nA, pos, lv[t]) : side_entry(a.pat.A, false, i, e, pos, lv[t]))) continue;
      if (!isb) {
        if (pos == i) {
          kp[t] = ki;
          vp[t] = vi;
        } else {
          const int64_t slot = pos % pb.capA;
          kp[t] = kA + (u * pb.capA + slot) * Dk;
          vp[t] = vA + (u * pb.capA + slot) * Dv;
        }
      } else {
        const int64_t slot = pos % pb.capB;
        kp[t] = kB + (u * pb.capB + slot) * Dk;
        vp[t] = yB + (u * pb.capB + slot) * Dv;
        wgt[t] = gamma;
      }
    }
#pragma unroll
    for (int t = 0; t < kIn; ++t) {
      float x = 0.f;
      if (kp[t]) {
        const T* src = pb.mode == Mode::Softmax ? kp[t] : gw + (h * pb.levels + lv[t]) * Dk;
        for (int64_t d = lane; d < Dk; d += 32) x = fmaf(qs[d], to_f(src[d]), x);
      }
      s[t] = x;
    }
#pragma unroll
    for (int t = 0; t < kIn; ++t) {
      s[t] = warp_sum(s[t]);
      if (!kp[t]) {
        s[t] = -INFINITY;
        continue;
      }
      if (pb.mode == Mode::Softmax) s[t] *= scale;
      if (bias) s[t] += to_f(bias[h * pb.levels + lv[t]]);
    }
#pragma unroll
    for (int t = 0; t < kIn; ++t) {
      if (!kp[t]) continue;
      const float nm = fmaxf(m, s[t]);
      const float r = m == -INFINITY ? 0.f : __expf(m - nm);
      const float p = __expf(s[t] - nm);
      l = l * r + p;
      m = nm;
#pragma unroll
      for (int j = 0; j < kSplitMaxV; ++j) {
        const int64_t d = lane + 32 * j;
        acc[j] = acc[j] * r + (d < Dv ? p * wgt[t] * to_f(vp[t][d]) : 0.f);
      }
    }
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < kSplitMaxV; ++j) wacc[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < 4; ++w) M = fmaxf(M, wm[w]);
  float* out = ws + (u * nsplit + split) * (Dv + 2);
  float f[4];
  for (int w = 0; w < 4; ++w) f[w] = wm[w] == -INFINITY ? 0.f : __expf(wm[w] - M);
  if (threadIdx.x == 0) {
    out[0] = M;
    out[1] = f[0] * wl[0] + f[1] * wl[1] + f[2] * wl[2] + f[3] * wl[3];
  }
  for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x)
    out[2 + d] = f[0] * wacc[0][d] + f[1] * wacc[1][d] + f[2] * wacc[2][d] + f[3] * wacc[3][d];
}

template <class T>
__global__ void __launch_bounds__(128) decode_split_combine(DecArgs a, int32_t nsplit, const T* q, const T* k, const T* v,
                                                            const float* ws, T* kA, T* vA, T* kB, T* yB, T* y) {
  extern __shared__ float fac[];  // nsplit
  __shared__ float red[32];
  const DecodeProblem& pb = a.pb;
  const int64_t u = blockIdx.x, b = u / pb.H, h = u % pb.H;
  const int64_t i = a.st.pos_in[b];
  const int64_t Dk = pb.Dk, Dv = pb.Dv;
  const int tid = threadIdx.x;
  const T* ki = k + u * Dk;
  const T* vi = v + u * Dv;
  bool nonfinite = false;
  for (int64_t d = tid; d < Dk; d += blockDim.x) nonfinite |= !isfinite(to_f(q[u * Dk + d])) || !isfinite(to_f(ki[d]));
  for (int64_t d = tid; d < Dv; d += blockDim.x) nonfinite |= !isfinite(to_f(vi[d]));
  if (__syncthreads_or(nonfinite) && tid == 0) {
    volatile unsigned long long* f = a.st.bad + b;
    if (*f == 0) *f = static_cast<unsigned long long>(i + 1);
  }
  const float* base = ws + u * nsplit * (Dv + 2);
  float mx = -INFINITY;
  for (int s = tid; s < nsplit; s += blockDim.x) mx = fmaxf(mx, base[s * (Dv + 2)]);
  const float M = block_reduce<true>(mx, red);
  float sum = 0.f;
  for (int s = tid; s < nsplit; s += blockDim.x) {
    const float ms = base[s * (Dv + 2)];
    const float fs = ms == -INFINITY ? 0.f : __expf(ms - M);
    fac[s] = fs;
    sum += fs * base[s * (Dv + 2) + 1];
  }
  const float L = block_reduce<false>(sum, red);
  __syncthreads();
  const float inv = 1.f / L;
  if (h == 0 && tid == 0) a.st.pos_out[b] = i + 1;
  const int64_t new_a = pb.capA > 0 ? i % pb.capA : -1, new_b = pb.capB > 0 ? i % pb.capB : -1;
  for (int64_t d = tid; d < Dv; d += blockDim.x) {
    float x = 0.f;
#pragma unroll 8
    for (int s = 0; s < nsplit; ++s) x = fmaf(fac[s], base[s * (Dv + 2) + 2 + d], x);
    const T yv = from_f<T>(x * inv);
    y[u * Dv + d] = yv;
    if (new_a >= 0) vA[(u * pb.capA + new_a) * Dv + d] = vi[d];
    if (new_b >= 0) yB[(u * pb.capB + new_b) * Dv + d] = yv;
  }
  for (int64_t d = tid; d < Dk; d += blockDim.x) {
    if (new_a >= 0) kA[(u * pb.capA + new_a) * Dk + d] = ki[d];
    if (new_b >= 0) kB[(u * pb.capB + new_b) * Dk + d] = ki[d];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning, workspace layout, launches.

struct Plan {
  bool fast = false;
  std::vector<SeqInfo> seqs;
  std::vector<int32_t> chunk_seq;
  int64_t nseq = 0, total_chunks = 0, cap = 0;
  int32_t kin = 0;
  // superchunk chains (v14): whether they serve, superchunks (all, the most in one sequence),
  // levels with f <= kSC (nn), with f < kSC (nin), and log2 of the inverse's ring (a power of
  // two >= the largest such f)
  bool super = false;
  int64_t total_super = 0, max_super = 0;
  int32_t sc_nn = 0, sc_nin = 0, sc_ring_log = 0;
};

bool super_ok(const CudaMix& m, Plan& p);

Plan make_plan(const CudaMix& m) {
  Plan p;
  const MixProblem& pb = m.pb;
  const PatternDesc& hp = m.host_pat;
  p.fast = mix_cuda_fast_path(m);
  if (pb.cu_seqlens) {
    for (int64_t s = 0; s < pb.num_seqs; ++s)
      p.seqs.push_back(SeqInfo{0, pb.cu_seqlens[s], pb.cu_seqlens[s + 1] - pb.cu_seqlens[s], 0, 0});
  } else {
    for (int64_t b = 0; b < pb.batch; ++b) p.seqs.push_back(SeqInfo{b, 0, pb.T, 0, 0});
  }
  p.nseq = static_cast<int64_t>(p.seqs.size());
  for (int64_t s = 0; s < p.nseq; ++s) {
    p.seqs[s].cbase = p.total_chunks;
    const int64_t nc = (p.seqs[s].n + kC - 1) / kC;
    for (int64_t c = 0; c < nc; ++c) p.chunk_seq.push_back(static_cast<int32_t>(s));
    p.total_chunks += nc;
    p.seqs[s].sbase = p.total_super;
    const int64_t ns = (p.seqs[s].n + kSC - 1) / kSC;
    p.total_super += ns;
    p.max_super = std::max(p.max_super, ns);
  }
  auto side_cap = [&](const SideDesc& s) -> int64_t {
    switch (s.kind) {
      case SupportKind::Self: return 1;
      case SupportKind::Window: return s.window > 0 ? std::min<int64_t>(s.window, m.max_seq) : m.max_seq;
      case SupportKind::Offsets:
      case SupportKind::Lattice: return m.nbl;
      default: return 0;
    }
  };
  p.cap = std::max<int64_t>(1, side_cap(hp.A) + side_cap(hp.B));
  if (p.fast) {
    for (int32_t k = 0; k < m.nbl; ++k) {
      const int64_t reach = hp.B.kind == SupportKind::Lattice ? hp.B.f[k] - hp.B.a[k] : hp.B.f[k] - 1;
      if (reach < kC) p.kin = k + 1;
    }
  }
  p.super = super_ok(m, p);
  return p;
}

// Workspace: a bump allocator over one buffer (dry run for the size).
struct Bump {
  char* base;
  int64_t off = 0;
  template <class X>
  X* take(int64_t n) {
    off = (off + 255) & ~int64_t(255);
    X* r = base ? reinterpret_cast<X*>(base + off) : nullptr;
    off += n * static_cast<int64_t>(sizeof(X));
    return r;
  }
};

struct Buffers {
  SeqInfo* seqs;
  int32_t* chunk_seq;
  float* yf;  // float32 copy of y (float storage: y itself)
  // chunked
  float *P, *M, *DS, *dkacc;
  __half* M2;  // superchunk chains: M2 per superchunk instead of M
  float* PT;   // superchunk chains: P level-major
  int32_t* SRC;
  // generic
  float *pbuf, *ubuf, *gdk, *gdv;
  int64_t* posbuf;
  int32_t* lvlbuf;
  float* G;
  int32_t* bad;  // finiteness flags (fast path)
};

// Rows of the [B, H, T] coefficient tables.
int64_t table_rows(const CudaMix& m) { return m.pb.batch * m.pb.H * m.pb.T; }

// The chunked solver's tables (P, SRC, M; superchunk chains: P, SRC, M2, PT): written by the
// forward into `saved`, which the caller keeps for the backward (n rows x (2 |support| + 64) x 4
// bytes, about x (3 |support| + 67) x 4 with the superchunk chains: linear in n), so that the
// backward does not compute them again.
void carve_tables(const CudaMix& m, const Plan& p, void* saved, Buffers& b, int64_t* bytes) {
  Bump bp{static_cast<char*>(saved)};
  if (p.fast) {
    const MixProblem& pb = m.pb;
    const int64_t rows = table_rows(m);
    b.P = bp.take<float>(rows * (1 + m.nbl));
    b.SRC = bp.take<int32_t>(rows * std::max<int32_t>(1, m.nbl));
    if (p.super) {
      b.M2 = bp.take<__half>(p.total_super * pb.H * kSCElems);
      b.PT = bp.take<float>(rows * (1 + m.nbl));
    }
    else b.M = bp.take<float>(p.total_chunks * pb.H * kC * kC);
  }
  *bytes = p.fast ? bp.off + 256 : 0;
}

Buffers carve(const CudaMix& m, const Plan& p, bool backward, void* ws, void* saved, int64_t* bytes) {
  Bump bp{static_cast<char*>(ws)};
  Buffers b{};
  int64_t tbytes;
  carve_tables(m, p, saved, b, &tbytes);
  const MixProblem& pb = m.pb;
  const int64_t rows = table_rows(m);
  const int64_t ny = pb.batch * pb.T * pb.H * pb.Dv, nk = pb.batch * pb.T * pb.H * pb.Dk;
  const int64_t units = p.nseq * pb.H;
  b.seqs = bp.take<SeqInfo>(std::max<int64_t>(1, p.nseq));
  b.chunk_seq = bp.take<int32_t>(std::max<int64_t>(1, p.total_chunks));
  b.yf = !backward && m.dtype != DType::F32 ? bp.take<float>(ny) : nullptr;
  b.bad = bp.take<int32_t>(1);
  if (p.fast) {
    const int64_t S = 1 + m.nbl;
    if (backward) {
      b.G = bp.take<float>(ny);
      b.DS = bp.take<float>(rows * S);
      if (m.host_pat.B.kind == SupportKind::Lattice && pb.mode == Mode::Softmax) b.dkacc = bp.take<float>(nk);
    }
  } else {
    b.pbuf = bp.take<float>(units * p.cap);
    b.posbuf = bp.take<int64_t>(units * p.cap);
    if (backward) {
      b.ubuf = bp.take<float>(units * p.cap);
      b.lvlbuf = bp.take<int32_t>(units * p.cap);
      b.G = bp.take<float>(ny);
      b.gdv = bp.take<float>(ny);
      if (pb.mode == Mode::Softmax) b.gdk = bp.take<float>(nk);
    }
  }
  *bytes = bp.off + 256;
  return b;
}

int variant_bits();
KArgs kargs(const CudaMix& m, const Plan& p) {
  KArgs a;
  a.pat = m.dev_pat;
  a.H = m.pb.H;
  a.T = m.pb.T;
  a.Dk = m.pb.Dk;
  a.Dv = m.pb.Dv;
  a.levels = m.pb.levels;
  a.sq = m.pb.sq;
  a.sk = m.pb.sk;
  a.sv = m.pb.sv;
  a.sy = m.pb.sy;
  a.mode = static_cast<int32_t>(m.pb.mode);
  a.scale = static_cast<float>(m.pb.scale);
  a.gamma = static_cast<float>(m.pb.gamma);
  a.nbl = m.nbl;
  a.kin = p.kin;
  a.cap = p.cap;
  a.lpk = a.lpv = 0;
  a.bad = nullptr;
  a.tc = !(variant_bits() & 8);
  return a;
}

// TOKMIX_CUDA_VARIANT (measurements only): bit 0 selects the previous chains, bit 1 turns the
// lane-group paths off, bit 2 the slab passes (v13), bit 3 the chains' tensor-core product
// (v13), bit 4 the superchunk chains (v14), so that one run can time versions side by side.
int variant_bits() {
  const char* e = std::getenv("TOKMIX_CUDA_VARIANT");
  return e ? std::atoi(e) : 0;
}

bool aligned_to(const void* ptr, int64_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }
bool strides_multiple(const Strides& s, int64_t n) { return s.sb % n == 0 && s.st % n == 0 && s.sh % n == 0; }
// Lanes per row for the lane-group paths: width / 8 when that is a power of two <= 32 and every
// row starts on a 16-byte boundary (8 elements); else 0.
int32_t lanes_per_row(int64_t width, int64_t esize, std::initializer_list<std::pair<const void*, Strides>> rows) {
  if (width % 8 != 0 || width / 8 > 32 || ((width / 8) & (width / 8 - 1)) != 0 || (variant_bits() & 2)) return 0;
  for (const auto& r : rows)
    if (!aligned_to(r.first, 8 * esize) || !strides_multiple(r.second, 8)) return 0;
  return static_cast<int32_t>(width / 8);
}
// Whether the slab passes (v13) serve this problem: offsets in B, at most 32 entries a row,
// 16-byte pieces of q and k, Dk = 64 or 128 (a.lpk = 8 or 16). TOKMIX_CUDA_VARIANT bit 2 turns them off.
bool slab_ok(const CudaMix& m, const KArgs& a) {
  // 16-bit storage: at float32 the gathered pieces double and grad_slab spills (ptxas: ~1 KB a
  // thread), so float32 keeps the v12 passes
  return m.host_pat.B.kind == SupportKind::Offsets && m.nbl + 1 <= 32 && (a.lpk == 8 || a.lpk == 16) && m.dtype != DType::F32 &&
         !(variant_bits() & 4);
}
// Calls f(kSMax, kL) with the slab passes' compile-time shape for a problem slab_ok accepts:
// entries a row (16 or 32) and lanes a row (Dk / 8).
template <class F>
void with_slab_shape(const CudaMix& m, const KArgs& a, F&& f) {
  using I8 = std::integral_constant<int, 8>;
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  if (m.nbl + 1 <= 16) {
    if (a.lpk == 8) f(I16{}, I8{});
    else f(I16{}, I16{});
  } else {
    if (a.lpk == 8) f(I32{}, I8{});
    else f(I32{}, I16{});
  }
}
// SMs of the current device, asked once per device: make_plan runs several times a call.
int current_sms() {
  static std::atomic<int> cache[64];
  int dev = 0;
  TOKMIX_CU(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 && cache[dev].load(std::memory_order_relaxed) > 0) return cache[dev].load(std::memory_order_relaxed);
  int sms = 0;
  TOKMIX_CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}
// Whether the superchunk chains (v14) serve: offsets in B with at most kSCNear levels of
// f <= kSC, bfloat16 storage (the product is TF32: float16 and float32 keep the 64-row chains),
// Dv a multiple of 8, rows of v and y (dy) at multiples of 8 elements, and every block resident
// on the current device. Forward and backward must agree (the saved tables differ: M2 and PT
// instead of M), so the choice depends only on the problem, the device (the op runs under a
// guard for the tensors' device) and TOKMIX_CUDA_VARIANT (bit 4 turns them off; for
// measurements, never changed between a forward and its backward). Sets the plan's level counts.
bool super_ok(const CudaMix& m, Plan& p) {
  const PatternDesc& hp = m.host_pat;
  if (!p.fast || hp.B.kind != SupportKind::Offsets || m.dtype != DType::BF16 || (variant_bits() & 16)) return false;
  if (m.pb.Dv % kSCW != 0 || !strides_multiple(m.pb.sv, 8) || !strides_multiple(m.pb.sy, 8)) return false;
  if (2 * p.max_super > 65535 || m.pb.Dv / kSCW > 65535 || m.pb.H > 65535) return false;
  int32_t nn = 0, nin = 0, ring_log = 0;
  for (int32_t k = 0; k < m.nbl; ++k) {
    if (hp.B.f[k] <= kSC) nn = k + 1;
    if (hp.B.f[k] < kSC) {
      nin = k + 1;
      while ((int64_t(1) << ring_log) < hp.B.f[k]) ++ring_log;
    }
  }
  if (nn > kSCNear) return false;
  // one block a SM, all resident at once: a second wave would run the whole chain again, and
  // then the 64-row chains (two or more blocks a SM) serve better
  const int sms = current_sms();
  if (p.nseq * m.pb.H * (m.pb.Dv / kSCW) > sms) return false;
  p.sc_nn = nn;
  p.sc_nin = nin;
  p.sc_ring_log = ring_log;
  return true;
}

// Whether the 4-channel chains serve v, y (or dy) and the float32 copies.
bool chain4_ok(const CudaMix& m, int64_t esize, std::initializer_list<const void*> ptrs) {
  if (m.pb.Dv % 4 != 0 || !strides_multiple(m.pb.sv, 4) || !strides_multiple(m.pb.sy, 4) || (variant_bits() & 1)) return false;
  for (const void* p : ptrs)
    if (!aligned_to(p, 4 * esize)) return false;
  return true;
}

// Layout of the 4-channel chains, 256 threads a block: kG channel quads x kS threads per row,
// (kG, kS) = (1, 4), (2, 2) or (4, 1). The fewest channels per block (more blocks, more threads
// on each step's chain) such that every block is resident at once (a second wave would run the
// whole sequential chain again); 0 when even kG = 4 does not fit (the 512-thread chain then).
// TOKMIX_CHAIN_G = 1, 2 or 4 forces a layout (measurements, checks).
// one_per_sm (backward): first look for a layout with at most one block per SM; measured at
// (1, 65536, 16, 64) (v13, ncu): the backward chain takes 3.13 ms with (2, 2) at one block a
// SM against 3.84 ms with (1, 4) at two (more instructions a warp, but half the warps sharing
// each scheduler); the forward chain gains nothing (4.14 against 4.09 ms).
template <class K1, class K2, class K4>
int chain4_groups(const CudaMix& m, const Plan& p, K1 k1, K2 k2, K4 k4, bool one_per_sm = false) {
  if (const char* env = std::getenv("TOKMIX_CHAIN_G")) {
    const int g = std::atoi(env);
    if (g == 1 || g == 2 || g == 4) return g;
  }
  const int sms = current_sms();
  auto resident = [&](int g) {
    int per_sm = 0;
    if (g == 1) TOKMIX_CU(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k1, kChain4Threads, 0));
    if (g == 2) TOKMIX_CU(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k2, kChain4Threads, 0));
    if (g == 4) TOKMIX_CU(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k4, kChain4Threads, 0));
    return static_cast<int64_t>(per_sm) * sms;
  };
  auto blocks = [&](int g) { return p.nseq * m.pb.H * ((m.pb.Dv + 4 * g - 1) / (4 * g)); };
  if (one_per_sm)
    for (int g : {1, 2, 4})
      if (blocks(g) <= std::min<int64_t>(resident(g), sms)) return g;
  for (int g : {1, 2, 4})
    if (blocks(g) <= resident(g)) return g;
  return 0;
}

// Host memory a captured graph's copy nodes read at every replay: pinned, never freed or reused.
// cudaHostAlloc may not run during a capture, so calls outside one keep room ahead (at least
// 256 KB and 8 times their own plan); a capture that outgrows it fails and its caller runs eagerly.
struct PinnedArena {
  std::mutex mu;
  char* block = nullptr;
  size_t used = 0, cap = 0;
};
PinnedArena& pinned_arena() {
  static PinnedArena a;
  return a;
}
void pinned_reserve(size_t plan_bytes) {
  PinnedArena& a = pinned_arena();
  std::lock_guard<std::mutex> lk(a.mu);
  const size_t want = std::max<size_t>(size_t(256) << 10, 8 * plan_bytes);
  if (a.cap - a.used >= want) return;
  const size_t bytes = std::max<size_t>(size_t(4) << 20, want);
  void* h = nullptr;
  TOKMIX_CU(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
  a.block = static_cast<char*>(h);  // the previous block stays: graphs may still read it
  a.used = 0;
  a.cap = bytes;
}
const void* pinned_forever(const void* src, size_t bytes) {
  PinnedArena& a = pinned_arena();
  std::lock_guard<std::mutex> lk(a.mu);
  const size_t at = (a.used + 15) & ~size_t(15);
  if (!a.block || at + bytes > a.cap)
    throw std::runtime_error("tokmix CUDA: the pinned memory kept for captured plans is used up (" + std::to_string(bytes) +
                             " bytes needed); run the call once outside a capture first");
  std::memcpy(a.block + at, src, bytes);
  a.used = at + bytes;
  return a.block + at;
}

void upload_plan(const Plan& p, const Buffers& b, cudaStream_t st, bool capturing) {
  auto up = [&](void* dst, const void* src, size_t bytes) {
    TOKMIX_CU(cudaMemcpyAsync(dst, capturing ? pinned_forever(src, bytes) : src, bytes, cudaMemcpyHostToDevice, st));
  };
  if (!capturing) pinned_reserve(sizeof(SeqInfo) * p.nseq + sizeof(int32_t) * p.total_chunks);
  if (p.nseq) up(b.seqs, p.seqs.data(), sizeof(SeqInfo) * p.nseq);
  if (p.total_chunks) up(b.chunk_seq, p.chunk_seq.data(), sizeof(int32_t) * p.total_chunks);
}

template <class K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) TOKMIX_CU(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Channels per thread in the chain (1, 2 or 4): the fewest that let every chain block be
// resident at once; a second wave would run the whole sequential chain a second time.
template <class K>
int64_t chain_vec(const CudaMix& m, const Plan& p, K kernel) {
  const int sms = current_sms();
  int per_sm = 0;
  TOKMIX_CU(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kChainThreads, 0));
  const int64_t resident = std::max(1, per_sm) * static_cast<int64_t>(sms);
  for (int64_t per : {1, 2, 4})
    if (p.nseq * m.pb.H * ((m.pb.Dv + kDS * per - 1) / (kDS * per)) <= resident) return per;
  return 4;
}

// Reads the finiteness flags the kernels left (one small copy and a stream sync), or, when the
// caller defers the report (m.flags_out), only queues their copy to its pinned slot.
int32_t read_flags(const CudaMix& m, const int32_t* dflag, cudaStream_t st) {
  if (m.capturing) return 0;
  if (m.flags_out) {
    TOKMIX_CU(cudaMemcpyAsync(m.flags_out, dflag, sizeof(int32_t), cudaMemcpyDeviceToHost, st));
    return 0;
  }
  int32_t h = 0;
  TOKMIX_CU(cudaMemcpyAsync(&h, dflag, sizeof(int32_t), cudaMemcpyDeviceToHost, st));
  TOKMIX_CU(cudaStreamSynchronize(st));
  return h;
}

// The superchunk chain of one direction (forward: x = v, y and yf written; backward: x = dy, G
// written). Instantiated for bfloat16 only: super_ok admits no other storage type.
template <bool kBack, class T>
void launch_chain_super(const CudaMix& m, const Plan& p, const KArgs& a, const Buffers& b, const T* x, T* y, float* out,
                        cudaStream_t st) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    allow_smem(chain_super<T, kBack>, kSCSmem);
    const int64_t rows = table_rows(m);
    const int32_t vec = aligned_to(x, 16) ? 1 : 0;
    chain_super<T, kBack><<<dim3(p.nseq, m.pb.H, m.pb.Dv / kSCW), kSC, kSCSmem, st>>>(a, b.seqs, x, b.PT, rows, b.M2, y, out,
                                                                                        p.sc_nn, vec, variant_bits());
    TOKMIX_LAUNCHED(kBack ? "chain_super (backward)" : "chain_super (forward)");
  }
}

template <class T>
int32_t forward_t(const CudaMix& m, const T* q, const T* k, const T* v, const T* bias, const T* gw, T* y, float* lse, void* ws,
                  void* saved) {
  cudaStream_t st = static_cast<cudaStream_t>(m.stream);
  const Plan p = make_plan(m);
  int64_t bytes;
  Buffers b = carve(m, p, false, ws, saved, &bytes);
  float* yf = b.yf ? b.yf : reinterpret_cast<float*>(y);
  upload_plan(p, b, st, m.capturing);
  KArgs a = kargs(m, p);
  if (p.nseq == 0 || m.pb.H == 0) return p.fast ? 0 : -1;
  if (p.fast) {
    if (p.total_chunks == 0) return 0;
    const bool softmax = m.pb.mode == Mode::Softmax;
    a.lpk = lanes_per_row(m.pb.Dk, sizeof(T), {{q, m.pb.sq}, {softmax ? k : q, m.pb.sk}, {gw, Strides{0, 0, 0}}});
    a.bad = b.bad;
    TOKMIX_CU(cudaMemsetAsync(b.bad, 0, sizeof(int32_t), st));
    if (slab_ok(m, a)) {
      with_slab_shape(m, a, [&](auto sm, auto l) {
        coef_slab<T, decltype(sm)::value, decltype(l)::value>
            <<<dim3(p.total_chunks, m.pb.H), kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, q, k, bias, gw, lse, b.P, b.SRC);
      });
      TOKMIX_LAUNCHED("coef_slab");
    } else {
      const size_t sm1 = sizeof(float) * (kRowWarps * (m.pb.Dk + 1 + m.nbl));
      allow_smem(coef_kernel<T>, sm1);
      coef_kernel<T><<<dim3(p.total_chunks, m.pb.H), kRowWarps * 32, sm1, st>>>(a, b.seqs, b.chunk_seq, q, k, bias, gw, lse,
                                                                                     b.P, b.SRC, b.M);
      TOKMIX_LAUNCHED("coef_kernel");
    }
    if (p.super) {
      if (!aligned_to(y, 4)) throw std::invalid_argument("tokmix CUDA: y must be 4-byte aligned (bfloat16 pairs are stored)");
      const int nin_slots = p.sc_nin <= 8 ? 8 : 16;
      const size_t sms = sizeof(float) * ((size_t(1) << p.sc_ring_log) * kSCInvCols + kSC * nin_slots);
      const dim3 igrid(p.nseq, m.pb.H, 2 * p.max_super);
      if (nin_slots == 8) {
        allow_smem(super_inverse<8>, sms);
        super_inverse<8><<<igrid, kSCInvCols, sms, st>>>(a, b.seqs, b.P, b.M2, p.sc_nin, p.sc_ring_log);
      } else {
        allow_smem(super_inverse<16>, sms);
        super_inverse<16><<<igrid, kSCInvCols, sms, st>>>(a, b.seqs, b.P, b.M2, p.sc_nin, p.sc_ring_log);
      }
      TOKMIX_LAUNCHED("super_inverse");
      const int64_t rows = table_rows(m);
      transpose_coef<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, st>>>(b.P, b.PT, rows, 1 + m.nbl);
      TOKMIX_LAUNCHED("transpose_coef");
      launch_chain_super<false>(m, p, a, b, v, y, yf, st);
      return read_flags(m, b.bad, st);
    }
    const size_t smi = sizeof(float) * kInvChunks * (kC * (kC + 1) + 2 * kC * p.kin);
    allow_smem(chunk_inverse, smi);
    chunk_inverse<<<dim3((p.total_chunks + kInvChunks - 1) / kInvChunks, m.pb.H), kInvChunks * kC, smi, st>>>(
        a, b.seqs, b.chunk_seq, p.total_chunks, b.P, b.SRC, b.M);
    TOKMIX_LAUNCHED("chunk_inverse");
    // levels past kPF are read inside the step: long lattices (sq1-lattice: ~256 levels) run
    // faster on the 512-thread chain (measured, see docs/perf-notes.md)
    const int g = chain4_ok(m, sizeof(T), {v, y}) && (m.nbl <= kPF || std::getenv("TOKMIX_CHAIN_G"))
                      ? chain4_groups(m, p, chain_forward4<T, 1, 4>, chain_forward4<T, 2, 2>, chain_forward4<T, 4, 1>)
                      : 0;
    if (g > 0) {
      const dim3 grid(p.nseq, m.pb.H, (m.pb.Dv + 4 * g - 1) / (4 * g));
      if (g == 1) chain_forward4<T, 1, 4><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      else if (g == 2) chain_forward4<T, 2, 2><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      else chain_forward4<T, 4, 1><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      TOKMIX_LAUNCHED("chain_forward4");
    } else {
      const int64_t per = chain_vec(m, p, chain_forward<T, 1>);
      const dim3 g(p.nseq, m.pb.H, (m.pb.Dv + kDS * per - 1) / (kDS * per));
      if (per == 1)
        chain_forward<T, 1><<<g, kChainThreads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      else if (per == 2)
        chain_forward<T, 2><<<g, kChainThreads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      else
        chain_forward<T, 4><<<g, kChainThreads, 0, st>>>(a, b.seqs, v, b.P, b.SRC, b.M, y, yf);
      TOKMIX_LAUNCHED("chain_forward");
    }
    return read_flags(m, b.bad, st);
  }
  const size_t smg = sizeof(float) * (m.pb.Dk + 32);
  allow_smem(gen_forward<T>, smg);
  gen_forward<T><<<dim3(p.nseq, m.pb.H), kGenThreads, smg, st>>>(a, b.seqs, q, k, v, bias, gw, y, yf, lse, b.pbuf, b.posbuf);
  TOKMIX_LAUNCHED("gen_forward");
  return -1;
}

template <class T>
int32_t backward_t(const CudaMix& m, const T* q, const T* k, const T* v, const T* bias, const T* gw, const T* y, const float* lse,
                   const T* dy, T* dq, T* dk, T* dv, float* dbias_u, float* dgate_u, void* ws, const void* saved) {
  cudaStream_t st = static_cast<cudaStream_t>(m.stream);
  const Plan p = make_plan(m);
  int64_t bytes;
  Buffers b = carve(m, p, true, ws, const_cast<void*>(saved), &bytes);
  upload_plan(p, b, st, m.capturing);
  KArgs a = kargs(m, p);
  if (p.nseq == 0 || m.pb.H == 0) return p.fast ? 0 : -1;
  const bool softmax = m.pb.mode == Mode::Softmax;
  if (p.fast) {
    if (p.total_chunks == 0) return 0;
    const bool lattice = m.host_pat.B.kind == SupportKind::Lattice;
    a.lpk = lanes_per_row(m.pb.Dk, sizeof(T), {{q, m.pb.sq}, {softmax ? k : q, m.pb.sk}, {gw, Strides{0, 0, 0}}, {dq, m.pb.sq},
                                               {softmax ? dk : dq, m.pb.sk}});
    a.lpv = lanes_per_row(m.pb.Dv, sizeof(T), {{v, m.pb.sv}, {y, m.pb.sy}, {dv, m.pb.sv}});
    a.bad = b.bad;
    TOKMIX_CU(cudaMemsetAsync(b.bad, 0, sizeof(int32_t), st));
    const dim3 rows_grid(p.total_chunks, m.pb.H);
    // P, SRC and M come from the forward (`saved`)
    const int64_t ny = m.pb.batch * m.pb.T * m.pb.H * m.pb.Dv;
    const int g = p.super ? -1
                  : !lattice && chain4_ok(m, sizeof(T), {dy})
                      ? chain4_groups(m, p, chain_backward4<T, 1, 4>, chain_backward4<T, 2, 2>, chain_backward4<T, 4, 1>, true)
                      : 0;
    if (p.super) {
      launch_chain_super<true>(m, p, a, b, dy, static_cast<T*>(nullptr), b.G, st);
    } else if (g > 0) {
      const dim3 grid(p.nseq, m.pb.H, (m.pb.Dv + 4 * g - 1) / (4 * g));
      if (g == 1) chain_backward4<T, 1, 4><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, dy, b.P, b.M, b.G);
      else if (g == 2) chain_backward4<T, 2, 2><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, dy, b.P, b.M, b.G);
      else chain_backward4<T, 4, 1><<<grid, kChain4Threads, 0, st>>>(a, b.seqs, dy, b.P, b.M, b.G);
      TOKMIX_LAUNCHED("chain_backward4");
    } else {
      if (lattice) TOKMIX_CU(cudaMemsetAsync(b.G, 0, sizeof(float) * ny, st));
      const int64_t per = lattice ? chain_vec(m, p, chain_backward<T, true, 1>) : chain_vec(m, p, chain_backward<T, false, 1>);
      const dim3 cgrid(p.nseq, m.pb.H, (m.pb.Dv + kDS * per - 1) / (kDS * per));
#define TOKMIX_CHAIN_BWD(L, V) chain_backward<T, L, V><<<cgrid, kChainThreads, 0, st>>>(a, b.seqs, dy, b.P, b.SRC, b.M, b.G)
      if (lattice) {
        if (per == 1) TOKMIX_CHAIN_BWD(true, 1);
        else if (per == 2) TOKMIX_CHAIN_BWD(true, 2);
        else TOKMIX_CHAIN_BWD(true, 4);
      } else {
        if (per == 1) TOKMIX_CHAIN_BWD(false, 1);
        else if (per == 2) TOKMIX_CHAIN_BWD(false, 2);
        else TOKMIX_CHAIN_BWD(false, 4);
      }
#undef TOKMIX_CHAIN_BWD
      TOKMIX_LAUNCHED("chain_backward");
    }
    const bool slab = softmax && slab_ok(m, a) && a.lpv == a.lpk;
    if (slab) {
      with_slab_shape(m, a, [&](auto sm, auto l) {
        grad_slab<T, decltype(sm)::value, decltype(l)::value>
            <<<rows_grid, kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, k, v, y, b.P, b.G, dq, dv, b.DS, dbias_u);
      });
      TOKMIX_LAUNCHED("grad_slab");
    } else {
      const size_t smr = sizeof(float) * kRowWarps * (m.pb.Dv + 1 + m.nbl);
      allow_smem(grad_rows<T>, smr);
      grad_rows<T><<<rows_grid, kRowWarps * 32, smr, st>>>(a, b.seqs, b.chunk_seq, q, k, v, gw, y, b.P, b.SRC, b.G, dq, dv, b.DS,
                                                           dbias_u, dgate_u);
      TOKMIX_LAUNCHED("grad_rows");
    }
    if (softmax) {
      if (slab) {
        with_slab_shape(m, a, [&](auto sm, auto l) {
          dk_slab<T, decltype(sm)::value, decltype(l)::value><<<rows_grid, kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, q, b.DS, dk);
        });
        TOKMIX_LAUNCHED("dk_slab");
      } else if (lattice) {
        const int64_t nk = m.pb.batch * m.pb.T * m.pb.H * m.pb.Dk;
        TOKMIX_CU(cudaMemsetAsync(b.dkacc, 0, sizeof(float) * nk, st));
        dk_lattice_scatter<T><<<rows_grid, kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, q, b.DS, b.SRC, b.dkacc);
        TOKMIX_LAUNCHED("dk_lattice_scatter");
        dk_lattice_finish<T><<<rows_grid, kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, q, b.DS, b.dkacc, dk);
        TOKMIX_LAUNCHED("dk_lattice_finish");
      } else {
        dk_gather<T><<<rows_grid, kRowWarps * 32, 0, st>>>(a, b.seqs, b.chunk_seq, q, b.DS, dk);
        TOKMIX_LAUNCHED("dk_gather");
      }
    }
    return read_flags(m, b.bad, st);
  }
  const size_t smg = sizeof(float) * (m.pb.Dk + m.pb.Dv + 32);
  allow_smem(gen_backward<T>, smg);
  gen_backward<T><<<dim3(p.nseq, m.pb.H), kGenThreads, smg, st>>>(a, b.seqs, q, k, v, bias, gw, y, lse, dy, dq, dk, dv, dbias_u,
                                                                  dgate_u, b.G, b.gdk, b.gdv, b.pbuf, b.ubuf, b.posbuf,
                                                                  b.lvlbuf);
  TOKMIX_LAUNCHED("gen_backward");
  return -1;
}

template <class T>
void decode_t(const PatternDesc& pat, const DecodeProblem& pb, const CudaDecodeState& st, int32_t nbl, const T* q, const T* k,
              const T* v, const T* bias, const T* gw, T* kA, T* vA, T* kB, T* yB, T* y, void* stream) {
  if (pb.Dv > 4 * kDecThreads) throw std::invalid_argument("tokmix CUDA decode: Dv > 512 is not supported");
  const bool lattice = st.slot_in != nullptr;
  if (lattice && nbl > kDecMaxLevels) throw std::invalid_argument("tokmix CUDA decode: more than 4096 lattice levels");
  DecArgs a{pat, pb, st, nbl};
  if (st.split_ws) {
    if (lattice || pb.Dv > 32 * kSplitMaxV || pb.Dk > 256)
      throw std::invalid_argument("tokmix CUDA decode: the split path takes non-lattice patterns with Dk, Dv <= 256");
    const int32_t chunk = static_cast<int32_t>(split_chunk(pb)), ns = static_cast<int32_t>(split_count(pb));
    auto cs = static_cast<cudaStream_t>(stream);
    decode_split_partial<T><<<dim3(pb.batch * pb.H, ns), 128, 0, cs>>>(a, chunk, ns, q, k, v, bias, gw, kA, vA, kB, yB, st.split_ws);
    TOKMIX_LAUNCHED("decode_split_partial");
    const size_t smc = sizeof(float) * ns;
    allow_smem(decode_split_combine<T>, smc);
    decode_split_combine<T><<<pb.batch * pb.H, 128, smc, cs>>>(a, ns, q, k, v, st.split_ws, kA, vA, kB, yB, y);
    TOKMIX_LAUNCHED("decode_split_combine");
    return;
  }
  const size_t sm = decode_smem(pb, nbl, lattice);
  allow_smem(decode_kernel<T>, sm);
  decode_kernel<T><<<dim3(pb.batch, pb.H), kDecThreads, sm, static_cast<cudaStream_t>(stream)>>>(a, q, k, v, bias, gw, kA, vA, kB, yB, y);
  TOKMIX_LAUNCHED("decode_kernel");
}

}  // namespace

bool mix_cuda_fast_path(const CudaMix& m) {
  const PatternDesc& p = m.host_pat;
  return p.A.kind == SupportKind::Self && (p.B.kind == SupportKind::Offsets || p.B.kind == SupportKind::Lattice) && m.nbl >= 1 &&
         m.nbl <= kMaxFastLevels;
}

int64_t mix_cuda_workspace_bytes(const CudaMix& m, bool backward) {
  const Plan p = make_plan(m);
  int64_t bytes;
  carve(m, p, backward, nullptr, nullptr, &bytes);
  return bytes;
}

int64_t mix_cuda_saved_bytes(const CudaMix& m) {
  const Plan p = make_plan(m);
  Buffers b{};
  int64_t bytes;
  carve_tables(m, p, nullptr, b, &bytes);
  return bytes;
}

#define TOKMIX_DISPATCH(DT, ...)                       \
  switch (DT) {                                        \
    case DType::F32: { using T = float; __VA_ARGS__; break; }          \
    case DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case DType::F16: { using T = __half; __VA_ARGS__; break; }         \
  }

int32_t mix_forward_cuda(const CudaMix& m, const void* q, const void* k, const void* v, const void* bias, const void* gate_w, void* y,
                         float* lse, void* ws, void* saved) {
  int32_t flags = -1;
  TOKMIX_DISPATCH(m.dtype, flags = forward_t<T>(m, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                                        static_cast<const T*>(bias), static_cast<const T*>(gate_w), static_cast<T*>(y), lse, ws, saved));
  return flags;
}

int32_t mix_backward_cuda(const CudaMix& m, const void* q, const void* k, const void* v, const void* bias, const void* gate_w,
                          const void* y, const float* lse, const void* dy, void* dq, void* dk, void* dv, float* dbias_units,
                          float* dgate_units, void* ws, const void* saved) {
  int32_t flags = -1;
  TOKMIX_DISPATCH(m.dtype, flags = backward_t<T>(m, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                                         static_cast<const T*>(bias), static_cast<const T*>(gate_w), static_cast<const T*>(y), lse,
                                         static_cast<const T*>(dy), static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv),
                                         dbias_units, dgate_units, ws, saved));
  return flags;
}

void decode_step_cuda(const PatternDesc& dev_pat, const DecodeProblem& pb, const CudaDecodeState& st, int32_t nbl, DType dtype,
                      const void* q, const void* k, const void* v, const void* bias, const void* gate_w, void* kA, void* vA,
                      void* kB, void* yB, void* y, void* stream) {
  TOKMIX_DISPATCH(dtype, decode_t<T>(dev_pat, pb, st, nbl, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                                     static_cast<const T*>(bias), static_cast<const T*>(gate_w), static_cast<T*>(kA),
                                     static_cast<T*>(vA), static_cast<T*>(kB), static_cast<T*>(yB), static_cast<T*>(y), stream));
}

int64_t decode_split_floats(const DecodeProblem& pb, bool lattice) {
  if (lattice || pb.row_max < kSplitMin || pb.Dv > 32 * kSplitMaxV || pb.Dk > 256) return 0;
  return pb.batch * pb.H * split_count(pb) * (pb.Dv + 2);
}

unsigned long long* decode_flags_alloc(int64_t n, unsigned long long** dev) {
  void* hp = nullptr;
  const size_t bytes = sizeof(unsigned long long) * static_cast<size_t>(std::max<int64_t>(n, 1));
  TOKMIX_CU(cudaHostAlloc(&hp, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(hp, 0, bytes);
  void* dp = nullptr;
  TOKMIX_CU(cudaHostGetDevicePointer(&dp, hp, 0));
  *dev = static_cast<unsigned long long*>(dp);
  return static_cast<unsigned long long*>(hp);
}

int32_t* flag_slots_alloc(int64_t n) {
  void* hp = nullptr;
  TOKMIX_CU(cudaHostAlloc(&hp, sizeof(int32_t) * static_cast<size_t>(std::max<int64_t>(n, 1)), cudaHostAllocPortable));
  return static_cast<int32_t*>(hp);
}
void flag_slots_free(int32_t* host) {
  if (host) cudaFreeHost(host);
}
void* event_record(void* stream) {
  cudaEvent_t e;
  TOKMIX_CU(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  TOKMIX_CU(cudaEventRecord(e, static_cast<cudaStream_t>(stream)));
  return e;
}
bool event_done(void* event, bool wait) {
  cudaEvent_t e = static_cast<cudaEvent_t>(event);
  if (wait) {
    TOKMIX_CU(cudaEventSynchronize(e));
    return true;
  }
  const cudaError_t r = cudaEventQuery(e);
  if (r == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not an error: keep it from surfacing at the next launch check
    return false;
  }
  TOKMIX_CU(r);
  return true;
}
void event_destroy(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

void decode_flags_free(unsigned long long* host) {
  if (host) cudaFreeHost(host);  // may run at exit after the context is gone: nothing to report then
}

}  // namespace tokmix::kernels
