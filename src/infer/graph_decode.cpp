#include "tokmix/infer/graph_decode.h"

#include <cstdio>
#include <stdexcept>
#include <string>

#ifdef TOKMIX_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include "tokmix/cuda_capture.h"
#endif

namespace tokmix::infer {
using torch::Tensor;

#ifdef TOKMIX_WITH_CUDA

struct GraphDecoder::Impl {
  nn::LanguageModelImpl& m;
  nn::DecodeState& s;
  c10::cuda::CUDAStream stream;
  Tensor tokens, pos;  // static inputs on the device; the graphs advance pos themselves
  std::unique_ptr<at::cuda::CUDAGraph> graph[2];
  Tensor out[2];                       // static outputs of each graph
  std::vector<int64_t> positions;      // s.positions after this decoder's last step
  std::vector<const void*> conv_ptrs;  // the convolution tails the graphs read and write
  bool warmed = false;
  bool eager_only = false;  // a capture failed: every step runs eagerly

  Impl(nn::LanguageModelImpl& model, nn::DecodeState& state)
      : m(model), s(state), stream(c10::cuda::getStreamFromPool(false, model.parameters().front().device().index())) {}

  std::vector<const void*> conv_now() const {
    std::vector<const void*> p;
    for (const auto& l : s.layers) p.push_back(l.conv.defined() ? l.conv.data_ptr() : nullptr);
    return p;
  }

  // the caller's stream waits for ours (and ours for the caller's before we start)
  static void order(c10::cuda::CUDAStream from, c10::cuda::CUDAStream to) {
    at::cuda::CUDAEvent ev;
    ev.record(from);
    ev.block(to);
  }

  void capture(const Tensor& tc) {
    stream.synchronize();
    int par = -2;
    for (auto& l : s.layers) {
      const int p = l.cache->device_parity();
      if (p < 0) throw std::logic_error("GraphDecoder: a mixer cache's device state is not in step with its host state");
      if (par != -2 && p != par) throw std::logic_error("GraphDecoder: the layers' caches are at different parities");
      par = p;
    }
    // what a step would throw on entry (NaN flags of earlier steps) is thrown here, outside
    // the capture
    for (auto& l : s.layers) l.cache->check_device_state();
    std::vector<MixCache::HostState> saved;
    for (auto& l : s.layers) saved.push_back(l.cache->host_state());
    const std::vector<int64_t> saved_pos = s.positions;
    pos.copy_(torch::tensor(s.positions, torch::kInt64));
    tokens.copy_(tc);
    stream.synchronize();
    auto restore = [&] {
      for (size_t l = 0; l < s.layers.size(); ++l) s.layers[l].cache->restore_host_state(saved[l]);
      s.positions = saved_pos;
    };
    at::cuda::MempoolId_t pool{0, 0};
    for (int k = 0; k < 2; ++k) {
      const int p = k == 0 ? par : 1 - par;
      auto g = std::make_unique<at::cuda::CUDAGraph>();
      try {
        g->capture_begin(pool);
        out[p] = m.step_unchecked(s, tokens, pos);
        pos.add_(1);
        g->capture_end();
      } catch (...) {
        abandon_capture(*g, stream.stream());
        graph[0].reset();
        graph[1].reset();
        restore();
        throw;
      }
      if (k == 0) pool = g->pool();
      graph[p] = std::move(g);
    }
    restore();
    conv_ptrs = conv_now();
  }

  // one step without graphs (the warm-up, or every step once a capture failed)
  Tensor eager(const Tensor& tc) {
    tokens.copy_(tc);
    pos.copy_(torch::tensor(s.positions, torch::kInt64));
    Tensor logits = m.step_unchecked(s, tokens, pos);
    for (auto& p : s.positions) ++p;
    return logits;
  }

  Tensor step(const Tensor& tokens_in) {
    const Tensor tc = tokens_in.to(torch::kCPU).contiguous();  // checked on the host: no device read
    m.check_step(s, tc);
    auto caller = c10::cuda::getCurrentCUDAStream(stream.device_index());
    order(caller, stream);
    c10::cuda::CUDAStreamGuard sg(stream);
    if (!tokens.defined()) {
      tokens = torch::empty({s.batch}, torch::TensorOptions().dtype(torch::kInt64).device(stream.device()));
      pos = torch::empty_like(tokens);
    }
    Tensor logits;
    if (!warmed || eager_only) {
      logits = eager(tc);
      warmed = true;
    } else {
      if (!graph[0]) {
        try {
          capture(tc);
        } catch (const std::invalid_argument&) {
          throw;  // bad input (NaN flags): the caller's error, as in an eager step
        } catch (const std::exception& e) {
          // the host state was restored: go on without graphs
          std::fprintf(stderr, "GraphDecoder: CUDA graph capture failed (%s); decoding without graphs\n", e.what());
          eager_only = true;
        }
      }
      if (eager_only) {
        logits = eager(tc);
      } else {
        if (s.positions != positions || conv_now() != conv_ptrs)
          throw std::logic_error("GraphDecoder::step: the decode state changed outside this decoder (reset, prefill or an eager step); "
                                 "make a new GraphDecoder");
        const int par = s.layers.empty() ? 0 : s.layers[0].cache->device_parity();
        if (par < 0) throw std::logic_error("GraphDecoder::step: a mixer cache changed outside this decoder; make a new GraphDecoder");
        // host side first: it throws (NaN flags of an earlier step) before anything runs; a
        // layer that throws leaves its own state as it was, the layers before it are restored
        std::vector<MixCache::HostState> saved;
        for (auto& l : s.layers) saved.push_back(l.cache->host_state());
        size_t done = 0;
        try {
          for (; done < s.layers.size(); ++done) s.layers[done].cache->replayed_step();
        } catch (...) {
          for (size_t l = 0; l < done; ++l) s.layers[l].cache->restore_host_state(saved[l]);
          throw;
        }
        tokens.copy_(tc);
        graph[par]->replay();
        logits = out[par].clone();
        for (auto& p : s.positions) ++p;
      }
    }
    positions = s.positions;
    order(stream, caller);
    c10::cuda::CUDACachingAllocator::recordStream(logits.storage().data_ptr(), caller);
    return logits;
  }
};

GraphDecoder::GraphDecoder(nn::LanguageModelImpl& model, nn::DecodeState& state) {
  if (model.parameters().empty() || !model.parameters().front().is_cuda())
    throw std::invalid_argument("GraphDecoder: the model is not on a CUDA device; CUDA graphs decode CUDA models only");
  if (int64_t(state.layers.size()) != model.config().n_layers)
    throw std::invalid_argument("GraphDecoder: the decode state has " + std::to_string(state.layers.size()) + " layers; the model " +
                                std::to_string(model.config().n_layers));
  impl_ = std::make_unique<Impl>(model, state);
}
GraphDecoder::~GraphDecoder() = default;
Tensor GraphDecoder::step(const Tensor& tokens) {
  torch::NoGradGuard ng;
  return impl_->step(tokens);
}
bool GraphDecoder::captured() const { return impl_ && impl_->graph[0] != nullptr; }
bool GraphDecoder::available() { return true; }

#else

struct GraphDecoder::Impl {};
GraphDecoder::GraphDecoder(nn::LanguageModelImpl&, nn::DecodeState&) {
  throw std::invalid_argument("GraphDecoder: this build has no CUDA backend (configure with -DTOKMIX_CUDA=ON)");
}
GraphDecoder::~GraphDecoder() = default;
Tensor GraphDecoder::step(const Tensor&) { throw std::logic_error("GraphDecoder: no CUDA backend"); }
bool GraphDecoder::captured() const { return false; }
bool GraphDecoder::available() { return false; }

#endif

}  // namespace tokmix::infer
