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
  fs::remove_all(o.out);
}
