// Text generation through prefill and cached decoding: sampling (temperature, top-k, top-p),
// batches of prompts of different lengths, per-token callbacks for streaming.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "tokmix/nn/model.h"

namespace tokmix::infer {

struct SampleOptions {
  double temperature = 1.0;  // 0: greedy (argmax)
  int64_t top_k = 0;         // keep the k most likely tokens (0: all)
  double top_p = 1.0;        // keep the smallest set whose probability reaches p (1: all)
  uint64_t seed = 0;
  bool cuda_graph = true;    // CUDA models: decode steps replayed from CUDA graphs (GraphDecoder)
  void validate() const;     // throws std::invalid_argument naming the bad value
};

// Draws a token from one row of logits [V].
int64_t sample_token(const torch::Tensor& logits, const SampleOptions& o, std::mt19937_64& rng);

struct GenerateResult {
  std::vector<std::vector<int64_t>> tokens;  // generated tokens per prompt
  std::vector<int64_t> prompt_tokens;        // prompt tokens actually used (after truncation)
  std::vector<int64_t> dropped_tokens;       // leading prompt tokens dropped to fit the context
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t decode_steps = 0;
  double decode_tokens_per_s = 0;  // generated tokens (all sequences) per second of decoding
  int64_t cache_bytes = 0;         // the decode state after generation: mixer stores + conv tails
  bool cuda_graph = false;         // the steps were replayed from CUDA graphs
};

// Generates max_tokens tokens after each prompt. Every prompt must be non-empty with ids in the
// vocabulary; a prompt that does not leave room for max_tokens in the model's context keeps its
// last tokens (reported in dropped_tokens); max_tokens must be below the context. on_token(seq,
// token) is called as each token is produced.
GenerateResult generate(nn::LanguageModelImpl& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_tokens,
                        const SampleOptions& sample, const std::function<void(int64_t, int64_t)>& on_token = nullptr);

// Decode speed of `model` (in eval mode, on its device) at a context: `batch` prompts of
// `context` tokens prefilled, then `steps` greedy steps timed after two warm-up steps. On CUDA
// the same tokens go through a GraphDecoder too, whose logits must equal the eager ones (else it
// throws).
struct DecodeSpeed {
  double tokens_per_s = 0;         // eager steps (one launch per kernel), all sequences
  double graph_tokens_per_s = 0;   // CUDA graph replays (0: not measured)
  double graph_max_rel_diff = -1;  // max |graph - eager| / max |eager| over every step's logits
  int64_t cache_bytes = 0;         // per sequence: mixer stores + conv tails
};
DecodeSpeed measure_decode(nn::LanguageModelImpl& model, int64_t context, int64_t steps, int64_t batch = 1, bool graph = true);

}  // namespace tokmix::infer
