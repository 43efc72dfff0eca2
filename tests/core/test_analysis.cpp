// Pattern analysis (spec section 7): shortest paths, copy congestion, cost and cache, checked
// against brute force on the explicit graph and against the paper's claims.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <iostream>

#include "tokmix/analysis.h"

using namespace tokmix;

namespace {

const std::vector<std::string> kTranslationInvariant = {
    "attention", "local:1",   "local:5",          "first-order",     "recurrence:3",       "dense",
    "pow2",      "sq1",       "f:1,3,9,27",       "f:3^k",           "f:2*k+1",            "f:2,3",
    "f:3,5,11",  "A=local:4;B=pow2", "A=local:7;B=sq1", "A=local:3;B=f:4,6", "B=recurrence:2", "A=attention;B=pow2",
    "A=local:5;B=dense"};
const std::vector<std::string> kSearched = {"pow2-lattice", "sq1-lattice", "f:1,2,5,6,20,21-lattice", "f:3^k-lattice",
                                            "A=local:4;B=sq1-lattice", "f:2,3,7-lattice"};

// Statistics over every pair, from one sweep per source over the explicit graph.
struct Brute {
  std::vector<std::vector<int32_t>> d;  // d[j][i]
  PathStats s;
};

Brute brute(const Pattern& p, int64_t n) {
  Brute b;
  CommGraph g = CommGraph::build(p, n);
  for (int64_t j = 0; j < n; ++j) b.d.push_back(distances_from(g, j));
  double sum = 0, cnt = 0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j + 1; i < n; ++i) {
      const int32_t d = b.d[j][i];
      ++b.s.pairs;
      if (d == kUnreachable) {
        if (b.s.unreachable++ == 0) b.s.unreachable_j = j, b.s.unreachable_i = i;
        continue;
      }
      if (static_cast<int64_t>(b.s.histogram.size()) <= d) b.s.histogram.resize(d + 1, 0);
      ++b.s.histogram[d];
      sum += d, ++cnt;
      if (d > b.s.max) b.s.max = d, b.s.max_j = j, b.s.max_i = i;
    }
  b.s.mean = cnt ? sum / cnt : 0;
  return b;
}

void expect_same_stats(const PathStats& a, const PathStats& b, const std::string& what) {
  EXPECT_EQ(a.pairs, b.pairs) << what;
  EXPECT_EQ(a.unreachable, b.unreachable) << what;
  EXPECT_EQ(a.max, b.max) << what;
  EXPECT_EQ(a.max_j, b.max_j) << what;
  EXPECT_EQ(a.max_i, b.max_i) << what;
  EXPECT_NEAR(a.mean, b.mean, 1e-9) << what;
  EXPECT_EQ(a.histogram, b.histogram) << what;
  if (a.unreachable) {
    EXPECT_EQ(a.unreachable_j, b.unreachable_j) << what;
    EXPECT_EQ(a.unreachable_i, b.unreachable_i) << what;
  }
}

bool is_edge(const CommGraph& g, int64_t from, int64_t to, bool first_hop) {
  if (first_hop && to - from >= 1 && to - from < g.a_reach) return true;
  for (int64_t e = g.b_start[to]; e < g.b_start[to + 1]; ++e)
    if (g.b_src[e] == from) return true;
  return false;
}

}  // namespace

TEST(Analysis, DistanceDpMatchesTheGraphForEveryPairIncludingTheStart) {
  // Translation invariance of d is argued (paths stay inside [j, i]); here it is checked.
  const int64_t n = 300;
  for (const auto& spec : kTranslationInvariant) {
    Pattern p = Pattern::parse(spec);
    DistanceProfile prof = distance_profile(p, n);
    Brute b = brute(p, n);
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = j + 1; i < n; ++i) bad += prof.d[i - j] != b.d[j][i];
    EXPECT_EQ(bad, 0) << spec;
    for (int64_t dl = 1; dl < n; ++dl) {
      std::vector<int64_t> h = profile_hops(prof, dl);
      if (prof.d[dl] == kUnreachable) {
        EXPECT_TRUE(h.empty()) << spec;
        continue;
      }
      ASSERT_EQ(static_cast<int64_t>(h.size()), prof.d[dl]) << spec << " delta " << dl;
      int64_t sum = 0;
      for (int64_t x : h) sum += x;
      EXPECT_EQ(sum, dl) << spec;
    }
  }
}

TEST(Analysis, StatisticsMatchBruteForce) {
  const int64_t n = 600;  // more than two batches of 256 sources
  std::vector<std::string> all = kTranslationInvariant;
  all.insert(all.end(), kSearched.begin(), kSearched.end());
  for (const auto& spec : all) {
    Pattern p = Pattern::parse(spec);
    Brute b = brute(p, n);
    PathOptions searched;
    searched.force_search = true;
    searched.copy_shift = 217;
    PathStats s = shortest_paths(p, n, searched);
    EXPECT_TRUE(s.exact) << spec;
    expect_same_stats(s, b.s, spec + " (search)");
    ASSERT_EQ(static_cast<int64_t>(s.copy_distances.size()), n - 217) << spec;
    for (int64_t j = 0; j + 217 < n; ++j) EXPECT_EQ(s.copy_distances[j], b.d[j][j + 217]) << spec << " j " << j;
    if (p.translation_invariant()) expect_same_stats(shortest_paths(p, n), b.s, spec + " (dp)");
  }
}

TEST(Analysis, Pow2DistanceIsThePopcountForEveryPairAt4096) {
  const int64_t n = 4096;
  Pattern p = Pattern::parse("pow2");
  CommGraph g = CommGraph::build(p, n);
  DistanceProfile prof = distance_profile(p, n);
  int64_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    std::vector<int32_t> d = distances_from(g, j);
    for (int64_t i = j + 1; i < n; ++i) bad += d[i] != __builtin_popcountll(i - j) || prof.d[i - j] != d[i];
  }
  EXPECT_EQ(bad, 0);
  PathStats s = shortest_paths(p, n);
  EXPECT_EQ(s.max, 12);  // popcount(4095) = log2(4096)
  EXPECT_EQ(s.max_j, 0);
  EXPECT_EQ(s.max_i, 4095);
}

TEST(Analysis, Sq1ShortestPathsAreAtMostFourAt4096) {
  const int64_t n = 4096;
  Pattern p = Pattern::parse("sq1");
  PathStats dp = shortest_paths(p, n);
  PathOptions searched;
  searched.force_search = true;
  PathStats s = shortest_paths(p, n, searched);
  expect_same_stats(dp, s, "sq1 dp vs search");
  EXPECT_LE(s.max, 4);
  EXPECT_EQ(s.unreachable, 0);
  EXPECT_EQ(s.pairs, n * (n - 1) / 2);
}

TEST(Analysis, FirstOrderAttentionDenseAndLocal) {
  const int64_t n = 512;
  Brute fo = brute(Pattern::parse("first-order"), n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j + 1; i < n; ++i) ASSERT_EQ(fo.d[j][i], i - j);
  PathStats s = shortest_paths(Pattern::parse("first-order"), 65536);
  EXPECT_EQ(s.max, 65535);
  EXPECT_NEAR(s.mean, (65536.0 + 1) / 3, 1e-6);  // mean of i - j over pairs
  for (std::string spec : {"attention", "dense"}) {
    for (int64_t len : {2, 100, 65536}) {
      PathStats a = shortest_paths(Pattern::parse(spec), len);
      EXPECT_EQ(a.max, 1) << spec;
      EXPECT_EQ(a.mean, 1.0) << spec;
      EXPECT_EQ(a.unreachable, 0) << spec;
    }
  }
  // one layer of local attention never reaches past its window
  PathStats loc = shortest_paths(Pattern::parse("local:64"), 4096);
  EXPECT_EQ(loc.max, 1);
  EXPECT_EQ(loc.unreachable_i - loc.unreachable_j, 64);
  EXPECT_EQ(loc.unreachable, 4096LL * 4095 / 2 - (63LL * 4096 - 63 * 64 / 2));
}

TEST(Analysis, CongestionRoutesAreValidAndTheirLoadIsTheUpperBound) {
  const int64_t n = 400;
  std::vector<std::string> all = kTranslationInvariant;
  all.insert(all.end(), kSearched.begin(), kSearched.end());
  for (const auto& spec : all) {
    Pattern p = Pattern::parse(spec);
    CommGraph g = CommGraph::build(p, n);
    for (int64_t m : {1, 7, 64, 199, 200, 201, 333, 399}) {
      CongestionStats c = copy_congestion(p, n, m);
      auto routes = copy_routes(p, n, m);
      EXPECT_EQ(c.routed, !routes.empty()) << spec << " m " << m;
      if (!c.routed) continue;
      ASSERT_EQ(static_cast<int64_t>(routes.size()), n - m);
      const int32_t d_m = p.translation_invariant() ? distance_profile(p, n).d[m] : 0;
      std::vector<int64_t> load(n, 0);
      int64_t longest = 0;
      for (int64_t j = 0; j + m < n; ++j) {
        const auto& r = routes[j];
        ASSERT_EQ(r.front(), j);
        ASSERT_EQ(r.back(), j + m);
        for (size_t k = 1; k < r.size(); ++k) {
          ASSERT_TRUE(is_edge(g, r[k - 1], r[k], k == 1)) << spec << " m " << m << " hop " << r[k - 1] << "->" << r[k];
          ++load[r[k]];
        }
        longest = std::max<int64_t>(longest, static_cast<int64_t>(r.size()) - 1);
        if (p.translation_invariant()) EXPECT_EQ(static_cast<int64_t>(r.size()) - 1, d_m);
      }
      EXPECT_EQ(*std::max_element(load.begin(), load.end()), c.upper) << spec << " m " << m;
      EXPECT_EQ(load[c.upper_node], c.upper);
      EXPECT_EQ(longest, c.longest_route);
      EXPECT_GE(c.upper, c.lower) << spec << " m " << m << " lower: " << c.lower_rule;
      EXPECT_GE(c.lower, 1);
    }
  }
}

// Every path j -> t of the layered graph (first hop any edge, later hops B edges).
void all_paths(const CommGraph& g, int64_t j, int64_t t, std::vector<int64_t>& cur, std::vector<std::vector<int64_t>>& out) {
  const int64_t p = cur.back();
  if (p == t) {
    out.push_back(cur);
    return;
  }
  for (int64_t q = p + 1; q <= t; ++q)
    if (is_edge(g, p, q, p == j)) {
      cur.push_back(q);
      all_paths(g, j, t, cur, out);
      cur.pop_back();
    }
}

// The least max load over all path systems, by exhaustive search with pruning.
void best_system(const std::vector<std::vector<std::vector<int64_t>>>& options, size_t k, std::vector<int64_t>& load, int64_t cur_max,
                 int64_t& best) {
  if (cur_max >= best) return;
  if (k == options.size()) {
    best = cur_max;
    return;
  }
  for (const auto& path : options[k]) {
    int64_t mx = cur_max;
    for (size_t h = 1; h < path.size(); ++h) mx = std::max(mx, ++load[path[h]]);
    best_system(options, k + 1, load, mx, best);
    for (size_t h = 1; h < path.size(); ++h) --load[path[h]];
  }
}

TEST(Analysis, CongestionBoundsBracketTheExactOptimumOnSmallGraphs) {
  std::vector<std::string> all = kTranslationInvariant;
  all.insert(all.end(), kSearched.begin(), kSearched.end());
  int64_t checked = 0, checked_searched = 0;
  for (const auto& spec : all) {
    Pattern p = Pattern::parse(spec);
    for (int64_t n : {9, 12}) {
      CommGraph g = CommGraph::build(p, n);
      for (int64_t m = 1; m < n; ++m) {
        std::vector<std::vector<std::vector<int64_t>>> options;
        bool routable = true;
        for (int64_t j = 0; j + m < n && routable; ++j) {
          std::vector<int64_t> cur = {j};
          options.emplace_back();
          all_paths(g, j, j + m, cur, options.back());
          routable = !options.back().empty();
        }
        CongestionStats c = copy_congestion(p, n, m);
        if (!routable) {
          EXPECT_FALSE(c.routed && p.translation_invariant()) << spec;
          continue;
        }
        int64_t search_space = 1;
        for (const auto& o : options) search_space = std::min<int64_t>(search_space * static_cast<int64_t>(o.size()), int64_t(1) << 40);
        if (search_space > 2000000) continue;  // too many systems to enumerate
        std::vector<int64_t> load(n, 0);
        int64_t best = INT64_MAX;
        best_system(options, 0, load, 0, best);
        ASSERT_TRUE(c.routed) << spec << " n " << n << " m " << m;
        EXPECT_LE(c.lower, best) << spec << " n " << n << " m " << m << ": " << c.lower_rule;
        EXPECT_GE(c.upper, best) << spec << " n " << n << " m " << m;
        ++checked;
        checked_searched += !p.translation_invariant();
      }
    }
  }
  std::cout << "[ info ] " << checked << " (pattern, n, m) cases solved exactly, " << checked_searched << " of them lattices\n";
  EXPECT_GT(checked, 200);
  EXPECT_GT(checked_searched, 50);
}

TEST(Analysis, CongestionBoundsFollowThePaper) {
  std::vector<int64_t> fo, k4;
  for (int64_t n : {512, 1024, 2048, 4096}) {
    const int64_t m = n / 2;
    CongestionStats c = copy_congestion(Pattern::parse("first-order"), n, m);
    EXPECT_EQ(c.upper, c.lower);  // the only routing there is, and the cut bound meets it
    EXPECT_EQ(c.upper, std::min(m, n - m));
    fo.push_back(c.upper);
    for (int64_t k : {2, 4, 8}) {
      CongestionStats ck = copy_congestion(Pattern::parse("recurrence:" + std::to_string(k)), n, m);
      EXPECT_EQ(ck.upper, ck.lower) << k;
      EXPECT_EQ(ck.upper, (m + k - 1) / k) << k;  // ~ n / (2k)
      if (k == 4) k4.push_back(ck.upper);
    }
    for (std::string spec : {"attention", "dense"}) {
      CongestionStats a = copy_congestion(Pattern::parse(spec), n, m);
      EXPECT_EQ(a.upper, 1) << spec;
      EXPECT_EQ(a.lower, 1) << spec;
    }
    EXPECT_LE(copy_congestion(Pattern::parse("sq1"), n, m).upper, 4);
    EXPECT_LE(copy_congestion(Pattern::parse("pow2"), n, m).upper, std::log2(double(n)));
  }
  for (size_t t = 1; t < fo.size(); ++t) {  // doubling n doubles the congestion: grows like n
    EXPECT_EQ(fo[t], 2 * fo[t - 1]);
    EXPECT_EQ(k4[t], 2 * k4[t - 1]);
  }
  // every shift, not only n / 2
  const int64_t n = 1024;
  Pattern pow2 = Pattern::parse("pow2"), sq1 = Pattern::parse("sq1");
  for (int64_t m = 1; m < n; ++m) {
    CongestionStats c = copy_congestion(pow2, n, m);
    EXPECT_LE(c.upper, 10) << m;  // log2 n
    if (m <= n / 2) EXPECT_EQ(c.upper, __builtin_popcountll(m)) << m;
    EXPECT_LE(copy_congestion(sq1, n, m).upper, 4) << m;
  }
}

TEST(Analysis, LatticeCacheAndShortestPaths) {
  for (auto [spec, want] : std::vector<std::pair<std::string, int64_t>>{{"pow2-lattice", 15}, {"sq1-lattice", 103}}) {
    Pattern p = Pattern::parse(spec);
    int64_t recount = 0;
    for (int64_t i = 0; i < 19999; ++i) recount = std::max<int64_t>(recount, static_cast<int64_t>(p.row_B(i).size()));
    EXPECT_EQ(recount, want) << spec;  // spec section 3: max |L_f(i)| for i < 20000
    EXPECT_EQ(cost_stats(p, 19999).cache, recount) << spec;
  }
  // Sampling beyond the exact limit: the sampled max cannot exceed the exact one, and the mean
  // estimate is close.
  for (std::string spec : {"pow2-lattice", "sq1-lattice"}) {
    Pattern p = Pattern::parse(spec);
    PathStats exact = shortest_paths(p, 4096);
    PathOptions o;
    o.exact_max_n = 1000;
    o.samples = 512;
    PathStats sampled = shortest_paths(p, 4096, o);
    EXPECT_TRUE(exact.exact);
    EXPECT_FALSE(sampled.exact);
    EXPECT_EQ(sampled.sources, 512);
    EXPECT_LE(sampled.max, exact.max) << spec;
    EXPECT_NEAR(sampled.mean, exact.mean, 0.05 * exact.mean) << spec;
    EXPECT_EQ(exact.unreachable, 0) << spec;
    std::cout << "[ info ] " << spec << " at n = 4096: shortest path max " << exact.max << " at (" << exact.max_j + 1 << ", "
              << exact.max_i + 1 << "), mean " << exact.mean << "\n";
    // the lattice keeps the f-pattern's level 0, so every pair is reachable and d(j, i) <= i - j
    EXPECT_LE(exact.max, 4095);
  }
}

TEST(Analysis, GrowthExponents) {
  std::vector<double> ns = {256, 1024, 4096, 16384};
  std::vector<double> ys;
  for (double n : ns) ys.push_back(3 * std::pow(n, 1.5));
  EXPECT_NEAR(fit_exponent(ns, ys), 1.5, 1e-12);
  EXPECT_TRUE(std::isnan(fit_exponent({256}, {1.0})));
  EXPECT_NEAR(fit_exponent({256, 1024, 4096}, {0.0, 4.0, 16.0}), 1.0, 1e-12);  // non-positive points are skipped
  auto exponent = [&](const std::string& spec, auto metric) {
    std::vector<double> v;
    for (double n : ns) v.push_back(metric(analyze(Pattern::parse(spec), static_cast<int64_t>(n))));
    return fit_exponent(ns, v);
  };
  auto cong = [](const Analysis& a) { return double(a.congestion.upper); };
  auto cost = [](const Analysis& a) { return a.cost.mean; };
  EXPECT_NEAR(exponent("first-order", cong), 1.0, 1e-9);
  EXPECT_NEAR(exponent("recurrence:4", cong), 1.0, 1e-9);
  EXPECT_NEAR(exponent("attention", cost), 1.0, 0.01);
  EXPECT_LT(exponent("pow2", cost), 0.2);
  EXPECT_NEAR(exponent("sq1", cost), 0.5, 0.1);
}

TEST(Analysis, FullTableAt65536IsFast) {
  // The speed target: every instance at n = 65536 within 30 s on 2 cores (lattices by
  // sampled sources beyond 16384).
  const auto t0 = std::chrono::steady_clock::now();
  for (std::string spec : {"attention", "local:64", "first-order", "recurrence:4", "dense", "pow2", "sq1", "pow2-lattice", "sq1-lattice"}) {
    Analysis a = analyze(Pattern::parse(spec), 65536);
    EXPECT_EQ(a.paths.exact, Pattern::parse(spec).translation_invariant()) << spec;
    if (a.congestion.routed) EXPECT_GE(a.congestion.upper, a.congestion.lower) << spec;
    std::cout << "[ info ]   " << spec << ": " << a.seconds << " s\n";
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[ info ] full table at n = 65536: " << s << " s\n";
  EXPECT_LT(s, 30.0);
}
