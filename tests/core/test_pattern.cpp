// Patterns and the cache-efficient lattice: pure properties (spec sections 2 and 3).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "tokmix/pattern.h"

using namespace tokmix;

namespace {

std::vector<int64_t> positions(const std::vector<Entry>& es) {
  std::vector<int64_t> p;
  for (auto& e : es) p.push_back(e.pos);
  return p;
}

std::set<int64_t> lattice_1idx(const Pattern& p, int64_t i1) {  // L_f(i), 1-indexed
  std::set<int64_t> s;
  for (auto& e : p.row_B(i1 - 1)) s.insert(e.pos + 1);
  return s;
}

// The spec's definition of the lattice, written directly (1-indexed), for comparison.
std::set<int64_t> lattice_by_definition(const std::vector<int64_t>& f, int64_t i) {
  std::vector<int64_t> a = {1};
  for (size_t k = 1; k < f.size(); ++k) a.push_back(a.back() * (int64_t)std::ceil(double(f[k] - f[k - 1]) / double(a.back())));
  std::set<int64_t> s;
  for (size_t k = 0; k < f.size() && f[k] < i; ++k) s.insert(a[k] * (int64_t)std::ceil(double(i - f[k]) / double(a[k])));
  return s;
}

const std::vector<std::string> kAllSpecs = {"attention", "local:1",  "local:5",   "first-order", "ssm",          "recurrence:3",
                                            "dense",     "pow2",     "sq1",       "pow2-lattice", "sq1-lattice", "f:1,3,9,27",
                                            "f:3^k",     "f:2*k+1",  "f:1,2,5,6,20,21-lattice", "A=local:4;B=pow2",
                                            "A=attention;B=sq1-lattice", "B=recurrence:2"};

}  // namespace

TEST(Pattern, ParsesEveryInstanceOfTheSpec) {
  for (const auto& s : kAllSpecs) EXPECT_NO_THROW(Pattern::parse(s)) << s;
  EXPECT_EQ(Pattern::parse("attention").A().kind, SupportKind::Window);
  EXPECT_EQ(Pattern::parse("attention").B().kind, SupportKind::None);
  EXPECT_EQ(Pattern::parse("local:64").A().window, 64);
  EXPECT_EQ(Pattern::parse("dense").B().kind, SupportKind::Window);
  EXPECT_EQ(Pattern::parse("pow2").B().kind, SupportKind::Offsets);
  EXPECT_EQ(Pattern::parse("sq1-lattice").B().kind, SupportKind::Lattice);
  EXPECT_EQ(Pattern::parse("A=local:64;B=pow2").A().window, 64);
  EXPECT_EQ(Pattern::parse("A=local:64;B=pow2").B().kind, SupportKind::Offsets);
}

TEST(Pattern, BadSpecsListTheAcceptedForms) {
  for (std::string s : {"", "attn", "local:", "local:0", "local:-3", "recurrence:x", "f:", "f:3,2", "f:0,1,2", "f:1,1",
                        "f:k", "f:k^2", "C=pow2", "A=pow2;A=dense", "B=attention", "pow2-lattice-lattice", "f:2^k+", "f:1,2-5", "f:1 4", "f:-"}) {
    try {
      Pattern::parse(s);
      ADD_FAILURE() << "accepted bad spec '" << s << "'";
    } catch (const PatternError& e) {
      std::string m = e.what();
      EXPECT_FALSE(m.empty());
    }
  }
  try {
    Pattern::parse("attn");
  } catch (const PatternError& e) {
    EXPECT_NE(std::string(e.what()).find("Accepted forms"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("attn"), std::string::npos);
  }
  try {
    Pattern::parse("f:1,3,2");
  } catch (const PatternError& e) {
    EXPECT_NE(std::string(e.what()).find("not strictly increasing"), std::string::npos) << e.what();
  }
  try {
    Pattern::parse("f:0,1,2");
  } catch (const PatternError& e) {
    EXPECT_NE(std::string(e.what()).find("f(0) >= 1"), std::string::npos) << e.what();
  }
}

TEST(Pattern, RowsFollowTheSpecTable) {
  const int64_t n = 200;
  for (int64_t i1 = 1; i1 <= n; ++i1) {  // 1-indexed row
    const int64_t i = i1 - 1;
    // attention: [1, i]
    auto a = positions(Pattern::parse("attention").row_A(i));
    EXPECT_EQ((int64_t)a.size(), i1);
    // local:5: [i-4, i] clipped
    auto l = positions(Pattern::parse("local:5").row_A(i));
    EXPECT_EQ((int64_t)l.size(), std::min<int64_t>(5, i1));
    for (auto p : l) EXPECT_TRUE(p <= i && p >= i - 4);
    // recurrence:3: A {i}, B {i-1, i-2, i-3}
    auto r = Pattern::parse("recurrence:3");
    EXPECT_EQ(positions(r.row_A(i)), std::vector<int64_t>{i});
    EXPECT_EQ((int64_t)r.row_B(i).size(), std::min<int64_t>(3, i));
    // dense: B = [1, i-1]
    EXPECT_EQ((int64_t)Pattern::parse("dense").row_B(i).size(), i);
    // pow2: B = {i - 2^k : 2^k < i}
    std::set<int64_t> want;
    for (int64_t f = 1; f < i1; f *= 2) want.insert(i1 - f);
    std::set<int64_t> got;
    for (auto p : positions(Pattern::parse("pow2").row_B(i))) got.insert(p + 1);
    EXPECT_EQ(got, want) << "pow2 row " << i1;
    // sq1
    want.clear();
    for (int64_t k = 0; k * k + 1 < i1; ++k) want.insert(i1 - (k * k + 1));
    got.clear();
    for (auto p : positions(Pattern::parse("sq1").row_B(i))) got.insert(p + 1);
    EXPECT_EQ(got, want) << "sq1 row " << i1;
  }
}

TEST(Pattern, FormulaAndListAgree) {
  auto f1 = Sequence::parse("2^k"), f2 = Sequence::parse("pow2"), f3 = Sequence::parse("1,2,4,8,16");
  EXPECT_EQ(f1.f, f2.f);
  EXPECT_EQ(std::vector<int64_t>(f1.f.begin(), f1.f.begin() + 5), f3.f);
  EXPECT_EQ(Sequence::parse("k^2+1").f[3], 10);
  EXPECT_EQ(Sequence::parse("3*k+1").f[4], 13);
  EXPECT_EQ(Sequence::parse("(k+1)*(k+2)/2").f[3], 10);
}

TEST(Lattice, WorkedExamples) {
  EXPECT_EQ(lattice_1idx(Pattern::parse("pow2-lattice"), 100), (std::set<int64_t>{64, 80, 88, 92, 96, 98, 99}));
  EXPECT_EQ(lattice_1idx(Pattern::parse("sq1-lattice"), 100), (std::set<int64_t>{24, 48, 72, 84, 90, 96, 98, 99}));
}

TEST(Lattice, CausalNestedAndSmallBelow20000) {
  struct Case { std::string spec; int64_t max_size; };
  for (const auto& c : std::vector<Case>{{"pow2-lattice", 15}, {"sq1-lattice", 103}}) {
    Pattern p = Pattern::parse(c.spec);
    int64_t violations = 0, max_size = 0;
    std::set<int64_t> prev = lattice_1idx(p, 1);
    for (int64_t i = 1; i < 20000; ++i) {
      std::set<int64_t> cur = prev, next = lattice_1idx(p, i + 1);
      for (int64_t x : cur) EXPECT_LT(x, i) << c.spec << " row " << i;
      for (int64_t x : next)
        if (!cur.count(x) && x != i) ++violations;
      max_size = std::max<int64_t>(max_size, (int64_t)cur.size());
      prev = next;
    }
    EXPECT_EQ(violations, 0) << c.spec;
    EXPECT_EQ(max_size, c.max_size) << c.spec;
  }
}

TEST(Lattice, MatchesTheDefinitionForManyF) {
  // includes lists with gaps that make levels merge
  std::vector<std::string> fs = {"1,2,4,8,16,32,64,128", "1,2,5,10,17,26,37,50,65,82", "1,3,9,27,81", "1,2,5,6,20,21,100,101",
                                 "3,5,7,100,103,400", "2,3,4,5,6,7,8,9,10"};
  std::mt19937 rng(7);
  for (int t = 0; t < 6; ++t) {  // random strictly increasing lists
    std::string s;
    int64_t v = 1 + rng() % 4;
    for (int k = 0; k < 10; ++k) {
      s += (k ? "," : "") + std::to_string(v);
      v += 1 + rng() % (5 * (k + 1));
    }
    fs.push_back(s);
  }
  for (const auto& f : fs) {
    Pattern p = Pattern::parse("f:" + f + "-lattice");
    for (int64_t i = 1; i < 3000; ++i) {
      auto got = lattice_1idx(p, i);
      EXPECT_EQ(got, lattice_by_definition(p.B().seq.f, i)) << f << " row " << i;
      EXPECT_EQ(got.size(), p.row_B(i - 1).size()) << "duplicate entries, f=" << f << " row " << i;
    }
  }
}

TEST(Pattern, TransposedSupportsMatchBruteForce) {
  const int64_t n = 150;
  for (const auto& s : kAllSpecs) {
    Pattern p = Pattern::parse(s);
    // brute force transpose: colX[j] = {(m, level) : j in SX(m)}
    std::vector<std::vector<Entry>> ca(n), cb(n);
    for (int64_t m = 0; m < n; ++m) {
      for (auto& e : p.row_A(m)) ca[e.pos].push_back({m, e.level});
      for (auto& e : p.row_B(m)) cb[e.pos].push_back({m, e.level});
    }
    for (int64_t j = 0; j < n; ++j) {
      auto sorted = [](std::vector<Entry> v) {
        std::sort(v.begin(), v.end(), [](const Entry& x, const Entry& y) { return x.pos < y.pos; });
        return v;
      };
      EXPECT_EQ(sorted(p.col_A(j, n)), sorted(ca[j])) << s << " col " << j;
      EXPECT_EQ(sorted(p.col_B(j, n)), sorted(cb[j])) << s << " col " << j;
    }
  }
}

TEST(Pattern, LevelsAreInRangeAndStable) {
  for (const auto& s : kAllSpecs) {
    Pattern p = Pattern::parse(s);
    const int64_t n = 500;
    const int32_t L = p.num_levels(n);
    for (int64_t i = 0; i < n; ++i) {
      for (auto& e : p.row_A(i)) {
        EXPECT_GE(e.level, 0);
        EXPECT_LT(e.level, p.num_A_levels()) << s;
      }
      for (auto& e : p.row_B(i)) {
        EXPECT_GE(e.level, p.num_A_levels()) << s;
        EXPECT_LT(e.level, L) << s;
      }
      EXPECT_LE((int64_t)(p.row_A(i).size() + p.row_B(i).size()), p.max_row_size(n)) << s;
    }
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += (int64_t)(p.row_A(i).size() + p.row_B(i).size());
    EXPECT_EQ(p.total_entries(n), total) << s;
  }
}

TEST(Pattern, CacheSizes) {
  EXPECT_EQ(Pattern::parse("attention").cache_entries(4096), 4095);
  EXPECT_EQ(Pattern::parse("local:64").cache_entries(4096), 63);
  EXPECT_EQ(Pattern::parse("first-order").cache_entries(4096), 1);
  EXPECT_EQ(Pattern::parse("recurrence:4").cache_entries(4096), 4);
  EXPECT_EQ(Pattern::parse("dense").cache_entries(4096), 4095);
  EXPECT_EQ(Pattern::parse("pow2").cache_entries(4096), 2048);
  EXPECT_EQ(Pattern::parse("pow2-lattice").cache_entries(20000), 15);
  EXPECT_EQ(Pattern::parse("sq1-lattice").cache_entries(20000), 103);
  EXPECT_EQ(Pattern::parse("sq1-lattice").max_row_size(20000), 104);  // merged levels counted once, + {i}
  EXPECT_LE(Pattern::parse("pow2-lattice").cache_entries(65536), 17);
  EXPECT_EQ(Pattern::parse("A=local:8;B=pow2-lattice").cache_A(100), 7);
}

TEST(Pattern, LengthBeyondTheHorizonIsRefused) {
  Pattern p = Pattern::parse("f:k+1");  // 2^20 terms: horizon 2^20
  EXPECT_NO_THROW(p.check_length(1000));
  EXPECT_THROW(p.check_length(int64_t(1) << 22), PatternError);
  EXPECT_NO_THROW(Pattern::parse("f:1,3,9").check_length(int64_t(1) << 40));  // a finite list serves any length
}
