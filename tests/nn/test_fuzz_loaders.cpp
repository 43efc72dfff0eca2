// Fuzz-style tests of the loaders: random bytes, truncations and byte flips of a real checkpoint,
// of a safetensors file and of a model config. Every outcome must be a success or the loader's
// own error type; anything else (another exception type, a crash) fails. Also built under
// AddressSanitizer as `fuzz_nn` (cmake -DTOKMIX_ASAN=ON; ctest -L fuzz).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "tokmix/nn/checkpoint.h"

using namespace tokmix::nn;
using nlohmann::json;
using torch::Tensor;
namespace fs = std::filesystem;

namespace {

// Iterations per kind of input; TOKMIX_FUZZ_ITERS raises it for a longer run.
int iterations(int base) {
  const char* e = std::getenv("TOKMIX_FUZZ_ITERS");
  return e ? std::max(1, std::atoi(e)) : base;
}

std::string temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("tokmix_fuzz_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(d);
  return d.string();
}

void overwrite(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = char(rng() & 0xff);
  return s;
}

// One random damage: truncation, byte flips, a random splice, or random bytes.
std::string mutate(const std::string& in, std::mt19937_64& rng) {
  std::string s = in;
  switch (rng() % 5) {
    case 0:
      return s.substr(0, s.empty() ? 0 : rng() % s.size());
    case 1:
    case 2: {
      const int flips = 1 + int(rng() % 4);
      for (int f = 0; f < flips && !s.empty(); ++f) s[rng() % s.size()] ^= char(1 << (rng() % 8));
      return s;
    }
    case 3: {
      if (s.empty()) return random_bytes(rng, 16);
      size_t at = rng() % s.size(), n = 1 + rng() % 16;
      return s.substr(0, at) + random_bytes(rng, n) + s.substr(std::min(s.size(), at + n));
    }
    default:
      return random_bytes(rng, rng() % 512);
  }
}

// Runs f; true on success, false on the expected error; any other exception fails the test.
template <class E, class F>
bool only_errors_of(F&& f, const std::string& what) {
  try {
    f();
    return true;
  } catch (const E&) {
    return false;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": unexpected exception type: " << e.what();
  } catch (...) {
    ADD_FAILURE() << what << ": unexpected non-standard exception";
  }
  return false;
}

// Recomputes the manifest's sizes and checksums so that damaged files reach the parsers.
void refresh_manifest(const std::string& dir) {
  json m = json::parse(read_file(dir + "/checkpoint.json"));
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it) {
    std::string bytes = read_file(dir + "/" + it.key());
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)fnv1a64(bytes.data(), bytes.size()));
    it.value() = {{"bytes", bytes.size()}, {"fnv1a64", hex}};
  }
  overwrite(dir + "/checkpoint.json", m.dump(2));
}

LanguageModel fuzz_model(uint64_t seed) {
  torch::manual_seed(seed);
  return LanguageModel(ModelConfig::from_json(
      {{"vocab_size", 16}, {"d_model", 16}, {"n_layers", 2}, {"max_context", 32}, {"mixer", {{"type", "pow2-lattice"}, {"heads", 2}}}}));
}

}  // namespace

TEST(Fuzz, ConfigLoaderGivesOnlyConfigErrors) {
  std::mt19937_64 rng(12345);
  const std::string real = ModelConfig::from_json({{"name", "fuzz"},
                                                   {"vocab_size", 64},
                                                   {"d_model", 32},
                                                   {"n_layers", 4},
                                                   {"max_context", 128},
                                                   {"positions", "learned"},
                                                   {"mixer", {{"heads", 4}, {"conv", 3}}},
                                                   {"layers", json::array({{{"type", "pow2"}}, {{"type", "local"}, {"window", 8}}})}})
                               .to_json()
                               .dump(1);
  int ok = 0;
  const int n = iterations(3000);
  for (int i = 0; i < n; ++i) {
    const std::string text = mutate(real, rng);
    ok += only_errors_of<ConfigError>([&] { ModelConfig::from_text(text, "fuzz"); }, "config");
  }
  // deeply nested and oversized values
  ok += only_errors_of<ConfigError>([&] { ModelConfig::from_text(std::string(20000, '[') + std::string(20000, ']')); }, "nesting");
  ok += only_errors_of<ConfigError>([&] { ModelConfig::from_text(R"({"vocab_size": 1e300, "d_model": 8})"); }, "huge");
  ok += only_errors_of<ConfigError>([&] { ModelConfig::from_text(R"({"vocab_size": 18446744073709551615})"); }, "u64");
  EXPECT_LT(ok, n);  // most damaged configs are rejected
}

TEST(Fuzz, SafetensorsParserGivesOnlyCheckpointErrors) {
  std::mt19937_64 rng(777);
  LanguageModel model = fuzz_model(1);
  NamedTensors named;
  for (const auto& kv : model->named_parameters()) named.emplace_back(kv.key(), kv.value());
  const std::string real = safetensors_bytes(named, {{"format", "pt"}});
  const int n = iterations(3000);
  for (int i = 0; i < n; ++i) {
    const std::string bytes = mutate(real, rng);
    only_errors_of<CheckpointError>([&] { parse_safetensors(bytes); }, "safetensors");
  }
  for (size_t cut = 0; cut < real.size(); cut += 1 + real.size() / 97)
    EXPECT_FALSE(only_errors_of<CheckpointError>([&] { parse_safetensors(real.substr(0, cut)); }, "truncation")) << "cut " << cut;
}

TEST(Fuzz, CheckpointLoaderGivesOnlyCheckpointErrors) {
  std::mt19937_64 rng(4242);
  LanguageModel model = fuzz_model(1);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  {
    Tensor x = torch::randint(0, 16, {2, 9}, torch::kInt64);
    model->forward(x).sum().backward();
    opt.step();
  }
  const std::string dir = temp_dir("real"), work = temp_dir("work");
  save_checkpoint(dir, *model, json{{"kind", "bytes"}}, 7, &opt);
  LanguageModel target = fuzz_model(2);
  torch::optim::AdamW target_opt(target->parameters(), torch::optim::AdamWOptions(1e-3));
  torch::NoGradGuard ng;
  const Tensor probe = torch::arange(9, torch::kInt64).view({1, 9});
  Tensor current = target->forward(probe);
  const std::vector<std::string> files = {"checkpoint.json", "config.json", "tokenizer.json", "model.safetensors", "optimizer.pt"};
  const int n = iterations(150);
  int loaded = 0;
  for (int i = 0; i < n; ++i) {
    const std::string f = files[rng() % files.size()];
    fs::remove_all(work);
    fs::copy(dir, work);
    const std::string orig = read_file(dir + "/" + f);
    overwrite(work + "/" + f, mutate(orig, rng));
    // with fixed-up checksums the damage reaches the parsers; the optimizer archive is handed
    // to LibTorch's reader only behind a matching checksum, so it is damaged only that way
    if (f != "checkpoint.json" && f != "optimizer.pt" && rng() % 2 == 0) refresh_manifest(work);
    const bool ok = only_errors_of<CheckpointError>([&] { load_checkpoint(work, *target, &target_opt); }, f);
    loaded += ok;
    if (!ok) EXPECT_TRUE(torch::equal(target->forward(probe), current)) << "a failed load changed the model (" << f << ")";
    if (ok) {
      // damage the checksums cannot see (e.g. a flipped bit in a weight) loads; restore
      load_checkpoint(dir, *target, &target_opt);
      current = target->forward(probe);
    }
    if (rng() % 8 == 0) only_errors_of<CheckpointError>([&] { load_model(work); }, f + " (load_model)");
  }
  // the optimizer archive behind a matching checksum: random bytes and truncations
  for (int i = 0; i < 20; ++i) {
    fs::remove_all(work);
    fs::copy(dir, work);
    const std::string orig = read_file(dir + "/optimizer.pt");
    overwrite(work + "/optimizer.pt", i % 2 ? random_bytes(rng, rng() % 4096) : orig.substr(0, rng() % orig.size()));
    refresh_manifest(work);
    only_errors_of<CheckpointError>([&] { load_checkpoint(work, *target, &target_opt); }, "optimizer archive");
  }
  std::printf("checkpoint fuzz: %d of %d damaged checkpoints loaded (harmless damage, e.g. JSON whitespace)\n", loaded, n);
  fs::remove_all(dir);
  fs::remove_all(work);
}
