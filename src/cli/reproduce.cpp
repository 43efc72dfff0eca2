// `tokmix reproduce table1`: every Table 1 structure on copy, associative recall and multi-hop
// recall, our accuracy beside the paper's, as a table, JSON and a grouped bar chart.
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>

#include "commands.h"
#include "tokmix/train/trainer.h"

namespace tokmix::cli {
namespace {
namespace fs = std::filesystem;

struct Structure {
  std::string label;      // as in the paper's table
  nlohmann::json mixer;   // model config mixer line
  double paper[3];        // copy, assoc. recall, multi-hop (%)
};

std::vector<Structure> structures(int64_t window, int64_t order) {
  return {
      {"attention", {{"type", "attention"}}, {100, 100, 39.21}},
      {"local attention", {{"type", "local"}, {"window", window}}, {23.75, 26.20, 23.59}},
      {"diagonal SSM", {{"type", "first-order"}}, {42.98, 32.53, 27.17}},
      {"k-th order recurrence", {{"type", "recurrence"}, {"order", order}}, {74.66, 41.12, 39.08}},
      {"dense recurrence", {{"type", "dense"}}, {100, 99.99, 99.80}},
      {"pow2", {{"type", "pow2"}}, {92.63, 49.03, 34.85}},
      {"pow2, cache-efficient", {{"type", "pow2-lattice"}}, {75.47, 52.59, 38.63}},
      {"sq1", {{"type", "sq1"}}, {99.66, 53.61, 35.68}},
      {"sq1, cache-efficient", {{"type", "sq1-lattice"}}, {91.59, 54.56, 38.02}},
  };
}

struct Preset {
  std::string tasks[3];
  nlohmann::json model;  // without the mixer type
  int64_t steps, batch, window, order;
  std::vector<double> lrs;
};

Preset preset(const std::string& name) {
  if (name == "quick") {
    // 2 CPU cores, ~15 minutes for 27 runs: short sequences, a small vocabulary, one lr.
    return {{"copy:T=48,L=12,V=16", "mqar:T=64,N=8,V=128", "multihop:T=64,N=4,hops=2,V=64"},
            {{"d_model", 64}, {"n_layers", 2}, {"positions", "none"}, {"mlp", true}, {"mixer", {{"heads", 4}, {"conv", 4}}}},
            550,
            32,
            4,
            4,
            {3e-3}};
  }
  if (name == "paper") {
    // The paper's settings are unpublished; these follow Zoology's MQAR harness (d_model 128,
    // 2 layers, T = 256, N = 16, V = 8192, best of four learning rates). GPU recommended.
    return {{"copy:T=256,L=64,V=64", "mqar:T=256,N=16,V=8192", "multihop:T=256,N=16,hops=2,V=8192"},
            {{"d_model", 128}, {"n_layers", 2}, {"positions", "none"}, {"mlp", false}, {"mixer", {{"heads", 2}, {"conv", 4}}}},
            4000,
            64,
            32,
            8,
            {1e-4, 3e-4, 1e-3, 3e-3}};
  }
  throw std::invalid_argument("preset '" + name + "' is not known; accepted: quick, paper");
}

void write_plot(const fs::path& dir, const std::vector<Structure>& ss, const std::vector<std::array<double, 3>>& ours) {
  {
    std::ofstream d(dir / "table1.dat");
    d << "# structure copy_ours recall_ours multihop_ours copy_paper recall_paper multihop_paper\n";
    for (size_t i = 0; i < ss.size(); ++i)
      d << "\"" << ss[i].label << "\" " << ours[i][0] << " " << ours[i][1] << " " << ours[i][2] << " " << ss[i].paper[0] << " "
        << ss[i].paper[1] << " " << ss[i].paper[2] << "\n";
  }
  std::ofstream g(dir / "table1.gp");
  g << "set terminal pngcairo size 1400,520 noenhanced\nset output '" << (dir / "table1.png").string() << "'\n"
    << "set style data histograms\nset style histogram clustered gap 1\nset style fill solid 0.8 border -1\n"
    << "set yrange [0:105]\nset ylabel 'accuracy (%)'\nset xtics rotate by -25\nset key top right\nset grid ytics\n"
    << "set title 'Table 1: ours (solid) and the paper (light)'\n"
    << "plot '" << (dir / "table1.dat").string() << "' using 2:xtic(1) title 'copy' lc rgb '#1f77b4', '' using 5 title 'copy (paper)' lc rgb '#aec7e8', "
    << "'' using 3 title 'recall' lc rgb '#d62728', '' using 6 title 'recall (paper)' lc rgb '#ff9896', "
    << "'' using 4 title 'multi-hop' lc rgb '#2ca02c', '' using 7 title 'multi-hop (paper)' lc rgb '#98df8a'\n";
  g.close();
  if (std::system(("gnuplot '" + (dir / "table1.gp").string() + "' 2>/dev/null").c_str()) != 0)
    std::printf("note: gnuplot is not available; wrote %s and the script %s\n", (dir / "table1.dat").c_str(), (dir / "table1.gp").c_str());
  else
    std::printf("bar chart: %s\n", (dir / "table1.png").c_str());
}

void run_table1(const std::string& preset_name, const std::string& out, std::vector<std::string> only, bool verbose,
                const std::string& device, bool resume) {
  const Preset p = preset(preset_name);
  auto ss = structures(p.window, p.order);
  if (!only.empty()) {
    std::vector<Structure> keep;
    for (auto& s : ss)
      if (std::find(only.begin(), only.end(), s.mixer["type"].get<std::string>()) != only.end()) keep.push_back(s);
    if (keep.empty()) throw std::invalid_argument("--only names no Table 1 structure (use mixer types: attention, local, first-order, ...)");
    ss = keep;
  }
  const fs::path dir(out);
  fs::create_directories(dir);
  nlohmann::json settings = {{"preset", preset_name}, {"tasks", p.tasks}, {"model", p.model}, {"steps", p.steps},
                             {"batch_size", p.batch}, {"lrs", p.lrs}, {"local_window", p.window}, {"recurrence_order", p.order},
                             {"threads", torch::get_num_threads()}, {"device", device}, {"bf16", device == "cuda"}};
  std::ofstream(dir / "settings.json") << settings.dump(2) << "\n";
  std::vector<std::array<double, 3>> ours(ss.size(), {0, 0, 0});
  nlohmann::json results = nlohmann::json::array();
  const int64_t runs = int64_t(ss.size()) * 3;
  int64_t done = 0, trained = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < ss.size(); ++i) {
    for (int t = 0; t < 3; ++t) {
      nlohmann::json model = p.model;
      for (auto it = ss[i].mixer.begin(); it != ss[i].mixer.end(); ++it) model["mixer"][it.key()] = it.value();
      nlohmann::json tj = {{"model", model},        {"task", p.tasks[t]}, {"batch_size", p.batch}, {"steps", p.steps},
                           {"eval_every", p.steps}, {"eval_batches", 8},  {"log_every", p.steps},
                           {"device", device},      {"bf16", device == "cuda"},
                           {"out", (dir / (ss[i].mixer["type"].get<std::string>() + "-" + std::to_string(t))).string()}};
      const train::TrainOptions o = train::TrainOptions::from_json(tj, "table1");
      std::optional<train::TrainResult> earlier = resume ? train::finished_sweep(o, p.lrs) : std::nullopt;
      // --resume: rates already finished are read back, the others trained
      const train::TrainResult best = earlier ? *earlier : train::train_sweep(o, p.lrs, false, verbose ? &std::cerr : nullptr, resume);
      ours[i][t] = 100 * best.eval.accuracy;
      ++done;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!earlier) ++trained;
      std::fprintf(stderr, "[%2lld/%lld] %-22s %-34s acc %6.2f%%  (%.0f tok/s)%s  elapsed %.0fs, ETA %.0fs\n", (long long)done,
                   (long long)runs, ss[i].label.c_str(), p.tasks[t].c_str(), ours[i][t], best.tokens_per_s,
                   earlier ? "  from an earlier run" : "", secs, trained ? secs / trained * (runs - done) : 0.0);
      results.push_back({{"structure", ss[i].label}, {"mixer", ss[i].mixer}, {"task", p.tasks[t]}, {"accuracy", ours[i][t]},
                         {"paper", ss[i].paper[t]}, {"eval_loss", best.eval.loss}, {"tokens_per_s", best.tokens_per_s}});
    }
  }
  std::printf("\nTable 1 (%s preset): accuracy %% — ours | paper\n", preset_name.c_str());
  std::printf("%-24s %17s %17s %17s\n", "structure", "copy", "assoc. recall", "multi-hop");
  for (size_t i = 0; i < ss.size(); ++i)
    std::printf("%-24s %7.2f | %7.2f %7.2f | %7.2f %7.2f | %7.2f\n", ss[i].label.c_str(), ours[i][0], ss[i].paper[0], ours[i][1],
                ss[i].paper[1], ours[i][2], ss[i].paper[2]);
  std::printf("tasks: %s | %s | %s\n", p.tasks[0].c_str(), p.tasks[1].c_str(), p.tasks[2].c_str());
  std::ofstream(dir / "results.json") << nlohmann::json{{"settings", settings}, {"rows", results}}.dump(2) << "\n";
  std::printf("results: %s\n", (dir / "results.json").c_str());
  write_plot(dir, ss, ours);
}

CommandRegistrar reg([](CLI::App& app) {
  auto* t1 = reproduce_command(app)->add_subcommand("table1", "Table 1: copy, associative recall and multi-hop recall for every structure");
  struct Args {
    std::string preset = "quick", out = "out/table1";
    std::vector<std::string> only;
    bool verbose = false;
    std::string device = "cpu";
    bool resume = false;
  };
  auto a = std::make_shared<Args>();
  t1->add_option("--preset", a->preset, "quick (2 CPU cores, ~15 min) or paper")->check(CLI::IsMember({"quick", "paper"}));
  t1->add_option("--out", a->out, "output directory");
  t1->add_option("--only", a->only, "mixer types to run (attention,local,first-order,recurrence,dense,pow2,...)")->delimiter(',');
  t1->add_flag("--verbose", a->verbose, "progress of every training run");
  t1->add_option("--device", a->device, "cpu, or cuda (bf16 autocast, the step replayed as a CUDA graph)")->check(CLI::IsMember({"cpu", "cuda"}));
  t1->add_flag("--resume", a->resume,
               "reuse the runs already finished in --out with the same settings (result.json and options.json of every "
               "learning rate), train the others: a long preset can run in pieces");
  t1->callback([a] { run_table1(a->preset, a->out, a->only, a->verbose, a->device, a->resume); });
});

}  // namespace
}  // namespace tokmix::cli
