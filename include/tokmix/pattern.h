// Patterns: the supports SA(i) and SB(i) of a generalized linear token mixer
//   y_i = sum_{j in SA(i)} alpha_ij x_j + sum_{j in SB(i)} beta_ij y_j
// (spec: shared/spec/framework.md, sections 2 and 3). Pure C++, no tensors.
//
// Rows and positions are 0-indexed in this API; the printed form (`tokmix pattern`) is 1-indexed.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokmix/pattern_desc.h"

namespace tokmix {

// Error for a bad pattern spec, a bad f or a length the pattern cannot serve.
struct PatternError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct Entry {
  int64_t pos;    // source position (0-indexed)
  int32_t level;  // bias / gate level of the entry (B levels follow A levels)
  bool operator==(const Entry& o) const { return pos == o.pos && level == o.level; }
};

// A strictly increasing integer sequence f(0) < f(1) < ... with f(0) >= 1, given by a
// formula in k (e.g. "2^k", "k^2+1", "3*k+1") or an explicit list. Formulas are expanded up to
// the horizon (f(k) < 2^31, at most 2^20 terms): lengths beyond the horizon are refused.
struct Sequence {
  std::string text;           // as written
  std::vector<int64_t> f;     // expanded values
  bool finite = false;        // explicit list: rows past the last term simply have fewer levels
  int64_t horizon() const;    // largest row length served exactly (INT64_MAX when finite)
  static Sequence parse(const std::string& text);  // "pow2", "sq1", "2^k", "1,3,9,27", ...
};

// Lattice steps of f (spec section 3): a_0 = 1, a_{k+1} = a_k * ceil((f(k+1) - f(k)) / a_k).
std::vector<int64_t> lattice_steps(const std::vector<int64_t>& f);

struct Side {
  SupportKind kind = SupportKind::None;
  int64_t window = 0;   // Window: w, 0 = unbounded
  Sequence seq;         // Offsets / Lattice
  std::vector<int64_t> a;  // Lattice steps
};

class Pattern {
 public:
  // Accepted forms (see `accepted_forms()`):
  //   attention | local:W | first-order | ssm | recurrence:K | dense | pow2 | sq1 | f:LIST|FORMULA
  //   <f-pattern>-lattice (pow2-lattice, sq1-lattice, f:1,3,9-lattice)
  //   A=<a-side>;B=<b-side> hybrids, where the A side is taken from the named instance's A
  //   support and the B side from its B support (e.g. A=local:64;B=pow2).
  static Pattern parse(const std::string& spec);
  static std::string accepted_forms();

  const std::string& spec() const { return spec_; }
  const Side& A() const { return a_; }
  const Side& B() const { return b_; }

  // Plain-data view for kernels. Valid while this Pattern lives.
  PatternDesc desc() const;

  // Supports of row i (0-indexed).
  std::vector<Entry> row_A(int64_t i) const;
  std::vector<Entry> row_B(int64_t i) const;
  // Transposed pattern: rows m (i < m < n) that read position j, with their level.
  std::vector<Entry> col_A(int64_t j, int64_t n) const;
  std::vector<Entry> col_B(int64_t j, int64_t n) const;

  int32_t num_A_levels() const;
  int32_t num_B_levels(int64_t n) const;              // levels a row < n can use
  int32_t num_levels(int64_t n) const { return num_A_levels() + num_B_levels(n); }
  int64_t max_row_size(int64_t n) const;               // max |SA(i)| + |SB(i)| for i < n
  int64_t total_entries(int64_t n) const;              // sum over i < n of |SA(i)| + |SB(i)|
  int64_t max_len() const;                             // longest sequence served exactly
  // Decode cache at context n: the past positions the decoder must keep, for A (keys and
  // inputs) and for B (keys and outputs), maximised over the sequence.
  int64_t cache_A(int64_t n) const;
  int64_t cache_B(int64_t n) const;
  int64_t cache_entries(int64_t n) const { return cache_A(n) + cache_B(n); }
  bool translation_invariant() const { return b_.kind != SupportKind::Lattice; }

  // Throws PatternError when a sequence of length n cannot be served exactly.
  void check_length(int64_t n) const;

 private:
  std::string spec_;
  Side a_, b_;
};

}  // namespace tokmix
