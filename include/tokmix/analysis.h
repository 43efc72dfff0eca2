// Pattern analysis (spec section 7): per-token cost, decode cache, shortest paths over the
// communication graph, and the congestion of a copy task. Pure C++, no tensors.
//
// Positions are 0-indexed here, as in pattern.h; printed pairs are 1-indexed (the CLI adds 1).
//
// Communication graph on positions 0..n-1: edge j -> i when j is in SA(i) or SB(i), j != i
// (i in SA(i) is a self-loop, not a path). A path j -> i is j = p0 < p1 < ... < pL = i where
// the first hop is any edge and every later hop is a B edge: A reads inputs x, not outputs y,
// so information of x_j enters once (through A, or through y_j and a B edge) and then travels
// along B. For patterns whose A support is {i} this is every path of the graph.
// d(j, i) = fewest hops; d(j, i) is finite exactly when entry (i, j) of (I - B)^{-1} A can be
// nonzero.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokmix/pattern.h"

namespace tokmix {

constexpr int32_t kUnreachable = -1;

// Explicit graph, for search (lattices, or checks at small n). B predecessors of row i are
// b_src[b_start[i] .. b_start[i + 1]) in decreasing position; the transposed (successor) lists
// out_dst[out_start[p] .. out_start[p + 1]) are increasing. The A side is kept as a reach: A
// edges are j -> i for 0 < i - j < a_reach (a_reach = 1: A = {i}; n: unbounded window).
struct CommGraph {
  int64_t n = 0;
  int64_t a_reach = 0;
  std::vector<int64_t> b_start, out_start;
  std::vector<int32_t> b_src, out_dst;
  // Refuses graphs with more than max_edges B edges (a dense B side at large n).
  static CommGraph build(const Pattern& p, int64_t n, int64_t max_edges = int64_t(1) << 30);
  int64_t edges() const { return static_cast<int64_t>(b_src.size()); }
};

// d(j, i) for every i: 0 at i = j, kUnreachable before j or with no path. One forward sweep
// over the DAG (edges go forward), O(edges after j).
std::vector<int32_t> distances_from(const CommGraph& g, int64_t j);

// Translation-invariant patterns: every edge p -> p + delta exists for all p >= 0 with
// p + delta < n, and a path from j to i only visits [j, i], so d(j, i) = d[i - j].
struct DistanceProfile {
  std::vector<int32_t> d;        // d[delta], delta in [0, n); d[0] = 0
  std::vector<int32_t> b_hops;   // fewest B hops summing to delta (kUnreachable: none)
  std::vector<int64_t> b_last;   // one B hop of such a fewest-hop sum
  std::vector<int64_t> a_first;  // A hop that starts a best path for delta (0: none, B only)
};
// O(n * |offsets below n|); throws PatternError for a lattice.
DistanceProfile distance_profile(const Pattern& p, int64_t n);
// Hops of the path behind d[delta]: the A hop first (if any), then B hops, largest first.
// Empty when delta is unreachable (or 0).
std::vector<int64_t> profile_hops(const DistanceProfile& prof, int64_t delta);

struct PathOptions {
  int64_t exact_max_n = 16384;  // search every source up to this n, sample sources beyond
  int64_t samples = 2048;       // sources searched when sampling (source 0 always included)
  uint64_t seed = 1;
  bool force_search = false;    // search even a translation-invariant pattern (for checks)
  int64_t copy_shift = 0;       // also record d(j, j + copy_shift) for the searched sources
  int threads = 0;              // 0: OpenMP default
};

struct PathStats {
  std::string method;           // how it was computed, in words
  bool exact = true;            // false: sampled sources; max is then a lower bound
  int64_t sources = 0;          // sources covered (n - 1 when every source is)
  int64_t pairs = 0;            // pairs j < i covered
  int64_t unreachable = 0;      // pairs among them with no path
  int32_t max = 0;              // largest finite d over the covered pairs
  int64_t max_j = -1, max_i = -1;  // the lexicographically smallest pair (j, i) attaining max
  int64_t unreachable_j = -1, unreachable_i = -1;  // smallest unreachable pair, if any
  double mean = 0;              // mean d over the reachable covered pairs
  std::vector<int64_t> histogram;  // histogram[t] = covered pairs at distance t
  // d(j, j + copy_shift) for every source j < n - copy_shift, when all were searched (or the
  // profile gives them); empty otherwise.
  std::vector<int32_t> copy_distances;
};

PathStats shortest_paths(const Pattern& p, int64_t n, const PathOptions& opt = {});

// Copy task: n - m pairs j -> j + m (j in [0, n - m)). A routing picks one path per pair; the
// load of a node is the number of paths that enter it, as a hop's end (interior nodes and the
// target, not the source: x_j is an input, y of the later nodes must carry it). Congestion =
// max load, minimised over routings: the routing below gives an upper bound, the lower bound
// is the larger of a cut bound and an averaging bound.
struct CongestionStats {
  int64_t m = 0, pairs = 0;
  bool routed = false;           // every pair has a route (else no upper bound)
  std::string routing;           // the routing rule, in words
  std::vector<int64_t> hops;     // translation-invariant routing: hops every pair takes
  int64_t upper = 0;             // max load of that routing
  int64_t upper_node = -1;       // a node with that load (smallest)
  int64_t longest_route = 0;     // hops of the longest route
  int64_t lower = 0;             // a proven lower bound on the congestion
  std::string lower_rule;        // which argument gave it
};

// copy_distances: d(j, j + m) for all j < n - m if known (enables the averaging bound for
// patterns that are not translation-invariant).
CongestionStats copy_congestion(const Pattern& p, int64_t n, int64_t m, const std::vector<int32_t>* copy_distances = nullptr);
// The routes themselves (node sequences from j to j + m), for checks at small n.
std::vector<std::vector<int64_t>> copy_routes(const Pattern& p, int64_t n, int64_t m);

struct CostStats {
  double mean = 0;     // mean over rows of |SA(i)| + |SB(i)|
  int64_t max = 0;     // max over rows
  int64_t total = 0;   // sum over rows
  int64_t cache = 0;   // decode cache entries, max over the sequence (Pattern::cache_entries)
};
CostStats cost_stats(const Pattern& p, int64_t n);

struct AnalysisOptions {
  PathOptions paths;
  int64_t copy_shift = 0;  // m of the copy task; 0: n / 2; negative: n / 2 + copy_shift
};

struct Analysis {
  std::string spec;
  int64_t n = 0;
  CostStats cost;
  PathStats paths;
  CongestionStats congestion;
  double seconds = 0;  // wall time of this analysis
};

Analysis analyze(const Pattern& p, int64_t n, const AnalysisOptions& opt = {});

// Least-squares slope of log(value) against log(n) over the points with value > 0 (the growth
// exponent: value ~ n^slope). NaN with fewer than two such points.
double fit_exponent(const std::vector<double>& ns, const std::vector<double>& values);

}  // namespace tokmix
