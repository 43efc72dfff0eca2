// JSON form of an Analysis (include/tokmix/analysis_json.h). Positions are printed 1-indexed.
#include "tokmix/analysis_json.h"

namespace tokmix {

nlohmann::json to_json(const Analysis& a) {
  const auto& p = a.paths;
  const auto& c = a.congestion;
  nlohmann::json sp = {{"max", (p.unreachable > 0) ? nlohmann::json(nullptr) : nlohmann::json(p.max)},
                       {"max_finite", p.max},
                       {"max_pair_1idx", {p.max_j + 1, p.max_i + 1}},
                       {"mean", p.mean},
                       {"mean_over", "reachable pairs"},
                       {"exact", p.exact},
                       {"max_is", p.exact ? "exact" : "lower bound (sampled sources)"},
                       {"method", p.method},
                       {"sources", p.sources},
                       {"pairs", p.pairs},
                       {"unreachable_pairs", p.unreachable},
                       {"histogram", p.histogram}};
  if (p.unreachable > 0) sp["first_unreachable_pair_1idx"] = {p.unreachable_j + 1, p.unreachable_i + 1};
  nlohmann::json cg = {{"task", "copy j -> j + m"},
                       {"m", c.m},
                       {"pairs", c.pairs},
                       {"load_counts", "nodes a path enters: interior nodes and the target, not the source"},
                       {"upper_bound", c.routed ? nlohmann::json(c.upper) : nlohmann::json(nullptr)},
                       {"upper_node_1idx", c.upper_node + 1},
                       {"routing", c.routing},
                       {"routing_hops", c.hops.size() <= 64 ? nlohmann::json(c.hops) : nlohmann::json("see routing")},
                       {"longest_route", c.longest_route},
                       {"lower_bound", c.lower},
                       {"lower_bound_rule", c.lower_rule}};
  return {{"pattern", a.spec},
          {"n", a.n},
          {"cost", {{"mean", a.cost.mean}, {"max", a.cost.max}, {"total", a.cost.total}}},
          {"cache_entries", a.cost.cache},
          {"shortest_path", sp},
          {"congestion", cg},
          {"seconds", a.seconds}};
}

}  // namespace tokmix
