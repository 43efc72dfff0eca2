// `tokmix train`, `tokmix eval`, `tokmix reproduce table1`.
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "tokmix/mix.h"
#include "tokmix/nn/checkpoint.h"
#include "tokmix/train/trainer.h"

namespace tokmix::cli {
namespace {
namespace fs = std::filesystem;

CommandRegistrar reg_train([](CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train a model on a synthetic task or a JSONL dataset (config: JSON, see configs/train)");
  struct Args {
    std::string config, out, task, data, device;
    std::vector<double> lrs;
    int64_t steps = 0, batch = 0;
    int64_t seed = -1;
    bool resume = false, distributed = false;
    double dist_timeout = 0, bucket_mb = 0;
    int threads = -1;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--config", a->config, "train config (JSON)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--lr", a->lrs, "learning rate(s); several: a sweep keeping the best")->delimiter(',')->check(CLI::Range(1e-12, 10.0));
  cmd->add_option("--steps", a->steps, "override steps");
  cmd->add_option("--batch-size", a->batch, "override batch size");
  cmd->add_option("--out", a->out, "override the run directory");
  cmd->add_option("--task", a->task, "override the task spec");
  cmd->add_option("--data", a->data, "override the JSONL training file");
  cmd->add_option("--seed", a->seed, "override the seed");
  cmd->add_option("--device", a->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_flag("--resume", a->resume, "continue from <out>/checkpoint when it exists");
  cmd->add_option("--threads", a->threads, "override CPU threads (0: all cores, or cores / local processes when distributed)")
      ->check(CLI::Range(0, 4096));
  cmd->add_flag("--distributed", a->distributed,
                "data parallel, one process per device (start with `tokmix launch --nproc N -- tokmix train ...`); "
                "--batch-size is per process. See docs/distributed.md");
  cmd->add_option("--dist-timeout", a->dist_timeout, "seconds a rank waits for the others before stopping with an error (default 300)")
      ->check(CLI::Range(0.1, 1e6));
  cmd->add_option("--bucket-mb", a->bucket_mb, "gradient all-reduce bucket size in MB (default 25)")->check(CLI::Range(1e-6, 1e4));
  cmd->callback([a] {
    auto o = train::TrainOptions::load(a->config);
    if (a->steps > 0) o.steps = a->steps;
    if (a->batch > 0) o.batch_size = a->batch;
    if (!a->out.empty()) o.out = a->out;
    if (!a->task.empty()) {
      o.task = a->task;
      o.data.clear();
    }
    if (!a->data.empty()) {
      o.data = a->data;
      o.task.clear();
    }
    if (a->seed >= 0) o.seed = uint64_t(a->seed);
    if (!a->device.empty()) o.device = a->device;
    if (a->threads >= 0) o.threads = a->threads;
    if (a->distributed) o.distributed = true;
    if (a->dist_timeout > 0) o.dist_timeout = a->dist_timeout;
    if (a->bucket_mb > 0) o.bucket_mb = a->bucket_mb;
    if (o.out.empty()) o.out = "runs/" + fs::path(a->config).stem().string();
    auto r = train::train_sweep(o, a->lrs, a->resume, &std::cerr);
    if (r.rank != 0) return;  // rank 0 reports for the job
    std::printf("trained %lld steps in %.1f s (%.0f tokens/s%s): final loss %.4f, eval loss %.4f, eval accuracy %.2f%%%s\nrun: %s\n",
                (long long)r.steps, r.seconds, r.tokens_per_s,
                r.world_size > 1 ? (", " + std::to_string(r.world_size) + " processes").c_str() : "", r.final_loss, r.eval.loss, 100 * r.eval.accuracy,
                r.reached_target ? " (target reached)" : "", r.out.c_str());
  });
});

CommandRegistrar reg_eval([](CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Evaluate a checkpoint on a task or a JSONL file: accuracy over supervised positions");
  struct Args {
    std::string ckpt, data, task, json, corpus;
    int64_t batches = 16, batch = 32, seed = 0, context = 0, windows = 0;
    bool by_distance = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--checkpoint", a->ckpt, "checkpoint directory")->required();
  auto* d = cmd->add_option("--data", a->data, "JSONL file of {input, labels}");
  auto* t = cmd->add_option("--task", a->task, "synthetic task spec");
  auto* c = cmd->add_option("--corpus", a->corpus, "corpus directory: perplexity and bits per byte on its validation split");
  d->excludes(t)->excludes(c);
  t->excludes(c);
  cmd->add_option("--context", a->context, "corpus windows: tokens per window (default: the model's max_context)");
  cmd->add_option("--windows", a->windows, "corpus: at most this many validation windows (0 = all)");
  cmd->add_option("--batches", a->batches, "batches of the task's held-out stream");
  cmd->add_option("--batch-size", a->batch, "batch size");
  cmd->add_option("--seed", a->seed, "seed of the held-out stream");
  cmd->add_option("--json", a->json, "write the result as JSON");
  cmd->add_flag("--by-distance", a->by_distance,
                "task or data: accuracy by how far back the answer sits in the input (buckets [1,2), [2,4), ...)");
  cmd->callback([a] {
    if (int(!a->data.empty()) + int(!a->task.empty()) + int(!a->corpus.empty()) != 1)
      throw std::invalid_argument("give exactly one of --data, --task or --corpus");
    if (a->by_distance && !a->corpus.empty()) throw std::invalid_argument("--by-distance takes --task or --data, not --corpus");
    set_threads();
    auto [model, info] = nn::load_model(a->ckpt);
    model->eval();
    train::EvalResult r;
    train::DistanceResult dr;
    if (!a->corpus.empty()) {
      auto c = data::read_corpus_info(a->corpus);
      if (c.vocab_size > info.config.vocab_size || c.tokenizer != info.tokenizer)
        throw std::invalid_argument("corpus '" + a->corpus + "' was not tokenized with this checkpoint's tokenizer (vocabulary " +
                                    std::to_string(c.vocab_size) + " vs " + std::to_string(info.config.vocab_size) + ")");
      const int64_t ctx = a->context > 0 ? a->context : info.config.max_context;
      if (ctx > info.config.max_context)
        throw std::invalid_argument("--context " + std::to_string(ctx) + " exceeds the model's max_context " +
                                    std::to_string(info.config.max_context));
      r = train::evaluate(*model, c, ctx, a->batch, a->windows);
      std::printf("perplexity %.4f, bits per byte %.4f, loss %.4f (%lld tokens)\n", r.perplexity, r.bits_per_byte, r.loss,
                  (long long)r.supervised);
    } else if (!a->task.empty()) {
      auto spec = data::parse_task_spec(a->task);
      if (data::vocab_size(spec) > info.config.vocab_size || spec.T > info.config.max_context)
        throw std::invalid_argument("task '" + a->task + "' needs vocabulary " + std::to_string(data::vocab_size(spec)) + " and context " +
                                    std::to_string(spec.T) + "; the model has " + std::to_string(info.config.vocab_size) + " and " +
                                    std::to_string(info.config.max_context));
      r = train::evaluate(*model, spec, a->batch, a->batches, uint64_t(a->seed), 0, 1, a->by_distance ? &dr : nullptr);
    } else {
      r = train::evaluate(*model, data::read_jsonl(a->data), a->batch, 0, 1, a->by_distance ? &dr : nullptr);
    }
    if (a->corpus.empty())
      std::printf("accuracy %.4f (%lld supervised positions), loss %.4f\n", r.accuracy, (long long)r.supervised, r.loss);
    nlohmann::json by_distance;
    if (a->by_distance) {
      std::printf("%-16s %10s %9s\n", "answer distance", "positions", "accuracy");
      by_distance = nlohmann::json::array();
      auto row = [&](const train::DistanceBucket& b, const std::string& label) {
        const double acc = b.supervised ? double(b.correct) / double(b.supervised) : 0.0;
        std::printf("%-16s %10lld %8.1f%%\n", label.c_str(), (long long)b.supervised, 100 * acc);
        by_distance.push_back({{"lo", b.lo}, {"hi", b.hi}, {"supervised", b.supervised}, {"accuracy", acc}});
      };
      for (const auto& [lo, b] : dr.buckets) row(b, "[" + std::to_string(lo) + ", " + std::to_string(b.hi) + ")");
      if (dr.absent.supervised) row(dr.absent, "not in input");
    }
    if (!a->json.empty()) {
      nlohmann::json j = {{"checkpoint", a->ckpt}, {"accuracy", r.accuracy}, {"loss", r.loss}, {"supervised", r.supervised},
                          {"step", info.step}};
      if (a->by_distance) j["by_distance"] = by_distance;
      if (!a->task.empty()) j["task"] = a->task;
      else if (!a->data.empty()) j["data"] = a->data;
      else {
        j["corpus"] = a->corpus;
        j["perplexity"] = r.perplexity;
        j["bits_per_byte"] = r.bits_per_byte;
      }
      std::ofstream(a->json) << j.dump(2) << "\n";
    }
  });
});

}  // namespace
}  // namespace tokmix::cli
