// Layers and the backbone: config validation, the two attention paths, and for every registered
// mixer: forward and backward, 50 optimizer steps on a copy task, decode = forward on every
// prefix, save -> load gives identical logits.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <random>

#include "tokmix/nn/checkpoint.h"
#include "tokmix/nn/model.h"

using namespace tokmix;
using namespace tokmix::nn;
using nlohmann::json;
using torch::Tensor;

namespace {

namespace fs = std::filesystem;

double rel_err(const Tensor& a, const Tensor& b) {
  EXPECT_TRUE(torch::isfinite(a).all().item<bool>()) << "NaN/Inf in result";
  double den = b.abs().max().item<double>();
  return (a - b).abs().max().item<double>() / std::max(den, 1e-30);
}

std::string temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("tokmix_test_nn_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(d);
  return d.string();
}

json tiny(json mixer, int64_t vocab = 16, int64_t d = 32, int64_t layers = 2, int64_t ctx = 64) {
  return json{{"vocab_size", vocab}, {"d_model", d}, {"n_layers", layers}, {"max_context", ctx}, {"mixer", mixer}};
}

// The config line of every registered mixer type, with the options a layer offers switched on.
json mixer_line(const MixerType& t, const std::string& mode) {
  json m = t.example;
  m["heads"] = 2;
  m["mode"] = mode;
  m["output_gate"] = true;
  m["qk_norm"] = mode == "softmax";
  if (t.name == "local") m["window"] = 5;
  if (t.name == "hybrid") m["a"] = "local:3";
  return m;
}

void expect_config_error(const json& j, const std::vector<std::string>& parts) {
  try {
    ModelConfig::from_json(j);
    ADD_FAILURE() << "accepted: " << j.dump();
  } catch (const ConfigError& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "'" << p << "' not in: " << e.what();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// configs

TEST(Config, BadValuesNameTheKeyAndTheAcceptedValues) {
  json ok = tiny({{"type", "pow2"}, {"heads", 2}});
  EXPECT_NO_THROW(ModelConfig::from_json(ok));
  auto with = [&](const std::string& k, json v) {
    json j = ok;
    j[k] = v;
    return j;
  };
  auto mixer = [&](const std::string& k, json v) {
    json j = ok;
    j["mixer"][k] = v;
    return j;
  };
  expect_config_error(with("d_modle", 32), {"d_modle", "unknown key", "d_model"});
  expect_config_error(with("d_model", "32"), {"d_model", "string", "integer"});
  expect_config_error(with("d_model", 32.5), {"d_model", "integer"});
  expect_config_error(with("vocab_size", 1), {"vocab_size", "[2,"});
  expect_config_error(with("positions", "alibi"), {"positions", "rotary | learned | none"});
  expect_config_error(with("mlp", 1), {"mlp", "true or false"});
  expect_config_error(mixer("heads", 3), {"mixer.heads", "does not divide d_model = 32", "1, 2, 4, 8, 16, 32"});
  expect_config_error(mixer("type", "pow4"), {"mixer.type", "pow4", "attention | local"});
  expect_config_error(mixer("window", 4), {"mixer.window", "does not apply", "local"});
  expect_config_error(mixer("mode", "linear"), {"mixer.mode", "softmax | gate"});
  expect_config_error(mixer("gamma", 0), {"mixer.gamma", "0 < gamma <= 1"});
  expect_config_error(mixer("conv", -1), {"mixer.conv", "[0, 256]"});
  expect_config_error(mixer("impl", "fused"), {"mixer.impl", "fused", "generic"});
  expect_config_error(mixer("colour", 1), {"mixer.colour", "unknown key"});
  expect_config_error(tiny({{"type", "local"}, {"window", 0}}), {"mixer.window", "value 0", "[1,"});
  expect_config_error(tiny({{"type", "local"}}), {"mixer.window", "missing"});
  expect_config_error(tiny({{"type", "f"}, {"f", "3,2"}}), {"mixer.f", "3,2"});
  expect_config_error(tiny({{"type", "hybrid"}, {"a", "local:2"}, {"b", "pow9"}}), {"mixer.a", "pow9"});
  expect_config_error(tiny({{"type", "attention"}, {"rotary", true}, {"mode", "gate"}}), {"mixer.rotary", "softmax"});
  json layers = ok;
  layers["layers"] = json::array({{{"type", "pow2"}}, {{"type", "local"}, {"window", 4}}, {{"type", "dense"}}});
  expect_config_error(layers, {"layers", "3 entries", "n_layers = 2"});
  json bad_layer = ok;
  bad_layer["layers"] = json::array({{{"type", "pow2"}}, {{"type", "local"}, {"window", 0}}});
  expect_config_error(bad_layer, {"layers[1].window"});
  expect_config_error(json::array(), {"JSON object"});
  EXPECT_THROW(ModelConfig::from_text("{\"vocab_size\": 16,", "cfg.json"), ConfigError);
}

TEST(Config, MixedStacksAndCanonicalRoundTrip) {
  json j = tiny({{"heads", 2}, {"conv", 3}}, 16, 32, 4);
  j["layers"] = json::array({{{"type", "pow2"}}, {{"type", "local"}, {"window", 8}}});
  ModelConfig c = ModelConfig::from_json(j);
  ASSERT_EQ(c.layers.size(), 4u);
  EXPECT_EQ(c.layers[0].spec, "pow2");
  EXPECT_EQ(c.layers[1].spec, "local:8");
  EXPECT_EQ(c.layers[2].spec, "pow2");
  EXPECT_EQ(c.layers[3].conv, 3);
  EXPECT_EQ(c.layers[1].impl, "fused");
  EXPECT_TRUE(c.layers[1].rotary);
  EXPECT_FALSE(c.layers[0].rotary);  // recurrences need no positions
  ModelConfig again = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(again.to_json(), c.to_json());
  EXPECT_EQ(config_diff(c, again), "");
  json k = c.to_json();
  k["layers"][1]["window"] = 9;
  EXPECT_NE(config_diff(c, ModelConfig::from_json(k)).find("layers[1].window"), std::string::npos);
}

TEST(Config, EveryShippedConfigLoadsAndCountsItsParameters) {
  const fs::path dir = fs::path(TOKMIX_TESTDATA) / ".." / ".." / "configs" / "models";
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    SCOPED_TRACE(e.path().string());
    ModelConfig c = ModelConfig::load(e.path().string());
    EXPECT_FALSE(c.name.empty());
    if (c.d_model <= 128) {  // build the small ones and compare the closed-form count
      LanguageModel m(c);
      EXPECT_EQ(m->num_parameters(), count_parameters(c));
    }
    auto costs = decode_costs(c, c.max_context);
    EXPECT_EQ(int64_t(costs.size()), c.n_layers);
    ++n;
  }
  EXPECT_GE(n, 12);
}

// ---------------------------------------------------------------------------------------------
// attention: LibTorch's path and the generic op agree

TEST(Attention, FusedAndGenericPathsAgreeWithGradients) {
  for (const std::string type : {"attention", "local"}) {
    for (bool packed : {false, true}) {
      SCOPED_TRACE(type + (packed ? " packed" : " batched"));
      torch::manual_seed(7);
      json m = {{"type", type}, {"heads", 2}, {"conv", 3}, {"qk_norm", true}};
      if (type == "local") m["window"] = 6;
      ModelConfig c = ModelConfig::from_json(tiny(m, 16, 16, 1, 64));
      ASSERT_EQ(c.layers[0].impl, "fused");
      TokenMixer mx(c.layers[0], 16, 64, 10000.0, 0.3, 1);
      {
        torch::NoGradGuard ng;
        for (auto& p : mx->named_parameters())
          if (p.key() == "bias") p.value().normal_();  // a non-trivial per-level bias
      }
      TokenPositions p = packed ? TokenPositions::packed({5, 1, 20}) : TokenPositions::contiguous(2, 23);
      const int64_t B = packed ? 1 : 2, T = packed ? 26 : 23;
      Tensor x = torch::randn({B, T, 16}, torch::requires_grad());
      Tensor y1 = mx(x, p);
      auto g1 = torch::autograd::grad({y1.pow(2).sum()}, mx->parameters(), {}, false, false, true);
      mx->set_force_generic(true);
      Tensor y2 = mx(x, p);
      auto g2 = torch::autograd::grad({y2.pow(2).sum()}, mx->parameters(), {}, false, false, true);
      EXPECT_LT(rel_err(y1, y2), 1e-5);
      for (size_t i = 0; i < g1.size(); ++i)
        if (g1[i].defined() && g2[i].defined()) EXPECT_LT(rel_err(g1[i], g2[i]), 1e-4) << "parameter " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// every registered mixer

namespace {

// Copy task: a1..am SEP a1..am; loss on the copied half.
std::pair<Tensor, Tensor> copy_batch(int64_t B, int64_t m, int64_t V) {
  Tensor a = torch::randint(2, V, {B, m}, torch::kInt64);
  Tensor sep = torch::ones({B, 1}, torch::kInt64);
  Tensor seq = torch::cat({a, sep, a}, 1);
  return {seq.narrow(1, 0, 2 * m), seq.narrow(1, 1, 2 * m)};
}

// Decoding after prompts of different lengths equals the full forward on every prefix.
void check_decode(LanguageModel& model, const std::vector<int64_t>& lens, int64_t steps) {
  torch::NoGradGuard ng;
  const int64_t V = model->config().vocab_size, N = lens.size();
  std::vector<Tensor> seqs;
  std::vector<std::vector<int64_t>> prompts;
  for (auto l : lens) {
    Tensor s = torch::randint(0, V, {l + steps}, torch::kInt64);
    seqs.push_back(s);
    prompts.emplace_back(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + l);
  }
  std::vector<Tensor> full;
  for (auto& s : seqs) full.push_back(model->forward(s.unsqueeze(0))[0]);
  DecodeState st = model->new_decode_state(N);
  Tensor all = model->prefill(st, prompts, /*all_logits=*/true);
  int64_t at = 0;
  for (int64_t b = 0; b < N; ++b) {
    EXPECT_LT(rel_err(all.narrow(0, at, lens[b]), full[b].narrow(0, 0, lens[b])), 1e-4) << "prefill of prompt " << b;
    at += lens[b];
  }
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<int64_t> tok;
    for (int64_t b = 0; b < N; ++b) tok.push_back(seqs[b][lens[b] + t].item<int64_t>());
    Tensor logits = model->step(st, torch::tensor(tok, torch::kInt64));
    for (int64_t b = 0; b < N; ++b)
      EXPECT_LT(rel_err(logits[b], full[b][lens[b] + t]), 1e-4) << "sequence " << b << " (prompt " << lens[b] << ") step " << t;
  }
  // the caches hold what the patterns say, nothing more
  int64_t want = 0;
  for (const auto& m : model->config().layers)
    want += N * m.heads * (m.d_key + m.d_value) * int64_t(sizeof(float)) * pattern_from_spec(m.spec)->cache_entries(st.max_context);
  EXPECT_EQ(st.cache_bytes(), want);
}

}  // namespace

TEST(Model, EveryMixerDecodesLikeTheForwardOnEveryPrefix) {
  for (const auto& t : mixer_types())
    for (std::string mode : {"softmax", "gate"}) {
      SCOPED_TRACE(t.name + " " + mode);
      torch::manual_seed(11);
      json j = tiny(mixer_line(t, mode));
      if (t.name == "first-order") j["positions"] = "learned";  // learned positions follow the sequence too
      LanguageModel model(ModelConfig::from_json(j));
      check_decode(model, {1, 2, 7, 13}, 12);  // prompts shorter and longer than the convolution
    }
}

TEST(Model, EveryMixerHasFiniteGradientsForEveryParameterInBothModes) {
  for (const auto& t : mixer_types())
    for (std::string mode : {"softmax", "gate"}) {
      SCOPED_TRACE(t.name + " " + mode);
      torch::manual_seed(5);
      LanguageModel model(ModelConfig::from_json(tiny(mixer_line(t, mode))));
      Tensor x = torch::randint(0, 16, {2, 33}, torch::kInt64);
      Tensor loss = torch::nn::functional::cross_entropy(model->forward(x.narrow(1, 0, 32)).reshape({-1, 16}), x.narrow(1, 1, 32).reshape({-1}));
      loss.backward();
      for (const auto& p : model->named_parameters()) {
        ASSERT_TRUE(p.value().grad().defined()) << p.key();
        EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
        EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
      }
    }
}

TEST(Model, DecodeWithoutMlpConvOrPositionsAndAtTheContextEnd) {
  json m = {{"type", "sq1-lattice"}, {"heads", 2}, {"conv", 0}, {"gamma", 0.9}, {"level_bias", false}};
  json j = tiny(m, 16, 32, 2, 24);
  j["mlp"] = false;
  j["positions"] = "none";
  LanguageModel model(ModelConfig::from_json(j));
  check_decode(model, {3, 20}, 4);  // the second sequence ends exactly at max_context
  DecodeState st = model->new_decode_state(1);
  torch::NoGradGuard ng;
  model->prefill(st, {std::vector<int64_t>(24, 3)});
  EXPECT_THROW(model->step(st, torch::tensor({1}, torch::kInt64)), std::invalid_argument);
  DecodeState st2 = model->new_decode_state(2);
  EXPECT_THROW(model->prefill(st2, {{1, 2}, {}}), std::invalid_argument);
  EXPECT_THROW(model->prefill(st2, {{1, 2}, {99}}), std::invalid_argument);
}

TEST(Model, EveryMixerTrainsOnCopySavesAndLoads) {
  // 6 symbols (ids 2..7): a model that only learns the alphabet stays at ln 6 = 1.79 from
  // ln 8 = 2.08; below 0.8 x the start it has begun to copy
  const int64_t V = 8, m = 4, B = 32, steps = 50;
  const double lr = 1e-2;
  std::string report;
  for (const auto& t : mixer_types()) {
    SCOPED_TRACE(t.name);
    torch::manual_seed(3);
    json line = mixer_line(t, "softmax");
    line["qk_norm"] = false;
    LanguageModel model(ModelConfig::from_json(tiny(line, V, 32, 2, 64)));
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.0));
    std::vector<double> losses;
    for (int64_t s = 0; s < steps; ++s) {
      auto [in, target] = copy_batch(B, m, V);
      Tensor logits = model->forward(in);
      Tensor l = torch::nn::functional::cross_entropy(logits.narrow(1, m, m).reshape({-1, V}), target.narrow(1, m, m).reshape({-1}));
      opt.zero_grad();
      l.backward();
      for (const auto& p : model->parameters()) ASSERT_TRUE(p.grad().defined() && torch::isfinite(p.grad()).all().item<bool>());
      opt.step();
      losses.push_back(l.item<double>());
    }
    const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[steps - 1] + losses[steps - 2] + losses[steps - 3]) / 3;
    report += t.name + " " + std::to_string(first).substr(0, 5) + " -> " + std::to_string(last).substr(0, 5) + "; ";
    EXPECT_LT(last, 0.8 * first) << "loss " << first << " -> " << last;

    const std::string dir = temp_dir("copy_" + t.name);
    save_checkpoint(dir, *model, json{{"kind", "test"}}, steps, &opt);
    auto [loaded, info] = load_model(dir);
    EXPECT_EQ(info.step, steps);
    auto [in, target] = copy_batch(4, m, V);
    torch::NoGradGuard ng;
    EXPECT_TRUE(torch::equal(model->forward(in), loaded->forward(in)));
    fs::remove_all(dir);
  }
  std::printf("copy task, loss over 50 steps: %s\n", report.c_str());
}

// Logits at chosen positions equal the full forward's rows there, with gradients.
TEST(LanguageModel, ForwardAtSelectedPositionsEqualsFullForward) {
  for (std::string mixer : {"pow2", "attention", "sq1-lattice"}) {
    torch::manual_seed(std::random_device{}());
    LanguageModel m(ModelConfig::from_json(tiny({{"type", mixer}, {"heads", 2}}, 40, 32, 2, 64)));
    Tensor tok = torch::randint(0, 40, {3, 37}, torch::kInt64);
    Tensor idx = torch::tensor(std::vector<int64_t>{0, 5, 36, 37, 80, 110}, torch::kInt64);
    Tensor full = m->forward(tok).reshape({-1, 40}).index_select(0, idx);
    Tensor part = m->forward_at(tok, idx);
    ASSERT_EQ(part.sizes(), full.sizes());
    EXPECT_LT(rel_err(part, full), 1e-5) << mixer;
    // the same gradient reaches the weights
    m->zero_grad();
    full.square().sum().backward();
    Tensor g_full = m->named_parameters()["tok_emb.weight"].grad().clone();
    m->zero_grad();
    m->forward_at(tok, idx).square().sum().backward();
    EXPECT_LT(rel_err(m->named_parameters()["tok_emb.weight"].grad(), g_full), 1e-4) << mixer;
    EXPECT_THROW(m->forward_at(tok, torch::tensor(std::vector<int64_t>{111}, torch::kInt64)), std::invalid_argument);
    EXPECT_THROW(m->forward_at(tok, torch::tensor(std::vector<int64_t>{-1}, torch::kInt64)), std::invalid_argument);
    // the captured training step's form: the same logits with the checks made beforehand
    {
      torch::NoGradGuard ng;
      EXPECT_TRUE(torch::equal(m->forward_unchecked(tok, idx), m->forward_at(tok, idx))) << mixer;
      EXPECT_TRUE(torch::equal(m->forward_unchecked(tok, Tensor()), m->forward(tok))) << mixer;
    }
    EXPECT_NO_THROW(m->check_batch(tok));
    Tensor bad = tok.clone();
    bad[1][3] = 40;  // one past the vocabulary
    EXPECT_THROW(m->check_batch(bad), std::invalid_argument);
    EXPECT_THROW(m->check_batch(tok.view({-1})), std::invalid_argument);
    EXPECT_THROW(m->check_batch(torch::zeros({1, 65}, torch::kInt64)), std::invalid_argument);  // max_context 64
  }
}
