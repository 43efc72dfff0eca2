// `tokmix model --config FILE [--context N]`: what a model config builds, and what decoding it
// costs per token at a context length. `tokmix model --mixers` lists the mixer registry.
#include <cstdio>

#include "commands.h"
#include "tokmix/nn/model.h"

namespace tokmix::cli {
namespace {

std::string bytes_str(int64_t b) {
  char buf[32];
  if (b >= (int64_t(1) << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", double(b) / double(int64_t(1) << 30));
  else if (b >= (int64_t(1) << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", double(b) / double(1 << 20));
  else if (b >= 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", double(b) / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%lld B", (long long)b);
  return buf;
}

std::string count_str(int64_t n) {
  char buf[32];
  if (n >= 1000000000)
    std::snprintf(buf, sizeof buf, "%.2fG", double(n) / 1e9);
  else if (n >= 1000000)
    std::snprintf(buf, sizeof buf, "%.2fM", double(n) / 1e6);
  else if (n >= 1000)
    std::snprintf(buf, sizeof buf, "%.1fK", double(n) / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%lld", (long long)n);
  return buf;
}

void print_mixers() {
  std::printf("%-14s %-44s %s\n", "type", "keys (besides the common ones)", "what");
  for (const auto& t : nn::mixer_types()) {
    std::string keys;
    for (const auto& k : t.keys) {
      bool req = std::find(t.required.begin(), t.required.end(), k) != t.required.end();
      keys += (keys.empty() ? "" : ", ") + k + (req ? "" : " (optional)");
    }
    std::printf("%-14s %-44s %s\n", t.name.c_str(), keys.empty() ? "-" : keys.c_str(), t.summary.c_str());
  }
  std::printf("\ncommon keys: mode (softmax | gate), heads, d_key, d_value, conv (width, 0 = none; default 4), output_gate,\n"
              "level_bias, qk_norm, gamma (0 < gamma <= 1), rotary, impl (fused | generic; attention patterns only)\n");
}

void print_model(const std::string& path, int64_t context) {
  nn::ModelConfig cfg = nn::ModelConfig::load(path);
  if (context <= 0) context = cfg.max_context;
  if (context > cfg.max_context)
    throw std::invalid_argument("--context " + std::to_string(context) + " exceeds the model's max_context = " + std::to_string(cfg.max_context));
  const int64_t params = nn::count_parameters(cfg);
  const int64_t emb = cfg.vocab_size * cfg.d_model;
  std::printf("model %s: %s parameters (%s without the tied embedding), d_model %lld, %lld layers, vocab %lld, max_context %lld,\n",
              cfg.name.empty() ? path.c_str() : cfg.name.c_str(), count_str(params).c_str(), count_str(params - emb).c_str(),
              (long long)cfg.d_model, (long long)cfg.n_layers, (long long)cfg.vocab_size, (long long)cfg.max_context);
  std::printf("positions %s, MLP %s\n\n", cfg.positions.c_str(),
              cfg.mlp ? ("SwiGLU " + std::to_string(cfg.mlp_hidden)).c_str() : "off");
  const auto costs = nn::decode_costs(cfg, context);
  std::printf("decode at context %lld, per sequence and token (fp32):\n", (long long)context);
  std::printf("%-5s %-26s %-8s %-8s %5s %6s %5s %-4s %9s %9s %12s %12s\n", "layer", "pattern", "mode", "impl", "heads", "dk/dv", "conv",
              "rope", "row", "cache", "cache bytes", "flops");
  int64_t total_cache = 0, total_conv = 0, total_flops = 0;
  for (size_t l = 0; l < costs.size(); ++l) {
    const auto& m = cfg.layers[l];
    const auto& c = costs[l];
    std::string dims = std::to_string(m.d_key) + "/" + std::to_string(m.d_value);
    std::printf("%-5zu %-26s %-8s %-8s %5lld %6s %5lld %-4s %9s %9s %12s %12s\n", l, c.spec.c_str(), m.mode.c_str(), m.impl.c_str(),
                (long long)m.heads, dims.c_str(), (long long)m.conv, m.rotary ? "yes" : "no", count_str(c.row_entries).c_str(),
                count_str(c.cache_entries).c_str(), bytes_str(c.cache_bytes).c_str(), count_str(c.flops).c_str());
    total_cache += c.cache_bytes;
    total_conv += c.conv_bytes;
    total_flops += c.flops;
  }
  const int64_t head_flops = 2 * cfg.vocab_size * cfg.d_model;
  std::printf("\ntotal per token: %s flops (layers %s + output head %s)\n", count_str(total_flops + head_flops).c_str(),
              count_str(total_flops).c_str(), count_str(head_flops).c_str());
  std::printf("decode cache per sequence: %s (mixer stores) + %s (convolution tails)\n", bytes_str(total_cache).c_str(),
              bytes_str(total_conv).c_str());
}

CommandRegistrar reg_model([](CLI::App& app) {
  auto* cmd = app.add_subcommand("model", "Check a model config; print parameters, per-layer patterns and decode cost per token");
  auto config = std::make_shared<std::string>();
  auto context = std::make_shared<int64_t>(0);
  auto mixers = std::make_shared<bool>(false);
  cmd->add_option("--config", *config, "model config (JSON), e.g. configs/models/tiny-pow2.json");
  cmd->add_option("--context", *context, "context length for the decode figures (default: max_context)")->check(positive_integer());
  cmd->add_flag("--mixers", *mixers, "list the mixer types a config can name");
  cmd->callback([=] {
    if (*mixers) {
      print_mixers();
      return;
    }
    if (config->empty()) throw CLI::RequiredError("--config");
    print_model(*config, *context);
  });
});

}  // namespace
}  // namespace tokmix::cli
