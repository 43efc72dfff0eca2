// Training and evaluation of a language-model backbone on a synthetic task or a JSONL dataset:
// AdamW with decoupled weight decay, linear warmup then cosine decay, gradient clipping,
// periodic evaluation, stop at a target accuracy, checkpoints with exact resume, metrics as JSONL
// and CSV, and a progress line.
#pragma once
#include <torch/torch.h>

#include <iosfwd>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tokmix/data/corpus.h"
#include "tokmix/data/tasks.h"
#include "tokmix/nn/model.h"

namespace tokmix::train {

struct TrainOptions {
  nlohmann::json model;         // a model config (object), completed from the task when needed
  std::string task;             // synthetic task spec ("mqar:T=256,N=16"), or
  std::string data;             // a JSONL training file
  std::string eval_data;        // JSONL evaluation file (default: the task's held-out stream)
  // or a text corpus (language modeling): the directory of one built by `tokmix corpus`, or,
  // as an object {sources, tokenizer, out, val_every}, the options to build (or reuse) one
  nlohmann::json corpus;
  int64_t context = 0;          // corpus windows: tokens per sequence (0: the model's max_context, else 512)
  int64_t batch_size = 32;
  int64_t steps = 1000;
  double lr = 1e-3;
  double weight_decay = 0.1;    // on matrices and embeddings, not on norms or biases
  int64_t warmup_steps = -1;    // -1: 5% of steps
  double min_lr_ratio = 0.1;    // cosine decays to lr * min_lr_ratio
  double grad_clip = 1.0;       // max global norm, 0 = off
  int64_t eval_every = 100;
  int64_t eval_batches = 8;
  double target_accuracy = 0;   // stop when evaluation reaches it (0 = never)
  uint64_t seed = 0;
  std::string out;              // run directory: metrics, checkpoint
  int64_t checkpoint_every = 0; // 0: only at the end
  int64_t log_every = 10;
  std::string device = "cpu";   // "cpu" | "cuda"
  bool bf16 = false;            // autocast to bfloat16 (cuda)
  bool cuda_graph = true;       // cuda: replay the training step as one CUDA graph when batches keep their shape
  int threads = 0;              // CPU threads, 0 = all cores (distributed: cores / local processes)
  bool distributed = false;     // one process per device, ranks from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
                                // batch_size is per process (docs/distributed.md)
  double dist_timeout = 300;    // seconds a rank waits for the others before it stops with an error
  double bucket_mb = 25;        // size of the gradient all-reduce buckets

  // Validates a config object: unknown keys, wrong types and impossible values are errors that
  // name the key and what is accepted. `origin` prefixes messages (a file name).
  static TrainOptions from_json(const nlohmann::json& j, const std::string& origin = "train config");
  static TrainOptions load(const std::string& path);
  nlohmann::json to_json() const;
};

struct EvalResult {
  double loss = 0;
  double accuracy = 0;    // argmax == label over supervised positions
  int64_t supervised = 0;  // positions counted
  // language modeling (corpus runs): exp(loss) and loss in bits per byte of text, comparable
  // across tokenizers (the split's tokens / bytes ratio converts per-token to per-byte)
  double perplexity = 0;
  double bits_per_byte = 0;
};

struct TrainResult {
  int64_t steps = 0;        // steps done (counting resumed ones)
  double final_loss = 0;    // training loss of the last step
  EvalResult eval;          // last evaluation
  double best_accuracy = 0;
  double tokens_per_s = 0;  // training throughput (of all ranks together when distributed)
  double seconds = 0;
  bool reached_target = false;
  std::string out;
  int rank = 0, world_size = 1;
};

// The model config a run uses: the options' model completed with the vocabulary and context
// the task or data needs (an explicit value too small for them is an error).
nn::ModelConfig resolve_model_config(const TrainOptions& o);

// Trains. With resume, continues from `<out>/checkpoint` when it exists: batches are a function
// of (seed, step) and the schedule of step, so a resumed run ends with the same weights as an
// uninterrupted one. `stop_after` > 0 stops (with a checkpoint) after that many steps of this
// call, as an interruption would. Progress goes to `log` (may be null).
TrainResult train(const TrainOptions& o, bool resume = false, std::ostream* log = nullptr, int64_t stop_after = 0);

// One run per learning rate, each in <out>/lr_<lr> (a single rate: <out> itself); returns the
// best (eval accuracy, then eval loss), as Zoology's sweeps keep the best of several rates.
// reuse_finished: a rate whose run finished earlier (finished_run) is read back, not trained, so
// a long sweep can run in pieces.
TrainResult train_sweep(const TrainOptions& o, const std::vector<double>& lrs, bool resume = false, std::ostream* log = nullptr,
                        bool reuse_finished = false);
// Where train_sweep puts the run of one learning rate: <o.out>/<sweep_dir(lr)> (several rates).
std::string sweep_dir(double lr);
// The result a finished run left in r.out: its result.json, with options.json equal to r's
// options (but for "out": a run may have been moved) and every step done; nullopt when missing,
// unfinished, unreadable or made otherwise.
std::optional<TrainResult> finished_run(const TrainOptions& r);
// The same for a whole sweep (every rate finished), the best by the sweep's rule.
std::optional<TrainResult> finished_sweep(const TrainOptions& o, const std::vector<double>& lrs);

// Accuracy by recall distance: for a supervised position t whose label is token x, the distance
// is t - p for the last p <= t with input[p] == x (how far back the answer sits in the input;
// MQAR: from the query to its value). Buckets [0, 1), [1, 2), [2, 4), [4, 8), ... keyed by their
// lower end; positions whose label does not occur in the input up to t are counted in `absent`.
struct DistanceBucket {
  int64_t lo = 0, hi = 0;  // distances in [lo, hi)
  int64_t supervised = 0, correct = 0;
};
struct DistanceResult {
  std::map<int64_t, DistanceBucket> buckets;  // only those with supervised positions
  DistanceBucket absent{-1, -1};
};
// The distance of position t's answer in one sequence (input[0..T)), or -1 when absent.
int64_t recall_distance(const int64_t* input, int64_t t, int64_t label);

// Evaluates a model on the held-out stream of a task (batches 0..batches-1 of seed ^ kEvalSeed)
// or on a dataset. With parts > 1, only part `part` of it: the rows a rank of a distributed run
// with batch_size per rank scores (the parts together are the whole with batch_size * parts).
// With by_distance, the same predictions are also tallied by recall distance.
EvalResult evaluate(nn::LanguageModelImpl& model, const data::TaskSpec& task, int64_t batch_size, int64_t batches,
                    uint64_t seed, int part = 0, int parts = 1, DistanceResult* by_distance = nullptr);
EvalResult evaluate(nn::LanguageModelImpl& model, const data::Dataset& data, int64_t batch_size, int part = 0, int parts = 1,
                    DistanceResult* by_distance = nullptr);
// Validation windows of a corpus (consecutive, non-overlapping, at most max_windows; 0 = all);
// with parts > 1, the windows first + k·batch_size·parts + part·batch_size of a rank.
EvalResult evaluate(nn::LanguageModelImpl& model, const data::CorpusInfo& corpus, int64_t context, int64_t batch_size,
                    int64_t max_windows, int part = 0, int parts = 1);
// Perplexity and bits per byte from an evaluation's loss per token on this corpus.
void set_lm_metrics(EvalResult& e, const data::CorpusInfo& corpus);
// The corpus a run trains on: built (or reused) from the options' object, or read from a directory.
data::CorpusInfo resolve_corpus(const TrainOptions& o, std::ostream* log = nullptr);

constexpr uint64_t kEvalSeed = 0x5eed0e7a1ULL;  // evaluation streams never meet training streams

}  // namespace tokmix::train
