// `tokmix analyze`: cost, decode cache, shortest paths and copy-task congestion of any pattern
// (spec section 7), as a table, JSON or CSV; `--sweep` adds growth exponents and log-log plots.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include "commands.h"
#include "tokmix/analysis.h"
#include "tokmix/analysis_json.h"

namespace tokmix::cli {
namespace {

struct AnalyzeOpts {
  std::vector<std::string> specs;
  bool instances = false;
  int64_t n = 4096;
  int64_t shift = 0;
  std::vector<int64_t> sweep;
  bool json = false, csv = false, no_plots = false;
  std::string plot_dir = "analysis-plots";
  PathOptions paths;
};

// Spec section 2, one entry per row of its table, plus a custom f and a hybrid.
const std::vector<std::string> kInstances = {"attention", "local:64",     "first-order", "recurrence:4", "dense",
                                             "pow2",      "sq1",          "pow2-lattice", "sq1-lattice", "f:3^k",
                                             "f:2*k+1",   "A=local:64;B=pow2"};

std::string human(double v) {
  char b[32];
  if (v >= 1e9) std::snprintf(b, sizeof b, "%.2fG", v / 1e9);
  else if (v >= 1e6) std::snprintf(b, sizeof b, "%.2fM", v / 1e6);
  else if (v >= 1e4) std::snprintf(b, sizeof b, "%.1fK", v / 1e3);
  else if (v == std::floor(v)) std::snprintf(b, sizeof b, "%.0f", v);
  else std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

std::string pair_1idx(int64_t j, int64_t i) { return "(" + std::to_string(j + 1) + ", " + std::to_string(i + 1) + ")"; }

bool unreachable_max(const PathStats& s) { return s.unreachable > 0; }

std::string sp_max_text(const PathStats& s) {
  if (unreachable_max(s)) return "inf";
  return (s.exact ? "" : ">=") + std::to_string(s.max);
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return q + "\"";
}

void print_csv(const std::vector<Analysis>& rows) {
  std::printf("pattern,n,cost_mean,cost_max,total_cost,cache,sp_max,sp_max_j,sp_max_i,sp_mean,sp_exact,sp_sources,"
              "sp_unreachable_pairs,copy_shift,congestion_upper,congestion_lower,longest_route,seconds\n");
  for (const auto& a : rows) {
    const auto& p = a.paths;
    const auto& c = a.congestion;
    std::printf("%s,%lld,%.6g,%lld,%lld,%lld,%s,%lld,%lld,%.6g,%d,%lld,%lld,%lld,%s,%s,%lld,%.4f\n", csv_field(a.spec).c_str(),
                (long long)a.n, a.cost.mean, (long long)a.cost.max, (long long)a.cost.total, (long long)a.cost.cache,
                unreachable_max(p) ? "inf" : std::to_string(p.max).c_str(), (long long)p.max_j + 1, (long long)p.max_i + 1, p.mean,
                p.exact ? 1 : 0, (long long)p.sources, (long long)p.unreachable, (long long)c.m,
                c.routed ? std::to_string(c.upper).c_str() : "", c.lower > 0 ? std::to_string(c.lower).c_str() : "",
                (long long)c.longest_route, a.seconds);
  }
}

void print_table(const std::vector<Analysis>& rows, int64_t n) {
  std::printf("tokmix analyze at n = %lld; copy task j -> j + m with m = %lld; positions 1-indexed\n", (long long)n,
              rows.empty() ? 0LL : (long long)rows[0].congestion.m);
  std::printf("cost = |SA(i)| + |SB(i)| per token; cache = decode cache entries (max over the sequence); d = shortest path\n");
  std::printf("congestion: ub = max load of the stated routing (upper bound), lb = proven lower bound\n\n");
  std::printf("%-20s %9s %7s %9s %7s | %6s %-16s %9s %-7s | %7s %6s | %6s\n", "pattern", "cost mean", "max", "total", "cache", "d max",
              "at pair", "d mean", "paths", "cong ub", "lb", "time");
  for (const auto& a : rows) {
    const auto& p = a.paths;
    const auto& c = a.congestion;
    std::string at = unreachable_max(p) ? pair_1idx(p.unreachable_j, p.unreachable_i) : (p.max_j >= 0 ? pair_1idx(p.max_j, p.max_i) : "-");
    std::printf("%-20s %9s %7s %9s %7s | %6s %-16s %9.3f %-7s | %7s %6s | %5.2fs\n", a.spec.c_str(), human(a.cost.mean).c_str(),
                human(double(a.cost.max)).c_str(), human(double(a.cost.total)).c_str(), human(double(a.cost.cache)).c_str(),
                sp_max_text(p).c_str(), at.c_str(), p.mean, p.exact ? "exact" : "sampled", c.routed ? std::to_string(c.upper).c_str() : "-",
                c.routed ? std::to_string(c.lower).c_str() : "-", a.seconds);
  }
  std::printf("\nhow each row was computed:\n");
  for (const auto& a : rows) {
    const auto& p = a.paths;
    const auto& c = a.congestion;
    std::printf("  %s\n    paths: %s", a.spec.c_str(), p.method.c_str());
    if (p.unreachable > 0)
      std::printf("; %lld of %lld pairs unreachable (d mean is over the reachable ones)", (long long)p.unreachable, (long long)p.pairs);
    if (c.routed)
      std::printf("\n    congestion ub: %s; most loaded node %lld; longest route %lld hop%s\n", c.routing.c_str(), (long long)c.upper_node + 1,
                  (long long)c.longest_route, c.longest_route == 1 ? "" : "s");
    else
      std::printf("\n    congestion: %s\n", c.routing.c_str());
    std::printf("    congestion lb: %s\n", c.lower_rule.c_str());
  }
}

struct Metric {
  const char* key;
  const char* title;
  double (*value)(const Analysis&);
};

double nan_v() { return std::nan(""); }
const std::vector<Metric>& metrics() {
  static const std::vector<Metric> m = {
      {"cost_mean", "cost per token, mean of |SA(i)|+|SB(i)|", [](const Analysis& a) { return a.cost.mean; }},
      {"cost_max", "cost per token, max of |SA(i)|+|SB(i)|", [](const Analysis& a) { return double(a.cost.max); }},
      {"total_cost", "total cost, sum of |SA(i)|+|SB(i)|", [](const Analysis& a) { return double(a.cost.total); }},
      {"cache", "decode cache entries (max over the sequence)", [](const Analysis& a) { return double(a.cost.cache); }},
      {"sp_max", "shortest path, max over pairs j < i", [](const Analysis& a) { return a.paths.unreachable ? INFINITY : double(a.paths.max); }},
      {"sp_mean", "shortest path, mean over reachable pairs", [](const Analysis& a) { return a.paths.mean; }},
      {"congestion_upper", "copy congestion, upper bound (routing)",
       [](const Analysis& a) { return a.congestion.routed ? double(a.congestion.upper) : nan_v(); }},
      {"congestion_lower", "copy congestion, lower bound",
       [](const Analysis& a) { return a.congestion.lower > 0 ? double(a.congestion.lower) : nan_v(); }},
  };
  return m;
}

std::string cell(double v, bool lower_bound) {
  if (std::isnan(v)) return "-";
  if (std::isinf(v)) return "inf";
  return (lower_bound ? ">=" : "") + human(v);
}

std::string gp_quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("''") : std::string(1, ch);
  return q + "'";
}

// One data file, one gnuplot script and (when gnuplot runs) one PNG per metric.
nlohmann::json write_plots(const std::vector<std::string>& specs, const std::vector<int64_t>& ns,
                           const std::map<std::string, std::vector<Analysis>>& by_spec,
                           std::map<std::string, std::map<std::string, double>>& exps, const std::string& dir) {
  nlohmann::json files = nlohmann::json::array();
  ::mkdir(dir.c_str(), 0755);
  const bool have_gnuplot = std::system("command -v gnuplot >/dev/null 2>&1") == 0;
  for (const auto& m : metrics()) {
    const std::string base = dir + "/" + m.key;
    {
      std::ofstream dat(base + ".dat");
      dat << "# n";
      for (const auto& s : specs) dat << " \"" << s << "\"";
      dat << "\n";
      for (size_t t = 0; t < ns.size(); ++t) {
        dat << ns[t];
        for (const auto& s : specs) {
          const double v = m.value(by_spec.at(s)[t]);
          if (v > 0 && std::isfinite(v)) dat << " " << v;
          else dat << " ?";
        }
        dat << "\n";
      }
    }
    {
      std::ofstream gp(base + ".gp");
      gp << "set terminal pngcairo size 1000,640 noenhanced\n"
         << "set output " << gp_quote(std::string(m.key) + ".png") << "\n"
         << "set logscale xy 2\nset grid\nset datafile missing '?'\n"
         << "set title " << gp_quote(m.title) << "\nset xlabel 'n'\nset ylabel " << gp_quote(m.key) << "\n"
         << "set key outside right top\nset offsets 0, 0, graph 0.05, graph 0.05\n"
         << "plot ";
      int shown = 0;
      for (size_t k = 0; k < specs.size(); ++k) {
        const double e = exps[m.key][specs[k]];
        if (std::isnan(e)) continue;  // no plottable point (e.g. unreachable everywhere)
        char title[64];
        std::snprintf(title, sizeof title, " (n^%.2f)", e);
        gp << (shown++ ? ", \\\n     " : "") << gp_quote(std::string(m.key) + ".dat") << " using 1:" << k + 2
           << " with linespoints title " << gp_quote(specs[k] + title);
      }
      if (!shown) gp << "NaN notitle";
      gp << "\n";
    }
    std::string png;
    if (have_gnuplot) {
      const std::string cmd = "cd '" + dir + "' && gnuplot '" + std::string(m.key) + ".gp' 2>&1";
      if (std::system(cmd.c_str()) == 0) png = base + ".png";
    }
    files.push_back({{"metric", m.key}, {"data", base + ".dat"}, {"script", base + ".gp"}, {"png", png}});
  }
  if (!have_gnuplot)
    std::fprintf(stderr, "note: gnuplot not found; wrote the data (.dat) and scripts (.gp) to %s; run `gnuplot NAME.gp` there for the PNGs\n",
                 dir.c_str());
  return files;
}

void run_sweep(const AnalyzeOpts& o, const std::vector<std::string>& specs) {
  std::map<std::string, std::vector<Analysis>> by_spec;
  std::vector<Analysis> all;
  std::vector<double> xs(o.sweep.begin(), o.sweep.end());
  for (const auto& s : specs) {
    Pattern p = Pattern::parse(s);
    for (int64_t n : o.sweep) {
      AnalysisOptions ao;
      ao.paths = o.paths;
      ao.copy_shift = o.shift;
      by_spec[s].push_back(analyze(p, n, ao));
      all.push_back(by_spec[s].back());
    }
  }
  nlohmann::json fits = nlohmann::json::object();
  std::map<std::string, std::map<std::string, double>> exps;
  for (const auto& m : metrics())
    for (const auto& s : specs) {
      std::vector<double> ys;
      for (const auto& a : by_spec[s]) ys.push_back(m.value(a));
      double e = fit_exponent(xs, ys);
      if (std::fabs(e) < 5e-4) e = 0;  // print a flat line as 0, not -0.000
      exps[m.key][s] = e;
      fits[s][m.key] = std::isnan(e) ? nlohmann::json(nullptr) : nlohmann::json(e);
    }
  nlohmann::json plots;
  if (!o.no_plots) plots = write_plots(specs, o.sweep, by_spec, exps, o.plot_dir);
  if (o.json) {
    nlohmann::json recs = nlohmann::json::array();
    for (const auto& a : all) recs.push_back(to_json(a));
    std::printf("%s\n", nlohmann::json({{"sweep", o.sweep}, {"records", recs}, {"growth_exponents", fits}, {"plots", plots}}).dump(1).c_str());
    return;
  }
  if (o.csv) {
    print_csv(all);
    return;
  }
  std::printf("tokmix analyze --sweep: each metric against n; exponent = least-squares slope of log(metric) on log(n)\n");
  std::printf("(>= marks a lower bound from sampled sources; inf: some pair has no path; - : no routing)\n");
  for (const auto& m : metrics()) {
    std::printf("\n%s [%s]\n%-20s", m.title, m.key, "pattern");
    for (int64_t n : o.sweep) std::printf(" %9lld", (long long)n);
    std::printf(" %9s\n", "exponent");
    for (const auto& s : specs) {
      std::printf("%-20s", s.c_str());
      for (const auto& a : by_spec[s])
        std::printf(" %9s", cell(m.value(a), std::string(m.key) == "sp_max" && !a.paths.exact && !a.paths.unreachable).c_str());
      const double e = exps[m.key][s];
      if (std::isnan(e)) std::printf(" %9s\n", "-");
      else std::printf(" %9.3f\n", e);
    }
  }
  if (!o.no_plots) {
    std::printf("\nplots (log-log, one line per pattern):\n");
    for (const auto& f : plots)
      std::printf("  %-17s %s\n", f["metric"].get<std::string>().c_str(),
                  f["png"].get<std::string>().empty() ? (f["script"].get<std::string>() + " (no PNG: gnuplot missing or failed)").c_str()
                                                      : f["png"].get<std::string>().c_str());
  }
}

void run_analyze(const AnalyzeOpts& o) {
  std::vector<std::string> specs = o.specs;
  if (o.instances) specs.insert(specs.begin(), kInstances.begin(), kInstances.end());
  if (specs.empty()) throw PatternError("analyze: give at least one pattern spec, or --instances. " + Pattern::accepted_forms());
  if (!o.sweep.empty()) {
    run_sweep(o, specs);
    return;
  }
  std::vector<Analysis> rows;
  for (const auto& s : specs) {
    AnalysisOptions ao;
    ao.paths = o.paths;
    ao.copy_shift = o.shift;
    rows.push_back(analyze(Pattern::parse(s), o.n, ao));
  }
  if (o.json) {
    nlohmann::json recs = nlohmann::json::array();
    for (const auto& a : rows) recs.push_back(to_json(a));
    std::printf("%s\n", nlohmann::json({{"n", o.n}, {"records", recs}}).dump(1).c_str());
  } else if (o.csv) {
    print_csv(rows);
  } else {
    print_table(rows, o.n);
  }
}

CommandRegistrar reg_analyze([](CLI::App& app) {
  auto* cmd = app.add_subcommand("analyze", "Cost, decode cache, shortest paths and copy congestion of patterns (spec section 7)");
  auto o = std::make_shared<AnalyzeOpts>();
  cmd->add_option("spec", o->specs, Pattern::accepted_forms());
  cmd->add_flag("--instances", o->instances, "analyze the instances of spec section 2 (and a custom f and a hybrid)");
  cmd->add_option("--n", o->n, "sequence length")->check(CLI::Range(int64_t(2), int64_t(1) << 30));
  cmd->add_option("--copy-shift", o->shift,
                  "copy task shift m: pairs j -> j + m (default n / 2); negative: n / 2 + M, e.g. -1 for n / 2 - 1 (pow2's "
                  "longest binary sum when n is a power of two)");
  cmd->add_option("--sweep", o->sweep, "lengths, e.g. 256,1024,4096,16384,65536: metrics against n, exponents, plots")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(2), int64_t(1) << 30));
  cmd->add_option("--plot-dir", o->plot_dir, "where --sweep writes NAME.dat, NAME.gp and NAME.png per metric");
  cmd->add_flag("--no-plots", o->no_plots, "--sweep without plot files");
  cmd->add_flag("--json", o->json, "JSON on stdout");
  cmd->add_flag("--csv", o->csv, "CSV on stdout");
  cmd->add_option("--exact-max-n", o->paths.exact_max_n, "patterns that are not translation-invariant: search every source up to this n");
  cmd->add_option("--samples", o->paths.samples, "sources searched beyond --exact-max-n")->check(positive_integer());
  cmd->add_option("--seed", o->paths.seed, "seed of the sampled sources");
  cmd->add_option("--threads", o->paths.threads, "search threads (0: OpenMP default)");
  cmd->callback([o] { run_analyze(*o); });
});

}  // namespace
}  // namespace tokmix::cli
