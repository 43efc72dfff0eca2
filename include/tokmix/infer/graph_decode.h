// Decoding through CUDA graphs: the whole model's step (embedding, every layer's projections,
// convolution tail, mixer cache step, MLP, head) captured once and replayed, so a token costs one
// graph launch instead of a few hundred kernel launches from the host.
#pragma once
#include <torch/torch.h>

#include <memory>

#include "tokmix/nn/model.h"

namespace tokmix::infer {

// Steps `state` like model.step(state, tokens), with the same logits. The first call runs
// eagerly (it warms up the libraries and brings the device state in step with the host's); the
// second captures two graphs, one per parity of the mixer caches' double-buffered device state
// (their host side is restored afterwards), and every later call replays one of them.
// Valid while `state` advances only through this decoder: after reset, a new prefill or an
// eager model.step, make a new one (a replay on a state changed behind its back throws).
class GraphDecoder {
 public:
  GraphDecoder(nn::LanguageModelImpl& model, nn::DecodeState& state);
  ~GraphDecoder();
  GraphDecoder(const GraphDecoder&) = delete;
  GraphDecoder& operator=(const GraphDecoder&) = delete;

  // tokens [N] int64 (any device) -> logits [N, vocab] on the model's device.
  torch::Tensor step(const torch::Tensor& tokens);
  bool captured() const;
  static bool available();  // this build has the CUDA backend

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokmix::infer
