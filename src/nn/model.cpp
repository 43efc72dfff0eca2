// The backbone and its decoding: prefill over packed prompts of different lengths, then one
// step for every sequence at once, through each layer's MixerState.
#include "tokmix/nn/model.h"

#include <sstream>

namespace tokmix::nn {

using torch::Tensor;

BlockImpl::BlockImpl(const ModelConfig& cfg, int64_t layer) {
  norm1 = register_module("norm1", RMSNorm(cfg.d_model, cfg.norm_eps));
  mixer = register_module("mixer", TokenMixer(cfg.layers.at(layer), cfg.d_model, cfg.max_context, cfg.rope_theta, cfg.init_std, cfg.n_layers));
  if (cfg.mlp) {
    norm2 = register_module("norm2", RMSNorm(cfg.d_model, cfg.norm_eps));
    mlp = register_module("mlp", SwiGLU(cfg.d_model, cfg.mlp_hidden));
    torch::NoGradGuard ng;
    mlp->w_gate->weight.normal_(0.0, cfg.init_std);
    mlp->w_up->weight.normal_(0.0, cfg.init_std);
    mlp->w_down->weight.normal_(0.0, cfg.init_std / std::sqrt(2.0 * double(cfg.n_layers)));
  }
}

Tensor BlockImpl::forward(const Tensor& h, const TokenPositions& p) {
  Tensor x = h + mixer(norm1(h), p);
  return mlp ? x + mlp(norm2(x)) : x;
}

Tensor BlockImpl::prefill(const Tensor& h, const TokenPositions& p, MixerState& s) {
  Tensor x = h + mixer->prefill(norm1(h), p, s);
  return mlp ? x + mlp(norm2(x)) : x;
}

Tensor BlockImpl::step(const Tensor& h, const Tensor& pos, MixerState& s) {
  Tensor x = h + mixer->step(norm1(h), pos, s);
  return mlp ? x + mlp(norm2(x)) : x;
}

int64_t DecodeState::cache_bytes() const {
  int64_t b = 0;
  for (const auto& l : layers) b += l.bytes();
  return b;
}

int64_t DecodeState::conv_bytes() const {
  int64_t b = 0;
  for (const auto& l : layers) b += l.conv_bytes();
  return b;
}

LanguageModelImpl::LanguageModelImpl(const ModelConfig& cfg) : cfg_(cfg) {
  if (int64_t(cfg.layers.size()) != cfg.n_layers)
    throw ConfigError("LanguageModel: config has " + std::to_string(cfg.layers.size()) + " resolved layers for n_layers = " +
                      std::to_string(cfg.n_layers) + "; build configs with ModelConfig::from_json");
  tok_emb = register_module("tok_emb", torch::nn::Embedding(cfg.vocab_size, cfg.d_model));
  if (cfg.positions == "learned") pos_emb = register_module("pos_emb", torch::nn::Embedding(cfg.max_context, cfg.d_model));
  block_list = register_module("blocks", torch::nn::ModuleList());
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    blocks_.push_back(Block(cfg, l));
    block_list->push_back(blocks_.back());
  }
  final_norm = register_module("final_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
  torch::NoGradGuard ng;
  tok_emb->weight.normal_(0.0, cfg.init_std);
  if (pos_emb) pos_emb->weight.normal_(0.0, cfg.init_std);
}

void LanguageModelImpl::check_tokens(const Tensor& tokens) const {
  if (tokens.scalar_type() != torch::kInt64) throw std::invalid_argument("LanguageModel: tokens must be int64");
  if (tokens.numel() == 0) return;
  const int64_t lo = tokens.min().item<int64_t>(), hi = tokens.max().item<int64_t>();
  if (lo < 0 || hi >= cfg_.vocab_size)
    throw std::invalid_argument("LanguageModel: token id " + std::to_string(lo < 0 ? lo : hi) + " is outside the vocabulary [0, " +
                                std::to_string(cfg_.vocab_size) + ")");
}

Tensor LanguageModelImpl::embed(const Tensor& tokens, const Tensor& pos) {
  Tensor h = tok_emb(tokens);
  if (pos_emb) h = h + pos_emb(pos);
  return h;
}

Tensor LanguageModelImpl::head(const Tensor& h) { return torch::matmul(final_norm(h), tok_emb->weight.t()); }

Tensor LanguageModelImpl::forward(const Tensor& tokens) {
  if (tokens.dim() != 2) throw std::invalid_argument("LanguageModel::forward: tokens must be [B, T]");
  return forward(tokens, TokenPositions::contiguous(tokens.size(0), tokens.size(1), tokens.device()));
}

Tensor LanguageModelImpl::forward(const Tensor& tokens, const TokenPositions& p) { return head(hidden(tokens, p)); }

Tensor LanguageModelImpl::hidden(const Tensor& tokens, const TokenPositions& p) {
  if (tokens.dim() != 2) throw std::invalid_argument("LanguageModel::forward: tokens must be [B, T]");
  check_tokens(tokens);
  if (!p.pos.defined() || !p.pos.sizes().equals(tokens.sizes()))
    throw std::invalid_argument("LanguageModel::forward: positions must have the tokens' shape [B, T]");
  check_length(p.one_per_row ? tokens.size(1) : (p.pos.numel() > 0 ? p.pos.max().item<int64_t>() + 1 : 0));
  return blocks_forward(tokens, p);
}

Tensor LanguageModelImpl::blocks_forward(const Tensor& tokens, const TokenPositions& p) {
  Tensor h = embed(tokens, p.pos);
  for (auto& b : blocks_) h = b->forward(h, p);
  return h;
}

void LanguageModelImpl::check_batch(const Tensor& tokens) const {
  if (tokens.dim() != 2) throw std::invalid_argument("LanguageModel::forward: tokens must be [B, T]");
  check_tokens(tokens);
  check_length(tokens.size(1));
}

void LanguageModelImpl::check_length(int64_t longest) const {
  if (longest > cfg_.max_context)
    throw std::invalid_argument("LanguageModel::forward: a sequence of " + std::to_string(longest) + " tokens exceeds max_context = " +
                                std::to_string(cfg_.max_context));
}

Tensor LanguageModelImpl::forward_unchecked(const Tensor& tokens, const Tensor& flat_index) {
  Tensor h = blocks_forward(tokens, TokenPositions::contiguous(tokens.size(0), tokens.size(1), tokens.device()));
  if (!flat_index.defined()) return head(h);
  return head(h.reshape({-1, h.size(-1)}).index_select(0, flat_index));
}

Tensor LanguageModelImpl::forward_at(const Tensor& tokens, const Tensor& flat_index) {
  if (tokens.dim() != 2) throw std::invalid_argument("LanguageModel::forward_at: tokens must be [B, T]");
  if (flat_index.dim() != 1 || flat_index.scalar_type() != torch::kInt64)
    throw std::invalid_argument("LanguageModel::forward_at: flat_index must be a 1-D int64 tensor");
  if (flat_index.numel() > 0) {
    const int64_t lo = flat_index.min().item<int64_t>(), hi = flat_index.max().item<int64_t>();
    if (lo < 0 || hi >= tokens.numel())
      throw std::invalid_argument("LanguageModel::forward_at: index " + std::to_string(lo < 0 ? lo : hi) + " outside the " +
                                  std::to_string(tokens.numel()) + " positions");
  }
  // the blocks run on every position (they mix across positions); the head only where asked
  Tensor h = hidden(tokens, TokenPositions::contiguous(tokens.size(0), tokens.size(1), tokens.device()));
  return head(h.reshape({-1, h.size(-1)}).index_select(0, flat_index.to(h.device())));
}

DecodeState LanguageModelImpl::new_decode_state(int64_t batch, int64_t max_context) const {
  if (max_context == 0) max_context = cfg_.max_context;
  if (batch < 1 || max_context < 1 || max_context > cfg_.max_context)
    throw std::invalid_argument("LanguageModel::new_decode_state: batch " + std::to_string(batch) + ", max_context " +
                                std::to_string(max_context) + "; expected batch >= 1 and 1 <= max_context <= " + std::to_string(cfg_.max_context));
  DecodeState s;
  s.batch = batch;
  s.max_context = max_context;
  s.positions.assign(batch, 0);
  const auto& w = tok_emb->weight;
  for (const auto& b : blocks_) s.layers.push_back(b->mixer->new_state(batch, max_context, w.scalar_type(), w.device()));
  return s;
}

Tensor LanguageModelImpl::prefill(DecodeState& s, const std::vector<std::vector<int64_t>>& prompts, bool all_logits) {
  const int64_t N = int64_t(prompts.size());
  if (N != s.batch)
    throw std::invalid_argument("LanguageModel::prefill: " + std::to_string(N) + " prompts for a decode state of batch " + std::to_string(s.batch));
  std::vector<int64_t> lengths, flat;
  for (int64_t b = 0; b < N; ++b) {
    if (s.positions[b] != 0)
      throw std::invalid_argument("LanguageModel::prefill: sequence " + std::to_string(b) + " already holds " + std::to_string(s.positions[b]) +
                                  " tokens; expected a fresh decode state");
    const int64_t len = int64_t(prompts[b].size());
    if (len < 1) throw std::invalid_argument("LanguageModel::prefill: prompt " + std::to_string(b) + " is empty; expected at least one token");
    if (len > s.max_context)
      throw std::invalid_argument("LanguageModel::prefill: prompt " + std::to_string(b) + " has " + std::to_string(len) +
                                  " tokens; the decode state serves max_context = " + std::to_string(s.max_context));
    lengths.push_back(len);
    flat.insert(flat.end(), prompts[b].begin(), prompts[b].end());
  }
  const auto device = tok_emb->weight.device();
  Tensor tokens = torch::tensor(flat, torch::TensorOptions().dtype(torch::kInt64)).view({1, -1}).to(device);
  check_tokens(tokens);
  TokenPositions p = TokenPositions::packed(lengths, device);
  Tensor h = embed(tokens, p.pos);
  for (size_t l = 0; l < blocks_.size(); ++l) h = blocks_[l]->prefill(h, p, s.layers[l]);
  for (int64_t b = 0; b < N; ++b) s.positions[b] = lengths[b];
  if (all_logits) return head(h[0]);
  std::vector<int64_t> last;
  int64_t acc = 0;
  for (auto l : lengths) last.push_back((acc += l) - 1);
  return head(h[0].index_select(0, torch::tensor(last, torch::TensorOptions().dtype(torch::kInt64)).to(device)));
}

void LanguageModelImpl::check_step(const DecodeState& s, const Tensor& tokens) const {
  if (tokens.dim() != 1 || tokens.size(0) != s.batch)
    throw std::invalid_argument("LanguageModel::step: tokens must be [" + std::to_string(s.batch) + "] (one per sequence)");
  check_tokens(tokens);
  for (int64_t b = 0; b < s.batch; ++b)
    if (s.positions[b] >= s.max_context)
      throw std::invalid_argument("LanguageModel::step: sequence " + std::to_string(b) + " is full (" + std::to_string(s.positions[b]) +
                                  " tokens, max_context = " + std::to_string(s.max_context) + ")");
}

Tensor LanguageModelImpl::step(DecodeState& s, const Tensor& tokens) {
  check_step(s, tokens);
  const auto device = tok_emb->weight.device();
  Tensor pos = torch::tensor(s.positions, torch::TensorOptions().dtype(torch::kInt64)).to(device);
  Tensor logits = step_unchecked(s, tokens.to(device), pos);
  for (auto& p : s.positions) ++p;
  return logits;
}

Tensor LanguageModelImpl::step_unchecked(DecodeState& s, const Tensor& tokens, const Tensor& pos) {
  Tensor h = embed(tokens, pos);
  for (size_t l = 0; l < blocks_.size(); ++l) h = blocks_[l]->step(h, pos, s.layers[l]);
  return head(h);
}

int64_t LanguageModelImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

void LanguageModelImpl::set_force_generic(bool v) {
  for (auto& b : blocks_) b->mixer->set_force_generic(v);
}

int64_t count_parameters(const ModelConfig& cfg) {
  const int64_t C = cfg.d_model;
  int64_t n = cfg.vocab_size * C + C;  // embedding (tied head), final norm
  if (cfg.positions == "learned") n += cfg.max_context * C;
  for (const auto& m : cfg.layers) {
    const bool gate = m.mode == "gate";
    const int64_t H = m.heads, Dk = m.d_key, Dv = m.d_value;
    const int64_t ch = H * Dk * (gate ? 1 : 2) + H * Dv;
    const int64_t L = pattern_from_spec(m.spec)->num_levels(cfg.max_context);
    n += C;                           // norm1
    n += C * ch + H * Dv * C;         // in_proj, out_proj
    if (m.output_gate) n += C * H * Dv;
    if (m.conv > 0) n += ch * m.conv;
    if (m.level_bias) n += H * L;
    if (gate) n += H * L * Dk;
    if (m.qk_norm) n += gate ? Dk : 2 * Dk;
    if (cfg.mlp) n += C + 3 * C * cfg.mlp_hidden;
  }
  return n;
}

std::vector<LayerCost> decode_costs(const ModelConfig& cfg, int64_t context) {
  std::vector<LayerCost> out;
  const int64_t C = cfg.d_model;
  for (const auto& m : cfg.layers) {
    auto pat = pattern_from_spec(m.spec);
    pat->check_length(context);
    const bool gate = m.mode == "gate";
    const int64_t H = m.heads, Dk = m.d_key, Dv = m.d_value;
    const int64_t ch = H * Dk * (gate ? 1 : 2) + H * Dv;
    LayerCost c;
    c.spec = m.spec;
    c.row_entries = pat->max_row_size(context);
    c.cache_entries = pat->cache_entries(context);
    c.cache_bytes = c.cache_entries * H * (Dk + Dv) * int64_t(sizeof(float));
    c.conv_bytes = m.conv > 1 ? (m.conv - 1) * ch * int64_t(sizeof(float)) : 0;
    int64_t proj = C * ch + H * Dv * C + (m.output_gate ? C * H * Dv : 0) + (cfg.mlp ? 3 * C * cfg.mlp_hidden : 0);
    c.flops = 2 * proj + 2 * ch * m.conv + c.row_entries * H * (2 * Dk + 2 * Dv);
    out.push_back(c);
  }
  return out;
}

}  // namespace tokmix::nn
