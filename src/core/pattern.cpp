#include "tokmix/pattern.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <sstream>

namespace tokmix {
namespace {

constexpr int64_t kFormulaLimit = int64_t(1) << 31;  // formulas expand while f(k) < 2^31
constexpr size_t kFormulaTerms = size_t(1) << 20;

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

int64_t parse_positive(const std::string& what, const std::string& s) {
  if (s.empty() || !std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
    throw PatternError(what + ": expected a positive integer, got '" + s + "'");
  if (s.size() > 15) throw PatternError(what + ": value '" + s + "' is too large");
  int64_t v = std::stoll(s);
  if (v < 1) throw PatternError(what + ": expected a positive integer, got " + s);
  return v;
}

// A tiny recursive-descent evaluator for formulas in k: + - * / ^ ( ) integers and k.
// Evaluated in long double then checked to be an integer; overflow ends the expansion.
class Formula {
 public:
  explicit Formula(std::string s) : s_(std::move(s)) {}
  long double eval(long double k) {
    k_ = k;
    p_ = 0;
    long double v = expr();
    skip();
    if (p_ != s_.size()) fail("unexpected '" + s_.substr(p_, 1) + "'");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& why) {
    throw PatternError("formula '" + s_ + "': " + why + " (use k, integers, + - * / ^ and parentheses)");
  }
  void skip() {
    while (p_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[p_]))) ++p_;
  }
  long double expr() {
    long double v = term();
    for (;;) {
      skip();
      if (p_ < s_.size() && (s_[p_] == '+' || s_[p_] == '-')) {
        char op = s_[p_++];
        long double r = term();
        v = op == '+' ? v + r : v - r;
      } else {
        return v;
      }
    }
  }
  long double term() {
    long double v = power();
    for (;;) {
      skip();
      if (p_ < s_.size() && (s_[p_] == '*' || s_[p_] == '/')) {
        char op = s_[p_++];
        long double r = power();
        if (op == '/' && r == 0) fail("division by zero");
        v = op == '*' ? v * r : v / r;
      } else {
        return v;
      }
    }
  }
  long double power() {
    long double b = atom();
    skip();
    if (p_ < s_.size() && s_[p_] == '^') {
      ++p_;
      long double e = power();  // right associative
      long double r = 1;
      if (e < 0 || e != static_cast<long long>(e)) fail("exponent must be a non-negative integer");
      for (long long t = 0; t < static_cast<long long>(e) && r < 1e30L; ++t) r *= b;
      return r;
    }
    return b;
  }
  long double atom() {
    skip();
    if (p_ >= s_.size()) fail("unexpected end");
    char c = s_[p_];
    if (c == '(') {
      ++p_;
      long double v = expr();
      skip();
      if (p_ >= s_.size() || s_[p_] != ')') fail("missing ')'");
      ++p_;
      return v;
    }
    if (c == '-') {
      ++p_;
      return -atom();
    }
    if (c == 'k') {
      ++p_;
      return k_;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      long double v = 0;
      while (p_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p_]))) v = v * 10 + (s_[p_++] - '0');
      return v;
    }
    fail(std::string("unexpected '") + c + "'");
  }
  std::string s_;
  size_t p_ = 0;
  long double k_ = 0;
};

void check_increasing(const std::string& text, const std::vector<int64_t>& f) {
  if (f.empty()) throw PatternError("f '" + text + "': no terms");
  if (f[0] < 1)
    throw PatternError("f '" + text + "': f(0) = " + std::to_string(f[0]) + ", expected f(0) >= 1 (SB(i) must stay strictly in the past)");
  for (size_t k = 1; k < f.size(); ++k)
    if (f[k] <= f[k - 1])
      throw PatternError("f '" + text + "' is not strictly increasing: f(" + std::to_string(k - 1) + ") = " + std::to_string(f[k - 1]) +
                         ", f(" + std::to_string(k) + ") = " + std::to_string(f[k]));
}

Side window_side(int64_t w) {
  Side s;
  s.kind = SupportKind::Window;
  s.window = w;
  return s;
}

Side offsets_side(Sequence q, bool lattice) {
  Side s;
  s.kind = lattice ? SupportKind::Lattice : SupportKind::Offsets;
  if (lattice) s.a = lattice_steps(q.f);
  s.seq = std::move(q);
  return s;
}

Side self_side() {
  Side s;
  s.kind = SupportKind::Self;
  return s;
}

// One named instance: its A and B sides.
void parse_instance(const std::string& spec_in, Side& a, Side& b) {
  const std::string spec = trim(spec_in);
  a = Side{};
  b = Side{};
  if (spec == "attention") {
    a = window_side(0);
    return;
  }
  if (spec.rfind("local:", 0) == 0) {
    a = window_side(parse_positive("local window", spec.substr(6)));
    return;
  }
  a = self_side();
  if (spec == "first-order" || spec == "ssm") {
    b = offsets_side(Sequence::parse("1"), false);
    return;
  }
  if (spec.rfind("recurrence:", 0) == 0) {
    int64_t k = parse_positive("recurrence order", spec.substr(11));
    if (k > (int64_t(1) << 20)) throw PatternError("recurrence order " + std::to_string(k) + " is too large (use dense)");
    std::string list;
    for (int64_t d = 1; d <= k; ++d) list += (d > 1 ? "," : "") + std::to_string(d);
    b = offsets_side(Sequence::parse(list), false);
    b.seq.text = std::to_string(k);
    return;
  }
  if (spec == "dense") {
    b = window_side(0);
    return;
  }
  if (spec == "self") return;
  bool lattice = ends_with(spec, "-lattice");
  std::string base = lattice ? spec.substr(0, spec.size() - 8) : spec;
  if (base == "pow2" || base == "sq1") {
    b = offsets_side(Sequence::parse(base), lattice);
    return;
  }
  if (base.rfind("f:", 0) == 0) {
    b = offsets_side(Sequence::parse(base.substr(2)), lattice);
    return;
  }
  throw PatternError("unknown pattern '" + spec + "'. " + Pattern::accepted_forms());
}

}  // namespace

int64_t Sequence::horizon() const {
  if (finite) return INT64_MAX;
  return f.back();  // rows up to f.back() + 1 only need terms < row length
}

Sequence Sequence::parse(const std::string& text_in) {
  Sequence q;
  q.text = trim(text_in);
  std::string t = q.text;
  if (t == "pow2") t = "2^k";
  if (t == "sq1") t = "k^2+1";
  if (t == "pow3") t = "3^k";
  if (t.empty()) throw PatternError("f: empty sequence; give a formula in k (e.g. 2^k) or a list (e.g. 1,3,9,27)");
  bool is_list = std::all_of(t.begin(), t.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) || c == ',' || c == ' ' || c == '-';
  });
  if (is_list) {
    q.finite = true;
    std::stringstream ss(t);
    std::string item;
    while (std::getline(ss, item, ',')) {
      item = trim(item);
      if (item.empty()) throw PatternError("f list '" + q.text + "': empty item");
      const bool digits = std::all_of(item.begin(), item.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }) ||
                          (item.size() > 1 && item[0] == '-' &&
                           std::all_of(item.begin() + 1, item.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }));
      if (!digits) throw PatternError("f list '" + q.text + "': item '" + item + "' is not an integer");
      if (item.size() > 15) throw PatternError("f list '" + q.text + "': value '" + item + "' is too large");
      q.f.push_back(std::stoll(item));
    }
    check_increasing(q.text, q.f);
    return q;
  }
  Formula fm(t);
  for (size_t k = 0; k < kFormulaTerms; ++k) {
    long double v = fm.eval(static_cast<long double>(k));
    if (v >= static_cast<long double>(kFormulaLimit)) break;  // before any conversion: no overflow
    if (v != static_cast<long double>(static_cast<long long>(v)))
      throw PatternError("f '" + q.text + "': f(" + std::to_string(k) + ") is not an integer");
    q.f.push_back(static_cast<int64_t>(v));
    if (q.f.size() >= 2 && q.f.back() <= q.f[q.f.size() - 2]) break;  // reported by the check below
  }
  if (q.f.empty()) throw PatternError("f '" + q.text + "': f(0) >= 2^31");
  check_increasing(q.text, q.f);
  return q;
}

std::vector<int64_t> lattice_steps(const std::vector<int64_t>& f) {
  std::vector<int64_t> a(f.size());
  if (f.empty()) return a;
  a[0] = 1;
  for (size_t k = 1; k < f.size(); ++k) {
    const int64_t d = f[k] - f[k - 1];
    a[k] = a[k - 1] * ((d + a[k - 1] - 1) / a[k - 1]);
  }
  return a;
}

std::string Pattern::accepted_forms() {
  return "Accepted forms: attention | local:W | first-order | ssm | recurrence:K | dense | pow2 | sq1 | "
         "f:LIST (e.g. f:1,3,9,27) | f:FORMULA in k (e.g. f:2^k, f:k^2+1, f:3*k+1) | <f-pattern>-lattice "
         "(pow2-lattice, sq1-lattice, f:1,3,9-lattice) | A=<instance>;B=<instance> (hybrid: the A support of "
         "the first, the B support of the second, e.g. A=local:64;B=pow2). W, K >= 1; f strictly increasing "
         "with f(0) >= 1.";
}

Pattern Pattern::parse(const std::string& spec_in) {
  Pattern p;
  p.spec_ = trim(spec_in);
  const std::string& spec = p.spec_;
  if (spec.find('=') != std::string::npos) {
    bool have_a = false, have_b = false;
    std::stringstream ss(spec);
    std::string part;
    p.a_ = self_side();
    while (std::getline(ss, part, ';')) {
      part = trim(part);
      if (part.size() < 2 || part[1] != '=' || (part[0] != 'A' && part[0] != 'B'))
        throw PatternError("hybrid part '" + part + "': expected A=<instance> or B=<instance>. " + accepted_forms());
      Side a, b;
      parse_instance(part.substr(2), a, b);
      if (part[0] == 'A') {
        if (have_a) throw PatternError("hybrid '" + spec + "': A given twice");
        have_a = true;
        p.a_ = a;
      } else {
        if (have_b) throw PatternError("hybrid '" + spec + "': B given twice");
        have_b = true;
        if (b.kind == SupportKind::None)
          throw PatternError("hybrid part '" + part + "': that instance has no B support (use first-order, recurrence:K, dense, pow2, sq1, f:..., or a lattice)");
        p.b_ = b;
      }
    }
    if (!have_a && !have_b) throw PatternError("hybrid '" + spec + "' names no side. " + accepted_forms());
    return p;
  }
  parse_instance(spec, p.a_, p.b_);
  return p;
}

PatternDesc Pattern::desc() const {
  PatternDesc d;
  auto fill = [](const Side& s, SideDesc& o) {
    o.kind = s.kind;
    o.window = s.window;
    o.f = s.seq.f.empty() ? nullptr : s.seq.f.data();
    o.a = s.a.empty() ? nullptr : s.a.data();
    o.count = static_cast<int32_t>(s.seq.f.size());
  };
  fill(a_, d.A);
  fill(b_, d.B);
  d.A.level_base = 0;
  d.B.level_base = num_A_levels();
  return d;
}

std::vector<Entry> Pattern::row_A(int64_t i) const {
  std::vector<Entry> out;
  PatternDesc d = desc();
  visit_side(d.A, false, i, [&](int64_t pos, int32_t lvl) { out.push_back({pos, lvl}); });
  return out;
}

std::vector<Entry> Pattern::row_B(int64_t i) const {
  std::vector<Entry> out;
  PatternDesc d = desc();
  visit_side(d.B, true, i, [&](int64_t pos, int32_t lvl) { out.push_back({pos, lvl}); });
  return out;
}

std::vector<Entry> Pattern::col_A(int64_t j, int64_t n) const {
  std::vector<Entry> out;
  switch (a_.kind) {
    case SupportKind::Self:
      if (j < n) out.push_back({j, 0});
      break;
    case SupportKind::Window: {
      int64_t last = a_.window > 0 ? std::min(n - 1, j + a_.window - 1) : n - 1;
      for (int64_t m = j; m <= last; ++m) out.push_back({m, window_level(m - j)});
      break;
    }
    default:
      break;
  }
  return out;
}

std::vector<Entry> Pattern::col_B(int64_t j, int64_t n) const {
  std::vector<Entry> out;
  const int32_t base = num_A_levels();
  switch (b_.kind) {
    case SupportKind::Window: {
      int64_t last = b_.window > 0 ? std::min(n - 1, j + b_.window) : n - 1;
      for (int64_t m = j + 1; m <= last; ++m) out.push_back({m, base + window_level(m - j - 1)});
      break;
    }
    case SupportKind::Offsets:
      for (size_t k = 0; k < b_.seq.f.size() && j + b_.seq.f[k] < n; ++k)
        out.push_back({j + b_.seq.f[k], base + static_cast<int32_t>(k)});
      break;
    case SupportKind::Lattice: {
      // Level k of row r (1-indexed) reads p = a_k * ceil((r - f(k)) / a_k): p is a multiple of
      // a_k and r lies in (p + f(k) - a_k, p + f(k)]. A row that reads p at several levels keeps
      // the lowest one, so a row is reported at the first level that reaches it.
      const int64_t p = j + 1;
      for (size_t k = 0; k < b_.seq.f.size(); ++k) {
        const int64_t ak = b_.a[k], fk = b_.seq.f[k];
        if (fk - ak + 1 > n) break;  // first row of this level is already past n
        if (p % ak != 0) continue;
        const int64_t r_lo = std::max(p + fk - ak + 1, fk + 1), r_hi = std::min(p + fk, n);
        for (int64_t r = r_lo; r <= r_hi; ++r) {
          // keep only if no lower level of row r reads p (levels merge only when adjacent)
          bool lower = false;
          if (k > 0) {
            const int64_t a0 = b_.a[k - 1], f0 = b_.seq.f[k - 1];
            lower = f0 < r && a0 * ((r - f0 + a0 - 1) / a0) == p;
          }
          if (!lower) out.push_back({r - 1, base + static_cast<int32_t>(k)});
        }
      }
      std::sort(out.begin(), out.end(), [](const Entry& x, const Entry& y) { return x.pos < y.pos; });
      break;
    }
    default:
      break;
  }
  return out;
}

int32_t Pattern::num_A_levels() const {
  switch (a_.kind) {
    case SupportKind::Self:
      return 1;
    case SupportKind::Window:
      return a_.window > 0 ? window_level(a_.window - 1) + 1 : static_cast<int32_t>(kUnboundedWindowLevels);
    default:
      return 0;
  }
}

int32_t Pattern::num_B_levels(int64_t n) const {
  switch (b_.kind) {
    case SupportKind::Window:
      return b_.window > 0 ? window_level(b_.window - 1) + 1 : static_cast<int32_t>(kUnboundedWindowLevels);
    case SupportKind::Offsets:
    case SupportKind::Lattice: {
      // rows i < n use levels with f(k) <= n - 1
      const auto& f = b_.seq.f;
      return static_cast<int32_t>(std::upper_bound(f.begin(), f.end(), n - 1) - f.begin());
    }
    default:
      return 0;
  }
}

int64_t Pattern::max_len() const {
  if (b_.kind == SupportKind::Offsets || b_.kind == SupportKind::Lattice) {
    int64_t h = b_.seq.horizon();
    return h == INT64_MAX ? INT64_MAX : h + 1;
  }
  return INT64_MAX;
}

void Pattern::check_length(int64_t n) const {
  if (n > max_len())
    throw PatternError("sequence length " + std::to_string(n) + " is longer than pattern '" + spec_ + "' allows (at most " +
                       std::to_string(max_len()) + ": its f is expanded up to " + std::to_string(max_len() - 1) + ")");
}

int64_t Pattern::max_row_size(int64_t n) const {
  if (n <= 0) return 0;
  auto side_max = [&](const Side& s, bool is_b) -> int64_t {
    switch (s.kind) {
      case SupportKind::Self:
        return 1;
      case SupportKind::Window: {
        int64_t reach = is_b ? n - 1 : n;
        return s.window > 0 ? std::min(s.window, reach) : reach;
      }
      case SupportKind::Offsets:
        return num_B_levels(n);
      case SupportKind::Lattice:
        return cache_B(n);  // merged levels: the exact max |L(i)|, below the level count
      default:
        return 0;
    }
  };
  return side_max(a_, false) + side_max(b_, true);
}

int64_t Pattern::total_entries(int64_t n) const {
  // closed forms where they exist, so that attention at long n costs O(1) to count
  auto window_sum = [](int64_t w, int64_t rows) {  // sum_{i<rows} min(w, i + 1), w = 0 unbounded
    if (w <= 0 || w >= rows) return rows * (rows + 1) / 2;
    return w * (w + 1) / 2 + (rows - w) * w;
  };
  auto side = [&](const Side& s, bool is_b) -> int64_t {
    switch (s.kind) {
      case SupportKind::Self: return n;
      case SupportKind::Window: return is_b ? (n > 1 ? window_sum(s.window, n - 1) : 0) : window_sum(s.window, n);
      case SupportKind::Offsets: {
        int64_t t = 0;
        for (int64_t f : s.seq.f) {
          if (f > n - 1) break;
          t += n - f;  // rows i >= f use level k
        }
        return t;
      }
      case SupportKind::Lattice: {
        PatternDesc d = desc();
        int64_t t = 0;
        for (int64_t i = 0; i < n; ++i) t += visit_side(d.B, true, i, [](int64_t, int32_t) {});
        return t;
      }
      default: return 0;
    }
  };
  return side(a_, false) + side(b_, true);
}

int64_t Pattern::cache_A(int64_t n) const {
  // Row i+1 reads positions down to i+1-(w-1): the decoder keeps w-1 past inputs.
  if (a_.kind == SupportKind::Window) return a_.window > 0 ? std::min(a_.window - 1, n - 1) : n - 1;
  return 0;
}

int64_t Pattern::cache_B(int64_t n) const {
  if (n <= 1) return 0;
  switch (b_.kind) {
    case SupportKind::Window:
      return b_.window > 0 ? std::min(b_.window, n - 1) : n - 1;
    case SupportKind::Offsets: {
      // translation-invariant reach: the largest distance used below n
      int32_t L = num_B_levels(n);
      return L > 0 ? b_.seq.f[L - 1] : 0;
    }
    case SupportKind::Lattice: {
      // the decoder keeps exactly L(i) for the next row i; the maximum over rows < n
      PatternDesc d = desc();
      int64_t best = 0;
      for (int64_t i = 0; i < n; ++i) best = std::max(best, visit_side(d.B, true, i, [](int64_t, int32_t) {}));
      return best;
    }
    default:
      return 0;
  }
}

}  // namespace tokmix
