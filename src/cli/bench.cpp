// `tokmix bench mix`: forward, forward+backward and decode-step timings of every instance,
// beside the machine's matrix-product rate and the dense triangular solve, in one run.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "tokmix/infer/generate.h"
#include "tokmix/mix.h"
#include "tokmix/nn/model.h"

namespace tokmix::cli {
namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double median_ms(int reps, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// fp32 matrix-product rate of this machine through LibTorch (the ceiling to compare with).
double matmul_gflops() {
  auto a = torch::randn({1024, 1024}), b = torch::randn({1024, 1024});
  double ms = median_ms(7, [&] { auto c = torch::mm(a, b); });
  return 2.0 * 1024 * 1024 * 1024 / (ms * 1e6);
}

// Dense baseline: materialise A and B (random coefficients on the pattern's support) and solve
// (I - B) Y = A X per head, as the paper's formulation does. O(n^2) memory and time.
double dense_solve_ms(const Pattern& p, int64_t T, int64_t H, int64_t D, int reps) {
  auto mA = torch::zeros({T, T}), mB = torch::zeros({T, T});
  auto a = mA.accessor<float, 2>(), b = mB.accessor<float, 2>();
  for (int64_t i = 0; i < T; ++i) {
    auto ra = p.row_A(i), rb = p.row_B(i);
    for (auto& e : ra) a[i][e.pos] = 1.0f / float(ra.size() + rb.size());
    for (auto& e : rb) b[i][e.pos] = 1.0f / float(ra.size() + rb.size());
  }
  auto A = mA.expand({H, T, T}).contiguous(), IB = (torch::eye(T) - mB).expand({H, T, T}).contiguous();
  auto X = torch::randn({H, T, D});
  return median_ms(reps, [&] { auto Y = torch::linalg_solve_triangular(IB, torch::bmm(A, X), /*upper=*/false); });
}

struct Opts {
  std::vector<std::string> patterns = {"attention", "local:64", "first-order", "recurrence:4", "dense", "pow2", "sq1",
                                       "pow2-lattice", "sq1-lattice", "A=local:64;B=pow2"};
  std::vector<int64_t> Ts = {1024, 4096, 16384, 65536};
  std::vector<int64_t> decode_ctx = {1024, 16384, 65536};
  int64_t B = 1, H = 8, D = 64;
  int64_t quadratic_max_T = 4096;
  int64_t dense_max_T = 4096;
  int reps = 3;
  int threads = 0;
  std::string json;
  std::string mode = "softmax";
};

void run_bench(const Opts& o) {
  set_threads(o.threads);
  torch::manual_seed(0);
  const double mm = matmul_gflops();
  std::printf("tokmix bench mix: B=%lld H=%lld D=%lld fp32, %d threads, mode %s, median of %d\n", (long long)o.B, (long long)o.H,
              (long long)o.D, torch::get_num_threads(), o.mode.c_str(), o.reps);
  std::printf("machine fp32 matrix product (1024^3 through LibTorch): %.1f GFLOP/s at the start; measured again after each row\n"
              "(column matmul, GFLOP/s), and each row's %%matmul is against that figure\n", mm);
  std::printf("flops counted per support entry: forward 2*Dk + 2*Dv (score, mix); backward 6*Dk + 4*Dv (score, dp, dq, dk, dv|g)\n\n");
  std::printf("%-20s %7s %10s %10s %8s %8s %10s %10s %8s %8s\n", "pattern", "T", "entries", "fwd ms", "GFLOP/s", "%matmul", "fwd+bwd ms",
              "GFLOP/s", "%matmul", "matmul");
  nlohmann::json rows = nlohmann::json::array();
  std::map<std::string, std::map<int64_t, double>> fwd_ms_of;
  for (const auto& spec : o.patterns) {
    auto pat = pattern_from_spec(spec);
    const bool quadratic = pat->max_row_size(65536) > 4096;
    for (int64_t T : o.Ts) {
      if (quadratic && T > o.quadratic_max_T) {
        std::printf("%-20s %7lld   skipped: O(n^2) support (raise --quadratic-max-T)\n", spec.c_str(), (long long)T);
        continue;
      }
      auto q = torch::randn({o.B, T, o.H, o.D}), k = torch::randn({o.B, T, o.H, o.D}), v = torch::randn({o.B, T, o.H, o.D});
      MixOptions mo;
      mo.mode = o.mode;
      if (o.mode == "gate") mo.gate_weight = torch::randn({o.H, pat->num_levels(T), o.D}) * 0.1;
      const double entries = double(pat->total_entries(T)) * o.B * o.H;
      const double f_fwd = entries * (2.0 * o.D + 2.0 * o.D), f_bwd = entries * (6.0 * o.D + 4.0 * o.D);
      double t_f, t_fb;
      {
        torch::NoGradGuard ng;
        t_f = median_ms(o.reps, [&] { auto y = mix(q, k, v, *pat, mo); });
      }
      auto qg = q.clone().requires_grad_(), kg = k.clone().requires_grad_(), vg = v.clone().requires_grad_();
      auto dy = torch::randn_like(v);
      t_fb = median_ms(o.reps, [&] {
        auto y = mix(qg, kg, vg, *pat, mo);
        y.backward(dy);
      });
      // The matrix rate again, right after the op: this host's speed changes by up to 2x from one
      // second to the next (other tenants), so a rate measured minutes earlier can be off.
      const double mm_row = matmul_gflops();
      const double g_f = f_fwd / (t_f * 1e6), g_fb = (f_fwd + f_bwd) / (t_fb * 1e6);
      std::printf("%-20s %7lld %10.3g %10.2f %8.1f %7.1f%% %10.2f %8.1f %7.1f%% %8.1f\n", spec.c_str(), (long long)T, entries, t_f, g_f,
                  100 * g_f / mm_row, t_fb, g_fb, 100 * g_fb / mm_row, mm_row);
      std::fflush(stdout);
      fwd_ms_of[spec][T] = t_f;
      nlohmann::json r = {{"kind", "mix"}, {"pattern", spec}, {"T", T}, {"B", o.B}, {"H", o.H}, {"D", o.D}, {"entries", entries},
                          {"fwd_ms", t_f}, {"fwd_gflops", g_f}, {"fwdbwd_ms", t_fb}, {"fwdbwd_gflops", g_fb}, {"matmul_gflops", mm_row},
                          {"mode", o.mode}, {"threads", torch::get_num_threads()}};
      if (T <= o.dense_max_T) {
        double td = dense_solve_ms(*pat, T, o.B * o.H, o.D, std::max(1, o.reps / 2));
        r["dense_solve_ms"] = td;
        std::printf("%-20s %7s   dense (I-B)^-1 A X solve: %.2f ms (%.1fx the op's forward)\n", "", "", td, td / t_f);
      }
      rows.push_back(r);
    }
  }
  // Decode steps at growing context.
  std::printf("\ndecode step (batch 1, H=%lld, D=%lld): ms per token at context\n%-20s", (long long)o.H, (long long)o.D, "pattern");
  for (auto c : o.decode_ctx) std::printf(" %10lld", (long long)c);
  std::printf(" %12s %12s\n", "last/first", "cache bytes");
  for (const auto& spec : o.patterns) {
    auto pat = pattern_from_spec(spec);
    std::printf("%-20s", spec.c_str());
    std::vector<double> ts;
    int64_t bytes = 0;
    for (auto c : o.decode_ctx) {
      const int steps = 30;
      MixCache cache(pat, 1, o.H, o.D, o.D, c + steps + 2);
      cache.skip_to(c);
      auto q = torch::randn({1, o.H, o.D}), k = torch::randn({1, o.H, o.D}), v = torch::randn({1, o.H, o.D});
      MixOptions mo;
      mo.mode = o.mode;
      if (o.mode == "gate") mo.gate_weight = torch::randn({o.H, pat->num_levels(c + steps + 2), o.D}) * 0.1;
      torch::NoGradGuard ng;
      double t = median_ms(steps, [&] { auto y = cache.step(q, k, v, mo); });
      ts.push_back(t);
      bytes = cache.bytes();
      std::printf(" %10.4f", t);
      rows.push_back({{"kind", "decode"}, {"pattern", spec}, {"context", c}, {"H", o.H}, {"D", o.D}, {"step_ms", t},
                      {"cache_bytes_allocated", cache.bytes()}, {"cache_entries", cache.entries(0)}});
    }
    std::printf(" %11.2fx %12lld\n", ts.back() / ts.front(), (long long)bytes);
    std::fflush(stdout);
  }
  // Targets of the core issue, computed from this run.
  std::printf("\nchecks from this run:\n");
  for (const auto& r : rows) {
    if (r["kind"] != "mix") continue;
    const std::string p = r["pattern"];
    if ((p == "pow2" || p == "sq1") && r["T"] == o.Ts.back())
      std::printf("  %-5s T=%lld: forward %.1f%%, forward+backward %.1f%% of the matrix-product rate (target >= 20%%)\n", p.c_str(),
                  (long long)r["T"].get<int64_t>(), 100 * r["fwd_gflops"].get<double>() / r["matmul_gflops"].get<double>(),
                  100 * r["fwdbwd_gflops"].get<double>() / r["matmul_gflops"].get<double>());
  }
  if (fwd_ms_of.count("pow2") && fwd_ms_of["pow2"].count(4096) && fwd_ms_of["pow2"].count(65536)) {
    double ratio = fwd_ms_of["pow2"][65536] / fwd_ms_of["pow2"][4096];
    std::printf("  pow2 forward 65536 / 4096: %.1fx (n log n predicts %.1fx; target <= 28x)\n", ratio, 65536.0 * 16 / (4096.0 * 12));
  }
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << rows.dump(1) << "\n";
    std::printf("rows written to %s\n", o.json.c_str());
  }
}

// Decode speed of whole models against context: eager steps and CUDA-graph replays (GPU), with
// the graph's logits checked against the eager ones.
struct DecodeOpts {
  std::vector<std::string> models;
  std::vector<int64_t> contexts{512, 4096, 32768};
  int64_t steps = 64, batch = 1;
  std::string device = "cpu", json;
  bool no_graph = false;
};

void run_decode_bench(const DecodeOpts& o) {
  set_threads();
  const torch::Device dev(o.device == "cuda" ? torch::kCUDA : torch::kCPU);
  if (dev.is_cuda() && !torch::cuda::is_available()) throw std::invalid_argument("--device cuda: no CUDA device is available to this LibTorch");
  const int64_t longest = *std::max_element(o.contexts.begin(), o.contexts.end());
  nlohmann::json rows = nlohmann::json::array();
  std::printf("Decode, batch %lld, %lld timed steps after 2 warm-up steps, %s, random weights (fp32)\n", (long long)o.batch,
              (long long)o.steps, o.device.c_str());
  std::printf("%-28s %9s %14s %14s %9s %12s %14s\n", "model", "context", "eager tok/s", "graph tok/s", "speedup", "graph diff",
              "cache B/seq");
  for (const auto& path : o.models) {
    std::ifstream f(path);
    if (!f) throw std::invalid_argument("--models: cannot read '" + path + "'");
    nlohmann::json mj;
    try {
      mj = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      throw std::invalid_argument("--models: '" + path + "' is not JSON: " + e.what());
    }
    mj["max_context"] = longest + o.steps + 8;
    auto cfg = nn::ModelConfig::from_json(mj, path);
    torch::manual_seed(1);
    nn::LanguageModel m(cfg);
    m->to(dev);
    m->eval();
    const std::string name = mj.value("name", path);
    for (int64_t c : o.contexts) {
      auto r = infer::measure_decode(*m, c, o.steps, o.batch, !o.no_graph);
      const bool g = r.graph_tokens_per_s > 0;
      char gt[32] = "-", sp[32] = "-", gd[32] = "-";
      if (g) {
        std::snprintf(gt, sizeof gt, "%.1f", r.graph_tokens_per_s);
        std::snprintf(sp, sizeof sp, "%.2fx", r.graph_tokens_per_s / r.tokens_per_s);
        std::snprintf(gd, sizeof gd, "%.1e", r.graph_max_rel_diff);
      }
      std::printf("%-28s %9lld %14.1f %14s %9s %12s %14lld\n", name.c_str(), (long long)c, r.tokens_per_s, gt, sp, gd,
                  (long long)r.cache_bytes);
      std::fflush(stdout);
      rows.push_back({{"model", name}, {"context", c}, {"batch", o.batch}, {"steps", o.steps}, {"device", o.device},
                      {"tokens_per_s", r.tokens_per_s}, {"graph_tokens_per_s", r.graph_tokens_per_s},
                      {"graph_max_rel_diff", r.graph_max_rel_diff}, {"cache_bytes_per_seq", r.cache_bytes}});
    }
  }
  if (!o.json.empty()) {
    std::ofstream(o.json) << rows.dump(1) << "\n";
    std::printf("rows written to %s\n", o.json.c_str());
  }
}

CommandRegistrar reg([](CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  auto* m = bench->add_subcommand("mix", "The mixing op: forward, forward+backward, decode step, vs matmul rate and dense solve");
  auto o = std::make_shared<Opts>();
  m->add_option("--patterns", o->patterns, "pattern specs")->delimiter(',');
  m->add_option("--T", o->Ts, "sequence lengths")->delimiter(',');
  m->add_option("--decode-contexts", o->decode_ctx, "contexts for the decode step")->delimiter(',');
  m->add_option("--batch", o->B, "batch");
  m->add_option("--heads", o->H, "heads");
  m->add_option("--dim", o->D, "head width (Dk = Dv)");
  m->add_option("--reps", o->reps, "timed repetitions (median)")->check(positive_integer());
  m->add_option("--threads", o->threads, "threads (0: all cores)");
  m->add_option("--mode", o->mode, "softmax or gate")->check(CLI::IsMember({"softmax", "gate"}));
  m->add_option("--quadratic-max-T", o->quadratic_max_T, "longest T for patterns with O(n) rows (attention, dense)");
  m->add_option("--dense-max-T", o->dense_max_T, "longest T for the dense triangular-solve baseline");
  m->add_option("--json", o->json, "write rows as JSON to this file");
  m->callback([o] {
    if (o->patterns.empty() || o->Ts.empty() || o->decode_ctx.empty())
      throw std::invalid_argument("--patterns, --T and --decode-contexts need at least one value each");
    run_bench(*o);
  });
  auto* d = bench->add_subcommand("decode", "Whole-model decode speed against context: eager steps and CUDA-graph replays");
  auto od = std::make_shared<DecodeOpts>();
  d->add_option("--models", od->models, "model config files (JSON, configs/models)")->delimiter(',')->required()->check(CLI::ExistingFile);
  d->add_option("--contexts", od->contexts, "prompt lengths")->delimiter(',')->check(positive_integer());
  d->add_option("--steps", od->steps, "timed steps")->check(positive_integer());
  d->add_option("--batch", od->batch, "sequences decoded together")->check(positive_integer());
  d->add_option("--device", od->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  d->add_flag("--no-cuda-graph", od->no_graph, "eager steps only");
  d->add_option("--json", od->json, "write rows as JSON to this file");
  d->callback([od] { run_decode_bench(*od); });
});

}  // namespace
}  // namespace tokmix::cli
