// The language-model backbone: token embedding (+ learned positions), pre-norm residual blocks
// (RMSNorm, token mixer, optional SwiGLU MLP), final norm, output head tied to the embedding.
// Decoding: prefill a batch of prompts of different lengths, then step all of them together.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "tokmix/nn/config.h"
#include "tokmix/nn/layers.h"

namespace tokmix::nn {

struct BlockImpl : torch::nn::Module {
  BlockImpl(const ModelConfig& cfg, int64_t layer);
  torch::Tensor forward(const torch::Tensor& h, const TokenPositions& p);
  torch::Tensor prefill(const torch::Tensor& h, const TokenPositions& p, MixerState& s);
  torch::Tensor step(const torch::Tensor& h, const torch::Tensor& pos, MixerState& s);
  RMSNorm norm1{nullptr}, norm2{nullptr};
  TokenMixer mixer{nullptr};
  SwiGLU mlp{nullptr};
};
TORCH_MODULE(Block);

// Decode state of a whole model for `batch` sequences: one mixer state per layer and the
// number of tokens each sequence has seen.
struct DecodeState {
  int64_t batch = 0;
  int64_t max_context = 0;
  std::vector<int64_t> positions;
  std::vector<MixerState> layers;
  int64_t cache_bytes() const;  // the mixers' stores: what the patterns say a decoder keeps
  int64_t conv_bytes() const;   // short-convolution tails
};

class LanguageModelImpl : public torch::nn::Module {
 public:
  explicit LanguageModelImpl(const ModelConfig& cfg);

  // tokens [B, T] int64 -> logits [B, T, vocab]; every row is one sequence from position 0.
  torch::Tensor forward(const torch::Tensor& tokens);
  // General form: tokens [B, T] with explicit positions (packed sequences: B == 1, cu_seqlens).
  torch::Tensor forward(const torch::Tensor& tokens, const TokenPositions& p);
  // Logits at some positions only: rows `flat_index` (int64, into the B·T positions in order)
  // -> [n, vocab]. Tasks that supervise few positions (MQAR: N of T) skip the output head,
  // the largest product when the vocabulary is large, everywhere else.
  torch::Tensor forward_at(const torch::Tensor& tokens, const torch::Tensor& flat_index);
  // forward / forward_at with nothing checked that would read the device (token range, index
  // range): the caller checked the CPU copies. What a captured training step runs
  // (train::CudaStep). flat_index undefined: logits at every position.
  torch::Tensor forward_unchecked(const torch::Tensor& tokens, const torch::Tensor& flat_index);
  // What forward(tokens) checks first (shape, token range, length); pass a CPU copy to keep the
  // device out of it.
  void check_batch(const torch::Tensor& tokens) const;

  // A fresh decode state; max_context <= config().max_context (0 = the config's).
  DecodeState new_decode_state(int64_t batch, int64_t max_context = 0) const;
  // Runs the prompts (each non-empty, any lengths) in one packed pass and fills `s`, whose
  // batch must equal prompts.size() and whose sequences must be empty. Returns the logits of
  // each prompt's last token [N, vocab], or of every prompt token packed [total, vocab].
  torch::Tensor prefill(DecodeState& s, const std::vector<std::vector<int64_t>>& prompts, bool all_logits = false);
  // One token per sequence: tokens [N] int64 -> logits [N, vocab].
  torch::Tensor step(DecodeState& s, const torch::Tensor& tokens);
  // What step() checks first: tokens [N] int64 in the vocabulary, room in every sequence
  // (reads the tokens: pass a CPU copy to keep a device out of it).
  void check_step(const DecodeState& s, const torch::Tensor& tokens) const;
  // The device part of step(): tokens and positions [N] int64 already on the model's device,
  // nothing checked that would read the device, s.positions not advanced (the mixer caches
  // are). What a CUDA graph captures (infer::GraphDecoder); use step() otherwise.
  torch::Tensor step_unchecked(DecodeState& s, const torch::Tensor& tokens, const torch::Tensor& pos);

  const ModelConfig& config() const { return cfg_; }
  int64_t num_parameters() const;
  std::vector<Block>& blocks() { return blocks_; }
  // Every attention layer computes through tokmix::mix instead of LibTorch's attention.
  void set_force_generic(bool v);

 private:
  torch::Tensor embed(const torch::Tensor& tokens, const torch::Tensor& pos);
  // checks the inputs, then embedding and blocks: the states before the final norm
  torch::Tensor hidden(const torch::Tensor& tokens, const TokenPositions& p);
  torch::Tensor blocks_forward(const torch::Tensor& tokens, const TokenPositions& p);
  torch::Tensor head(const torch::Tensor& h);
  void check_tokens(const torch::Tensor& tokens) const;
  void check_length(int64_t longest) const;  // the longest sequence against max_context

  ModelConfig cfg_;
  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  torch::nn::ModuleList block_list{nullptr};
  std::vector<Block> blocks_;
  RMSNorm final_norm{nullptr};
};
TORCH_MODULE(LanguageModel);

// Per-token decode cost and cache of one layer at a context length.
struct LayerCost {
  std::string spec;
  int64_t row_entries = 0;    // max |SA(i)| + |SB(i)| for i < context
  int64_t cache_entries = 0;  // past positions kept
  int64_t cache_bytes = 0;    // one sequence, fp32, as MixCache allocates it
  int64_t conv_bytes = 0;
  int64_t flops = 0;          // one token: projections, mixing, MLP
};
std::vector<LayerCost> decode_costs(const ModelConfig& cfg, int64_t context);
int64_t count_parameters(const ModelConfig& cfg);  // without building the model

}  // namespace tokmix::nn
