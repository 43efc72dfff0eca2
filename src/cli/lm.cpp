// Language modeling from the command line: `tokmix corpus` (build token files), `tokmix generate`
// (stream text from a checkpoint) and `tokmix reproduce lm` (every mixer at equal parameters
// and tokens on a corpus: perplexity, bits per byte, training and decoding speed, cache).
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "tokmix/data/corpus.h"
#include "tokmix/infer/generate.h"
#include "tokmix/mix.h"
#include "tokmix/nn/checkpoint.h"
#include "tokmix/train/trainer.h"

namespace tokmix::cli {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

CommandRegistrar reg_corpus([](CLI::App& app) {
  auto* cmd = app.add_subcommand("corpus", "Build a tokenized corpus (train.bin / val.bin, memory-mapped) from text sources");
  auto o = std::make_shared<data::CorpusOptions>();
  o->sources.clear();
  cmd->add_option("--source", o->sources, "'kjv' (Debian's bible-kjv), text files or folders; repeat or comma-separate")->delimiter(',');
  cmd->add_option("--tokenizer", o->tokenizer, "byte or bpe:N (sentencepiece BPE with N pieces, trained on the train split)");
  cmd->add_option("--out", o->out, "corpus directory")->required();
  cmd->add_option("--val-every", o->val_every, "every n-th 64 KB block of text is validation (20 = 5%)");
  cmd->callback([o] {
    if (o->sources.empty()) o->sources = {"kjv"};
    auto info = data::build_corpus(*o, &std::cerr);
    std::printf("corpus %s: %s tokenizer, vocabulary %lld, train %lld tokens (%lld bytes), val %lld tokens (%lld bytes), %s\n",
                info.dir.c_str(), info.tokenizer["type"].get<std::string>().c_str(), (long long)info.vocab_size,
                (long long)info.train_tokens, (long long)info.train_bytes, (long long)info.val_tokens, (long long)info.val_bytes,
                info.dtype.c_str());
  });
});

// Streams the text of sequence 0 as tokens arrive: a BPE piece may only make sense once the
// next one is known, so the whole continuation is decoded each time and the new suffix printed.
struct TextStream {
  const data::Tokenizer& tok;
  std::vector<int64_t> ids;
  std::string printed;
  void push(int64_t id) {
    ids.push_back(id);
    const std::string s = tok.decode(ids);
    if (s.size() > printed.size() && s.compare(0, printed.size(), printed) == 0) {
      std::fwrite(s.data() + printed.size(), 1, s.size() - printed.size(), stdout);
      std::fflush(stdout);
      printed = s;
    }
  }
  void finish() {
    const std::string s = tok.decode(ids);
    if (s.size() > printed.size() && s.compare(0, printed.size(), printed) == 0)
      std::fwrite(s.data() + printed.size(), 1, s.size() - printed.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
};

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument("");
    } catch (...) {
      throw std::invalid_argument("--ids: '" + item + "' is not an integer token id");
    }
  }
  return ids;
}

CommandRegistrar reg_generate([](CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a checkpoint through prefill and cached decoding");
  struct Args {
    std::string ckpt, prompt, prompts, ids, json, device = "cpu";
    bool has_prompt = false;
    int64_t max_tokens = 200;
    infer::SampleOptions s;
    bool quiet = false, no_graph = false;
  };
  auto a = std::make_shared<Args>();
  a->s.temperature = 0.8;
  cmd->add_option("--checkpoint", a->ckpt, "checkpoint directory (of a corpus-trained model)")->required();
  auto* po = cmd->add_option("--prompt", a->prompt, "prompt text (empty: start from a line break)");
  auto* pf = cmd->add_option("--prompts", a->prompts, "file of prompts, one per line: generated as one batch")->check(CLI::ExistingFile);
  auto* pi = cmd->add_option("--ids", a->ids, "prompt as comma-separated token ids");
  po->excludes(pf)->excludes(pi);
  pf->excludes(pi);
  cmd->add_option("--max-tokens", a->max_tokens, "tokens to generate per prompt");
  cmd->add_option("--temperature", a->s.temperature, "0 = greedy");
  cmd->add_option("--top-k", a->s.top_k, "keep the k most likely tokens (0 = all)");
  cmd->add_option("--top-p", a->s.top_p, "nucleus: keep the smallest set reaching this probability (1 = all)");
  cmd->add_option("--seed", a->s.seed, "sampling seed");
  cmd->add_option("--json", a->json, "write prompts, completions and speed as JSON");
  cmd->add_flag("--quiet", a->quiet, "do not stream; print completions at the end");
  cmd->add_option("--device", a->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_flag("--no-cuda-graph", a->no_graph, "cuda: launch every kernel of each step from the host instead of replaying a CUDA graph");
  cmd->callback([a, po] {
    a->s.cuda_graph = !a->no_graph;
    set_threads();
    a->s.validate();
    auto [model, info] = nn::load_model(a->ckpt);
    if (a->device == "cuda") {
      if (!torch::cuda::is_available()) throw std::invalid_argument("--device cuda: no CUDA device is available to this LibTorch");
      model->to(torch::kCUDA);
    }
    model->eval();
    std::unique_ptr<data::Tokenizer> tok;
    try {
      tok = data::Tokenizer::from_json(info.tokenizer);
    } catch (const std::exception& e) {
      if (a->ids.empty()) throw std::invalid_argument(std::string("checkpoint '") + a->ckpt + "' has no text tokenizer (" + e.what() + "); use --ids");
    }
    std::vector<std::string> texts;
    std::vector<std::vector<int64_t>> prompts;
    if (!a->ids.empty()) {
      prompts.push_back(parse_ids(a->ids));
      if (prompts[0].empty()) throw std::invalid_argument("--ids holds no token ids");
    } else if (!a->prompts.empty()) {
      std::ifstream f(a->prompts, std::ios::binary);
      std::string line;
      while (std::getline(f, line)) texts.push_back(line);
      if (texts.empty()) throw std::invalid_argument("prompts file '" + a->prompts + "' holds no lines");
    } else {
      texts.push_back(a->prompt);
    }
    for (size_t i = 0; i < texts.size(); ++i) {
      // an empty prompt starts where a line of the corpus would
      auto ids = tok->encode(texts[i].empty() ? std::string("\n") : texts[i]);
      if (ids.empty()) ids = tok->encode("\n");
      prompts.push_back(ids);
    }
    const bool stream = !a->quiet && prompts.size() == 1 && tok;
    std::unique_ptr<TextStream> ts;
    if (stream) {
      ts = std::make_unique<TextStream>(TextStream{*tok, {}, {}});
      if (!texts.empty()) std::fwrite(texts[0].data(), 1, texts[0].size(), stdout);
      std::fflush(stdout);
    }
    auto r = infer::generate(*model, prompts, a->max_tokens, a->s, [&](int64_t seq, int64_t id) {
      if (ts && seq == 0) ts->push(id);
    });
    if (ts) ts->finish();
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::string completion = tok ? tok->decode(r.tokens[i]) : std::string();
      if (!stream) {
        if (!texts.empty()) std::printf("=== prompt %zu: %s\n%s%s\n", i, texts[i].c_str(), texts[i].c_str(), completion.c_str());
        else {
          std::printf("=== tokens:");
          for (auto t : r.tokens[i]) std::printf(" %lld", (long long)t);
          std::printf("\n");
        }
      }
      if (r.dropped_tokens[i] > 0)
        std::fprintf(stderr, "note: prompt %zu is longer than the model's context allows with %lld new tokens; its first %lld tokens were dropped\n",
                     i, (long long)a->max_tokens, (long long)r.dropped_tokens[i]);
      nlohmann::json o = {{"tokens", r.tokens[i]}, {"prompt_tokens", r.prompt_tokens[i]}, {"dropped_tokens", r.dropped_tokens[i]}};
      if (!texts.empty()) {
        o["prompt"] = texts[i];
        o["completion"] = data::first_invalid_utf8(completion) < 0 ? completion : std::string("(not UTF-8)");
      }
      out.push_back(o);
    }
    std::fprintf(stderr, "[generate] %zu prompt(s), %lld prompt tokens prefilled in %.3f s; %lld tokens each, decode %.1f tokens/s%s; cache %lld bytes\n",
                 prompts.size(), (long long)r.prompt_tokens[0], r.prefill_seconds, (long long)a->max_tokens, r.decode_tokens_per_s,
                 r.cuda_graph ? " (CUDA graph)" : "", (long long)r.cache_bytes);
    if (!a->json.empty())
      std::ofstream(a->json) << nlohmann::json{{"checkpoint", a->ckpt},
                                               {"results", out},
                                               {"prefill_seconds", r.prefill_seconds},
                                               {"decode_tokens_per_s", r.decode_tokens_per_s},
                                               {"cuda_graph", r.cuda_graph},
                                               {"cache_bytes", r.cache_bytes}}
                                    .dump(2)
                             << "\n";
  });
});

// --- reproduce lm -----------------------------------------------------------------------------

struct LmPreset {
  nlohmann::json corpus;    // corpus options object
  nlohmann::json model;     // without the mixer type
  int64_t context, batch, steps, eval_every, eval_batches;
  double lr;
  int64_t decode_context;   // decode tokens/s measured at this context (table)
  std::vector<int64_t> sweep_contexts;
  int64_t decode_steps;
  std::string device;
  bool bf16;
};

LmPreset lm_preset(const std::string& name) {
  if (name == "quick") {
    // 2 CPU cores, about 5 minutes for 7 mixers: a byte-level KJV, context 512 as in the paper
    return {{{"sources", {"kjv"}}, {"tokenizer", "byte"}, {"out", "data/kjv-byte"}},
            {{"d_model", 96}, {"n_layers", 2}, {"positions", "none"}, {"mlp", true}, {"mixer", {{"heads", 4}, {"conv", 4}}}},
            512, 8, 260, 65, 4, 3e-3, 4096, {512, 2048, 8192, 32768}, 32, "cpu", false};
  }
  if (name == "gpu") {
    // one H200: ~30M-parameter models, BPE 8192, context 512
    // the KJV holds ~0.93M BPE tokens: 400 steps of 32 x 512 tokens is about 7 epochs
    return {{{"sources", {"kjv"}}, {"tokenizer", "bpe:8192"}, {"out", "data/kjv-bpe8192"}},
            {{"d_model", 512}, {"n_layers", 8}, {"positions", "none"}, {"mlp", true}, {"mixer", {{"heads", 8}, {"conv", 4}}}},
            512, 32, 400, 50, 8, 1e-3, 4096, {512, 4096, 32768}, 64, "cuda", true};
  }
  throw std::invalid_argument("preset '" + name + "' is not known; accepted: quick, gpu");
}

struct LmMixer {
  std::string label;
  nlohmann::json mixer;
};

std::vector<LmMixer> lm_mixers() {
  return {{"attention", {{"type", "attention"}}},       {"first-order", {{"type", "first-order"}}},
          {"k-th order (k=4)", {{"type", "recurrence"}, {"order", 4}}}, {"pow2", {{"type", "pow2"}}},
          {"sq1", {{"type", "sq1"}}},                   {"pow2, cache-efficient", {{"type", "pow2-lattice"}}},
          {"sq1, cache-efficient", {{"type", "sq1-lattice"}}}};
}

// Decode speed of a model of this config at a context (batch 1, random weights: speed does not
// depend on them), eager and, on CUDA, replayed from CUDA graphs.
infer::DecodeSpeed decode_speed(nlohmann::json model, int64_t vocab, int64_t context, int64_t steps, const std::string& device) {
  model["vocab_size"] = vocab;
  model["max_context"] = context + steps + 8;  // prompt, warm-up and timed steps
  auto cfg = nn::ModelConfig::from_json(model, "decode bench");
  torch::manual_seed(1);
  nn::LanguageModel m(cfg);
  m->to(torch::Device(device == "cuda" ? torch::kCUDA : torch::kCPU));
  m->eval();
  return infer::measure_decode(*m, context, steps);
}

void write_curves_plot(const fs::path& dir, const std::vector<LmMixer>& ms, const std::vector<std::string>& runs) {
  std::ofstream g(dir / "lm.gp");
  g << "set terminal pngcairo size 1000,560 noenhanced\nset output '" << (dir / "lm-curves.png").string() << "'\n"
    << "set datafile separator ','\nset key top right\nset grid\nset xlabel 'step'\nset ylabel 'validation bits per byte'\n"
    << "set title 'Language modeling: validation curves at equal parameters and tokens'\nplot ";
  for (size_t i = 0; i < ms.size(); ++i)
    g << (i ? ", " : "") << "'" << (fs::path(runs[i]) / "metrics.csv").string() << "' using 1:($8 > 0 ? $8 : 1/0) with linespoints title '"
      << ms[i].label << "'";
  g << "\n";
  g.close();
  if (std::system(("gnuplot '" + (dir / "lm.gp").string() + "' 2>/dev/null").c_str()) != 0)
    std::printf("note: gnuplot is not available; wrote the script %s\n", (dir / "lm.gp").c_str());
  else
    std::printf("validation curves: %s\n", (dir / "lm-curves.png").c_str());
}

void run_lm(const std::string& preset_name, const std::string& out, const std::vector<std::string>& only, int64_t steps_override,
            const std::string& device_override, bool verbose) {
  LmPreset p = lm_preset(preset_name);
  if (steps_override > 0) p.steps = steps_override;
  if (!device_override.empty()) p.device = device_override;
  auto ms = lm_mixers();
  if (!only.empty()) {
    std::vector<LmMixer> keep;
    for (auto& m : ms)
      if (std::find(only.begin(), only.end(), m.mixer["type"].get<std::string>()) != only.end()) keep.push_back(m);
    if (keep.empty()) throw std::invalid_argument("--only names no mixer of this table (attention, first-order, recurrence, pow2, sq1, pow2-lattice, sq1-lattice)");
    ms = keep;
  }
  const fs::path dir(out);
  fs::create_directories(dir);
  auto corpus = data::build_corpus(
      [&] {
        data::CorpusOptions co;
        co.sources = p.corpus["sources"].get<std::vector<std::string>>();
        co.tokenizer = p.corpus["tokenizer"];
        co.out = p.corpus["out"];
        return co;
      }(),
      &std::cerr);
  nlohmann::json settings = {{"preset", preset_name}, {"corpus", p.corpus},        {"model", p.model},         {"context", p.context},
                             {"batch_size", p.batch}, {"steps", p.steps},          {"lr", p.lr},               {"eval_every", p.eval_every},
                             {"eval_windows", p.eval_batches * p.batch},          {"decode_context", p.decode_context},
                             {"device", p.device},    {"bf16", p.bf16},            {"threads", torch::get_num_threads()},
                             {"tokens_per_run", p.steps * p.batch * p.context}};
  std::ofstream(dir / "settings.json") << settings.dump(2) << "\n";
  struct Row {
    std::string label;
    int64_t params = 0;
    train::TrainResult r;
    infer::DecodeSpeed dec;
  };
  std::vector<Row> rows;
  std::vector<std::string> run_dirs;
  auto t0 = Clock::now();
  for (size_t i = 0; i < ms.size(); ++i) {
    nlohmann::json model = p.model;
    model["mixer"].update(ms[i].mixer);
    model["max_context"] = p.context;
    const std::string run = (dir / ms[i].mixer["type"].get<std::string>()).string();
    nlohmann::json tj = {{"model", model},          {"corpus", p.corpus["out"]}, {"context", p.context},
                         {"batch_size", p.batch},   {"steps", p.steps},          {"lr", p.lr},
                         {"eval_every", p.eval_every}, {"eval_batches", p.eval_batches}, {"log_every", std::max<int64_t>(1, p.steps / 20)},
                         {"device", p.device},      {"bf16", p.bf16},            {"out", run}};
    const auto o = train::TrainOptions::from_json(tj, "reproduce lm");
    Row row;
    row.label = ms[i].label;
    std::fprintf(stderr, "[%zu/%zu] %s: training %lld steps on %s\n", i + 1, ms.size(), ms[i].label.c_str(), (long long)p.steps, p.device.c_str());
    row.r = train::train(o, false, verbose ? &std::cerr : nullptr);
    {
      std::ifstream rf(fs::path(run) / "result.json");
      row.params = nlohmann::json::parse(rf).at("parameters").get<int64_t>();
    }
    std::fprintf(stderr, "[%zu/%zu] %s: decode speed at context %lld\n", i + 1, ms.size(), ms[i].label.c_str(), (long long)p.decode_context);
    row.dec = decode_speed(model, corpus.vocab_size, p.decode_context, p.decode_steps, p.device);
    rows.push_back(row);
    run_dirs.push_back(run);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::fprintf(stderr, "[%zu/%zu] %-24s val ppl %.3f  bpb %.4f  train %.0f tok/s  decode@%lld %.1f tok/s  elapsed %.0fs, ETA %.0fs\n", i + 1,
                 ms.size(), ms[i].label.c_str(), row.r.eval.perplexity, row.r.eval.bits_per_byte, row.r.tokens_per_s,
                 (long long)p.decode_context, row.dec.tokens_per_s, secs, secs / double(i + 1) * double(ms.size() - i - 1));
  }
  // decode speed against context (random weights of each config)
  std::vector<std::vector<infer::DecodeSpeed>> sweep(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    nlohmann::json model = p.model;
    model["mixer"].update(ms[i].mixer);
    for (int64_t c : p.sweep_contexts) {
      sweep[i].push_back(decode_speed(model, corpus.vocab_size, c, p.decode_steps, p.device));
      std::fprintf(stderr, "  decode %-24s context %7lld: %8.1f tok/s (CUDA graph: %.1f), cache %lld bytes\n", ms[i].label.c_str(),
                   (long long)c, sweep[i].back().tokens_per_s, sweep[i].back().graph_tokens_per_s, (long long)sweep[i].back().cache_bytes);
    }
  }

  const double att_ppl = rows.empty() || ms[0].mixer["type"] != "attention" ? 0 : rows[0].r.eval.perplexity;
  std::printf("\nLanguage modeling (%s preset): %s corpus %s, context %lld, %lld tokens per run\n", preset_name.c_str(),
              corpus.tokenizer["type"].get<std::string>().c_str(), corpus.dir.c_str(), (long long)p.context,
              (long long)(p.steps * p.batch * p.context));
  std::printf("%-24s %10s %9s %8s %9s %12s %14s %14s\n", "mixer", "params", "val ppl", "vs att", "val bpb", "train tok/s",
              ("decode@" + std::to_string(p.decode_context) + " tok/s").c_str(), "cache B/seq");
  nlohmann::json jrows = nlohmann::json::array();
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    const double rel = att_ppl > 0 ? r.r.eval.perplexity / att_ppl : 0;
    std::printf("%-24s %10lld %9.3f %7.1f%% %9.4f %12.0f %14.1f %14lld\n", r.label.c_str(), (long long)r.params, r.r.eval.perplexity,
                att_ppl > 0 ? 100 * (rel - 1) : 0.0, r.r.eval.bits_per_byte, r.r.tokens_per_s, r.dec.tokens_per_s,
                (long long)r.dec.cache_bytes);
    nlohmann::json dj = nlohmann::json::array();
    for (size_t k = 0; k < p.sweep_contexts.size(); ++k)
      dj.push_back({{"context", p.sweep_contexts[k]},
                    {"tokens_per_s", sweep[i][k].tokens_per_s},
                    {"graph_tokens_per_s", sweep[i][k].graph_tokens_per_s},
                    {"cache_bytes", sweep[i][k].cache_bytes}});
    jrows.push_back({{"mixer", ms[i].mixer},          {"label", r.label},
                     {"parameters", r.params},        {"val_loss", r.r.eval.loss},
                     {"val_perplexity", r.r.eval.perplexity}, {"val_bits_per_byte", r.r.eval.bits_per_byte},
                     {"train_tokens_per_s", r.r.tokens_per_s}, {"decode_tokens_per_s", r.dec.tokens_per_s},
                     {"decode_graph_tokens_per_s", r.dec.graph_tokens_per_s},
                     {"decode_context", p.decode_context}, {"cache_bytes", r.dec.cache_bytes},
                     {"decode_sweep", dj},            {"run", run_dirs[i]}});
  }
  const bool graphs = !sweep.empty() && !sweep[0].empty() && sweep[0][0].graph_tokens_per_s > 0;
  std::printf("\nDecode tokens/s (batch 1) against context%s, and cache bytes per sequence\n%-24s",
              graphs ? " (eager / replayed from a CUDA graph)" : "", "mixer");
  for (int64_t c : p.sweep_contexts) std::printf(graphs ? " %24s" : " %16s", ("ctx " + std::to_string(c)).c_str());
  std::printf("\n");
  for (size_t i = 0; i < ms.size(); ++i) {
    std::printf("%-24s", ms[i].label.c_str());
    for (auto& d : sweep[i]) {
      if (graphs) std::printf(" %7.1f / %7.1f %6.0fKB", d.tokens_per_s, d.graph_tokens_per_s, d.cache_bytes / 1024.0);
      else std::printf(" %7.1f %6.0fKB", d.tokens_per_s, d.cache_bytes / 1024.0);
    }
    std::printf("\n");
  }
  std::ofstream(dir / "results.json") << nlohmann::json{{"settings", settings}, {"rows", jrows}}.dump(2) << "\n";
  std::printf("results: %s\n", (dir / "results.json").c_str());
  write_curves_plot(dir, ms, run_dirs);
}

CommandRegistrar reg_lm([](CLI::App& app) {
  auto* lm = reproduce_command(app)->add_subcommand("lm", "Language modeling: every mixer at equal parameters and tokens on a corpus");
  struct Args {
    std::string preset = "quick", out = "out/lm", device;
    std::vector<std::string> only;
    int64_t steps = 0;
    bool verbose = false;
  };
  auto a = std::make_shared<Args>();
  lm->add_option("--preset", a->preset, "quick (2 CPU cores, ~5 min) or gpu (one H200, ~30M-parameter models)")->check(CLI::IsMember({"quick", "gpu"}));
  lm->add_option("--out", a->out, "output directory");
  lm->add_option("--only", a->only, "mixer types to run")->delimiter(',');
  lm->add_option("--steps", a->steps, "override the training steps");
  lm->add_option("--device", a->device, "override the device (cpu, cuda)")->check(CLI::IsMember({"cpu", "cuda"}));
  lm->add_flag("--verbose", a->verbose, "progress of every training run");
  lm->callback([a] { run_lm(a->preset, a->out, a->only, a->steps, a->device, a->verbose); });
});

}  // namespace
}  // namespace tokmix::cli
