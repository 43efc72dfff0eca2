#include "tokmix/analysis.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <deque>
#include <iterator>
#include <optional>
#include <random>
#include <unordered_set>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tokmix {
namespace {

// A distances are 0..reach-1 (0 is the self entry); A edges are those with distance >= 1.
int64_t a_reach_of(const Pattern& p, int64_t n) {
  switch (p.A().kind) {
    case SupportKind::Self: return 1;
    case SupportKind::Window: return p.A().window > 0 ? std::min(p.A().window, n) : n;
    default: return 0;
  }
}

int64_t b_edge_count(const Pattern& p, int64_t n) {
  const Side& b = p.B();
  if (b.kind == SupportKind::Window) {
    const int64_t w = b.window > 0 ? b.window : n;
    int64_t t = 0;
    for (int64_t i = 1; i < n; ++i) t += std::min(w, i);
    return t;
  }
  PatternDesc d = p.desc();
  int64_t t = 0;
  for (int64_t i = 0; i < n; ++i) t += visit_side(d.B, true, i, [](int64_t, int32_t) {});
  return t;
}

// Smallest position with an edge into q (q itself when none): cut bounds need it per node.
std::vector<int64_t> min_source(const Pattern& p, int64_t n) {
  std::vector<int64_t> ms(n);
  const int64_t ar = a_reach_of(p, n);
  const Side& b = p.B();
  PatternDesc d = p.desc();
  for (int64_t q = 0; q < n; ++q) {
    int64_t lo = ar > 1 ? q - std::min(ar - 1, q) : q;
    switch (b.kind) {
      case SupportKind::Window: lo = std::min(lo, q - std::min(b.window > 0 ? b.window : q, q)); break;
      case SupportKind::Offsets: {
        auto it = std::upper_bound(b.seq.f.begin(), b.seq.f.end(), q);
        if (it != b.seq.f.begin()) lo = std::min(lo, q - *(it - 1));
        break;
      }
      case SupportKind::Lattice:
        visit_side(d.B, true, q, [&](int64_t pos, int32_t) { lo = std::min(lo, pos); });
        break;
      default: break;
    }
    ms[q] = lo;
  }
  return ms;
}

// 256 sources searched at once: bit b of a node's lanes = "source b reaches this node".
struct Lanes {
  uint64_t w[4];
};
constexpr int kBatch = 256;

inline bool any_bit(const Lanes& a) { return (a.w[0] | a.w[1] | a.w[2] | a.w[3]) != 0; }
inline int lowest_bit(const Lanes& a) {
  for (int k = 0; k < 4; ++k)
    if (a.w[k]) return 64 * k + __builtin_ctzll(a.w[k]);
  return -1;
}
inline bool has_bit(const Lanes& a, int b) { return (a.w[b >> 6] >> (b & 63)) & 1; }
inline Lanes bit_range(int lo, int hi) {  // bits [lo, hi)
  Lanes r{{0, 0, 0, 0}};
  for (int k = 0; k < 4; ++k) {
    const int a = std::max(lo, 64 * k), b = std::min(hi, 64 * k + 64);
    if (a >= b) continue;
    const int len = b - a;
    const uint64_t m = len == 64 ? ~uint64_t(0) : ((uint64_t(1) << len) - 1);
    r.w[k] = m << (a - 64 * k);
  }
  return r;
}

struct BatchResult {
  std::vector<int64_t> hist;
  int32_t max = 0;
  int64_t max_j = -1, max_i = -1;
  int64_t covered = 0, reached = 0;
  int64_t unreach_j = -1, unreach_i = -1;
};

bool pair_less(int64_t j1, int64_t i1, int64_t j2, int64_t i2) { return j2 < 0 || j1 < j2 || (j1 == j2 && i1 < i2); }

// Level-synchronous search from the sorted sources src[0..cnt): level t holds every pair
// reachable in <= t hops. Edges go forward, so nodes before src[0] are never touched.
void search_batch(const CommGraph& g, const int64_t* src, int cnt, int64_t m, std::vector<Lanes>& cur, std::vector<Lanes>& nxt,
                  BatchResult& r, std::vector<int32_t>* copy_d) {
  const int64_t n = g.n, lo = src[0];
  for (int64_t i = lo; i < n; ++i) cur[i] = Lanes{{0, 0, 0, 0}};
  for (int b = 0; b < cnt; ++b) {
    cur[src[b]].w[b >> 6] |= uint64_t(1) << (b & 63);
    r.covered += n - 1 - src[b];
  }
  std::vector<char> copy_open(cnt, 0);
  if (copy_d && m > 0)
    for (int b = 0; b < cnt; ++b) copy_open[b] = src[b] + m < n;
  nxt[lo] = cur[lo];
  for (int32_t t = 1;; ++t) {
    bool any = false;
    int64_t best_j = -1, best_i = -1;
    for (int64_t i = lo + 1; i < n; ++i) {
      Lanes v = cur[i];
      for (int64_t e = g.b_start[i], end = g.b_start[i + 1]; e < end; ++e) {
        const int64_t q = g.b_src[e];
        if (q < lo) break;  // predecessors are in decreasing order
        const Lanes& c = cur[q];
        for (int k = 0; k < 4; ++k) v.w[k] |= c.w[k];
      }
      if (t == 1 && g.a_reach > 1) {  // the A entry hop: sources s with 0 < i - s < a_reach
        const int b0 = static_cast<int>(std::lower_bound(src, src + cnt, i - g.a_reach + 1) - src);
        const int b1 = static_cast<int>(std::lower_bound(src, src + cnt, i) - src);
        const Lanes a = bit_range(b0, b1);
        for (int k = 0; k < 4; ++k) v.w[k] |= a.w[k];
      }
      Lanes fresh;
      for (int k = 0; k < 4; ++k) fresh.w[k] = v.w[k] & ~cur[i].w[k];
      nxt[i] = v;
      if (!any_bit(fresh)) continue;
      any = true;
      int64_t c = 0;
      for (int k = 0; k < 4; ++k) c += __builtin_popcountll(fresh.w[k]);
      if (static_cast<int64_t>(r.hist.size()) <= t) r.hist.resize(t + 1, 0);
      r.hist[t] += c;
      r.reached += c;
      const int64_t j = src[lowest_bit(fresh)];
      if (pair_less(j, i, best_j, best_i)) best_j = j, best_i = i;
    }
    if (!any) break;
    if (t > r.max || (t == r.max && pair_less(best_j, best_i, r.max_j, r.max_i))) r.max = t, r.max_j = best_j, r.max_i = best_i;
    std::swap(cur, nxt);
    if (copy_d)
      for (int b = 0; b < cnt; ++b)
        if (copy_open[b] && has_bit(cur[src[b] + m], b)) {
          (*copy_d)[src[b]] = t;
          copy_open[b] = 0;
        }
  }
  if (r.reached < r.covered) {  // smallest unreachable pair: for each i, the first source missing
    for (int64_t i = lo + 1; i < n; ++i) {
      const int before = static_cast<int>(std::lower_bound(src, src + cnt, i) - src);
      Lanes miss = bit_range(0, before);
      for (int k = 0; k < 4; ++k) miss.w[k] &= ~cur[i].w[k];
      if (!any_bit(miss)) continue;
      const int64_t j = src[lowest_bit(miss)];
      if (pair_less(j, i, r.unreach_j, r.unreach_i)) r.unreach_j = j, r.unreach_i = i;
    }
  }
}

std::vector<int64_t> pick_sources(int64_t n, const PathOptions& opt, bool& exact) {
  std::vector<int64_t> s;
  exact = n <= opt.exact_max_n || opt.samples >= n - 1;
  if (exact) {
    for (int64_t j = 0; j + 1 < n; ++j) s.push_back(j);
    return s;
  }
  std::mt19937_64 rng(opt.seed);
  std::uniform_int_distribution<int64_t> pick(1, n - 2);
  std::unordered_set<int64_t> seen = {0};
  s.push_back(0);
  while (static_cast<int64_t>(s.size()) < std::max<int64_t>(opt.samples, 1))
    if (int64_t j = pick(rng); seen.insert(j).second) s.push_back(j);
  std::sort(s.begin(), s.end());
  return s;
}

void finish_mean(PathStats& s) {
  double num = 0, den = 0;
  for (size_t t = 0; t < s.histogram.size(); ++t) num += double(t) * double(s.histogram[t]), den += double(s.histogram[t]);
  s.mean = den > 0 ? num / den : 0;
}

std::string plural(int64_t v, const char* what) { return std::to_string(v) + " " + what + (v == 1 ? "" : "s"); }

std::string human_count(double v) {
  char b[32];
  std::snprintf(b, sizeof b, v >= 1e6 ? "%.3g" : "%.0f", v);
  return b;
}

// Hops as a short sum: "16384 x 2 + 1", "32 + 8 + 1".
std::string hop_sum(const std::vector<int64_t>& h) {
  std::string s;
  for (size_t k = 0; k < h.size();) {
    size_t e = k;
    while (e < h.size() && h[e] == h[k]) ++e;
    if (!s.empty()) s += " + ";
    s += (e - k > 2 ? std::to_string(e - k) + " x " : "") + std::to_string(h[k]);
    if (e - k == 2) s += " + " + std::to_string(h[k]);
    k = e;
  }
  return s;
}

// What one analysis needs once: the profile (translation-invariant) or the graph (others).
struct Context {
  const Pattern& p;
  int64_t n;
  std::optional<DistanceProfile> prof;
  std::optional<CommGraph> graph;
  Context(const Pattern& pat, int64_t len) : p(pat), n(len) {}
  const DistanceProfile& profile() {
    if (!prof) prof = distance_profile(p, n);
    return *prof;
  }
  const CommGraph& g() {
    if (!graph) graph = CommGraph::build(p, n);
    return *graph;
  }
};

PathStats paths_impl(Context& cx, const PathOptions& opt) {
  const int64_t n = cx.n;
  PathStats s;
  if (n < 2) {
    s.method = "no pairs";
    return s;
  }
  const int64_t m = opt.copy_shift;
  if (cx.p.translation_invariant() && !opt.force_search) {
    const DistanceProfile& pr = cx.profile();
    s.method = "dp over distances (translation-invariant), exact";
    s.sources = n - 1;
    for (int64_t dl = 1; dl < n; ++dl) {
      const int64_t w = n - dl;  // pairs (j, j + dl)
      s.pairs += w;
      const int32_t d = pr.d[dl];
      if (d == kUnreachable) {
        s.unreachable += w;
        if (s.unreachable_j < 0) s.unreachable_j = 0, s.unreachable_i = dl;
        continue;
      }
      if (static_cast<int64_t>(s.histogram.size()) <= d) s.histogram.resize(d + 1, 0);
      s.histogram[d] += w;
      if (d > s.max) s.max = d, s.max_j = 0, s.max_i = dl;
    }
    if (m > 0 && m < n) s.copy_distances.assign(n - m, pr.d[m]);
    finish_mean(s);
    return s;
  }
  const CommGraph& g = cx.g();
  bool exact = true;
  std::vector<int64_t> src = pick_sources(n, opt, exact);
  s.exact = exact;
  s.sources = static_cast<int64_t>(src.size());
  s.method = exact ? "search from every source (bit-parallel, 256 at a time), exact"
                   : "search from " + std::to_string(src.size()) + " sampled sources of " + std::to_string(n - 1) + " (seed " +
                         std::to_string(opt.seed) + ", source 1 included); max is a lower bound, mean an estimate";
  std::vector<int32_t> copy_d;
  const bool want_copy = exact && m > 0 && m < n;
  if (want_copy) copy_d.assign(n - m, kUnreachable);
  const int64_t batches = (s.sources + kBatch - 1) / kBatch;
  BatchResult total;
#ifdef _OPENMP
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<Lanes> cur(n), nxt(n);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t bi = 0; bi < batches; ++bi) {
      const int64_t first = bi * kBatch;
      const int cnt = static_cast<int>(std::min<int64_t>(kBatch, s.sources - first));
      BatchResult r;
      search_batch(g, src.data() + first, cnt, m, cur, nxt, r, want_copy ? &copy_d : nullptr);
#ifdef _OPENMP
#pragma omp critical(tokmix_analysis_merge)
#endif
      {
        if (total.hist.size() < r.hist.size()) total.hist.resize(r.hist.size(), 0);
        for (size_t t = 0; t < r.hist.size(); ++t) total.hist[t] += r.hist[t];
        total.covered += r.covered;
        total.reached += r.reached;
        if (r.max > total.max || (r.max == total.max && r.max_j >= 0 && pair_less(r.max_j, r.max_i, total.max_j, total.max_i)))
          total.max = r.max, total.max_j = r.max_j, total.max_i = r.max_i;
        if (r.unreach_j >= 0 && pair_less(r.unreach_j, r.unreach_i, total.unreach_j, total.unreach_i))
          total.unreach_j = r.unreach_j, total.unreach_i = r.unreach_i;
      }
    }
  }
  s.histogram = total.hist;
  s.pairs = total.covered;
  s.unreachable = total.covered - total.reached;
  s.max = total.max;
  s.max_j = total.max_j;
  s.max_i = total.max_i;
  s.unreachable_j = total.unreach_j;
  s.unreachable_i = total.unreach_i;
  if (want_copy) s.copy_distances = std::move(copy_d);
  finish_mean(s);
  return s;
}

// Routings for patterns searched on the explicit graph. Each is tried, the one with the
// smallest max load is kept (all are valid routings, so each max load is an upper bound).
struct RouteRule {
  const char* name;
  bool backward;  // built from the target back to the source
  int spread;     // backward only: 0 = largest jump; D > 0 = least-loaded predecessor among
                  // those whose jump is at least 1/D of the largest one
  bool shortest = false;  // backward along shortest paths; O(edges) per pair, so only a fallback
};
const RouteRule kRouteRules[] = {
    {"backward greedy: from q step back to the farthest predecessor >= j", true, 0},
    {"backward balanced: from q step back to the least-loaded predecessor >= j whose jump is at least 1/16 of the "
     "largest possible (ties: the farthest)",
     true, 16},
    {"backward balanced: from q step back to the least-loaded predecessor >= j whose jump is at least 1/64 of the "
     "largest possible (ties: the farthest)",
     true, 64},
    {"forward greedy: from p take the edge to the farthest node <= j + m", false, 0},
};
// Tried only when every rule above gets stuck (possible when f(0) > 1): it cannot get stuck.
const RouteRule kShortestRule = {"shortest paths: from q step back to the least-loaded predecessor one hop closer to j (ties: the farthest)",
                                 true, 0, true};

// One route j -> t by `rule`; `load` is read by the balanced rules (loads of the routes so
// far). The first hop may be an A edge (from j), later hops are B edges. False when stuck.
bool route_one(const CommGraph& g, const RouteRule& rule, int64_t j, int64_t t, const std::vector<int64_t>& load,
               std::vector<int64_t>& path) {
  if (rule.shortest) {
    const std::vector<int32_t> d = distances_from(g, j);
    if (d[t] == kUnreachable) return false;
    path.assign(1, t);
    for (int64_t q = t; q > j;) {
      int64_t next = -1, best_load = INT64_MAX;
      if (d[q] == 1 && q - j < g.a_reach) next = j, best_load = -1;
      for (int64_t e = g.b_start[q + 1] - 1; e >= g.b_start[q]; --e) {  // farthest first
        const int64_t s = g.b_src[e];
        if (s < j || d[s] != d[q] - 1) continue;
        const int64_t l = s == j ? -1 : load[s];  // the source is not loaded by its own path
        if (l < best_load) best_load = l, next = s;
      }
      path.push_back(next);
      q = next;
    }
    std::reverse(path.begin(), path.end());
    return true;
  }
  if (!rule.backward) {
    path.assign(1, j);
    int64_t p = j;
    while (p < t) {
      int64_t next = -1;
      if (p == j && g.a_reach > 1) next = std::min(p + g.a_reach - 1, t);
      const int32_t* b = g.out_dst.data() + g.out_start[p];
      const int32_t* e = g.out_dst.data() + g.out_start[p + 1];
      const int32_t* it = std::upper_bound(b, e, static_cast<int32_t>(t));
      if (it != b) next = std::max<int64_t>(next, *(it - 1));
      if (next <= p) return false;
      path.push_back(next);
      p = next;
    }
    return true;
  }
  path.assign(1, t);
  int64_t q = t;
  while (q > j) {
    const int64_t b = g.b_start[q], e = g.b_start[q + 1];  // predecessors, decreasing
    // the farthest predecessor >= j: the last one in the list that is >= j
    int64_t lo = b, hi = e;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (g.b_src[mid] >= j) lo = mid + 1;
      else hi = mid;
    }
    int64_t far = lo > b ? g.b_src[lo - 1] : -1;
    if (q - j < g.a_reach) far = j;  // the A edge from the source itself
    if (far < 0) return false;
    int64_t next = far;
    if (rule.spread > 0 && far != j) {
      const int64_t need = (q - far) / rule.spread;
      int64_t best_load = INT64_MAX;
      for (int64_t k = lo - 1; k >= b; --k) {  // largest jump first, so ties keep the farthest
        const int64_t s = g.b_src[k];
        if (q - s < need) break;
        if (load[s] < best_load) best_load = load[s], next = s;
      }
    }
    path.push_back(next);
    q = next;
  }
  std::reverse(path.begin(), path.end());
  return true;
}

// Routes every pair j -> j + m (j increasing) with one rule; visit(path) per pair. Returns the
// load of every node, or an empty vector when some pair is stuck or a load reaches `limit`
// (a rule that cannot beat the best so far is abandoned early).
template <class Visit>
std::vector<int64_t> route_all(const CommGraph& g, const RouteRule& rule, int64_t m, Visit&& visit, int64_t limit = INT64_MAX) {
  std::vector<int64_t> load(g.n, 0), path;
  for (int64_t j = 0; j + m < g.n; ++j) {
    if (!route_one(g, rule, j, j + m, load, path)) return {};
    for (size_t k = 1; k < path.size(); ++k)
      if (++load[path[k]] >= limit) return {};
    visit(path);
  }
  return load;
}

// The routing of a translation-invariant pattern: every pair takes the same hops. Empty rule
// when m has no path.
std::string ti_routing(Context& cx, int64_t m, std::vector<int64_t>& hops) {
  const DistanceProfile& pr = cx.profile();
  hops = profile_hops(pr, m);
  if (hops.empty()) return "";
  const bool a_first = pr.a_first[m] > 0;
  return "translation-invariant: every j takes the same " + plural(static_cast<int64_t>(hops.size()), "hop") + ", m = " +
         hop_sum(hops) + " (a fewest-hop sum from the distance dp; " + (a_first ? "the A hop first, then B hops" : "B hops") +
         " largest first)";
}

// Longest B edge out of each node (staying below n), and the longest first hop (A or B).
void longest_hops(Context& cx, std::vector<int64_t>& out_b, std::vector<int64_t>& first) {
  const int64_t n = cx.n;
  const Pattern& p = cx.p;
  out_b.assign(n, 0);
  first.assign(n, 0);
  if (!p.translation_invariant()) {
    const CommGraph& g = cx.g();
    for (int64_t q = 0; q < n; ++q)
      if (g.out_start[q + 1] > g.out_start[q]) out_b[q] = g.out_dst[g.out_start[q + 1] - 1] - q;
  } else {
    const Side& b = p.B();
    for (int64_t q = 0; q < n; ++q) {
      const int64_t room = n - 1 - q;
      if (b.kind == SupportKind::Window) {
        out_b[q] = std::min(b.window > 0 ? b.window : room, room);
      } else if (b.kind == SupportKind::Offsets) {
        auto it = std::upper_bound(b.seq.f.begin(), b.seq.f.end(), room);
        out_b[q] = it == b.seq.f.begin() ? 0 : *(it - 1);
      }
    }
  }
  const int64_t ar = a_reach_of(p, n);
  for (int64_t q = 0; q < n; ++q) first[q] = std::max(out_b[q], std::min(std::max<int64_t>(ar - 1, 0), n - 1 - q));
}

struct Bound {
  int64_t value = 0;
  std::string rule;
};

// Lower bounds on the congestion of any routing (each proven in docs/analysis.md).
Bound congestion_lower(Context& cx, int64_t m, const std::vector<int32_t>* copy_d) {
  const int64_t n = cx.n;
  Bound best;
  auto offer = [&](int64_t v, std::string rule) {
    if (v > best.value) best.value = v, best.rule = std::move(rule);
  };
  auto cross = [&](int64_t cut) {  // pairs j -> j + m with j < cut <= j + m
    return std::max<int64_t>(0, std::min(cut - 1, n - m - 1) - std::max<int64_t>(0, cut - m) + 1);
  };
  // Entry cut: a crossing path enters a node q >= cut with an edge from before the cut.
  std::vector<int64_t> ms = min_source(cx.p, n), entry(n + 1, 0);
  for (int64_t q = 0; q < n; ++q)
    if (ms[q] < q) ++entry[ms[q] + 1], --entry[q + 1];
  for (int64_t q = 1; q <= n; ++q) entry[q] += entry[q - 1];
  // Exit cut: a crossing path whose first hop does not cross enters a node p < cut with a B
  // edge across it.
  std::vector<int64_t> out_b, first;
  longest_hops(cx, out_b, first);
  std::vector<int64_t> gate(n + 2, 0), jump(n + 2, 0);
  for (int64_t p = 0; p < n; ++p) {
    if (out_b[p] > 0) ++gate[p + 1], --gate[std::min(n, p + out_b[p]) + 1];
    if (first[p] > 0) ++jump[p + 1], --jump[std::min(n, p + first[p]) + 1];
  }
  for (int64_t c = 1; c <= n; ++c) gate[c] += gate[c - 1], jump[c] += jump[c - 1];
  for (int64_t cut = 1; cut < n; ++cut) {
    const int64_t x = cross(cut);
    if (x == 0) continue;
    if (entry[cut] > 0)
      offer((x + entry[cut] - 1) / entry[cut], "entry cut before position " + std::to_string(cut + 1) + ": " + plural(x, "path") + (x == 1 ? " crosses" : " cross") +
                                                   " it, into " + plural(entry[cut], "node") + " with an edge across it");
    const int64_t need = x - jump[cut];
    if (need > 0 && gate[cut] > 0)
      offer((need + gate[cut] - 1) / gate[cut], "exit cut before position " + std::to_string(cut + 1) + ": " + plural(x, "path") + (x == 1 ? " crosses" : " cross") +
                                                    " it, at most " + std::to_string(jump[cut]) +
                                                    " in their first hop, the rest through " + plural(gate[cut], "node") +
                                                    " with a B edge across it");
  }
  // Length-weighted average: after the first hop a route covers m - first(j) more, each hop
  // from an entered node q at most min(out_b(q), m).
  double need = 0, room = 0;
  for (int64_t j = 0; j + m < n; ++j) need += double(std::max<int64_t>(0, m - std::min(first[j], m)));
  for (int64_t q = 1; q + 1 < n; ++q) room += double(std::min(out_b[q], m));
  if (need > 0 && room > 0)
    offer(static_cast<int64_t>(std::ceil(need / room - 1e-9)),
          "length-weighted: routes must cover " + human_count(need) + " positions after their first hop; each node carries at most its "
          "longest B edge per path, " + human_count(room) + " in all");
  // Hop-count average: the routes enter sum_j d(j, j + m) nodes among the n - 1 enterable.
  if (copy_d && static_cast<int64_t>(copy_d->size()) == n - m &&
      std::none_of(copy_d->begin(), copy_d->end(), [](int32_t d) { return d == kUnreachable; })) {
    int64_t sum = 0;
    for (int32_t d : *copy_d) sum += d;
    offer((sum + (n - 2)) / (n - 1), "hop count: the routes enter at least sum_j d(j, j+m) = " + std::to_string(sum) +
                                         " nodes, among n - 1 = " + std::to_string(n - 1));
  }
  if (best.value == 0 && n - m > 0) best = {1, "every target is entered by its own path"};
  return best;
}

// Best rule for a searched pattern: index into kRouteRules (-1 when every rule gets stuck),
// with its loads and longest route.
int best_route_rule(const CommGraph& g, int64_t m, std::vector<int64_t>& best_load, int64_t& longest) {
  int best = -1;
  int64_t max_load = INT64_MAX;
  for (int r = 0; r < static_cast<int>(std::size(kRouteRules)); ++r) {
    int64_t len = 0;
    std::vector<int64_t> load = route_all(
        g, kRouteRules[r], m, [&](const std::vector<int64_t>& path) { len = std::max<int64_t>(len, static_cast<int64_t>(path.size()) - 1); },
        max_load);
    if (load.empty()) continue;
    const int64_t mx = *std::max_element(load.begin(), load.end());
    if (mx < max_load) max_load = mx, best = r, best_load = std::move(load), longest = len;
  }
  if (best < 0) {
    int64_t len = 0;
    std::vector<int64_t> load = route_all(g, kShortestRule, m, [&](const std::vector<int64_t>& path) {
      len = std::max<int64_t>(len, static_cast<int64_t>(path.size()) - 1);
    });
    if (!load.empty()) best = static_cast<int>(std::size(kRouteRules)), best_load = std::move(load), longest = len;
  }
  return best;
}

const RouteRule& route_rule(int r) { return r < static_cast<int>(std::size(kRouteRules)) ? kRouteRules[r] : kShortestRule; }

CongestionStats congestion_impl(Context& cx, int64_t m, const std::vector<int32_t>* copy_d) {
  const Pattern& p = cx.p;
  const int64_t n = cx.n;
  if (m < 1 || m >= n)
    throw PatternError("copy shift m = " + std::to_string(m) + " must be in [1, n - 1] (n = " + std::to_string(n) + ")");
  CongestionStats c;
  c.m = m;
  c.pairs = n - m;
  std::vector<int64_t> load(n + 1, 0);
  if (p.translation_invariant()) {
    // Every route has the same offsets s_1 < ... < s_h = m, so node q gets one path per s_t
    // with 0 <= q - s_t < n - m: a difference array instead of walking the routes.
    std::vector<int64_t> hops;
    c.routing = ti_routing(cx, m, hops);
    if (c.routing.empty()) {
      c.routing = "no routing: j -> j + m has no path";
      c.lower_rule = "none: the copy task cannot be routed at all";
      return c;
    }
    c.hops = hops;
    int64_t s = 0;
    for (int64_t h : hops) {
      s += h;
      load[s] += 1;
      load[std::min(n, s + (n - m))] -= 1;
    }
    for (int64_t q = 1; q <= n; ++q) load[q] += load[q - 1];
    c.longest_route = static_cast<int64_t>(hops.size());
  } else {
    const int r = best_route_rule(cx.g(), m, load, c.longest_route);
    if (r < 0) c.routing = "no routing: some pair j -> j + m has no path";
    else if (r < static_cast<int>(std::size(kRouteRules)))
      c.routing = std::string(kRouteRules[r].name) + " (the best of " + std::to_string(std::size(kRouteRules)) + " rules tried)";
    else
      c.routing = std::string(kShortestRule.name) + " (every faster rule got stuck)";
  }
  c.routed = c.longest_route > 0;
  for (int64_t q = 0; q < n && c.routed; ++q)
    if (load[q] > c.upper) c.upper = load[q], c.upper_node = q;
  std::vector<int32_t> own;
  if (!copy_d && p.translation_invariant()) own.assign(n - m, cx.profile().d[m]), copy_d = &own;
  Bound lb = congestion_lower(cx, m, copy_d);
  c.lower = lb.value;
  c.lower_rule = lb.rule;
  return c;
}

}  // namespace

CommGraph CommGraph::build(const Pattern& p, int64_t n, int64_t max_edges) {
  p.check_length(n);
  if (n < 1 || n > INT32_MAX) throw PatternError("graph: length " + std::to_string(n) + " out of range");
  const int64_t e = b_edge_count(p, n);
  if (e > max_edges)
    throw PatternError("graph of '" + p.spec() + "' at n = " + std::to_string(n) + " has " + std::to_string(e) +
                       " B edges, more than the limit " + std::to_string(max_edges));
  CommGraph g;
  g.n = n;
  g.a_reach = a_reach_of(p, n);
  g.b_start.assign(n + 1, 0);
  g.b_src.reserve(e);
  PatternDesc d = p.desc();
  std::vector<int64_t> row;
  for (int64_t i = 0; i < n; ++i) {
    row.clear();
    visit_side(d.B, true, i, [&](int64_t pos, int32_t) { row.push_back(pos); });
    std::sort(row.begin(), row.end(), std::greater<int64_t>());
    row.erase(std::unique(row.begin(), row.end()), row.end());
    for (int64_t q : row) g.b_src.push_back(static_cast<int32_t>(q));
    g.b_start[i + 1] = static_cast<int64_t>(g.b_src.size());
  }
  g.out_start.assign(n + 1, 0);
  for (int32_t q : g.b_src) ++g.out_start[q + 1];
  for (int64_t q = 0; q < n; ++q) g.out_start[q + 1] += g.out_start[q];
  g.out_dst.resize(g.b_src.size());
  std::vector<int64_t> fill(g.out_start.begin(), g.out_start.end() - 1);
  for (int64_t i = 0; i < n; ++i)  // rows in increasing order keep each successor list sorted
    for (int64_t k = g.b_start[i]; k < g.b_start[i + 1]; ++k) g.out_dst[fill[g.b_src[k]]++] = static_cast<int32_t>(i);
  return g;
}

std::vector<int32_t> distances_from(const CommGraph& g, int64_t j) {
  std::vector<int32_t> d(g.n, kUnreachable);
  if (j < 0 || j >= g.n) return d;
  d[j] = 0;
  for (int64_t i = j + 1; i < g.n; ++i) {
    int32_t best = i - j < g.a_reach ? 1 : INT32_MAX;
    for (int64_t e = g.b_start[i]; e < g.b_start[i + 1]; ++e) {
      const int64_t q = g.b_src[e];
      if (q < j) break;
      if (d[q] != kUnreachable) best = std::min(best, d[q] + 1);
    }
    d[i] = best == INT32_MAX ? kUnreachable : best;
  }
  return d;
}

DistanceProfile distance_profile(const Pattern& p, int64_t n) {
  if (!p.translation_invariant())
    throw PatternError("pattern '" + p.spec() + "' is not translation-invariant (lattice): its distances need a search");
  p.check_length(n);
  DistanceProfile r;
  r.d.assign(n, kUnreachable);
  r.b_hops.assign(n, kUnreachable);
  r.b_last.assign(n, 0);
  r.a_first.assign(n, 0);
  if (n < 1) return r;
  r.b_hops[0] = 0;
  const Side& b = p.B();
  if (b.kind == SupportKind::Window) {
    const int64_t w = b.window > 0 ? b.window : n;
    for (int64_t dl = 1; dl < n; ++dl) r.b_hops[dl] = static_cast<int32_t>((dl + w - 1) / w), r.b_last[dl] = std::min(w, dl);
  } else if (b.kind == SupportKind::Offsets) {
    std::vector<int64_t> f;
    for (int64_t v : b.seq.f)
      if (v < n) f.push_back(v);
    // fewest offsets summing to dl; the largest offset wins ties
    for (int64_t dl = 1; dl < n; ++dl) {
      int32_t best = INT32_MAX;
      int64_t last = 0;
      for (auto it = std::upper_bound(f.begin(), f.end(), dl); it != f.begin();) {
        const int64_t o = *--it;
        const int32_t v = r.b_hops[dl - o];
        if (v != kUnreachable && v + 1 < best) best = v + 1, last = o;
      }
      if (best != INT32_MAX) r.b_hops[dl] = best, r.b_last[dl] = last;
    }
  }
  r.d = r.b_hops;
  // A entry hop a in [1, a_reach - 1], then B hops: 1 + min over the last a_reach - 1 values of
  // b_hops, a sliding-window minimum.
  const int64_t ar = a_reach_of(p, n);
  if (ar > 1) {
    std::deque<int64_t> win;  // indices k = dl - a, increasing, with increasing b_hops
    for (int64_t dl = 1; dl < n; ++dl) {
      const int64_t k = dl - 1;
      if (r.b_hops[k] != kUnreachable) {
        while (!win.empty() && r.b_hops[win.back()] >= r.b_hops[k]) win.pop_back();
        win.push_back(k);
      }
      while (!win.empty() && win.front() < dl - (ar - 1)) win.pop_front();
      if (win.empty()) continue;
      const int32_t via_a = r.b_hops[win.front()] + 1;
      if (r.d[dl] == kUnreachable || via_a < r.d[dl]) r.d[dl] = via_a, r.a_first[dl] = dl - win.front();
    }
  }
  return r;
}

std::vector<int64_t> profile_hops(const DistanceProfile& prof, int64_t delta) {
  std::vector<int64_t> hops;
  if (delta <= 0 || delta >= static_cast<int64_t>(prof.d.size()) || prof.d[delta] == kUnreachable) return hops;
  int64_t rest = delta;
  if (prof.a_first[delta] > 0) rest -= prof.a_first[delta];
  while (rest > 0) {
    hops.push_back(prof.b_last[rest]);
    rest -= prof.b_last[rest];
  }
  std::sort(hops.begin(), hops.end(), std::greater<int64_t>());
  if (prof.a_first[delta] > 0) hops.insert(hops.begin(), prof.a_first[delta]);
  return hops;
}

PathStats shortest_paths(const Pattern& p, int64_t n, const PathOptions& opt) {
  p.check_length(n);
  Context cx(p, n);
  return paths_impl(cx, opt);
}

CongestionStats copy_congestion(const Pattern& p, int64_t n, int64_t m, const std::vector<int32_t>* copy_distances) {
  p.check_length(n);
  Context cx(p, n);
  return congestion_impl(cx, m, copy_distances);
}

std::vector<std::vector<int64_t>> copy_routes(const Pattern& p, int64_t n, int64_t m) {
  p.check_length(n);
  Context cx(p, n);
  std::vector<std::vector<int64_t>> out;
  if (m < 1 || m >= n) return out;
  std::vector<int64_t> path;
  if (p.translation_invariant()) {
    std::vector<int64_t> hops;
    if (ti_routing(cx, m, hops).empty()) return out;
    for (int64_t j = 0; j + m < n; ++j) {
      path.assign(1, j);
      for (int64_t h : hops) path.push_back(path.back() + h);
      out.push_back(path);
    }
    return out;
  }
  std::vector<int64_t> load;
  int64_t longest = 0;
  const int r = best_route_rule(cx.g(), m, load, longest);
  if (r < 0) return out;
  route_all(cx.g(), route_rule(r), m, [&](const std::vector<int64_t>& route) { out.push_back(route); });
  return out;
}

CostStats cost_stats(const Pattern& p, int64_t n) {
  CostStats c;
  if (n < 1) return c;
  c.total = p.total_entries(n);
  c.mean = double(c.total) / double(n);
  c.max = p.max_row_size(n);
  c.cache = p.cache_entries(n);
  return c;
}

Analysis analyze(const Pattern& p, int64_t n, const AnalysisOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  p.check_length(n);
  Analysis a;
  a.spec = p.spec();
  a.n = n;
  a.cost = cost_stats(p, n);
  Context cx(p, n);
  PathOptions po = opt.paths;
  const int64_t m = opt.copy_shift > 0 ? opt.copy_shift : n / 2 + opt.copy_shift;
  po.copy_shift = m;
  a.paths = paths_impl(cx, po);
  if (n >= 2) a.congestion = congestion_impl(cx, m, a.paths.copy_distances.empty() ? nullptr : &a.paths.copy_distances);
  a.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return a;
}

double fit_exponent(const std::vector<double>& ns, const std::vector<double>& values) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  int k = 0;
  for (size_t t = 0; t < ns.size() && t < values.size(); ++t) {
    if (!(values[t] > 0) || !(ns[t] > 0) || !std::isfinite(values[t])) continue;
    const double x = std::log(ns[t]), y = std::log(values[t]);
    sx += x, sy += y, sxx += x * x, sxy += x * y, ++k;
  }
  if (k < 2) return std::nan("");
  const double den = k * sxx - sx * sx;
  if (den == 0) return std::nan("");
  return (k * sxy - sx * sy) / den;
}

}  // namespace tokmix
