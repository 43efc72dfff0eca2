// Compact, plain-data description of a pattern that kernels read (CPU and CUDA alike).
// No STL, no LibTorch: a kernel gets one of these plus raw pointers.
//
// All positions here are 0-indexed: row i is token i+1 of the specification.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TOKMIX_HD __host__ __device__ __forceinline__
#else
#define TOKMIX_HD inline
#endif

namespace tokmix {

// How one side (A or B) of a pattern reaches back.
enum class SupportKind : int32_t {
  None = 0,     // empty
  Self = 1,     // A only: {i}
  Window = 2,   // A: distances [0, w-1]; B: distances [1, w]; w = 0 means unbounded
  Offsets = 3,  // distances f(0) < f(1) < ... (B: f(0) >= 1)
  Lattice = 4,  // cache-efficient lattice of f (spec section 3), B only
};

// Levels of a window distance: exact below 16, then one level per octave, so that an
// unbounded window (attention, dense) has a fixed number of levels at any length.
TOKMIX_HD int32_t window_level(int64_t d) {
  if (d < 16) return static_cast<int32_t>(d);
  int32_t l = 0;
  while ((d >> l) > 1) ++l;  // floor(log2 d)
  return 16 + (l - 4);
}
constexpr int64_t kUnboundedWindowLevels = 16 + (62 - 4) + 1;

struct SideDesc {
  SupportKind kind = SupportKind::None;
  int64_t window = 0;          // Window: w (0 = unbounded)
  const int64_t* f = nullptr;  // Offsets / Lattice: f(k), strictly increasing
  const int64_t* a = nullptr;  // Lattice: a_k
  int32_t count = 0;           // number of f entries available
  int32_t level_base = 0;      // added to this side's levels (B levels follow A levels)
};

struct PatternDesc {
  SideDesc A, B;
};

// Visits the entries of row i (0-indexed) of one side: fn(pos, level), positions in
// non-increasing order; on the lattice, levels that land on one position (always neighbours)
// are emitted once, at the lowest level. Returns the number of entries visited.
template <class Fn>
TOKMIX_HD int64_t visit_side(const SideDesc& s, bool is_b, int64_t i, Fn&& fn) {
  int64_t n = 0;
  switch (s.kind) {
    case SupportKind::None:
      break;
    case SupportKind::Self:
      fn(i, s.level_base);
      n = 1;
      break;
    case SupportKind::Window: {
      const int64_t d0 = is_b ? 1 : 0;
      int64_t dmax = i;  // furthest distance that stays >= position 0
      if (s.window > 0) {
        const int64_t wmax = is_b ? s.window : s.window - 1;
        if (wmax < dmax) dmax = wmax;
      }
      for (int64_t d = d0; d <= dmax; ++d) {
        fn(i - d, s.level_base + window_level(is_b ? d - 1 : d));
        ++n;
      }
      break;
    }
    case SupportKind::Offsets:
      for (int32_t k = 0; k < s.count && s.f[k] <= i; ++k) {
        fn(i - s.f[k], s.level_base + k);
        ++n;
      }
      break;
    case SupportKind::Lattice: {
      // 1-indexed: row r = i + 1 reads a_k * ceil((r - f(k)) / a_k) for f(k) < r.
      const int64_t r = i + 1;
      int64_t last = -1;
      for (int32_t k = 0; k < s.count && s.f[k] < r; ++k) {
        const int64_t ak = s.a[k];
        const int64_t p1 = ak * ((r - s.f[k] + ak - 1) / ak);  // 1-indexed source
        if (p1 == last) continue;  // merged with the previous (lower) level
        last = p1;
        fn(p1 - 1, s.level_base + k);
        ++n;
      }
      break;
    }
  }
  return n;
}

}  // namespace tokmix
