// Layers of the backbone: RMSNorm, SwiGLU MLP, and the token mixer built from a MixerConfig.
// The mixer computes through tokmix::mix (training, prefill) and tokmix::MixCache (decoding), or,
// for attention patterns, through LibTorch's attention; it never calls a kernel itself.
#pragma once
#include <torch/torch.h>

#include <memory>

#include "tokmix/mix.h"
#include "tokmix/nn/config.h"

namespace tokmix::nn {

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// w_down(silu(w_gate x) * w_up x)
struct SwiGLUImpl : torch::nn::Module {
  SwiGLUImpl(int64_t d_model, int64_t hidden);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear w_gate{nullptr}, w_up{nullptr}, w_down{nullptr};
};
TORCH_MODULE(SwiGLU);

// Where the tokens of a [B, T, ...] batch sit in their sequences.
struct TokenPositions {
  torch::Tensor pos;         // [B, T] int64: index of each token inside its own sequence
  torch::Tensor cu_seqlens;  // packed sequences (B == 1): [N+1] int64 boundaries; else undefined
  bool one_per_row = false;  // every batch row is one sequence starting at position 0
  static TokenPositions contiguous(int64_t B, int64_t T, torch::Device device = torch::kCPU);
  static TokenPositions packed(const std::vector<int64_t>& lengths, torch::Device device = torch::kCPU);
};

// Rotary positions on x [..., H, D] with pos of shape x.shape[:-2] (D even; halves rotated).
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& pos, double theta);

// Softmax attention over the window pattern of `window` (0 = attention, W = local:W) through
// LibTorch: at::scaled_dot_product_attention on LibTorch >= 2.0, a masked softmax otherwise.
// q, k [B, T, H, Dk], v [B, T, H, Dv]; `pos` as in TokenPositions (a token sees only earlier
// tokens of its own sequence); `bias` [H, L] per distance level as in the pattern (optional).
torch::Tensor fused_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const TokenPositions& p,
                              int64_t window, const torch::Tensor& bias, double scale);

// Decode state of one mixer layer for `batch` sequences.
struct MixerState {
  std::unique_ptr<MixCache> cache;
  torch::Tensor conv;  // [batch, conv - 1, channels]: the last inputs of the short convolution
  int64_t bytes() const;       // cache bytes (the pattern's stores)
  int64_t conv_bytes() const;
};

class TokenMixerImpl : public torch::nn::Module {
 public:
  TokenMixerImpl(const MixerConfig& cfg, int64_t d_model, int64_t max_context, double rope_theta, double init_std, int64_t n_layers);

  // Parallel form: x [B, T, d_model] (already normalised) -> [B, T, d_model].
  torch::Tensor forward(const torch::Tensor& x, const TokenPositions& p);
  // Prompts packed in x [1, total, d_model] (p.cu_seqlens given): parallel form, fills `s`.
  torch::Tensor prefill(const torch::Tensor& x, const TokenPositions& p, MixerState& s);
  // One token per sequence: x [batch, d_model], pos [batch] int64 -> [batch, d_model].
  torch::Tensor step(const torch::Tensor& x, const torch::Tensor& pos, MixerState& s);
  MixerState new_state(int64_t batch, int64_t max_context, torch::ScalarType dtype, torch::Device device) const;

  const MixerConfig& config() const { return cfg_; }
  const Pattern& pattern() const { return *pattern_; }
  // Forces the generic op (true) or the configured path (false); for comparing the two.
  void set_force_generic(bool v) { force_generic_ = v; }
  MixOptions mix_options() const;
  int64_t levels() const { return levels_; }

 private:
  torch::Tensor conv_parallel(const torch::Tensor& u, const torch::Tensor& pos) const;
  void qkv(const torch::Tensor& u, const torch::Tensor& pos, torch::Tensor& q, torch::Tensor& k, torch::Tensor& v);
  torch::Tensor finish(const torch::Tensor& y, const torch::Tensor& x);
  // attention through LibTorch's fused kernel (impl "fused", not forced generic)
  bool fused() const { return cfg_.impl == "fused" && !force_generic_; }
  torch::Tensor attend_fused(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const TokenPositions& p);

  MixerConfig cfg_;
  std::shared_ptr<const Pattern> pattern_;
  int64_t d_model_, max_context_, levels_, channels_;
  double rope_theta_;
  bool force_generic_ = false;
  torch::nn::Linear in_proj{nullptr}, out_proj{nullptr}, gate_proj{nullptr};
  torch::Tensor conv_weight;  // [channels, conv]; column conv-1 multiplies the current token
  torch::Tensor bias;         // [H, L]
  torch::Tensor gate_weight;  // [H, L, Dk]
  RMSNorm q_norm{nullptr}, k_norm{nullptr};
};
TORCH_MODULE(TokenMixer);

}  // namespace tokmix::nn
