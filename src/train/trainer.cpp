#include "tokmix/train/trainer.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include "tokmix/mix.h"
#include "tokmix/nn/checkpoint.h"
#include "tokmix/train/distributed.h"

// The training step as device work (CudaStep) uses LibTorch 2's multi-tensor AdamW; a CUDA build
// against an older LibTorch trains with the eager step.
#if defined(TOKMIX_WITH_CUDA) && TORCH_VERSION_MAJOR >= 2
#define TOKMIX_CUDA_STEP 1
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "tokmix/cuda_capture.h"
#endif

namespace tokmix::train {
namespace fs = std::filesystem;
using torch::Tensor;

namespace {

[[noreturn]] void fail(const std::string& origin, const std::string& key, const std::string& what) {
  throw std::invalid_argument(origin + ": '" + key + "' " + what);
}

const std::vector<std::string> kKeys = {"comment",     "model",        "task",         "data",          "eval_data",
                                        "batch_size",  "steps",        "lr",           "weight_decay",  "warmup_steps",
                                        "min_lr_ratio", "grad_clip",   "eval_every",   "eval_batches",  "target_accuracy",
                                        "seed",        "out",          "checkpoint_every", "log_every", "device",
                                        "bf16",        "threads",      "distributed",  "dist_timeout", "bucket_mb",
                                        "corpus",      "context",      "cuda_graph"};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

int64_t get_int(const nlohmann::json& j, const std::string& key, int64_t lo, int64_t hi, const std::string& origin) {
  const auto& v = j.at(key);
  if (!v.is_number_integer()) fail(origin, key, "must be an integer, got " + v.dump());
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) fail(origin, key, "= " + std::to_string(x) + " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}
double get_num(const nlohmann::json& j, const std::string& key, double lo, double hi, const std::string& origin) {
  const auto& v = j.at(key);
  if (!v.is_number()) fail(origin, key, "must be a number, got " + v.dump());
  double x = v.get<double>();
  if (!(x >= lo && x <= hi)) {
    std::ostringstream os;
    os << "= " << x << " is out of range [" << lo << ", " << hi << "]";
    fail(origin, key, os.str());
  }
  return x;
}
std::string get_str(const nlohmann::json& j, const std::string& key, const std::string& origin) {
  const auto& v = j.at(key);
  if (!v.is_string()) fail(origin, key, "must be a string, got " + v.dump());
  return v.get<std::string>();
}

// Windows of T + 1 corpus tokens [B, T + 1] -> inputs tokens [0, T), labels tokens [1, T + 1).
data::Batch window_batch(const Tensor& win) {
  using torch::indexing::Slice;
  const int64_t T = win.size(1) - 1;
  return {win.index({Slice(), Slice(0, T)}).contiguous(), win.index({Slice(), Slice(1, T + 1)}).contiguous()};
}

// Where the batches of a run come from.
struct Source {
  bool synthetic = true;
  data::TaskSpec task;
  data::Dataset dataset;
  std::shared_ptr<data::TokenFile> tokens;  // corpus runs: the training split
  int64_t context = 0;
  std::map<int64_t, std::vector<int64_t>> perms;  // epoch -> row order

  data::Batch get(int64_t step, int64_t B, uint64_t seed) {
    if (tokens) {
      // row r of step s: a window at a position hashed from (seed, s, r)
      Tensor win = torch::empty({B, context + 1}, torch::kInt64);
      for (int64_t r = 0; r < B; ++r)
        tokens->read(data::train_window_start(seed, step, r, tokens->size(), context), context + 1, win[r].data_ptr<int64_t>());
      return window_batch(win);
    }
    if (synthetic) return data::make_batch(task, B, seed, step);
    const int64_t n = dataset.size();
    std::vector<int64_t> rows;
    for (int64_t r = 0; r < B; ++r) {
      const int64_t flat = step * B + r, epoch = flat / n;
      auto it = perms.find(epoch);
      if (it == perms.end()) {
        std::vector<int64_t> p(n);
        for (int64_t i = 0; i < n; ++i) p[i] = i;
        std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + uint64_t(epoch));
        std::shuffle(p.begin(), p.end(), rng);
        if (perms.size() > 4) perms.erase(perms.begin());
        it = perms.emplace(epoch, std::move(p)).first;
      }
      rows.push_back(it->second[flat % n]);
    }
    return dataset.batch(rows);
  }
};

int64_t corpus_context(const TrainOptions& o) {
  if (o.context > 0) return o.context;
  if (o.model.is_object() && o.model.contains("max_context") && o.model["max_context"].is_number_integer())
    return o.model["max_context"].get<int64_t>();
  return 512;
}

Source make_source(const TrainOptions& o, const data::CorpusInfo* corpus) {
  Source s;
  if (corpus) {
    s.synthetic = false;
    s.context = corpus_context(o);
    s.tokens = std::make_shared<data::TokenFile>(corpus->path("train"), corpus->dtype, corpus->vocab_size);
    if (s.tokens->size() <= s.context)
      throw std::invalid_argument("corpus '" + corpus->dir + "': the training split has " + std::to_string(s.tokens->size()) +
                                  " tokens, fewer than one window of context " + std::to_string(s.context) + " + 1");
  } else if (!o.task.empty()) {
    s.task = data::parse_task_spec(o.task);
  } else {
    s.synthetic = false;
    s.dataset = data::read_jsonl(o.data);
    if (s.dataset.size() == 0) throw std::invalid_argument("data file '" + o.data + "' holds no sequences");
  }
  return s;
}

struct Scored {
  double loss_sum = 0;
  int64_t correct = 0, supervised = 0;
};

// Positions that carry a label, when they are under half of all: computing logits there alone
// gives the same loss and accuracy (the head is per position) for a fraction of the work.
Tensor sparse_supervision(const Tensor& flat_labels) {
  Tensor at = (flat_labels != data::kIgnore).nonzero().squeeze(1);  // one host sync, as the count needs
  if (at.numel() == 0 || 2 * at.numel() >= flat_labels.numel()) return Tensor();
  return at;
}

// bf16 autocast on CUDA, across the LibTorch versions the project builds against.
void cuda_autocast(bool on) {
#if TORCH_VERSION_MAJOR >= 2
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, on);
#else
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
  at::autocast::set_enabled(on);
#endif
  if (!on) at::autocast::clear_cache();
}

// Logits [n, V] in float32 at the supervised positions `at` (every position when undefined),
// the forward under bf16 autocast when asked. checked = false: the caller checked the batch's
// CPU copy, and nothing here may read the device (a step being captured into a CUDA graph).
Tensor supervised_logits(nn::LanguageModelImpl& model, const Tensor& input, const Tensor& at, bool autocast, bool checked = true) {
  if (autocast) cuda_autocast(true);
  Tensor logits = checked ? (at.defined() ? model.forward_at(input, at) : model.forward(input)) : model.forward_unchecked(input, at);
  if (autocast) cuda_autocast(false);
  return logits.to(torch::kFloat32).reshape({-1, logits.size(-1)});
}

Tensor token_loss(const Tensor& flat_logits, const Tensor& labels, torch::nn::functional::CrossEntropyFuncOptions::reduction_t red = torch::kMean) {
  return torch::nn::functional::cross_entropy(flat_logits, labels,
                                              torch::nn::functional::CrossEntropyFuncOptions().ignore_index(data::kIgnore).reduction(red));
}

}  // namespace

int64_t recall_distance(const int64_t* input, int64_t t, int64_t label) {
  for (int64_t p = t; p >= 0; --p)
    if (input[p] == label) return t - p;
  return -1;
}

namespace {

// Tallies a batch's predictions (pred[n] at flat position where[n]) by recall distance.
void tally_by_distance(const data::Batch& b, const Tensor& where, const Tensor& pred, DistanceResult& r) {
  const Tensor input = b.input.to(torch::kCPU).contiguous(), lab = b.labels.to(torch::kCPU).contiguous().reshape({-1});
  const Tensor w = where.to(torch::kCPU).contiguous(), pr = pred.to(torch::kCPU).contiguous();
  const int64_t T = input.size(1);
  const int64_t *in = input.data_ptr<int64_t>(), *y = lab.data_ptr<int64_t>(), *wp = w.data_ptr<int64_t>(), *pp = pr.data_ptr<int64_t>();
  for (int64_t n = 0; n < w.size(0); ++n) {
    const int64_t idx = wp[n];
    if (y[idx] == data::kIgnore) continue;
    const int64_t d = recall_distance(in + (idx / T) * T, idx % T, y[idx]);
    DistanceBucket* bk = &r.absent;
    if (d >= 0) {
      int64_t lo = d == 0 ? 0 : 1;
      while (lo && lo * 2 <= d) lo *= 2;
      bk = &r.buckets[lo];
      bk->lo = lo;
      bk->hi = lo == 0 ? 1 : 2 * lo;
    }
    ++bk->supervised;
    bk->correct += pp[n] == y[idx] ? 1 : 0;
  }
}

Scored score(nn::LanguageModelImpl& model, const data::Batch& b, torch::Device dev, DistanceResult* by_distance = nullptr) {
  torch::NoGradGuard ng;
  Tensor input = b.input.to(dev), lab = b.labels.to(dev).reshape({-1});
  Tensor at = sparse_supervision(lab);
  Tensor flat = supervised_logits(model, input, at, false);
  if (at.defined()) lab = lab.index_select(0, at);
  Scored s;
  s.loss_sum = token_loss(flat, lab, torch::kSum).item<double>();
  check_finite_pending();  // deferred reports of the mixers (the GPU is idle after item())
  Tensor mask = lab != data::kIgnore;
  s.supervised = mask.sum().item<int64_t>();
  const Tensor pred = flat.argmax(-1);
  s.correct = ((pred == lab) & mask).sum().item<int64_t>();
  if (by_distance) tally_by_distance(b, at.defined() ? at : torch::arange(lab.numel(), torch::kInt64), pred, *by_distance);
  return s;
}

EvalResult finish(const Scored& s) {
  EvalResult r;
  r.supervised = s.supervised;
  r.loss = s.supervised ? s.loss_sum / double(s.supervised) : 0;
  r.accuracy = s.supervised ? double(s.correct) / double(s.supervised) : 0;
  return r;
}

// A non-finite loss or gradient norm stops the run before the update reaches the weights.
void require_finite_loss(double lv, int64_t step) {
  if (!std::isfinite(lv))
    throw std::runtime_error("training loss is " + std::to_string(lv) + " at step " + std::to_string(step) +
                             "; stopping (the last checkpoint is intact). Lower the learning rate or enable grad_clip.");
}
void require_finite_norm(double gnorm, int64_t step) {
  if (!std::isfinite(gnorm))
    throw std::runtime_error("gradient norm is " + std::to_string(gnorm) + " at step " + std::to_string(step) +
                             "; stopping before the update (the last checkpoint is intact)");
}

double lr_at(const TrainOptions& o, int64_t step) {
  const int64_t warm = o.warmup_steps >= 0 ? o.warmup_steps : std::max<int64_t>(1, o.steps / 20);
  if (step < warm) return o.lr * double(step + 1) / double(warm);
  const double prog = o.steps > warm ? double(step - warm) / double(o.steps - warm) : 1.0;
  const double lo = o.lr * o.min_lr_ratio;
  return lo + (o.lr - lo) * 0.5 * (1 + std::cos(M_PI * std::min(1.0, prog)));
}

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = int64_t(s + 0.5);
  std::ostringstream os;
  if (t >= 3600) os << t / 3600 << ":" << std::setw(2) << std::setfill('0') << (t / 60) % 60 << ":" << std::setw(2) << t % 60;
  else os << t / 60 << ":" << std::setw(2) << std::setfill('0') << t % 60;
  return os.str();
}

std::string si(double v) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1);
  if (v >= 1e6) os << v / 1e6 << "M";
  else if (v >= 1e3) os << v / 1e3 << "K";
  else os << v;
  return os.str();
}

}  // namespace

TrainOptions TrainOptions::from_json(const nlohmann::json& j, const std::string& origin) {
  if (!j.is_object()) throw std::invalid_argument(origin + ": expected a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(kKeys.begin(), kKeys.end(), it.key()) == kKeys.end())
      fail(origin, it.key(), "is not a known key; accepted: " + join(kKeys));
  TrainOptions o;
  if (!j.contains("model")) fail(origin, "model", "is required (a model config object or the path of one)");
  if (j["model"].is_string()) {
    std::string path = j["model"].get<std::string>();
    std::ifstream f(path);
    if (!f && fs::path(origin).has_parent_path()) f.open(fs::path(origin).parent_path() / path);
    if (!f) fail(origin, "model", "names '" + path + "', which cannot be read");
    try {
      o.model = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      fail(origin, "model", "file '" + path + "' is not valid JSON: " + e.what());
    }
  } else if (j["model"].is_object()) {
    o.model = j["model"];
  } else {
    fail(origin, "model", "must be an object or a path");
  }
  if (j.contains("task")) o.task = get_str(j, "task", origin);
  if (j.contains("data")) o.data = get_str(j, "data", origin);
  if (j.contains("eval_data")) o.eval_data = get_str(j, "eval_data", origin);
  if (j.contains("corpus")) {
    o.corpus = j["corpus"];
    if (o.corpus.is_string()) {
      if (o.corpus.get<std::string>().empty()) fail(origin, "corpus", "is an empty path");
    } else if (o.corpus.is_object()) {
      static const std::vector<std::string> ck = {"sources", "tokenizer", "out", "val_every"};
      for (auto it = o.corpus.begin(); it != o.corpus.end(); ++it)
        if (std::find(ck.begin(), ck.end(), it.key()) == ck.end())
          fail(origin, "corpus." + it.key(), "is not a known key; accepted: " + join(ck));
      if (!o.corpus.contains("out") || !o.corpus["out"].is_string()) fail(origin, "corpus.out", "is required (the corpus directory)");
      if (o.corpus.contains("sources") && !(o.corpus["sources"].is_array() && !o.corpus["sources"].empty()))
        fail(origin, "corpus.sources", "must be a non-empty list of 'kjv', files or folders");
      if (o.corpus.contains("tokenizer")) {
        std::string why;
        if (!o.corpus["tokenizer"].is_string() || !data::Tokenizer::spec_valid(o.corpus["tokenizer"].get<std::string>(), &why))
          fail(origin, "corpus.tokenizer", why.empty() ? "must be a string: byte or bpe:N" : why);
      }
      if (o.corpus.contains("val_every")) get_int(o.corpus, "val_every", 2, 1 << 20, origin + ": corpus");
    } else {
      fail(origin, "corpus", "must be a corpus directory or an object {sources, tokenizer, out, val_every}");
    }
  }
  if (j.contains("context")) o.context = get_int(j, "context", 1, int64_t(1) << 24, origin);
  if (int(!o.task.empty()) + int(!o.data.empty()) + int(!o.corpus.is_null()) != 1)
    fail(origin, "task", "or 'data' or 'corpus': give exactly one of them");
  if (!o.task.empty()) {
    try {
      data::parse_task_spec(o.task);
    } catch (const std::exception& e) {
      fail(origin, "task", std::string("is not valid: ") + e.what());
    }
  }
  if (j.contains("batch_size")) o.batch_size = get_int(j, "batch_size", 1, 1 << 20, origin);
  if (j.contains("steps")) o.steps = get_int(j, "steps", 1, int64_t(1) << 40, origin);
  if (j.contains("lr")) o.lr = get_num(j, "lr", 1e-12, 10, origin);
  if (j.contains("weight_decay")) o.weight_decay = get_num(j, "weight_decay", 0, 10, origin);
  if (j.contains("warmup_steps")) o.warmup_steps = get_int(j, "warmup_steps", -1, int64_t(1) << 40, origin);
  if (j.contains("min_lr_ratio")) o.min_lr_ratio = get_num(j, "min_lr_ratio", 0, 1, origin);
  if (j.contains("grad_clip")) o.grad_clip = get_num(j, "grad_clip", 0, 1e9, origin);
  if (j.contains("eval_every")) o.eval_every = get_int(j, "eval_every", 0, int64_t(1) << 40, origin);
  if (j.contains("eval_batches")) o.eval_batches = get_int(j, "eval_batches", 1, 1 << 20, origin);
  if (j.contains("target_accuracy")) o.target_accuracy = get_num(j, "target_accuracy", 0, 1, origin);
  if (j.contains("seed")) o.seed = uint64_t(get_int(j, "seed", 0, INT64_MAX, origin));
  if (j.contains("out")) o.out = get_str(j, "out", origin);
  if (j.contains("checkpoint_every")) o.checkpoint_every = get_int(j, "checkpoint_every", 0, int64_t(1) << 40, origin);
  if (j.contains("log_every")) o.log_every = get_int(j, "log_every", 1, int64_t(1) << 40, origin);
  if (j.contains("device")) {
    o.device = get_str(j, "device", origin);
    if (o.device != "cpu" && o.device != "cuda") fail(origin, "device", "= '" + o.device + "'; accepted: cpu, cuda");
  }
  if (j.contains("cuda_graph")) {
    if (!j["cuda_graph"].is_boolean()) fail(origin, "cuda_graph", "must be true or false");
    o.cuda_graph = j["cuda_graph"].get<bool>();
  }
  if (j.contains("bf16")) {
    if (!j["bf16"].is_boolean()) fail(origin, "bf16", "must be true or false");
    o.bf16 = j["bf16"].get<bool>();
  }
  if (j.contains("threads")) o.threads = int(get_int(j, "threads", 0, 4096, origin));
  if (j.contains("distributed")) {
    if (!j["distributed"].is_boolean()) fail(origin, "distributed", "must be true or false");
    o.distributed = j["distributed"].get<bool>();
  }
  if (j.contains("dist_timeout")) o.dist_timeout = get_num(j, "dist_timeout", 0.1, 1e6, origin);
  if (j.contains("bucket_mb")) o.bucket_mb = get_num(j, "bucket_mb", 1e-6, 1e4, origin);
  return o;
}

TrainOptions TrainOptions::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::invalid_argument("cannot read train config '" + path + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw std::invalid_argument(path + ": not valid JSON: " + e.what());
  }
  return from_json(j, path);
}

nlohmann::json TrainOptions::to_json() const {
  nlohmann::json j = {{"model", model},          {"batch_size", batch_size},     {"steps", steps},
                      {"lr", lr},                {"weight_decay", weight_decay}, {"warmup_steps", warmup_steps},
                      {"min_lr_ratio", min_lr_ratio}, {"grad_clip", grad_clip}, {"eval_every", eval_every},
                      {"eval_batches", eval_batches}, {"target_accuracy", target_accuracy}, {"seed", seed},
                      {"out", out},              {"checkpoint_every", checkpoint_every}, {"log_every", log_every},
                      {"device", device},        {"bf16", bf16},   {"cuda_graph", cuda_graph},                {"threads", threads},
                      {"distributed", distributed}, {"dist_timeout", dist_timeout}, {"bucket_mb", bucket_mb}};
  if (!task.empty()) j["task"] = task;
  if (!data.empty()) j["data"] = data;
  if (!eval_data.empty()) j["eval_data"] = eval_data;
  if (!corpus.is_null()) j["corpus"] = corpus;
  if (context > 0) j["context"] = context;
  return j;
}

nn::ModelConfig resolve_model_config(const TrainOptions& o) {
  nlohmann::json m = o.model;
  int64_t need_vocab = 0, need_T = 0;
  if (!o.corpus.is_null()) {
    // the corpus must exist by now (train() builds it first); its vocabulary sizes the model
    auto info = data::read_corpus_info(o.corpus.is_string() ? o.corpus.get<std::string>() : o.corpus["out"].get<std::string>());
    need_vocab = info.vocab_size;
    need_T = corpus_context(o);
  } else if (!o.task.empty()) {
    auto spec = data::parse_task_spec(o.task);
    need_vocab = data::vocab_size(spec);
    need_T = spec.T;
  } else {
    auto d = data::read_jsonl(o.data);
    need_vocab = d.vocab_size();
    need_T = d.max_length();
  }
  if (!m.contains("vocab_size")) m["vocab_size"] = std::max<int64_t>(2, need_vocab);
  if (!m.contains("max_context")) m["max_context"] = need_T;
  auto cfg = nn::ModelConfig::from_json(m, "model");
  if (cfg.vocab_size < need_vocab)
    throw std::invalid_argument("model: 'vocab_size' = " + std::to_string(cfg.vocab_size) + " but the data uses tokens up to " +
                                std::to_string(need_vocab - 1) + "; expected >= " + std::to_string(need_vocab));
  if (cfg.max_context < need_T)
    throw std::invalid_argument("model: 'max_context' = " + std::to_string(cfg.max_context) + " but sequences have " +
                                std::to_string(need_T) + " tokens; expected >= " + std::to_string(need_T));
  return cfg;
}

EvalResult evaluate(nn::LanguageModelImpl& model, const data::TaskSpec& task, int64_t batch_size, int64_t batches, uint64_t seed,
                    int part, int parts, DistanceResult* by_distance) {
  Scored tot;
  const auto dev = model.parameters().front().device();
  for (int64_t b = 0; b < batches; ++b) {
    Scored s = score(model, data::make_batch(task, batch_size, seed ^ kEvalSeed, b * parts + part), dev, by_distance);
    tot.loss_sum += s.loss_sum;
    tot.correct += s.correct;
    tot.supervised += s.supervised;
  }
  return finish(tot);
}

EvalResult evaluate(nn::LanguageModelImpl& model, const data::Dataset& d, int64_t batch_size, int part, int parts,
                    DistanceResult* by_distance) {
  Scored tot;
  const auto dev = model.parameters().front().device();
  for (int64_t first = part * batch_size; first < d.size(); first += batch_size * parts) {
    Scored s = score(model, d.batch(first, std::min(batch_size, d.size() - first)), dev, by_distance);
    tot.loss_sum += s.loss_sum;
    tot.correct += s.correct;
    tot.supervised += s.supervised;
  }
  return finish(tot);
}

data::CorpusInfo resolve_corpus(const TrainOptions& o, std::ostream* log) {
  if (o.corpus.is_string()) return data::read_corpus_info(o.corpus.get<std::string>());
  data::CorpusOptions co;
  co.out = o.corpus.at("out").get<std::string>();
  if (o.corpus.contains("sources")) co.sources = o.corpus["sources"].get<std::vector<std::string>>();
  if (o.corpus.contains("tokenizer")) co.tokenizer = o.corpus["tokenizer"].get<std::string>();
  if (o.corpus.contains("val_every")) co.val_every = o.corpus["val_every"].get<int64_t>();
  co.threads = o.threads;
  return data::build_corpus(co, log);
}

void set_lm_metrics(EvalResult& r, const data::CorpusInfo& corpus) {
  r.perplexity = std::exp(r.loss);
  r.bits_per_byte = r.loss / std::log(2.0) * double(corpus.val_tokens) / double(std::max<int64_t>(1, corpus.val_bytes));
}

EvalResult evaluate(nn::LanguageModelImpl& model, const data::CorpusInfo& corpus, int64_t context, int64_t batch_size,
                    int64_t max_windows, int part, int parts) {
  data::TokenFile val(corpus.path("val"), corpus.dtype, corpus.vocab_size);
  const int64_t n = data::num_val_windows(val.size(), context, max_windows);
  if (n == 0)
    throw std::invalid_argument("corpus '" + corpus.dir + "': the validation split has " + std::to_string(val.size()) +
                                " tokens, fewer than one window of context " + std::to_string(context) + " + 1");
  Scored tot;
  const auto dev = model.parameters().front().device();
  for (int64_t first = part * batch_size; first < n; first += batch_size * parts) {
    const int64_t B = std::min(batch_size, n - first);
    Tensor win = torch::empty({B, context + 1}, torch::kInt64);
    for (int64_t r = 0; r < B; ++r) val.read((first + r) * context, context + 1, win[r].data_ptr<int64_t>());
    Scored s = score(model, window_batch(win), dev);
    tot.loss_sum += s.loss_sum;
    tot.correct += s.correct;
    tot.supervised += s.supervised;
  }
  EvalResult r = finish(tot);
  set_lm_metrics(r, corpus);
  return r;
}

namespace {
// result.json: what a run reports (train writes it, finished_run reads it back); train adds the
// model, its parameter count and, for language modeling, the corpus.
nlohmann::json result_json(const TrainResult& r, bool lm) {
  nlohmann::json j = {{"world_size", r.world_size},  {"steps", r.steps},         {"final_loss", r.final_loss},
                      {"eval_loss", r.eval.loss},    {"eval_accuracy", r.eval.accuracy}, {"best_accuracy", r.best_accuracy},
                      {"tokens_per_s", r.tokens_per_s}, {"seconds", r.seconds},  {"reached_target", r.reached_target}};
  if (lm) {
    j["eval_perplexity"] = r.eval.perplexity;
    j["eval_bits_per_byte"] = r.eval.bits_per_byte;
  }
  return j;
}

TrainResult result_from_json(const nlohmann::json& j) {
  TrainResult t;
  t.world_size = j.value("world_size", 1);
  t.steps = j.at("steps").get<int64_t>();
  t.final_loss = j.value("final_loss", 0.0);
  t.eval.loss = j.value("eval_loss", 0.0);
  t.eval.accuracy = j.value("eval_accuracy", 0.0);
  t.eval.perplexity = j.value("eval_perplexity", 0.0);
  t.eval.bits_per_byte = j.value("eval_bits_per_byte", 0.0);
  t.best_accuracy = j.value("best_accuracy", 0.0);
  t.tokens_per_s = j.value("tokens_per_s", 0.0);
  t.seconds = j.value("seconds", 0.0);
  t.reached_target = j.value("reached_target", false);
  return t;
}

#ifdef TOKMIX_CUDA_STEP
// The trainer's CUDA work on a pooled stream (ordered after what the default stream did before,
// and waited for when the trainer returns).
struct SideStream {
  c10::cuda::CUDAStream s;
  std::unique_ptr<c10::cuda::CUDAStreamGuard> guard;
  explicit SideStream(torch::Device d) : s(c10::cuda::getStreamFromPool(false, d.index())) {
    c10::cuda::getCurrentCUDAStream(d.index()).synchronize();
    guard = std::make_unique<c10::cuda::CUDAStreamGuard>(s);
  }
  ~SideStream() {
    try {
      s.synchronize();
    } catch (...) {
    }
  }
};

// The training step on one GPU (not distributed), as device work only: forward, loss, backward,
// gradient clipping and the AdamW update, with the loss and the gradient norm read back once at
// the end. Nothing in it reads the device, so the same step can be captured into a CUDA graph
// and replayed with new data and learning rate: a small model's eager step is
// bound by the host (the paper preset's 2-layer d128 model: ~16 ms a step, hundreds of launches
// through the dispatcher, the GPU ~7% busy), the replay is one launch. Eager and captured steps
// run the same kernels, so a run resumed from a checkpoint repeats the uninterrupted one.
// Clipping and the update follow torch::nn::utils::clip_grad_norm_ and torch::optim::AdamW, whose
// state tensors (exp_avg, exp_avg_sq, step) are updated in place: checkpoints are the eager
// path's. The update is skipped on the device when the loss or the gradient norm is not finite;
// the host then throws after reading them, with the weights untouched.
struct CudaStep {
  static constexpr int64_t kEagerSteps = 2;  // before the capture: warm-up of handles, pools, uploads
  nn::LanguageModelImpl& model;
  torch::optim::AdamW& opt;
  const TrainOptions& o;
  torch::Device dev;
  struct Param {
    Tensor p;
    torch::optim::AdamWParamState* st;
    int group;
  };
  std::vector<Param> params;
  Tensor lr_dev, lr_host;         // the learning rate, every group's (device, pinned host)
  std::vector<Tensor> dev_steps;  // the fused update's step counts (float32, device)
  // the captured step: static inputs and outputs
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  Tensor g_input, g_labels, g_at, g_out;
  bool g_sparse = false;
  bool graph_failed = false;
  std::string graph_note;  // why the step is not (or no longer) captured

  CudaStep(nn::LanguageModelImpl& m, torch::optim::AdamW& op, const TrainOptions& opts, torch::Device d)
      : model(m), opt(op), o(opts), dev(d) {
    auto& groups = opt.param_groups();
    for (size_t gi = 0; gi < groups.size(); ++gi)
      for (auto& p : groups[gi].params()) {
        auto& slot = opt.state()[static_cast<void*>(p.unsafeGetTensorImpl())];
        if (!slot) {  // what AdamW::step creates on its first call
          auto st = std::make_unique<torch::optim::AdamWParamState>();
          st->step(0);
          st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          slot = std::move(st);
        }
        params.push_back({p, static_cast<torch::optim::AdamWParamState*>(slot.get()), static_cast<int>(gi)});
      }
    lr_dev = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(dev));
    lr_host = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(true));
    for (auto& pr : params) dev_steps.push_back(torch::full({}, static_cast<double>(pr.st->step()), lr_dev.options()));
  }

  // Host side, before the step's device work (the bias corrections come from dev_steps).
  void set_lr(double lr) {
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    lr_host.fill_(lr);
    lr_dev.copy_(lr_host, /*non_blocking=*/true);
  }
  // Host side, after a step whose update ran: the parameters it updated (those with a
  // gradient, as in AdamW::step) count one more step.
  void advance() {
    for (size_t i : stepped) params[i].st->step(params[i].st->step() + 1);
  }
  std::vector<size_t> stepped;  // set by device_step (for a graph: at its capture)

  // Forward, loss, backward, clip, update; returns [loss, gradient norm] (float32, device).
  Tensor device_step(const Tensor& input, const Tensor& labels, const Tensor& at, bool checked) {
    for (auto& pr : params) pr.p.mutable_grad() = Tensor();  // the backward writes fresh gradients
    Tensor loss = token_loss(supervised_logits(model, input, at, o.bf16, checked), labels);
    loss.backward();
    torch::NoGradGuard ng;
    std::vector<Tensor> grads;
    std::vector<size_t> with_grad;
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].p.grad().defined()) {
        grads.push_back(params[i].p.grad());
        with_grad.push_back(i);
      }
    stepped = with_grad;
    if (grads.empty()) return torch::stack({loss.detach().to(torch::kFloat32), torch::zeros({}, lr_dev.options())});
    // multi-tensor kernels: a handful of launches for the whole model instead of ~15 per tensor
    Tensor gnorm = torch::stack(at::_foreach_norm(grads)).to(torch::kFloat32).norm();
    Tensor found_inf = torch::isfinite(gnorm).logical_and(torch::isfinite(loss.detach())).logical_not().to(torch::kFloat32);
    if (o.grad_clip > 0)
      at::_foreach_mul_(grads, std::vector<Tensor>(grads.size(), gnorm.add(1e-6).reciprocal().mul(o.grad_clip).clamp_max(1.0)));
    std::vector<Tensor> steps;
    for (size_t i : with_grad) steps.push_back(dev_steps[i]);
    at::_foreach_add_(steps, 1);
    auto& groups = opt.param_groups();
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      auto& go = static_cast<torch::optim::AdamWOptions&>(groups[gi].options());
      std::vector<Tensor> p, g, m, v, st;
      for (size_t k = 0; k < with_grad.size(); ++k) {
        const Param& pr = params[with_grad[k]];
        if (pr.group != static_cast<int>(gi)) continue;
        p.push_back(pr.p);
        g.push_back(grads[k]);
        m.push_back(pr.st->exp_avg());
        v.push_back(pr.st->exp_avg_sq());
        st.push_back(steps[k]);
      }
      if (p.empty()) continue;
      // skips every write when found_inf is 1
      at::_fused_adamw_(p, g, m, v, {}, st, lr_dev, std::get<0>(go.betas()), std::get<1>(go.betas()), go.weight_decay(),
                        go.eps(), /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/c10::nullopt, found_inf);
    }
    at::_foreach_sub_(steps, std::vector<Tensor>(steps.size(), found_inf));  // a skipped step does not count
    return torch::stack({loss.detach().to(torch::kFloat32), gnorm.to(torch::kFloat32)});
  }

  // One step: replayed when a graph fits this batch (captured on first use), eager otherwise.
  // Returns [loss, gradient norm] on the host; the caller throws if either is not finite.
  std::pair<double, double> step(const data::Batch& b, bool may_capture) {
    Tensor flat = b.labels.reshape({-1});
    Tensor at = sparse_supervision(flat);  // CPU tensors: no device read
    Tensor labels = at.defined() ? flat.index_select(0, at) : flat;
    Tensor out;
    const bool fits = graph && g_input.sizes().equals(b.input.sizes()) && g_sparse == at.defined() &&
                      g_labels.sizes().equals(labels.sizes());
    if (fits || (may_capture && !graph && !graph_failed && o.cuda_graph)) {
      // the checks the eager forward makes on the device, made here on the CPU copies
      model.check_batch(b.input);
      if (!graph) capture(b.input, labels, at);
      if (graph) {
        g_input.copy_(b.input, true);
        g_labels.copy_(labels, true);
        if (g_sparse) g_at.copy_(at, true);
        graph->replay();
        out = g_out;
      }
    }
    if (!out.defined()) out = device_step(b.input.to(dev), labels.to(dev), at.defined() ? at.to(dev) : at, true);
    Tensor h = out.to(torch::kCPU);
    return {h[0].item<double>(), h[1].item<double>()};
  }

  void capture(const Tensor& input, const Tensor& labels, const Tensor& at) {
    g_input = input.to(dev);
    g_labels = labels.to(dev);
    g_sparse = at.defined();
    g_at = g_sparse ? at.to(dev) : Tensor();
    auto stream = c10::cuda::getCurrentCUDAStream(dev.index());
    stream.synchronize();
    auto g = std::make_unique<at::cuda::CUDAGraph>();
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    try {
      g->capture_begin();
      g_out = device_step(g_input, g_labels, g_at, false);
      g->capture_end();
      graph = std::move(g);
    } catch (const std::exception& e) {
      abandon_capture(*g, stream.stream());
      graph_failed = true;
      graph_note = std::string("the step could not be captured into a CUDA graph (") + e.what() + "); steps run eagerly";
    }
    at::autocast::set_autocast_cache_enabled(cache);
    // the capture recorded work but ran none of it: gradients and optimizer state are as before
  }
};
#endif
}  // namespace

TrainResult train(const TrainOptions& o, bool resume, std::ostream* log, int64_t stop_after) {
  using Clock = std::chrono::steady_clock;
  if (o.device == "cuda" && !torch::cuda::is_available())
    throw std::invalid_argument("device 'cuda' requested but no CUDA device is available to this LibTorch");
  // distributed: rendezvous first; rank 0 alone writes files and logs (docs/distributed.md)
  std::unique_ptr<dist::DataParallel> dp;
  if (o.distributed) dp = std::make_unique<dist::DataParallel>(dist::DataParallel::Options{o.device, o.dist_timeout, o.bucket_mb});
  const bool root = !dp || dp->is_root();
  if (!root) log = nullptr;
  set_threads(dp && o.threads == 0 ? dp->default_threads() : o.threads);
  const torch::Device dev = dp ? dp->device() : torch::Device(o.device == "cuda" ? torch::kCUDA : torch::kCPU);
  // On the GPU the mixers' finiteness reports are read where the step waits anyway (the loss,
  // the gradient norm), not inside each mix call: same errors, no stream sync per call.
  struct FiniteCheckScope {
    FiniteCheck before = finite_check();
    explicit FiniteCheckScope(bool gpu) {
      if (gpu) set_finite_check(FiniteCheck::Deferred);
    }
    ~FiniteCheckScope() {
      try {
        check_finite_pending();
      } catch (...) {  // already reported by the step, or the run is ending on another error
      }
      set_finite_check(before);
    }
  } finite_scope(dev.is_cuda());
  data::CorpusInfo corpus;
  const bool lm = !o.corpus.is_null();
  if (lm) {
    // rank 0 builds (or checks) the corpus while the others wait, then everyone reads it
    if (root) corpus = resolve_corpus(o, log);
    if (dp) dp->barrier("barrier after building the corpus");
    if (!root) corpus = resolve_corpus(o, nullptr);
  }
  const nn::ModelConfig cfg = resolve_model_config(o);
  Source src = make_source(o, lm ? &corpus : nullptr);
  data::Dataset eval_set;
  const bool eval_on_file = !lm && (!o.eval_data.empty() || !src.synthetic);
  if (!o.eval_data.empty()) eval_set = data::read_jsonl(o.eval_data);
  else if (!src.synthetic && !lm) eval_set = src.dataset;  // no held-out file: report fit on the training data

  torch::manual_seed(o.seed);
  nn::LanguageModel model(cfg);
  model->to(dev);
  std::vector<Tensor> decay, no_decay;
  for (auto& p : model->named_parameters()) (p.value().dim() >= 2 ? decay : no_decay).push_back(p.value());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto opt_decay = std::make_unique<torch::optim::AdamWOptions>(o.lr);
  opt_decay->weight_decay(o.weight_decay).betas({0.9, 0.95});
  auto opt_plain = std::make_unique<torch::optim::AdamWOptions>(o.lr);
  opt_plain->weight_decay(0.0).betas({0.9, 0.95});
  groups.emplace_back(decay, std::move(opt_decay));
  if (!no_decay.empty()) groups.emplace_back(no_decay, std::move(opt_plain));
  torch::optim::AdamW opt(groups);

  TrainResult res;
  res.out = o.out;
  const std::string ckpt = o.out.empty() ? "" : (fs::path(o.out) / "checkpoint").string();
  nlohmann::json tokenizer = lm             ? corpus.tokenizer
                             : src.synthetic ? nlohmann::json{{"type", "synthetic"}, {"task", o.task}}
                                             : nlohmann::json{{"type", "token-ids"}, {"data", o.data}};
  int64_t start = 0;
  if (resume && !ckpt.empty() && fs::exists(fs::path(ckpt) / "checkpoint.json")) {
    auto info = nn::load_checkpoint(ckpt, *model, &opt);
    start = info.step;
    if (log) *log << "resumed from " << ckpt << " at step " << start << "\n";
  }
  if (dp) dp->attach(*model, start);
  std::ofstream jsonl, csv;
  if (!o.out.empty() && root) {
    fs::create_directories(o.out);
    const auto mode = start > 0 ? std::ios::app : std::ios::trunc;
    jsonl.open(fs::path(o.out) / "metrics.jsonl", mode);
    const bool fresh_csv = start == 0 || !fs::exists(fs::path(o.out) / "metrics.csv");
    csv.open(fs::path(o.out) / "metrics.csv", fresh_csv ? std::ios::trunc : std::ios::app);
    if (fresh_csv) csv << "step,lr,loss,tokens_per_s,eval_loss,eval_accuracy,eval_perplexity,eval_bits_per_byte\n";
    std::ofstream(fs::path(o.out) / "options.json") << o.to_json().dump(2) << "\n";
  }
  auto save = [&](int64_t step) {
    if (!ckpt.empty() && root) nn::save_checkpoint(ckpt, *model, tokenizer, step, &opt);
    if (dp) dp->barrier("barrier after the checkpoint of step " + std::to_string(step));
  };
  auto run_eval = [&]() {
    model->eval();
    const int part = dp ? dp->rank() : 0, parts = dp ? dp->world_size() : 1;
    EvalResult e = lm             ? evaluate(*model, corpus, src.context, o.batch_size, o.eval_batches * o.batch_size * parts, part, parts)
                   : eval_on_file ? evaluate(*model, eval_set, o.batch_size, part, parts)
                                  : evaluate(*model, src.task, o.batch_size, o.eval_batches, o.seed, part, parts);
    if (dp) e = dp->reduce(e);
    if (lm) set_lm_metrics(e, corpus);
    model->train();
    return e;
  };

#ifdef TOKMIX_CUDA_STEP
  // one GPU: the step as device work on a stream of its own (a capture needs one), see CudaStep
  std::unique_ptr<SideStream> side;
  std::unique_ptr<CudaStep> cstep;
  if (dev.is_cuda() && !dp) {
    side = std::make_unique<SideStream>(dev);
    cstep = std::make_unique<CudaStep>(*model, opt, o, dev);
  }
#endif
  // The step through LibTorch's optimizer (CPU, distributed, or a CUDA build without CudaStep):
  // a non-finite loss stops before the backward, a non-finite gradient norm before the update.
  auto eager_step = [&](const data::Batch& b, double lr, int64_t step) {
    Tensor input = b.input.to(dev), labels = b.labels.to(dev);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    opt.zero_grad();
    Tensor flat_labels = labels.reshape({-1});
    // sparse supervision (MQAR, copy, ...): the head only where a label is
    Tensor at = sparse_supervision(flat_labels);
    Tensor flat_logits = supervised_logits(*model, input, at, o.bf16 && dev.is_cuda());
    if (at.defined()) flat_labels = flat_labels.index_select(0, at);
    Tensor loss = dp ? dp->loss(flat_logits, flat_labels) : token_loss(flat_logits, flat_labels);
    double lv = loss.item<double>();
    check_finite_pending();  // the forward's reports (the GPU is idle here after item())
    require_finite_loss(lv, step);
    loss.backward();
    if (dp) lv = dp->finish_backward(lv);  // gradients and loss averaged over the ranks
    // the norm is computed either way: a non-finite gradient stops the run before it can reach
    // the weights (and so the next checkpoint)
    const double gnorm = torch::nn::utils::clip_grad_norm_(model->parameters(),
                                                           o.grad_clip > 0 ? o.grad_clip : std::numeric_limits<double>::infinity());
    check_finite_pending();  // the backward's reports, before the update
    require_finite_norm(gnorm, step);
    opt.step();
    return std::make_pair(lv, gnorm);
  };

  const auto t0 = Clock::now();
  int64_t tokens = 0;
  double loss_avg = 0;
  int64_t loss_n = 0;
  int64_t step = start;
  for (; step < o.steps; ++step) {
    // distributed: this rank's rows of the global batch of batch_size * world_size
    data::Batch b = dp ? dp->shard(src.get(step, o.batch_size * dp->world_size(), o.seed)) : src.get(step, o.batch_size, o.seed);
    const double lr = lr_at(o, step);
    double lv = 0, gnorm = 0;
#ifdef TOKMIX_CUDA_STEP
    if (cstep) {
      cstep->set_lr(lr);
      std::tie(lv, gnorm) = cstep->step(b, step >= start + CudaStep::kEagerSteps);
      check_finite_pending();  // reports of the eager steps' mixers
      if (!cstep->graph_note.empty()) {
        if (log) *log << "note: " << cstep->graph_note << "\n";
        cstep->graph_note.clear();
      }
      require_finite_loss(lv, step);
      require_finite_norm(gnorm, step);  // the device skipped the update
      cstep->advance();
    } else
#endif
      std::tie(lv, gnorm) = eager_step(b, lr, step);
    tokens += b.input.numel() * (dp ? dp->world_size() : 1);
    loss_avg += lv;
    ++loss_n;
    res.final_loss = lv;
    const int64_t done = step + 1;
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const double tps = tokens / std::max(secs, 1e-9);
    bool evaluated = false;
    EvalResult e;
    if ((o.eval_every > 0 && done % o.eval_every == 0) || done == o.steps) {
      e = run_eval();
      evaluated = true;
      res.eval = e;
      res.best_accuracy = std::max(res.best_accuracy, e.accuracy);
    }
    if (done % o.log_every == 0 || evaluated || done == o.steps) {
      const double eta = (o.steps - done) * secs / double(done - start);
      if (log) {
        *log << "step " << done << "/" << o.steps << " | loss " << std::fixed << std::setprecision(4) << loss_avg / loss_n;
        if (evaluated && lm)
          *log << " | val loss " << e.loss << " ppl " << std::setprecision(2) << e.perplexity << " bpb " << std::setprecision(3)
               << e.bits_per_byte;
        else if (evaluated)
          *log << " | eval loss " << e.loss << " acc " << std::setprecision(1) << 100 * e.accuracy << "%";
        *log << " | lr " << std::scientific << std::setprecision(2) << lr << std::fixed << " | " << si(tps) << " tok/s | ETA "
             << hms(eta) << "\n";
        log->flush();
      }
      if (jsonl.is_open()) {
        nlohmann::json r = {{"step", done}, {"lr", lr}, {"loss", loss_avg / loss_n}, {"tokens_per_s", tps}, {"seconds", secs}};
        if (evaluated) {
          r["eval_loss"] = e.loss;
          r["eval_accuracy"] = e.accuracy;
          if (lm) {
            r["eval_perplexity"] = e.perplexity;
            r["eval_bits_per_byte"] = e.bits_per_byte;
          }
        }
        jsonl << r.dump() << "\n";
        jsonl.flush();
        csv << done << "," << lr << "," << loss_avg / loss_n << "," << tps << ",";
        if (evaluated) csv << e.loss << "," << e.accuracy << "," << (lm ? std::to_string(e.perplexity) : "") << ","
                           << (lm ? std::to_string(e.bits_per_byte) : "");
        else csv << ",,,";
        csv << "\n";
        csv.flush();
      }
      loss_avg = 0;
      loss_n = 0;
    }
    if (evaluated && o.target_accuracy > 0 && e.accuracy >= o.target_accuracy) {
      res.reached_target = true;
      ++step;
      break;
    }
    if (o.checkpoint_every > 0 && done % o.checkpoint_every == 0 && done != o.steps) save(done);
    if (stop_after > 0 && done - start >= stop_after) {
      ++step;
      break;
    }
  }
  res.steps = step;
  res.rank = dp ? dp->rank() : 0;
  res.world_size = dp ? dp->world_size() : 1;
  save(step);
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  res.tokens_per_s = tokens / std::max(res.seconds, 1e-9);
  if (!o.out.empty() && root) {
    nlohmann::json r = result_json(res, lm);
    r["model"] = cfg.to_json();
    r["parameters"] = model->num_parameters();
    if (lm) {
      r["corpus"] = corpus.dir;
      r["context"] = src.context;
    }
    std::ofstream(fs::path(o.out) / "result.json") << r.dump(2) << "\n";
  }
  check_finite_pending();  // nothing deferred is left for the scope's destructor to drop
  return res;
}

std::string sweep_dir(double lr) {
  std::ostringstream os;
  os << "lr_" << lr;
  return os.str();
}

namespace {
// Better result of a sweep: language modeling keeps the lowest validation loss, tasks the highest
// accuracy (then the lowest loss).
bool better_run(const TrainResult& a, const TrainResult& best) {
  return a.eval.perplexity > 0 ? a.eval.loss < best.eval.loss
                               : (a.eval.accuracy > best.eval.accuracy || (a.eval.accuracy == best.eval.accuracy && a.eval.loss < best.eval.loss));
}
}  // namespace

std::optional<TrainResult> finished_run(const TrainOptions& r) {
  try {
    std::ifstream ro(fs::path(r.out) / "result.json"), oo(fs::path(r.out) / "options.json");
    if (r.out.empty() || !ro || !oo) return std::nullopt;
    nlohmann::json res = nlohmann::json::parse(ro), opt = nlohmann::json::parse(oo), want = r.to_json();
    // the folder is where the run is found, not one of its settings: a moved or copied run
    // (results brought back from another machine) is the same run
    opt.erase("out");
    want.erase("out");
    if (opt != want || res.value("steps", int64_t(-1)) != r.steps) return std::nullopt;
    TrainResult t = result_from_json(res);
    t.out = r.out;
    return t;
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable: not finished
  }
}

namespace {
// The run of one rate of a sweep: its options and folder.
TrainOptions sweep_run(const TrainOptions& o, const std::vector<double>& lrs, double lr) {
  TrainOptions r = o;
  r.lr = lr;
  if (lrs.size() > 1 && !o.out.empty()) r.out = (fs::path(o.out) / sweep_dir(lr)).string();
  return r;
}
}  // namespace

std::optional<TrainResult> finished_sweep(const TrainOptions& o, const std::vector<double>& lrs) {
  std::optional<TrainResult> best;
  for (double lr : lrs.empty() ? std::vector<double>{o.lr} : lrs) {
    auto r = finished_run(sweep_run(o, lrs, lr));
    if (!r) return std::nullopt;
    if (!best || better_run(*r, *best)) best = r;
  }
  return best;
}

TrainResult train_sweep(const TrainOptions& o, const std::vector<double>& lrs, bool resume, std::ostream* log, bool reuse_finished) {
  if (o.distributed && lrs.size() > 1)
    throw std::invalid_argument("a learning-rate sweep (" + std::to_string(lrs.size()) +
                                " rates) cannot run distributed; start one distributed job per rate");
  TrainResult best;
  bool have = false;
  for (double lr : lrs.empty() ? std::vector<double>{o.lr} : lrs) {
    const TrainOptions r = sweep_run(o, lrs, lr);
    if (log && lrs.size() > 1) *log << "== lr " << lr << "\n";
    std::optional<TrainResult> earlier = reuse_finished ? finished_run(r) : std::nullopt;
    if (earlier && log) *log << "   finished earlier: " << r.out << "\n";
    const TrainResult res = earlier ? *earlier : train(r, resume, log);
    if (log && lrs.size() > 1)
      *log << "   lr " << lr << ": eval accuracy " << 100 * res.eval.accuracy << "%, eval loss " << res.eval.loss << "\n";
    if (!have || better_run(res, best)) {
      best = res;
      have = true;
    }
  }
  if (log && lrs.size() > 1) *log << "best: " << best.out << " (eval accuracy " << 100 * best.eval.accuracy << "%)\n";
  return best;
}

}  // namespace tokmix::train
