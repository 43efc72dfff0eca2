// tokmix's ops in the PyTorch dispatcher: torch.ops.tokmix.* from Python, c10::Dispatcher from
// C++ (libtokmix_torch.so). Every kernel forwards to the C++ API (tokmix::mix and its
// MixFunction, MixCache, analyze, the nn configs and safetensors): nothing is computed here, so
// Python and C++ run the very same code and raise the same messages.
//
// Schemas use only types every supported PyTorch knows (Tensor, Tensor?, str, int, float, bool).
// A decoding cache is C++ state: Python holds it as an integer handle into a registry here.
#include <torch/library.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>

#include "tokmix/analysis.h"
#include "tokmix/analysis_json.h"
#include "tokmix/crash_report.h"
#include "tokmix/mix.h"
#include "tokmix/nn/checkpoint.h"
#include "tokmix/nn/config.h"
#include "tokmix/nn/model.h"

namespace tokmix::torch_ops {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using nlohmann::json;

// TOKMIX_CRASH_REPORT=1: a crash inside the process prints where it happened (Python's own
// faulthandler shows only Python frames)
const bool crash_report = [] {
  const char* e = std::getenv("TOKMIX_CRASH_REPORT");
  if (e && std::string(e) == "1") install_crash_report();
  return true;
}();

std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

MixOptions make_options(const std::string& mode, const OptTensor& bias, const OptTensor& gate_weight, const OptTensor& cu_seqlens,
                        double scale, double gamma) {
  MixOptions o;
  o.mode = mode;
  o.bias = or_undefined(bias);
  o.gate_weight = or_undefined(gate_weight);
  o.cu_seqlens = or_undefined(cu_seqlens);
  o.scale = scale;
  o.gamma = gamma;
  return o;
}

// --- the mixing op ----------------------------------------------------------------------------
// One kernel for every key: under Autograd it records MixFunction (the C++ autograd node); below
// it (inference mode, tensors without autograd) MixFunction runs its forward only. The backend
// (CPU kernels or CUDA kernels) is chosen inside by the tensors' device, as for C++ callers.
Tensor mix_op(const Tensor& q, const OptTensor& k, const Tensor& v, c10::string_view pattern, c10::string_view mode, const OptTensor& bias,
              const OptTensor& gate_weight, const OptTensor& cu_seqlens, double scale, double gamma) {
  return tokmix::mix(q, or_undefined(k), v, str(pattern), make_options(str(mode), bias, gate_weight, cu_seqlens, scale, gamma));
}

// --- decoding caches --------------------------------------------------------------------------
struct CacheRegistry {
  std::mutex mu;
  int64_t next = 1;
  std::map<int64_t, std::shared_ptr<MixCache>> caches;
};
CacheRegistry& caches() {
  static CacheRegistry r;
  return r;
}
std::shared_ptr<MixCache> find_cache(int64_t handle, const char* op) {
  auto& r = caches();
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.caches.find(handle);
  if (it == r.caches.end())
    throw std::invalid_argument(std::string("tokmix::") + op + ": no decoding cache with handle " + std::to_string(handle) +
                                " (freed, or never made by tokmix::cache_new)");
  return it->second;
}

int64_t cache_new(c10::string_view pattern, int64_t batch, int64_t heads, int64_t d_key, int64_t d_value, int64_t max_context,
                  const Tensor& like) {
  std::shared_ptr<const Pattern> pat;
  try {
    pat = pattern_from_spec(str(pattern));
  } catch (const PatternError& e) {
    throw std::invalid_argument(std::string("tokmix::MixCache: ") + e.what());
  }
  auto c = std::make_shared<MixCache>(pat, batch, heads, d_key, d_value, max_context, like.scalar_type(), like.device());
  auto& r = caches();
  std::lock_guard<std::mutex> lk(r.mu);
  const int64_t h = r.next++;
  r.caches.emplace(h, std::move(c));
  return h;
}

void cache_free(int64_t handle) {
  auto& r = caches();
  std::lock_guard<std::mutex> lk(r.mu);
  r.caches.erase(handle);
}

void cache_reset(int64_t handle) { find_cache(handle, "cache_reset")->reset(); }

std::string cache_info(int64_t handle) {
  auto c = find_cache(handle, "cache_info");
  json entries = json::array();
  for (int64_t b = 0; b < c->batch(); ++b) entries.push_back(c->entries(b));
  return json{{"pattern", c->pattern().spec()},
              {"batch", c->batch()},
              {"positions", c->positions()},
              {"entries", entries},
              {"capacity_entries", c->capacity_entries()},
              {"bytes", c->bytes()}}
      .dump();
}

Tensor cache_prefill(int64_t handle, const Tensor& q, const OptTensor& k, const Tensor& v, c10::string_view mode, const OptTensor& bias,
                     const OptTensor& gate_weight, const OptTensor& cu_seqlens, double scale, double gamma) {
  return find_cache(handle, "cache_prefill")->prefill(q, or_undefined(k), v, make_options(str(mode), bias, gate_weight, cu_seqlens, scale, gamma));
}

// Decoding is inference only: the step's output carries no gradient, in C++ as here.
Tensor mix_step(int64_t handle, const Tensor& q, const OptTensor& k, const Tensor& v, c10::string_view mode, const OptTensor& bias,
                const OptTensor& gate_weight, double scale, double gamma) {
  return find_cache(handle, "mix_step")->step(q, or_undefined(k), v, make_options(str(mode), bias, gate_weight, c10::nullopt, scale, gamma));
}

// --- patterns and analysis -------------------------------------------------------------------
std::string kind_name(SupportKind k) {
  switch (k) {
    case SupportKind::None: return "none";
    case SupportKind::Self: return "self";
    case SupportKind::Window: return "window";
    case SupportKind::Offsets: return "offsets";
    case SupportKind::Lattice: return "lattice";
  }
  return "?";
}

std::string pattern_info(c10::string_view spec, int64_t n) {
  auto p = pattern_from_spec(str(spec));
  p->check_length(n);
  return json{{"pattern", p->spec()},
              {"n", n},
              {"A_kind", kind_name(p->A().kind)},
              {"A_window", p->A().window},
              {"B_kind", kind_name(p->B().kind)},
              {"levels", p->num_levels(n)},
              {"A_levels", p->num_A_levels()},
              {"B_levels", p->num_B_levels(n)},
              {"max_row_size", p->max_row_size(n)},
              {"cache_A", p->cache_A(n)},
              {"cache_B", p->cache_B(n)},
              {"max_len", p->max_len()}}
      .dump();
}

std::string analyze_op(c10::string_view spec, int64_t n, int64_t copy_shift, int64_t exact_max_n, int64_t samples, int64_t seed) {
  if (n < 2) throw std::invalid_argument("tokmix::analyze: n = " + std::to_string(n) + "; expected n >= 2");
  if (samples < 1) throw std::invalid_argument("tokmix::analyze: samples = " + std::to_string(samples) + "; expected >= 1");
  AnalysisOptions o;
  o.copy_shift = copy_shift;
  o.paths.exact_max_n = exact_max_n;
  o.paths.samples = samples;
  o.paths.seed = static_cast<uint64_t>(seed);
  return to_json(analyze(Pattern::parse(str(spec)), n, o)).dump();
}

// --- model configs and exported weights ------------------------------------------------------
// {"config": the canonical resolved config, "specs": the pattern spec of every layer}
std::string model_config(c10::string_view config_json) {
  auto cfg = nn::ModelConfig::from_text(str(config_json));
  json specs = json::array();
  for (const auto& l : cfg.layers) specs.push_back(l.spec);
  return json{{"config", cfg.to_json()}, {"specs", specs}}.dump();
}

void model_export(c10::string_view config_json, int64_t seed, c10::string_view path) {
  auto cfg = nn::ModelConfig::from_text(str(config_json));
  torch::manual_seed(static_cast<uint64_t>(seed));
  nn::LanguageModel m(cfg);
  nn::export_safetensors(str(path), *m);
}

// The C++ model of an exported safetensors file, for inference.
nn::LanguageModel load_exported(const std::string& path) {
  auto m = nn::import_safetensors(path);
  m->eval();
  return m;
}

Tensor model_forward(c10::string_view path, const Tensor& tokens) {
  auto m = load_exported(str(path));
  torch::NoGradGuard ng;
  return m->forward(tokens);
}

// prompts [N, P] (one prompt per row), then tokens [N, S] decoded one column per step; returns
// the logits [N, S + 1, vocab]: the prompts' last token, then every step.
Tensor model_decode(c10::string_view path, const Tensor& prompts, const Tensor& tokens) {
  if (prompts.dim() != 2 || tokens.dim() != 2 || prompts.size(0) != tokens.size(0) || prompts.scalar_type() != torch::kInt64 ||
      tokens.scalar_type() != torch::kInt64)
    throw std::invalid_argument("tokmix::model_decode: expected int64 prompts [N, P] and tokens [N, S]");
  auto m = load_exported(str(path));
  torch::NoGradGuard ng;
  const int64_t N = prompts.size(0);
  auto s = m->new_decode_state(N);
  std::vector<std::vector<int64_t>> ps(N);
  Tensor pc = prompts.to(torch::kCPU).contiguous();
  for (int64_t b = 0; b < N; ++b) ps[b].assign(pc[b].data_ptr<int64_t>(), pc[b].data_ptr<int64_t>() + pc.size(1));
  std::vector<Tensor> out = {m->prefill(s, ps)};
  for (int64_t t = 0; t < tokens.size(1); ++t) out.push_back(m->step(s, tokens.select(1, t).contiguous()));
  return torch::stack(out, 1);
}

// When CUDA calls report NaN/Inf in their inputs (tokmix::FiniteCheck): "at_call" or "deferred".
void set_finite_check_op(const std::string& mode) {
  if (mode == "at_call") tokmix::set_finite_check(tokmix::FiniteCheck::AtCall);
  else if (mode == "deferred") tokmix::set_finite_check(tokmix::FiniteCheck::Deferred);
  else throw std::invalid_argument("tokmix.set_finite_check: mode '" + mode + "' is not known; expected 'at_call' or 'deferred'");
}
std::string finite_check_op() { return tokmix::finite_check() == tokmix::FiniteCheck::Deferred ? "deferred" : "at_call"; }
void check_finite_pending_op() { tokmix::check_finite_pending(); }

int64_t has_cuda_backend() {
#ifdef TOKMIX_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // namespace
}  // namespace tokmix::torch_ops

using namespace tokmix::torch_ops;

TORCH_LIBRARY(tokmix, m) {
  m.def(
      "mix(Tensor q, Tensor? k, Tensor v, str pattern, str mode=\"softmax\", Tensor? bias=None, Tensor? gate_weight=None, "
      "Tensor? cu_seqlens=None, float scale=-1., float gamma=1.) -> Tensor");
  m.def(
      "cache_prefill(int cache, Tensor q, Tensor? k, Tensor v, str mode=\"softmax\", Tensor? bias=None, Tensor? gate_weight=None, "
      "Tensor? cu_seqlens=None, float scale=-1., float gamma=1.) -> Tensor");
  m.def(
      "mix_step(int cache, Tensor q, Tensor? k, Tensor v, str mode=\"softmax\", Tensor? bias=None, Tensor? gate_weight=None, "
      "float scale=-1., float gamma=1.) -> Tensor");
  // no kernel choice by device: one implementation for every key
  m.def("cache_new(str pattern, int batch, int heads, int d_key, int d_value, int max_context, Tensor like) -> int", &cache_new);
  m.def("cache_free(int cache) -> ()", &cache_free);
  m.def("cache_reset(int cache) -> ()", &cache_reset);
  m.def("cache_info(int cache) -> str", &cache_info);
  m.def("pattern_info(str pattern, int n) -> str", &pattern_info);
  m.def("analyze(str pattern, int n, int copy_shift=0, int exact_max_n=16384, int samples=2048, int seed=1) -> str", &analyze_op);
  m.def("model_config(str config) -> str", &model_config);
  m.def("model_export(str config, int seed, str path) -> ()", &model_export);
  m.def("model_forward(str path, Tensor tokens) -> Tensor", &model_forward);
  m.def("model_decode(str path, Tensor prompts, Tensor tokens) -> Tensor", &model_decode);
  m.def("has_cuda_backend() -> int", &has_cuda_backend);
  m.def("set_finite_check(str mode) -> ()", &set_finite_check_op);
  m.def("finite_check() -> str", &finite_check_op);
  m.def("check_finite_pending() -> ()", &check_finite_pending_op);
}

TORCH_LIBRARY_IMPL(tokmix, CPU, m) {
  m.impl("mix", &mix_op);
  m.impl("cache_prefill", &cache_prefill);
  m.impl("mix_step", &mix_step);
}

TORCH_LIBRARY_IMPL(tokmix, Autograd, m) {
  m.impl("mix", &mix_op);
  m.impl("cache_prefill", &cache_prefill);
  m.impl("mix_step", &mix_step);
}

#ifdef TOKMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(tokmix, CUDA, m) {
  m.impl("mix", &mix_op);
  m.impl("cache_prefill", &cache_prefill);
  m.impl("mix_step", &mix_step);
}
#endif
