// Checkpoints and safetensors: round trips, resuming, atomic replacement when a save is
// interrupted, and clear errors (with nothing changed) for mismatched, truncated or corrupted
// checkpoints.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "tokmix/nn/checkpoint.h"

using namespace tokmix::nn;
using nlohmann::json;
using torch::Tensor;
namespace fs = std::filesystem;

namespace {

std::string temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("tokmix_test_ckpt_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(d);
  return d.string();
}

ModelConfig tiny_config(json mixer) {
  return ModelConfig::from_json({{"vocab_size", 16}, {"d_model", 32}, {"n_layers", 2}, {"max_context", 32}, {"mixer", mixer}});
}

LanguageModel tiny_model(json mixer = {{"type", "pow2"}, {"heads", 2}}, uint64_t seed = 1) {
  torch::manual_seed(seed);
  return LanguageModel(tiny_config(mixer));
}

void train(LanguageModel& model, torch::optim::Optimizer& opt, int steps, uint64_t seed) {
  torch::manual_seed(seed);
  for (int s = 0; s < steps; ++s) {
    Tensor x = torch::randint(0, 16, {4, 12}, torch::kInt64);
    Tensor logits = model->forward(x.narrow(1, 0, 11));
    Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 16}), x.narrow(1, 1, 11).reshape({-1}));
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
}

Tensor probe_logits(LanguageModel& model) {
  torch::NoGradGuard ng;
  Tensor x = torch::arange(12, torch::kInt64).remainder(16).view({1, 12});
  return model->forward(x);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "(no error)";
}

void overwrite(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace

TEST(Safetensors, RoundTripAndHeaderFormat) {
  NamedTensors in = {{"w", torch::randn({3, 5})},
                     {"b.bias", torch::randn({7}, torch::kFloat64)},
                     {"idx", torch::arange(6, torch::kInt64).view({2, 3})},
                     {"scalar", torch::tensor(2.5f)},
                     {"empty", torch::zeros({0, 4})},
                     {"half", torch::randn({4}).to(torch::kBFloat16)}};
  std::string bytes = safetensors_bytes(in, {{"format", "pt"}});
  uint64_t hl = 0;
  for (int b = 0; b < 8; ++b) hl |= uint64_t(static_cast<unsigned char>(bytes[b])) << (8 * b);
  EXPECT_EQ(hl % 8, 0u);
  json h = json::parse(bytes.substr(8, hl));
  EXPECT_EQ(h["__metadata__"]["format"], "pt");
  EXPECT_EQ(h["w"]["dtype"], "F32");
  EXPECT_EQ(h["w"]["shape"], json({3, 5}));
  EXPECT_EQ(h["w"]["data_offsets"], json({0, 60}));
  EXPECT_EQ(h["b.bias"]["dtype"], "F64");
  EXPECT_EQ(h["idx"]["dtype"], "I64");
  EXPECT_EQ(h["half"]["dtype"], "BF16");
  EXPECT_EQ(h["scalar"]["shape"], json::array());
  // raw little-endian data right after the header
  float w0;
  std::memcpy(&w0, bytes.data() + 8 + hl, 4);
  EXPECT_EQ(w0, in[0].second[0][0].item<float>());
  std::map<std::string, std::string> meta;
  NamedTensors out = parse_safetensors(bytes, &meta);
  EXPECT_EQ(meta["format"], "pt");
  ASSERT_EQ(out.size(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(out[i].first, in[i].first);
    EXPECT_EQ(out[i].second.scalar_type(), in[i].second.scalar_type());
    EXPECT_TRUE(torch::equal(out[i].second, in[i].second)) << in[i].first;
  }
  // hand-made headers with impossible content are errors
  auto with_header = [](const std::string& hdr, size_t data) {
    std::string s(8, '\0');
    for (int b = 0; b < 8; ++b) s[b] = char((uint64_t(hdr.size()) >> (8 * b)) & 0xff);
    return s + hdr + std::string(data, '\0');
  };
  EXPECT_NO_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8)));
  EXPECT_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)), CheckpointError);
  EXPECT_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4)), CheckpointError);
  EXPECT_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}})", 8)), CheckpointError);
  EXPECT_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)), CheckpointError);
  EXPECT_THROW(parse_safetensors(with_header(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)),
               CheckpointError);
  EXPECT_THROW(parse_safetensors(with_header(
                   R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})", 8)),
               CheckpointError);
  EXPECT_THROW(parse_safetensors(std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10)), CheckpointError);
}

TEST(Safetensors, ExportedModelReadsBackUnderParameterNames) {
  LanguageModel model = tiny_model({{"type", "local"}, {"window", 4}, {"heads", 2}, {"output_gate", true}});
  const std::string dir = temp_dir("export");
  fs::create_directories(dir);
  export_safetensors(dir + "/model.safetensors", *model);
  std::map<std::string, std::string> meta;
  NamedTensors back = read_safetensors(dir + "/model.safetensors", &meta);
  EXPECT_EQ(meta["format"], "pt");
  EXPECT_EQ(ModelConfig::from_text(meta["tokmix_config"]), model->config());
  auto params = model->named_parameters();
  ASSERT_EQ(back.size(), params.size());
  for (const auto& [name, t] : back) {
    ASSERT_TRUE(params.contains(name)) << name;
    EXPECT_TRUE(torch::equal(params[name], t)) << name;
  }
  EXPECT_TRUE(params.contains("blocks.0.mixer.in_proj.weight"));
  EXPECT_TRUE(params.contains("tok_emb.weight"));
  fs::remove_all(dir);
}

TEST(Checkpoint, RoundTripWithOptimizerResumesIdentically) {
  LanguageModel a = tiny_model({{"type", "sq1-lattice"}, {"heads", 2}, {"mode", "gate"}});
  torch::optim::AdamW opt_a(a->parameters(), torch::optim::AdamWOptions(3e-3));
  train(a, opt_a, 5, 21);
  const std::string dir = temp_dir("resume");
  save_checkpoint(dir, *a, json{{"kind", "bytes"}, {"vocab_size", 16}}, 5, &opt_a);
  for (const char* f : {"checkpoint.json", "config.json", "tokenizer.json", "model.safetensors", "optimizer.pt"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;

  LanguageModel b = tiny_model({{"type", "sq1-lattice"}, {"heads", 2}, {"mode", "gate"}}, /*seed=*/99);
  torch::optim::AdamW opt_b(b->parameters(), torch::optim::AdamWOptions(3e-3));
  CheckpointInfo info = load_checkpoint(dir, *b, &opt_b);
  EXPECT_EQ(info.step, 5);
  EXPECT_EQ(info.optimizer, "AdamW");
  EXPECT_EQ(info.tokenizer["kind"], "bytes");
  EXPECT_TRUE(torch::equal(probe_logits(a), probe_logits(b)));
  // the same further steps from both give the same weights: the optimizer state came back
  train(a, opt_a, 3, 77);
  train(b, opt_b, 3, 77);
  EXPECT_TRUE(torch::equal(probe_logits(a), probe_logits(b)));
  // saving over an existing checkpoint replaces it and leaves no temporary directory
  save_checkpoint(dir, *a, json::object(), 8, &opt_a);
  EXPECT_EQ(read_checkpoint_info(dir).step, 8);
  for (const auto& e : fs::directory_iterator(fs::path(dir).parent_path()))
    EXPECT_EQ(e.path().filename().string().find(fs::path(dir).filename().string() + ".tmp-"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Checkpoint, InterruptedSaveLeavesThePreviousCheckpoint) {
  LanguageModel model = tiny_model();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  const std::string dir = temp_dir("atomic");
  save_checkpoint(dir, *model, json::object(), 1, &opt);
  const Tensor before = probe_logits(model);
  train(model, opt, 2, 5);
  for (std::string stage : {"config", "tokenizer", "weights", "optimizer", "manifest", "before-rename"}) {
    SCOPED_TRACE(stage);
    tokmix::nn::detail::save_hook = [&](const std::string& s) {
      if (s == stage) throw std::runtime_error("simulated crash at " + s);
    };
    EXPECT_THROW(save_checkpoint(dir, *model, json::object(), 3, &opt), std::runtime_error);
    tokmix::nn::detail::save_hook = nullptr;
    auto [loaded, info] = load_model(dir);
    EXPECT_EQ(info.step, 1);
    EXPECT_TRUE(torch::equal(probe_logits(loaded), before));
  }
  // a diverged model does not replace a good checkpoint
  LanguageModel diverged = tiny_model();
  {
    torch::NoGradGuard ng;
    diverged->parameters()[3].fill_(std::numeric_limits<float>::quiet_NaN());
  }
  EXPECT_NE(error_of([&] { save_checkpoint(dir, *diverged, json::object(), 9); }).find("NaN"), std::string::npos);
  EXPECT_EQ(read_checkpoint_info(dir).step, 1);
  save_checkpoint(dir, *model, json::object(), 3, &opt);
  auto [loaded, info] = load_model(dir);
  EXPECT_EQ(info.step, 3);
  EXPECT_TRUE(torch::equal(probe_logits(loaded), probe_logits(model)));
  fs::remove_all(dir);
}

TEST(Checkpoint, MismatchesAreClearErrorsAndChangeNothing) {
  LanguageModel model = tiny_model();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  const std::string dir = temp_dir("mismatch");
  save_checkpoint(dir, *model, json::object(), 4, &opt);

  LanguageModel other = tiny_model({{"type", "first-order"}, {"heads", 2}}, 5);
  const Tensor other_before = probe_logits(other);
  std::string e = error_of([&] { load_checkpoint(dir, *other); });
  EXPECT_NE(e.find("different model"), std::string::npos) << e;
  EXPECT_NE(e.find("layers[0].type"), std::string::npos) << e;
  EXPECT_TRUE(torch::equal(probe_logits(other), other_before));

  LanguageModel wider = tiny_model({{"type", "pow2"}, {"heads", 4}}, 5);
  e = error_of([&] { load_checkpoint(dir, *wider); });
  EXPECT_NE(e.find("layers[0].heads"), std::string::npos) << e;

  LanguageModel same = tiny_model({{"type", "pow2"}, {"heads", 2}}, 6);
  const Tensor same_before = probe_logits(same);
  torch::optim::SGD sgd(same->parameters(), torch::optim::SGDOptions(0.1));
  e = error_of([&] { load_checkpoint(dir, *same, &sgd); });
  EXPECT_NE(e.find("holds Adam state"), std::string::npos) << e;
  torch::optim::Adam partial(std::vector<Tensor>{same->parameters()[0]}, torch::optim::AdamOptions(1e-2));
  e = error_of([&] { load_checkpoint(dir, *same, &partial); });
  EXPECT_NE(e.find("parameter groups"), std::string::npos) << e;
  EXPECT_TRUE(torch::equal(probe_logits(same), same_before));

  save_checkpoint(dir, *model, json::object(), 4);  // no optimizer state
  torch::optim::Adam fresh(same->parameters(), torch::optim::AdamOptions(1e-2));
  e = error_of([&] { load_checkpoint(dir, *same, &fresh); });
  EXPECT_NE(e.find("no optimizer state"), std::string::npos) << e;
  EXPECT_NO_THROW(load_checkpoint(dir, *same));
  EXPECT_TRUE(torch::equal(probe_logits(same), probe_logits(model)));
  fs::remove_all(dir);
}

TEST(Checkpoint, TruncatedOrCorruptedFilesAreErrors) {
  LanguageModel model = tiny_model();
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  const std::string dir = temp_dir("corrupt");
  const std::string copy = temp_dir("corrupt_copy");
  save_checkpoint(dir, *model, json::object(), 2, &opt);
  LanguageModel target = tiny_model({{"type", "pow2"}, {"heads", 2}}, 8);
  const Tensor before = probe_logits(target);
  for (std::string f : {"checkpoint.json", "config.json", "tokenizer.json", "model.safetensors", "optimizer.pt"}) {
    SCOPED_TRACE(f);
    const std::string orig = read_file(dir + "/" + f);
    fs::remove_all(copy);
    fs::copy(dir, copy);
    overwrite(copy + "/" + f, orig.substr(0, orig.size() / 2));
    std::string e = error_of([&] { load_checkpoint(copy, *target, &opt); });
    EXPECT_NE(e, "(no error)");
    if (f != "checkpoint.json") EXPECT_NE(e.find("truncated"), std::string::npos) << e;
    std::string flipped = orig;
    flipped[flipped.size() / 3] ^= 0x20;
    overwrite(copy + "/" + f, flipped);
    e = error_of([&] { load_checkpoint(copy, *target, &opt); });
    if (f != "checkpoint.json") EXPECT_NE(e.find("checksum mismatch"), std::string::npos) << e;
    fs::remove(copy + "/" + f);
    EXPECT_NE(error_of([&] { load_checkpoint(copy, *target, &opt); }), "(no error)");
  }
  EXPECT_NE(error_of([&] { load_checkpoint(dir + "/nowhere", *target); }).find("no such directory"), std::string::npos);
  EXPECT_TRUE(torch::equal(probe_logits(target), before));
  fs::remove_all(dir);
  fs::remove_all(copy);
}
