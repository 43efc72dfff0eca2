// Layers: RMSNorm, SwiGLU, the token mixer (projections, short causal convolution, rotary
// positions, q/k normalisation, mixing, output gate) and LibTorch's attention path.
#include "tokmix/nn/layers.h"

#include <torch/version.h>

#include <cmath>
#include <limits>

namespace tokmix::nn {

using torch::Tensor;

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) { weight = register_parameter("weight", torch::ones({dim})); }

Tensor RMSNormImpl::forward(const Tensor& x) { return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight; }

SwiGLUImpl::SwiGLUImpl(int64_t d_model, int64_t hidden) {
  w_gate = register_module("w_gate", torch::nn::Linear(torch::nn::LinearOptions(d_model, hidden).bias(false)));
  w_up = register_module("w_up", torch::nn::Linear(torch::nn::LinearOptions(d_model, hidden).bias(false)));
  w_down = register_module("w_down", torch::nn::Linear(torch::nn::LinearOptions(hidden, d_model).bias(false)));
}

Tensor SwiGLUImpl::forward(const Tensor& x) { return w_down(torch::silu(w_gate(x)) * w_up(x)); }

TokenPositions TokenPositions::contiguous(int64_t B, int64_t T, torch::Device device) {
  TokenPositions p;
  p.pos = torch::arange(T, torch::TensorOptions().dtype(torch::kInt64).device(device)).unsqueeze(0).expand({B, T});
  p.one_per_row = true;
  return p;
}

TokenPositions TokenPositions::packed(const std::vector<int64_t>& lengths, torch::Device device) {
  std::vector<int64_t> cu = {0}, pos;
  for (int64_t l : lengths) {
    if (l < 0) throw std::invalid_argument("TokenPositions::packed: negative length " + std::to_string(l));
    cu.push_back(cu.back() + l);
    for (int64_t t = 0; t < l; ++t) pos.push_back(t);
  }
  TokenPositions p;
  auto o = torch::TensorOptions().dtype(torch::kInt64);
  p.pos = torch::tensor(pos, o).view({1, cu.back()}).to(device);
  p.cu_seqlens = torch::tensor(cu, o).to(device);
  p.one_per_row = lengths.size() == 1;
  return p;
}

Tensor apply_rotary(const Tensor& x, const Tensor& pos, double theta) {
  const int64_t D = x.size(-1), half = D / 2;
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64).device(x.device());
  Tensor inv_freq = torch::pow(theta, -torch::arange(half, o64) * (2.0 / double(D)));
  Tensor ang = pos.to(torch::kFloat64).unsqueeze(-1) * inv_freq;  // pos.shape + [half]
  Tensor c = torch::cos(ang).to(x.scalar_type()).unsqueeze(-2), s = torch::sin(ang).to(x.scalar_type()).unsqueeze(-2);
  Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return torch::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

Tensor fused_attention(const Tensor& q, const Tensor& k, const Tensor& v, const TokenPositions& p, int64_t window, const Tensor& bias,
                       double scale) {
  const int64_t T = q.size(1), H = q.size(2);
  Tensor qh = q.transpose(1, 2), kh = k.transpose(1, 2), vh = v.transpose(1, 2);  // [B, H, T, D]
  const bool plain_causal = p.one_per_row && window == 0 && !bias.defined();
  Tensor mask;  // bool (true = may attend) or additive float, broadcastable to [B, H, T, T]
  if (!plain_causal) {
    auto oi = torch::TensorOptions().dtype(torch::kInt64).device(q.device());
    Tensor ar = torch::arange(T, oi);
    Tensor d = ar.unsqueeze(1) - ar.unsqueeze(0);  // i - j
    Tensor allowed = d.ge(0);
    if (window > 0) allowed = allowed.logical_and(d.lt(window));
    allowed = allowed.unsqueeze(0);  // [1, T, T]
    // a token sees only its own sequence: i - j <= its position
    if (!p.one_per_row) allowed = allowed.logical_and(d.unsqueeze(0).le(p.pos.unsqueeze(2)));
    allowed = allowed.unsqueeze(1);  // [B|1, 1, T, T]
    if (bias.defined()) {
      // distances outside the window are masked; clamp them to a level the table has
      Tensor dd = window > 0 ? d.clamp(0, window - 1) : d.clamp_min(0);
      Tensor level = window_levels(dd, T).flatten();
      Tensor bm = bias.index_select(1, level).view({H, T, T}).unsqueeze(0);
      mask = bm.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    } else {
      mask = allowed;
    }
  }
#if TORCH_VERSION_MAJOR >= 2
  // The default scale of scaled_dot_product_attention is 1/sqrt(Dk); fold ours into q.
  Tensor qs = qh * (scale * std::sqrt(double(q.size(3))));
  Tensor y = at::scaled_dot_product_attention(qs, kh, vh, mask.defined() ? c10::optional<Tensor>(mask) : c10::nullopt, 0.0,
                                              /*is_causal=*/plain_causal);
#else
  Tensor scores = torch::matmul(qh, kh.transpose(-2, -1)) * scale;
  if (plain_causal) {
    auto oi = torch::TensorOptions().dtype(torch::kInt64).device(q.device());
    Tensor ar = torch::arange(T, oi);
    mask = ar.unsqueeze(1).ge(ar.unsqueeze(0));
  }
  if (mask.scalar_type() == torch::kBool)
    scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  else
    scores = scores + mask;
  Tensor y = torch::matmul(torch::softmax(scores, -1), vh);
#endif
  return y.transpose(1, 2);
}

int64_t MixerState::bytes() const { return cache ? cache->bytes() : 0; }
int64_t MixerState::conv_bytes() const { return conv.defined() ? conv.numel() * int64_t(conv.element_size()) : 0; }

TokenMixerImpl::TokenMixerImpl(const MixerConfig& cfg, int64_t d_model, int64_t max_context, double rope_theta, double init_std,
                               int64_t n_layers)
    : cfg_(cfg), d_model_(d_model), max_context_(max_context), rope_theta_(rope_theta) {
  pattern_ = pattern_from_spec(cfg.spec);
  pattern_->check_length(max_context);
  levels_ = pattern_->num_levels(max_context);
  const int64_t H = cfg.heads, Dk = cfg.d_key, Dv = cfg.d_value;
  const bool gate = cfg.mode == "gate";
  channels_ = H * Dk * (gate ? 1 : 2) + H * Dv;
  in_proj = register_module("in_proj", torch::nn::Linear(torch::nn::LinearOptions(d_model, channels_).bias(false)));
  out_proj = register_module("out_proj", torch::nn::Linear(torch::nn::LinearOptions(H * Dv, d_model).bias(false)));
  if (cfg.output_gate)
    gate_proj = register_module("gate_proj", torch::nn::Linear(torch::nn::LinearOptions(d_model, H * Dv).bias(false)));
  torch::NoGradGuard ng;
  in_proj->weight.normal_(0.0, init_std);
  out_proj->weight.normal_(0.0, init_std / std::sqrt(2.0 * double(n_layers)));
  if (gate_proj) gate_proj->weight.normal_(0.0, init_std);
  if (cfg.conv > 0) {
    // near the identity: the current token passes through, earlier taps start small
    const double b = 1.0 / std::sqrt(double(cfg.conv));
    Tensor w = torch::empty({channels_, cfg.conv}).uniform_(-b, b);
    w.select(1, cfg.conv - 1).add_(1.0);
    conv_weight = register_parameter("conv_weight", w);
  }
  if (cfg.level_bias) bias = register_parameter("bias", torch::zeros({H, levels_}));
  if (gate) gate_weight = register_parameter("gate_weight", torch::randn({H, levels_, Dk}) / std::sqrt(double(Dk)));
  if (cfg.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(Dk, 1e-6));
    if (!gate) k_norm = register_module("k_norm", RMSNorm(Dk, 1e-6));
  }
}

MixOptions TokenMixerImpl::mix_options() const {
  MixOptions o;
  o.mode = cfg_.mode;
  o.gamma = cfg_.gamma;
  if (bias.defined()) o.bias = bias;
  if (gate_weight.defined()) o.gate_weight = gate_weight;
  return o;
}

// Causal depthwise convolution along T; tap j (j tokens back) is dropped where it would reach
// into the previous sequence (pos < j), so packed prompts do not leak into each other.
Tensor TokenMixerImpl::conv_parallel(const Tensor& u, const Tensor& pos) const {
  const int64_t w = cfg_.conv, T = u.size(1);
  Tensor out = u * conv_weight.select(1, w - 1);
  for (int64_t j = 1; j < w && j < T; ++j) {
    Tensor shifted = torch::constant_pad_nd(u.narrow(1, 0, T - j), {0, 0, j, 0});
    Tensor keep = pos.ge(j).unsqueeze(-1).to(u.scalar_type());
    out = out + shifted * keep * conv_weight.select(1, w - 1 - j);
  }
  return out;
}

void TokenMixerImpl::qkv(const Tensor& u, const Tensor& pos, Tensor& q, Tensor& k, Tensor& v) {
  const int64_t H = cfg_.heads, Dk = cfg_.d_key, Dv = cfg_.d_value;
  const bool gate = cfg_.mode == "gate";
  auto heads = [&](const Tensor& t, int64_t D) {
    auto s = t.sizes().vec();
    s.back() = H;
    s.push_back(D);
    return t.reshape(s);
  };
  int64_t off = 0;
  q = heads(u.narrow(-1, off, H * Dk), Dk);
  off += H * Dk;
  if (!gate) {
    k = heads(u.narrow(-1, off, H * Dk), Dk);
    off += H * Dk;
  } else {
    k = Tensor();
  }
  v = heads(u.narrow(-1, off, H * Dv), Dv);
  if (cfg_.qk_norm) {
    q = q_norm(q);
    if (!gate) k = k_norm(k);
  }
  if (cfg_.rotary) {
    q = apply_rotary(q, pos, rope_theta_);
    k = apply_rotary(k, pos, rope_theta_);
  }
}

Tensor TokenMixerImpl::finish(const Tensor& y, const Tensor& x) {
  Tensor o = y.flatten(-2);
  if (gate_proj) o = o * torch::silu(gate_proj(x));
  return out_proj(o);
}

Tensor TokenMixerImpl::attend_fused(const Tensor& q, const Tensor& k, const Tensor& v, const TokenPositions& p) {
  return fused_attention(q, k, v, p, pattern_->A().window, bias, 1.0 / std::sqrt(double(cfg_.d_key)));
}

Tensor TokenMixerImpl::forward(const Tensor& x, const TokenPositions& p) {
  Tensor u = in_proj(x);
  if (cfg_.conv > 0) u = conv_parallel(u, p.pos);
  Tensor q, k, v;
  qkv(u, p.pos, q, k, v);
  Tensor y;
  if (fused()) {
    y = attend_fused(q, k, v, p);
  } else if (x.is_cuda() && !force_generic_ && !p.cu_seqlens.defined() && mix_dense_preferred(*pattern_, q.size(0), q.size(2), q.size(1))) {
    // a dense B on short sequences: batched products and one triangular solve beat the generic
    // kernel's row-by-row chain (dense recurrence, MQAR T = 256: docs/perf-notes.md, "Dense form")
    y = mix_dense(q, k, v, *pattern_, mix_options());
  } else {
    MixOptions o = mix_options();
    o.cu_seqlens = p.cu_seqlens;
    y = mix(q, k, v, *pattern_, o);
  }
  return finish(y, x);
}

// fused_attention builds T x T masks for packed prompts: 32K tokens take ~10 GB of them
constexpr int64_t kFusedPrefillMaxTokens = 32768;

Tensor TokenMixerImpl::prefill(const Tensor& x, const TokenPositions& p, MixerState& s) {
  if (!p.cu_seqlens.defined() || x.size(0) != 1)
    throw std::invalid_argument("TokenMixer::prefill: expected packed prompts x [1, total, d_model] with cu_seqlens");
  Tensor u = in_proj(x);
  if (cfg_.conv > 0) {
    // keep the last conv-1 inputs of each prompt (zeros before a short prompt's start)
    const int64_t keep = cfg_.conv - 1;
    if (keep > 0) {
      Tensor cu = p.cu_seqlens.to(torch::kCPU);
      const int64_t N = cu.numel() - 1;
      std::vector<Tensor> rows;
      for (int64_t b = 0; b < N; ++b) {
        const int64_t t0 = cu[b].item<int64_t>(), t1 = cu[b + 1].item<int64_t>();
        const int64_t n = std::min(keep, t1 - t0);
        Tensor tail = u[0].narrow(0, t1 - n, n).detach();
        rows.push_back(torch::constant_pad_nd(tail, {0, 0, keep - n, 0}));
      }
      s.conv = torch::stack(rows, 0);
    }
    u = conv_parallel(u, p.pos);
  }
  Tensor q, k, v;
  qkv(u, p.pos, q, k, v);
  MixOptions o = mix_options();
  o.cu_seqlens = p.cu_seqlens;
  Tensor y;
  // The prompt through the fused kernel, as in forward, on the GPU only and only while its T x T
  // mask (packed prompts, level bias) stays small: elsewhere the generic kernel, linear in T.
  if (fused() && x.is_cuda() && x.size(1) <= kFusedPrefillMaxTokens) {
    y = attend_fused(q, k, v, p);
    s.cache->prefill_outputs(q, k, v, y, o);
  } else {
    y = s.cache->prefill(q, k, v, o);
  }
  return finish(y, x);
}

Tensor TokenMixerImpl::step(const Tensor& x, const Tensor& pos, MixerState& s) {
  Tensor u = in_proj(x);  // [N, channels]
  if (cfg_.conv > 0) {
    const int64_t w = cfg_.conv;
    Tensor win = w > 1 ? torch::cat({s.conv, u.unsqueeze(1)}, 1) : u.unsqueeze(1);  // oldest .. current
    // same order of operations as conv_parallel, so both paths round alike
    Tensor out = win.select(1, w - 1) * conv_weight.select(1, w - 1);
    for (int64_t j = 1; j < w; ++j) out = out + win.select(1, w - 1 - j) * conv_weight.select(1, w - 1 - j);
    // in place: a step captured in a CUDA graph reads and writes the same tail every replay
    if (w > 1) s.conv.copy_(win.narrow(1, 1, w - 1).detach());
    u = out;
  }
  Tensor q, k, v;
  qkv(u, pos, q, k, v);
  Tensor y = s.cache->step(q, k, v, mix_options());
  return finish(y, x);
}

MixerState TokenMixerImpl::new_state(int64_t batch, int64_t max_context, torch::ScalarType dtype, torch::Device device) const {
  MixerState s;
  s.cache = std::make_unique<MixCache>(pattern_, batch, cfg_.heads, cfg_.d_key, cfg_.d_value, max_context, dtype, device);
  if (cfg_.conv > 0) s.conv = torch::zeros({batch, cfg_.conv - 1, channels_}, torch::TensorOptions().dtype(dtype).device(device));
  return s;
}

}  // namespace tokmix::nn
