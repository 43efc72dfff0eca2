// Checkpoints and safetensors.
//
// A checkpoint is a directory:
//   checkpoint.json    manifest: format, version, step, optimizer kind, size and FNV-1a 64 checksum
//                      of every other file
//   config.json        the model config (canonical form)
//   tokenizer.json     the tokenizer description given by the caller
//   model.safetensors  the weights (readable by any safetensors reader)
//   optimizer.pt       optimizer state (LibTorch archive), optional
// It is written into a fresh sibling directory (every file flushed and fsync'ed) which then
// replaces the old one in a single rename (an atomic exchange on Linux), so a crash at any point
// leaves either the previous checkpoint or the new one, never a mix.
// Loading checks the manifest, every size and checksum, the config against the model and every
// tensor's name, dtype and shape before changing anything: a truncated, corrupted or mismatched
// checkpoint is a CheckpointError, and the model and optimizer are left as they were.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tokmix/nn/model.h"

namespace tokmix::nn {

struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CheckpointInfo {
  ModelConfig config;
  nlohmann::json tokenizer;
  int64_t step = 0;
  std::string optimizer;  // optimizer kind ("" when the checkpoint holds none)
};

// Writes `dir` atomically. `optimizer` may be null.
void save_checkpoint(const std::string& dir, LanguageModelImpl& model, const nlohmann::json& tokenizer, int64_t step,
                     torch::optim::Optimizer* optimizer = nullptr);
// Reads the manifest, config and tokenizer (all checked) without the weights.
CheckpointInfo read_checkpoint_info(const std::string& dir);
// Loads into an existing model whose config must equal the checkpoint's. With an optimizer,
// the checkpoint must hold state of the same kind.
CheckpointInfo load_checkpoint(const std::string& dir, LanguageModelImpl& model, torch::optim::Optimizer* optimizer = nullptr);
// Builds the model from the checkpoint's config and loads its weights.
std::pair<LanguageModel, CheckpointInfo> load_model(const std::string& dir);

// FNV-1a 64-bit over bytes.
uint64_t fnv1a64(const void* data, size_t n);

// --- safetensors ---------------------------------------------------------------------------
// 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets},
// "__metadata__": {string: string}} padded with spaces to 8 bytes, then the raw little-endian
// data of every tensor, in header order, without gaps.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;
std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {});
// Parses and checks everything (header length, JSON, dtypes, shapes, offsets inside the data,
// no overlap and no gap); throws CheckpointError naming what is wrong. Tensors are copies.
NamedTensors parse_safetensors(const std::string& bytes, std::map<std::string, std::string>* metadata = nullptr);
void write_safetensors(const std::string& path, const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {});
NamedTensors read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);
// The model's weights under their parameter names, as a safetensors file (atomic write).
void export_safetensors(const std::string& path, LanguageModelImpl& model);
// The model of such a file: built from its tokmix_config, weights checked as a checkpoint's.
LanguageModel import_safetensors(const std::string& path);

// Writes a file atomically: temporary file in the same directory, flush, fsync, rename.
void write_file_atomic(const std::string& path, const std::string& bytes);
// Reads a whole file; throws CheckpointError past `max_bytes` or when it cannot be read.
std::string read_file(const std::string& path, size_t max_bytes = size_t(1) << 36);

namespace detail {
// Called at each stage of save_checkpoint ("config", "tokenizer", "weights", "optimizer",
// "manifest", "before-rename"); a test throws from it to stand for a crash at that point.
extern std::function<void(const std::string& stage)> save_hook;
}  // namespace detail

}  // namespace tokmix::nn
