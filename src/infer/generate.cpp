#include "tokmix/infer/generate.h"

#include "tokmix/infer/graph_decode.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace tokmix::infer {
using torch::Tensor;

void SampleOptions::validate() const {
  if (!(temperature >= 0) || !std::isfinite(temperature))
    throw std::invalid_argument("temperature = " + std::to_string(temperature) + "; expected a finite value >= 0 (0 = greedy)");
  if (top_k < 0) throw std::invalid_argument("top_k = " + std::to_string(top_k) + "; expected >= 0 (0 = all tokens)");
  if (!(top_p > 0 && top_p <= 1)) throw std::invalid_argument("top_p = " + std::to_string(top_p) + "; expected a value in (0, 1]");
}

int64_t sample_token(const Tensor& logits_in, const SampleOptions& o, std::mt19937_64& rng) {
  Tensor logits = logits_in.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  if (logits.dim() != 1) throw std::invalid_argument("sample_token: logits must be one row [V]");
  if (!torch::isfinite(logits).all().item<bool>()) throw std::runtime_error("sample_token: the model produced non-finite logits");
  if (o.temperature == 0) return logits.argmax().item<int64_t>();
  const int64_t V = logits.size(0);
  Tensor sorted, idx;
  std::tie(sorted, idx) = (logits / o.temperature).sort(/*dim=*/0, /*descending=*/true);
  int64_t keep = o.top_k > 0 ? std::min(o.top_k, V) : V;
  Tensor p = torch::softmax(sorted.slice(0, 0, keep), 0);
  if (o.top_p < 1) {
    // smallest prefix whose mass reaches top_p (at least one token)
    Tensor cum = p.cumsum(0);
    const int64_t n = (cum < o.top_p).sum().item<int64_t>() + 1;
    keep = std::min(keep, n);
    p = p.slice(0, 0, keep);
    p = p / p.sum();
  }
  const double* pp = p.data_ptr<double>();
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double r = u(rng), acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += pp[i];
    if (r < acc) return idx[i].item<int64_t>();
  }
  return idx[keep - 1].item<int64_t>();
}

GenerateResult generate(nn::LanguageModelImpl& model, const std::vector<std::vector<int64_t>>& prompts_in, int64_t max_tokens,
                        const SampleOptions& sample, const std::function<void(int64_t, int64_t)>& on_token) {
  using Clock = std::chrono::steady_clock;
  sample.validate();
  const auto& cfg = model.config();
  if (prompts_in.empty()) throw std::invalid_argument("generate: no prompts");
  if (max_tokens < 0 || max_tokens >= cfg.max_context)
    throw std::invalid_argument("max_tokens = " + std::to_string(max_tokens) + "; expected in [0, " + std::to_string(cfg.max_context) +
                                ") (the model's context is " + std::to_string(cfg.max_context) + ")");
  GenerateResult res;
  std::vector<std::vector<int64_t>> prompts;
  for (size_t i = 0; i < prompts_in.size(); ++i) {
    const auto& p = prompts_in[i];
    if (p.empty()) throw std::invalid_argument("generate: prompt " + std::to_string(i) + " has no tokens; expected at least one");
    for (int64_t t : p)
      if (t < 0 || t >= cfg.vocab_size)
        throw std::invalid_argument("generate: prompt " + std::to_string(i) + " holds token id " + std::to_string(t) +
                                    ", outside the vocabulary [0, " + std::to_string(cfg.vocab_size) + ")");
    const int64_t room = cfg.max_context - max_tokens;
    const int64_t drop = std::max<int64_t>(0, int64_t(p.size()) - room);
    prompts.emplace_back(p.begin() + drop, p.end());
    res.dropped_tokens.push_back(drop);
    res.prompt_tokens.push_back(int64_t(p.size()) - drop);
  }
  const int64_t N = int64_t(prompts.size());
  torch::NoGradGuard ng;
  const bool was_training = model.is_training();
  model.eval();
  const auto dev = model.parameters().front().device();
  std::mt19937_64 rng(sample.seed);
  res.tokens.assign(N, {});

  auto t0 = Clock::now();
  nn::DecodeState st = model.new_decode_state(N);
  Tensor logits = model.prefill(st, prompts);  // [N, V]
  res.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::unique_ptr<GraphDecoder> graph;
  if (sample.cuda_graph && dev.is_cuda() && GraphDecoder::available()) graph = std::make_unique<GraphDecoder>(model, st);
  auto t1 = Clock::now();
  for (int64_t k = 0; k < max_tokens; ++k) {
    std::vector<int64_t> next(N);
    Tensor lc = logits.to(torch::kCPU, torch::kFloat32);
    for (int64_t s = 0; s < N; ++s) {
      next[s] = sample_token(lc[s], sample, rng);
      res.tokens[s].push_back(next[s]);
      if (on_token) on_token(s, next[s]);
    }
    if (k + 1 == max_tokens) break;  // the last token needs no step
    Tensor tok = torch::tensor(next, torch::kInt64);
    logits = graph ? graph->step(tok) : model.step(st, tok.to(dev));
    ++res.decode_steps;
  }
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  res.decode_tokens_per_s = res.decode_steps > 0 ? double(res.decode_steps * N) / std::max(res.decode_seconds, 1e-12) : 0;
  res.cache_bytes = st.cache_bytes() + st.conv_bytes();
  res.cuda_graph = graph && graph->captured();
  if (was_training) model.train();
  return res;
}

DecodeSpeed measure_decode(nn::LanguageModelImpl& model, int64_t context, int64_t steps, int64_t batch, bool graph) {
  using Clock = std::chrono::steady_clock;
  const auto& cfg = model.config();
  if (context < 1 || steps < 1 || batch < 1 || context + steps + 2 > cfg.max_context)
    throw std::invalid_argument("measure_decode: context " + std::to_string(context) + " + steps " + std::to_string(steps) +
                                " + 2 warm-up steps must fit max_context = " + std::to_string(cfg.max_context) + ", and batch " +
                                std::to_string(batch) + ", context and steps must be >= 1");
  torch::NoGradGuard ng;
  const auto dev = model.parameters().front().device();
  auto sync = [&] {
    if (dev.is_cuda()) torch::cuda::synchronize();
  };
  std::vector<std::vector<int64_t>> prompts(batch, std::vector<int64_t>(context));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < context; ++i) prompts[b][i] = (i * 7919 + b * 104729) % cfg.vocab_size;
  DecodeSpeed r;
  std::vector<Tensor> fed, eager_logits;  // graph check: the same tokens, the same logits
  {
    nn::DecodeState st = model.new_decode_state(batch);
    Tensor tok = model.prefill(st, prompts).argmax(-1);
    for (int i = 0; i < 2; ++i) {
      fed.push_back(tok);
      tok = model.step(st, tok).argmax(-1);
    }
    sync();
    auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) {
      fed.push_back(tok);
      Tensor l = model.step(st, tok);
      eager_logits.push_back(l);
      tok = l.argmax(-1);
    }
    sync();
    r.tokens_per_s = double(steps * batch) / std::chrono::duration<double>(Clock::now() - t0).count();
    r.cache_bytes = (st.cache_bytes() + st.conv_bytes()) / batch;
  }
  if (graph && dev.is_cuda() && GraphDecoder::available()) {
    nn::DecodeState st = model.new_decode_state(batch);
    model.prefill(st, prompts);
    GraphDecoder gd(model, st);
    for (int i = 0; i < 2; ++i) gd.step(fed[i]);
    std::vector<Tensor> out;
    sync();
    auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) out.push_back(gd.step(fed[2 + i]));
    sync();
    r.graph_tokens_per_s = double(steps * batch) / std::chrono::duration<double>(Clock::now() - t0).count();
    double diff = 0;
    for (int64_t i = 0; i < steps; ++i) {
      const Tensor e = eager_logits[i].to(torch::kFloat64), g = out[i].to(torch::kFloat64);
      const double d = (g - e).abs().max().item<double>() / std::max(e.abs().max().item<double>(), 1e-30);
      diff = std::isfinite(d) ? std::max(diff, d) : std::numeric_limits<double>::infinity();
    }
    r.graph_max_rel_diff = diff;
    if (!(diff <= 1e-4))
      throw std::runtime_error("measure_decode: the CUDA graph's logits differ from the eager step's by " + std::to_string(diff) +
                               " (relative); expected equal");
  }
  return r;
}

}  // namespace tokmix::infer
