// Model configuration: the JSON a user writes (configs/models/*.json), validated on load, and the
// registry of mixer types that turns one config line into a pattern and a layer.
// No tensors here: the CLI and the loaders can read a config without building a model.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace tokmix::nn {

// A config that cannot be used. The message names the key (dotted path) and what is accepted.
struct ConfigError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// One token-mixer layer, fully resolved (defaults filled in, pattern spec built).
struct MixerConfig {
  std::string type;             // registry name: attention, local, pow2, ...
  nlohmann::json params;        // the type's own keys (window, order, f, ...), as written
  std::string spec;             // pattern spec handed to tokmix::mix
  std::string mode = "softmax";  // "softmax" | "gate"
  int64_t heads = 0;
  int64_t d_key = 0;    // per head
  int64_t d_value = 0;  // per head
  int64_t conv = 4;     // short causal convolution width on q/k/v; 0 = none
  bool output_gate = false;
  bool level_bias = true;  // learned bias per head and pattern level, [H, L]
  bool qk_norm = false;
  double gamma = 1.0;   // damping of B
  bool rotary = false;  // rotary positions on q and k
  std::string impl;     // "fused" (LibTorch attention) | "generic" (tokmix::mix)

  nlohmann::json to_json() const;
};

struct ModelConfig {
  std::string name;
  int64_t vocab_size = 0;
  int64_t d_model = 0;
  int64_t n_layers = 0;
  int64_t max_context = 0;            // longest sequence the model serves (bias/gate tables, positions)
  std::string positions = "rotary";   // "rotary" | "learned" | "none"
  double rope_theta = 10000.0;
  bool mlp = true;                    // SwiGLU MLP in every block
  int64_t mlp_hidden = 0;
  double norm_eps = 1e-5;
  double init_std = 0.02;
  std::vector<MixerConfig> layers;    // n_layers entries

  // Validates and resolves. `origin` prefixes error messages (a file name).
  static ModelConfig from_json(const nlohmann::json& j, const std::string& origin = "config");
  static ModelConfig from_text(const std::string& text, const std::string& origin = "config");
  static ModelConfig load(const std::string& path);
  // Canonical, fully resolved form: from_json(to_json()) gives the same config.
  nlohmann::json to_json() const;
  bool operator==(const ModelConfig& o) const { return to_json() == o.to_json(); }
  bool operator!=(const ModelConfig& o) const { return !(*this == o); }
};

// One entry of the mixer registry: a row of the framework's table (spec section 2).
struct MixerType {
  std::string name;
  std::string summary;                 // one line for help texts
  std::vector<std::string> keys;       // the type's own keys
  std::vector<std::string> required;   // of which these must be given
  nlohmann::json example;              // a valid config line
  // Builds the pattern spec from the type's keys (already checked to be present).
  std::function<std::string(const nlohmann::json& params)> spec;
};

const std::vector<MixerType>& mixer_types();
const MixerType* find_mixer_type(const std::string& name);
// Adds a type (e.g. a named f-pattern). Throws ConfigError when the name is taken.
void register_mixer_type(MixerType t);
std::string mixer_type_names();  // "attention | local | ..."

// Differences between two configs, one "key: a != b" per line (empty when equal).
std::string config_diff(const ModelConfig& a, const ModelConfig& b);

}  // namespace tokmix::nn
