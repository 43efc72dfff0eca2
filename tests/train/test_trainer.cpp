// The trainer: loss goes down, exact resume, config validation, LR sweep picks the best.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "tokmix/nn/checkpoint.h"
#include "tokmix/train/trainer.h"

using namespace tokmix;
namespace fs = std::filesystem;

namespace {

train::TrainOptions tiny(const std::string& out, const std::string& mixer = "pow2") {
  nlohmann::json j = {{"model", {{"d_model", 32}, {"n_layers", 1}, {"positions", "none"}, {"mixer", {{"type", mixer}, {"heads", 2}}}}},
                      {"task", "copy:T=24,L=6,V=12"},
                      {"batch_size", 16},
                      {"steps", 40},
                      {"lr", 3e-3},
                      {"eval_every", 20},
                      {"eval_batches", 2},
                      {"log_every", 10},
                      {"out", out},
                      {"threads", 1}};
  return train::TrainOptions::from_json(j, "test");
}

std::string tmpdir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("tokmix-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p.string();
}

}  // namespace

TEST(Trainer, LossGoesDownAndMetricsAreWritten) {
  auto o = tiny(tmpdir("loss"));
  o.steps = 120;
  o.lr = 1e-2;
  auto r = train::train(o);
  EXPECT_EQ(r.steps, 120);
  std::ifstream f(fs::path(o.out) / "metrics.jsonl");
  std::vector<double> losses;
  std::string line;
  while (std::getline(f, line)) losses.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  ASSERT_GE(losses.size(), 3u);
  EXPECT_LT(losses.back(), 0.8 * losses.front()) << "loss did not go down";
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "metrics.csv"));
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "checkpoint" / "checkpoint.json"));
  EXPECT_GT(r.eval.supervised, 0);
  fs::remove_all(o.out);
}

TEST(Trainer, StoppedAndResumedEndsWithTheSameWeights) {
  auto a = tiny(tmpdir("full"));
  auto b = tiny(tmpdir("resumed"));
  train::train(a);
  auto part = train::train(b, false, nullptr, /*stop_after=*/17);
  EXPECT_EQ(part.steps, 17);
  auto rest = train::train(b, /*resume=*/true);
  EXPECT_EQ(rest.steps, 40);
  auto [ma, ia] = nn::load_model((fs::path(a.out) / "checkpoint").string());
  auto [mb, ib] = nn::load_model((fs::path(b.out) / "checkpoint").string());
  EXPECT_EQ(ia.step, 40);
  EXPECT_EQ(ib.step, 40);
  auto pa = ma->named_parameters(), pb = mb->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (auto& p : pa) {
    const auto& q = pb[p.key()];
    EXPECT_TRUE(torch::equal(p.value(), q)) << p.key() << " differs by " << (p.value() - q).abs().max().item<double>();
  }
  fs::remove_all(a.out);
  fs::remove_all(b.out);
}

TEST(Trainer, ConfigErrorsNameTheKey) {
  auto err = [](nlohmann::json j) {
    try {
      train::TrainOptions::from_json(j, "cfg.json");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  nlohmann::json ok = {{"model", {{"d_model", 32}, {"n_layers", 1}, {"mixer", {{"type", "pow2"}, {"heads", 2}}}}}, {"task", "copy:T=24,L=6,V=12"}};
  EXPECT_NO_THROW(train::TrainOptions::from_json(ok, "cfg.json"));
  auto j = ok;
  j["stepz"] = 3;
  EXPECT_NE(err(j).find("'stepz' is not a known key"), std::string::npos) << err(j);
  j = ok;
  j["lr"] = "fast";
  EXPECT_NE(err(j).find("'lr' must be a number"), std::string::npos) << err(j);
  j = ok;
  j["batch_size"] = 0;
  EXPECT_NE(err(j).find("'batch_size' = 0 is out of range"), std::string::npos) << err(j);
  j = ok;
  j["task"] = "copyy:T=3";
  EXPECT_NE(err(j).find("'task' is not valid"), std::string::npos) << err(j);
  j = ok;
  j["data"] = "x.jsonl";
  EXPECT_NE(err(j).find("give exactly one"), std::string::npos) << err(j);
  j = ok;
  j["device"] = "tpu";
  EXPECT_NE(err(j).find("accepted: cpu, cuda"), std::string::npos) << err(j);
  // a model too small for the task
  j = ok;
  j["model"]["vocab_size"] = 4;
  auto o = train::TrainOptions::from_json(j, "cfg.json");
  try {
    train::resolve_model_config(o);
    ADD_FAILURE() << "accepted a vocabulary smaller than the task's";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("vocab_size"), std::string::npos) << e.what();
  }
}

TEST(Trainer, TrainsOnAJsonlDataset) {
  const std::string dir = tmpdir("jsonl");
  fs::create_directories(dir);
  // a dataset where the label of every position is the input token plus one (mod 10)
  {
    std::ofstream f(fs::path(dir) / "train.jsonl");
    std::mt19937 rng(3);
    for (int r = 0; r < 64; ++r) {
      nlohmann::json in = nlohmann::json::array(), lab = nlohmann::json::array();
      const int len = 8 + r % 5;
      for (int t = 0; t < len; ++t) {
        int x = rng() % 10;
        in.push_back(x);
        lab.push_back(t % 2 ? (x + 1) % 10 : -100);
      }
      f << nlohmann::json{{"input", in}, {"labels", lab}}.dump() << "\n";
    }
  }
  nlohmann::json j = {{"model", {{"d_model", 32}, {"n_layers", 1}, {"positions", "none"}, {"mixer", {{"type", "first-order"}, {"heads", 2}}}}},
                      {"data", (fs::path(dir) / "train.jsonl").string()},
                      {"batch_size", 16},
                      {"steps", 80},
                      {"lr", 1e-2},
                      {"eval_every", 40},
                      {"out", (fs::path(dir) / "run").string()},
                      {"threads", 1}};
  auto r = train::train(train::TrainOptions::from_json(j, "test"));
  EXPECT_GT(r.eval.accuracy, 0.5) << "a per-token map should be learned";
  fs::remove_all(dir);
}

TEST(Trainer, LearningRateSweepKeepsTheBestRun) {
  auto o = tiny(tmpdir("sweep"));
  o.steps = 80;
  auto best = train::train_sweep(o, {1e-6, 1e-2});
  EXPECT_NE(best.out.find("lr_0.01"), std::string::npos) << best.out;
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "lr_1e-06" / "result.json"));
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "lr_0.01" / "result.json"));
  // what `reproduce table1 --resume` reads back: the same best run, or nothing when a run is
  // missing, unfinished or was made with other settings
  auto again = train::finished_sweep(o, {1e-6, 1e-2});
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->out, best.out);
  EXPECT_EQ(again->eval.accuracy, best.eval.accuracy);
  EXPECT_EQ(again->eval.loss, best.eval.loss);
  EXPECT_EQ(again->steps, 80);
  EXPECT_FALSE(train::finished_sweep(o, {1e-6, 1e-2, 1e-3}).has_value()) << "a rate never run";
  auto other = o;
  other.steps = 81;
  EXPECT_FALSE(train::finished_sweep(other, {1e-6, 1e-2}).has_value()) << "other steps";
  other = o;
  other.batch_size = o.batch_size + 1;
  EXPECT_FALSE(train::finished_sweep(other, {1e-6, 1e-2}).has_value()) << "other settings";
  fs::remove(fs::path(o.out) / "lr_1e-06" / "result.json");
  EXPECT_FALSE(train::finished_sweep(o, {1e-6, 1e-2}).has_value()) << "a missing result";
  // a sweep in pieces: the finished rate is read back, the missing one trained again
  const auto kept = fs::last_write_time(fs::path(o.out) / "lr_0.01" / "result.json");
  auto pieced = train::train_sweep(o, {1e-6, 1e-2}, false, nullptr, /*reuse_finished=*/true);
  EXPECT_EQ(pieced.out, best.out);
  EXPECT_EQ(pieced.eval.accuracy, best.eval.accuracy);
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "lr_1e-06" / "result.json"));
  EXPECT_EQ(fs::last_write_time(fs::path(o.out) / "lr_0.01" / "result.json"), kept) << "the finished run was trained again";
  EXPECT_TRUE(train::finished_sweep(o, {1e-6, 1e-2}).has_value());
  // runs brought back into another folder (options.json still names the old one) are reused
  auto moved = o;
  moved.out = o.out + "-moved";
  fs::remove_all(moved.out);
  fs::copy(o.out, moved.out, fs::copy_options::recursive);
  auto back = train::finished_sweep(moved, {1e-6, 1e-2});
  ASSERT_TRUE(back.has_value()) << "a moved sweep was not recognised";
  EXPECT_EQ(back->eval.accuracy, best.eval.accuracy);
  EXPECT_EQ(back->out, (fs::path(moved.out) / "lr_0.01").string());
  fs::remove_all(moved.out);
  fs::remove_all(o.out);
}

namespace {

// A corpus whose next byte is mostly predictable: a model must beat the unigram entropy.
std::string lm_corpus(const std::string& dir, uint64_t seed) {
  std::mt19937_64 rng(seed);
  static const char* lines[] = {"and the lord spake unto moses, saying,\n", "in the beginning was the word.\n",
                                "and it came to pass in those days,\n", "blessed are the meek: for they shall inherit the earth.\n"};
  std::string text;
  while (text.size() < 120000) text += lines[rng() % 4];
  fs::create_directories(dir);
  std::ofstream(fs::path(dir) / "text.txt") << text;
  return (fs::path(dir) / "text.txt").string();
}

train::TrainOptions lm_options(const std::string& out, const std::string& text) {
  nlohmann::json j = {{"model", {{"d_model", 32}, {"n_layers", 1}, {"positions", "none"}, {"max_context", 64},
                                 {"mixer", {{"type", "pow2-lattice"}, {"heads", 2}, {"conv", 3}}}}},
                      {"corpus", {{"sources", {text}}, {"tokenizer", "byte"}, {"out", out + "/corpus"}, {"val_every", 5}}},
                      {"context", 64},
                      {"batch_size", 8},
                      {"steps", 100},
                      {"lr", 1e-2},
                      {"eval_every", 30},
                      {"eval_batches", 2},
                      {"log_every", 10},
                      {"out", out + "/run"},
                      {"threads", 1}};
  return train::TrainOptions::from_json(j, "test");
}

}  // namespace

TEST(Trainer, LanguageModelOnACorpus) {
  const auto dir = tmpdir("lm");
  const auto text = lm_corpus(dir, std::random_device{}());
  auto o = lm_options(dir, text);
  auto corpus = train::resolve_corpus(o);
  // untrained: about ln(256) nats per byte
  {
    torch::manual_seed(0);
    nn::LanguageModel m(train::resolve_model_config(o));
    auto e0 = train::evaluate(*m, corpus, 64, 8, 0);
    EXPECT_NEAR(e0.loss, std::log(256.0), 0.5);
  }
  auto r = train::train(o);
  EXPECT_EQ(r.steps, 100);
  // byte-level: tokens are bytes, so bits per byte is loss / ln 2; perplexity is exp(loss)
  EXPECT_NEAR(r.eval.bits_per_byte, r.eval.loss / std::log(2.0), 1e-9);
  EXPECT_NEAR(r.eval.perplexity, std::exp(r.eval.loss), 1e-9);
  // the model uses context: it beats the best context-free predictor (the text's unigram entropy)
  std::ifstream tf(text);
  std::string all((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
  std::vector<double> freq(256, 0);
  for (unsigned char c : all) freq[c] += 1;
  double unigram = 0;
  for (double f : freq)
    if (f > 0) unigram -= f / all.size() * std::log(f / all.size());
  EXPECT_LT(r.eval.loss, 0.9 * unigram) << "unigram entropy " << unigram;
  // the checkpoint carries the byte tokenizer
  auto info = nn::read_checkpoint_info(o.out + "/checkpoint");
  EXPECT_EQ(info.tokenizer["type"], "byte");
  // metrics hold the language-model columns
  std::ifstream csv(fs::path(o.out) / "metrics.csv");
  std::string header;
  std::getline(csv, header);
  EXPECT_NE(header.find("eval_bits_per_byte"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Trainer, LanguageModelResumeIsExact) {
  const auto dir = tmpdir("lm-resume");
  const auto text = lm_corpus(dir, 11);
  auto a = lm_options(dir + "/a", text);
  auto b = lm_options(dir + "/b", text);
  a.steps = b.steps = 24;
  train::train(a);
  train::train(b, false, nullptr, /*stop_after=*/9);
  train::train(b, /*resume=*/true);
  auto [ma, ia] = nn::load_model(a.out + "/checkpoint");
  auto [mb, ib] = nn::load_model(b.out + "/checkpoint");
  EXPECT_EQ(ia.step, ib.step);
  auto pb = mb->named_parameters();
  for (auto& p : ma->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  fs::remove_all(dir);
}

TEST(Trainer, LanguageModelConfigErrors) {
  auto base = lm_options("/tmp/unused", "/tmp/unused.txt");
  nlohmann::json j = base.to_json();
  j["task"] = "copy:T=24,L=6,V=12";
  EXPECT_THROW(train::TrainOptions::from_json(j, "t"), std::invalid_argument);
  j = base.to_json();
  j["corpus"]["tokenizer"] = "bpe:5";
  try {
    train::TrainOptions::from_json(j, "t");
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("corpus.tokenizer"), std::string::npos) << e.what();
  }
  j = base.to_json();
  j["corpus"]["shuffle"] = true;
  EXPECT_THROW(train::TrainOptions::from_json(j, "t"), std::invalid_argument);
  j = base.to_json();
  j["corpus"] = "/no/such/corpus";
  auto o = train::TrainOptions::from_json(j, "t");
  EXPECT_THROW(train::train(o), std::invalid_argument);
}

TEST(Evaluate, RecallDistanceIsHowFarBackTheAnswerSits) {
  const int64_t in[] = {5, 7, 9, 7, 3, 5};
  EXPECT_EQ(train::recall_distance(in, 5, 5), 0);   // the token at t itself
  EXPECT_EQ(train::recall_distance(in, 4, 5), 4);   // first position
  EXPECT_EQ(train::recall_distance(in, 4, 7), 1);   // the latest occurrence counts
  EXPECT_EQ(train::recall_distance(in, 2, 3), -1);  // only later in the sequence
  EXPECT_EQ(train::recall_distance(in, 5, 11), -1);
}

TEST(Evaluate, ByDistanceBucketsAddUpToTheAccuracy) {
  // an untrained model on MQAR and on copy: every supervised position lands in one bucket, the
  // buckets' correct predictions add up to evaluate()'s accuracy, and MQAR answers are values
  // that sit in the context (never absent), at distances below T
  torch::manual_seed(std::random_device{}());
  for (const std::string spec : {"mqar:T=64,N=8,V=64", "copy:T=24,L=6,V=12"}) {
    SCOPED_TRACE(spec);
    auto o = tiny(tmpdir("bydist"));
    o.task = spec;
    nn::LanguageModel m(train::resolve_model_config(o));
    auto task = data::parse_task_spec(spec);
    ASSERT_LE(data::vocab_size(task), m->config().vocab_size);
    const uint64_t seed = std::random_device{}();
    train::DistanceResult d;
    auto e = train::evaluate(*m, task, 8, 3, seed, 0, 1, &d);
    int64_t sup = d.absent.supervised, cor = d.absent.correct, prev_hi = 0;
    for (const auto& [lo, b] : d.buckets) {
      EXPECT_GT(b.supervised, 0);
      EXPECT_GE(b.lo, prev_hi);  // sorted, disjoint
      EXPECT_EQ(b.hi, b.lo == 0 ? 1 : 2 * b.lo);
      prev_hi = b.hi;
      sup += b.supervised;
      cor += b.correct;
    }
    EXPECT_EQ(sup, e.supervised);
    EXPECT_NEAR(double(cor) / double(sup), e.accuracy, 1e-12);
    if (spec.rfind("mqar", 0) == 0) {
      EXPECT_EQ(d.absent.supervised, 0);
      EXPECT_LT(d.buckets.rbegin()->second.lo, 64);
    }
  }
}
