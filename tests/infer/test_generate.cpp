// Generation: sampling rules, cached decoding equal to recomputing the whole sequence, batches
// of prompts of different lengths, and the edge cases (one-token prompt, over-long prompt, ids
// outside the vocabulary, bad options).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

#include "tokmix/infer/generate.h"

using namespace tokmix;
using torch::Tensor;

namespace {

nn::LanguageModel small_model(const std::string& mixer, int64_t ctx = 64, int64_t vocab = 40) {
  nlohmann::json j = {{"vocab_size", vocab}, {"d_model", 32}, {"n_layers", 2}, {"max_context", ctx}, {"positions", "rotary"},
                      {"mixer", {{"type", mixer}, {"heads", 2}, {"conv", 3}}}};
  torch::manual_seed(std::random_device{}());
  nn::LanguageModel m(nn::ModelConfig::from_json(j, "test"));
  m->eval();
  return m;
}

// Greedy continuation by recomputing the full forward pass at every step.
std::vector<int64_t> greedy_reference(nn::LanguageModelImpl& m, std::vector<int64_t> seq, int64_t n) {
  torch::NoGradGuard ng;
  std::vector<int64_t> out;
  for (int64_t k = 0; k < n; ++k) {
    Tensor x = torch::tensor(seq, torch::kInt64).unsqueeze(0);
    const int64_t t = m.forward(x)[0][-1].argmax().item<int64_t>();
    out.push_back(t);
    seq.push_back(t);
  }
  return out;
}

}  // namespace

TEST(Sampling, GreedyTopKTopPAndDistribution) {
  std::mt19937_64 rng(std::random_device{}());
  Tensor logits = torch::randn({50}, torch::kFloat64);
  const int64_t best = logits.argmax().item<int64_t>();
  infer::SampleOptions g;
  g.temperature = 0;
  EXPECT_EQ(infer::sample_token(logits, g, rng), best);
  infer::SampleOptions k1;
  k1.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(infer::sample_token(logits, k1, rng), best);
  infer::SampleOptions p0;
  p0.top_p = 1e-9;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(infer::sample_token(logits, p0, rng), best);
  // top-k 3: only the three most likely ever appear
  infer::SampleOptions k3;
  k3.top_k = 3;
  auto top3 = std::get<1>(logits.topk(3));
  for (int i = 0; i < 200; ++i) {
    const int64_t t = infer::sample_token(logits, k3, rng);
    EXPECT_TRUE((top3 == t).any().item<bool>()) << t;
  }
  // temperature 1, no truncation: frequencies follow softmax
  Tensor small = torch::tensor({0.0, 1.0, 2.0, -1.0}, torch::kFloat64);
  Tensor p = torch::softmax(small, 0);
  infer::SampleOptions plain;
  std::vector<int> counts(4, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) counts[infer::sample_token(small, plain, rng)]++;
  for (int v = 0; v < 4; ++v) {
    const double expect = p[v].item<double>(), sd = std::sqrt(expect * (1 - expect) / n);
    EXPECT_NEAR(counts[v] / double(n), expect, 5 * sd) << v;
  }
  // nucleus 0.8 over probabilities .6 .25 .1 .05: keeps the first two
  Tensor probs = torch::log(torch::tensor({0.6, 0.25, 0.1, 0.05}, torch::kFloat64));
  infer::SampleOptions nucleus;
  nucleus.top_p = 0.8;
  for (int i = 0; i < 500; ++i) EXPECT_LT(infer::sample_token(probs, nucleus, rng), 2);
  infer::SampleOptions bad;
  bad.temperature = -1;
  EXPECT_THROW(bad.validate(), std::invalid_argument);
  bad = {};
  bad.top_p = 0;
  EXPECT_THROW(bad.validate(), std::invalid_argument);
  bad = {};
  bad.top_k = -2;
  EXPECT_THROW(bad.validate(), std::invalid_argument);
  Tensor nan = torch::tensor({0.0, std::nan("")}, torch::kFloat64);
  EXPECT_THROW(infer::sample_token(nan, plain, rng), std::runtime_error);
}

TEST(Generate, CachedDecodingEqualsRecomputation) {
  for (std::string mixer : {"attention", "pow2-lattice", "sq1", "first-order"}) {
    auto m = small_model(mixer);
    infer::SampleOptions g;
    g.temperature = 0;
    const std::vector<std::vector<int64_t>> prompts = {{1}, {3, 4, 5, 6, 7, 8, 9}, {10, 11, 12}};
    auto r = infer::generate(*m, prompts, 12, g);
    ASSERT_EQ(r.tokens.size(), 3u);
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(r.tokens[i], greedy_reference(*m, prompts[i], 12)) << mixer << " prompt " << i;
      EXPECT_EQ(r.prompt_tokens[i], int64_t(prompts[i].size()));
      EXPECT_EQ(r.dropped_tokens[i], 0);
    }
    EXPECT_EQ(r.decode_steps, 11);
    EXPECT_GT(r.cache_bytes, 0);
    // a batch gives what each prompt gives alone
    auto alone = infer::generate(*m, {prompts[1]}, 12, g);
    EXPECT_EQ(alone.tokens[0], r.tokens[1]) << mixer;
  }
}

TEST(Generate, SeededSamplingIsReproducible) {
  auto m = small_model("pow2");
  infer::SampleOptions s;
  s.temperature = 1.0;
  s.top_k = 10;
  s.seed = 7;
  auto a = infer::generate(*m, {{1, 2, 3}}, 20, s);
  auto b = infer::generate(*m, {{1, 2, 3}}, 20, s);
  EXPECT_EQ(a.tokens, b.tokens);
  std::vector<int64_t> streamed;
  infer::generate(*m, {{1, 2, 3}}, 20, s, [&](int64_t seq, int64_t t) {
    EXPECT_EQ(seq, 0);
    streamed.push_back(t);
  });
  EXPECT_EQ(streamed, a.tokens[0]);
}

TEST(Generate, EdgeCases) {
  auto m = small_model("sq1-lattice", /*ctx=*/32);
  infer::SampleOptions g;
  g.temperature = 0;
  // a prompt longer than the context keeps its last tokens
  std::vector<int64_t> longp(50);
  for (int i = 0; i < 50; ++i) longp[i] = i % 40;
  auto r = infer::generate(*m, {longp}, 8, g);
  EXPECT_EQ(r.dropped_tokens[0], 50 - (32 - 8));
  EXPECT_EQ(r.prompt_tokens[0], 24);
  std::vector<int64_t> tail(longp.end() - 24, longp.end());
  EXPECT_EQ(r.tokens[0], greedy_reference(*m, tail, 8));
  // ids outside the vocabulary, empty prompts, no room: errors naming the value
  try {
    infer::generate(*m, {{1, 40}}, 4, g);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("40"), std::string::npos) << e.what();
  }
  EXPECT_THROW(infer::generate(*m, {{1, -1}}, 4, g), std::invalid_argument);
  EXPECT_THROW(infer::generate(*m, {{}}, 4, g), std::invalid_argument);
  EXPECT_THROW(infer::generate(*m, {}, 4, g), std::invalid_argument);
  EXPECT_THROW(infer::generate(*m, {{1}}, 32, g), std::invalid_argument);
  // zero new tokens: only the prefill
  auto z = infer::generate(*m, {{1, 2}}, 0, g);
  EXPECT_TRUE(z.tokens[0].empty());
}
