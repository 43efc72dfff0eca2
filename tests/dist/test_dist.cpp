// Data-parallel training: gradient buckets and their hooks in one process (a Gloo group of one),
// and whole jobs of the tokmix executable as 2 Gloo processes on loopback: same weights as one
// process with the global batch, a killed or stalled rank stops the other within the timeout and
// the checkpoint written before resumes with one process; the launcher stops a job when a rank fails.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "tokmix/nn/checkpoint.h"
#include "tokmix/train/distributed.h"

using namespace tokmix;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string tmpdir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("tokmix-dist-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A child process with its stdout and stderr in one file.
struct Proc {
  pid_t pid = -1;
  std::string log;
};

Proc spawn(const std::vector<std::string>& argv, const std::vector<std::pair<std::string, std::string>>& env, const std::string& log) {
  Proc p;
  p.log = log;
  p.pid = ::fork();
  if (p.pid == 0) {
    FILE* f = std::fopen(log.c_str(), "w");
    if (f) {
      ::dup2(fileno(f), 1);
      ::dup2(fileno(f), 2);
    }
    for (auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
    for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
      bool given = false;
      for (auto& e : env) given = given || e.first == k;
      if (!given) unsetenv(k);
    }
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    ::execv(a[0], a.data());
    std::_Exit(127);
  }
  return p;
}

// Exit code (128 + signal when killed), or -1 when still running after `timeout_s`.
int wait_for(const Proc& p, double timeout_s) {
  const auto end = Clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    int status = 0;
    if (::waitpid(p.pid, &status, WNOHANG) == p.pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (Clock::now() > end) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void kill_and_reap(const Proc& p) {
  ::kill(p.pid, SIGKILL);
  int status = 0;
  ::waitpid(p.pid, &status, 0);
}

int run(const std::vector<std::string>& argv, const std::string& log, double timeout_s = 60) {
  Proc p = spawn(argv, {}, log);
  int rc = wait_for(p, timeout_s);
  if (rc < 0) kill_and_reap(p);
  return rc;
}

// A model small enough that a step takes milliseconds on one core.
std::string write_config(const std::string& dir, nlohmann::json extra = {}) {
  nlohmann::json j = {{"model", {{"d_model", 32}, {"n_layers", 2}, {"positions", "none"}, {"mixer", {{"type", "pow2"}, {"heads", 2}}}}},
                      {"task", "copy:T=24,L=6,V=12"},
                      {"batch_size", 8},
                      {"steps", 12},
                      {"lr", 3e-3},
                      {"eval_every", 6},
                      {"eval_batches", 2},
                      {"log_every", 4},
                      {"seed", 3},
                      {"threads", 1}};
  for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
  const std::string path = (fs::path(dir) / "train.json").string();
  std::ofstream(path) << j.dump(2);
  return path;
}

// How far the weights of two checkpoints are apart, over their tensors: the largest
// ||a - b|| / ||a|| (norm) and the largest max|a - b| / max|a| (element).
struct Difference {
  double norm = 0, element = 0;
};
Difference weight_difference(const std::string& a, const std::string& b) {
  auto [ma, ia] = nn::load_model((fs::path(a) / "checkpoint").string());
  auto [mb, ib] = nn::load_model((fs::path(b) / "checkpoint").string());
  EXPECT_EQ(ia.step, ib.step);
  auto pa = ma->named_parameters(), pb = mb->named_parameters();
  EXPECT_EQ(pa.size(), pb.size());
  Difference d;
  for (auto& p : pa) {
    const torch::Tensor& q = pb[p.key()];
    const torch::Tensor delta = (p.value() - q).to(torch::kFloat64);
    d.norm = std::max(d.norm, delta.norm().item<double>() / std::max(p.value().to(torch::kFloat64).norm().item<double>(), 1e-30));
    d.element = std::max(d.element, delta.abs().max().item<double>() / std::max(p.value().abs().max().item<double>(), 1e-30));
  }
  return d;
}

nlohmann::json result(const std::string& run) { return nlohmann::json::parse(slurp((fs::path(run) / "result.json").string())); }

const std::string kExe = TOKMIX_EXE;

bool have_gloo() {
  auto b = dist::available_backends();
  return std::find(b.begin(), b.end(), "gloo") != b.end();
}
#define NEEDS_GLOO() \
  if (!have_gloo()) GTEST_SKIP() << "no Gloo in this build (Debian: libgloo-dev)"

}  // namespace

// ---------------------------------------------------------------------------------------------
// In one process

TEST(DistEnv, MissingVariablesAreNamed) {
  for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) unsetenv(k);
  try {
    dist::Env::from_environment();
    FAIL() << "no error without the variables";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("WORLD_SIZE"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("tokmix launch"), std::string::npos) << e.what();
  }
  setenv("WORLD_SIZE", "2", 1);
  setenv("RANK", "2", 1);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", "1234", 1);
  try {
    dist::Env::from_environment();
    FAIL() << "RANK=2 of 2 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("RANK='2'"), std::string::npos) << e.what();
  }
  setenv("RANK", "1", 1);
  auto env = dist::Env::from_environment();
  EXPECT_EQ(env.rank, 1);
  EXPECT_EQ(env.world_size, 2);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.master_port, 1234);
  for (const char* k : {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) unsetenv(k);
}

namespace {
dist::Env solo_env() {
  dist::Env e;
  e.master_port = dist::free_port();
  return e;
}

// Parameters used by the loss, one that is not, and a loss over a few layers.
struct Net {
  std::vector<torch::Tensor> params;
  torch::Tensor unused;
  Net() {
    torch::manual_seed(7);
    for (int64_t n : {5, 7, 3}) params.push_back(torch::randn({n, n}, torch::requires_grad()));
    unused = torch::randn({4}, torch::requires_grad());
    params.push_back(unused);
  }
  torch::Tensor loss(const torch::Tensor& x) const {
    torch::Tensor h = x.matmul(params[0]).tanh();
    h = torch::nn::functional::pad(h, torch::nn::functional::PadFuncOptions({0, 2})).matmul(params[1]).tanh();
    return h.narrow(1, 0, 3).matmul(params[2]).pow(2).sum();
  }
};
}  // namespace

TEST(GradientAverager, BucketsAreAllReducedDuringBackwardAndGradientsAreKept) {
  NEEDS_GLOO();
  dist::ProcessGroup group(solo_env(), "gloo", std::chrono::seconds(10));
  Net net;
  torch::Tensor x = torch::randn({6, 5});
  net.loss(x).backward();
  std::vector<torch::Tensor> want;
  for (auto& p : net.params) want.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
  ASSERT_FALSE(want[3].defined());

  // 4-byte buckets: every parameter in its own
  dist::GradientAverager avg(group, net.params, 4);
  EXPECT_EQ(avg.num_buckets(), 4u);
  for (int step = 0; step < 2; ++step) {
    for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
    net.loss(x).backward();
    torch::Tensor extra = avg.finish(torch::tensor({1.5, -2.0}, torch::kFloat64));
    ASSERT_EQ(extra.numel(), 2);
    EXPECT_DOUBLE_EQ(extra[0].item<double>(), 1.5);  // a group of one: sums are the values
    EXPECT_DOUBLE_EQ(extra[1].item<double>(), -2.0);
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE(net.params[i].grad().defined());
      EXPECT_TRUE(torch::allclose(net.params[i].grad(), want[i], 0, 0)) << "parameter " << i;
    }
    EXPECT_FALSE(net.params[3].grad().defined()) << "a parameter no rank used got a gradient";
    // buckets launch in bucket order, the same on every rank: the unused parameter's bucket is
    // first (reverse parameter order) and only finish() launches it, so the others wait too
    EXPECT_EQ(avg.launched_in_backward(), 0);
  }
}

TEST(GradientAverager, LaunchesEarlyInBucketOrder) {
  NEEDS_GLOO();
  dist::ProcessGroup group(solo_env(), "gloo", std::chrono::seconds(10));
  Net net;
  std::vector<torch::Tensor> used(net.params.begin(), net.params.begin() + 3);
  torch::Tensor x = torch::randn({6, 5});
  {
    dist::GradientAverager avg(group, used, 4);
    net.loss(x).backward();
    avg.finish();
    // every bucket was launched from a hook, before backward returned
    EXPECT_EQ(avg.launched_in_backward(), 3);
  }
  // one large bucket: launched by the last hook, still inside backward
  for (auto& p : used) p.mutable_grad() = torch::Tensor();
  dist::GradientAverager one(group, used, int64_t(1) << 30);
  EXPECT_EQ(one.num_buckets(), 1u);
  net.loss(x).backward();
  one.finish();
  EXPECT_EQ(one.launched_in_backward(), 1);
}

TEST(GradientAverager, RejectsBadArguments) {
  NEEDS_GLOO();
  dist::ProcessGroup group(solo_env(), "gloo", std::chrono::seconds(10));
  EXPECT_THROW(dist::GradientAverager(group, {torch::zeros({3})}, 1024), std::invalid_argument);  // nothing requires grad
  EXPECT_THROW(dist::GradientAverager(group, {torch::zeros({3}, torch::requires_grad())}, 0), std::invalid_argument);
  try {
    dist::ProcessGroup bad(solo_env(), "nccl-or-so", std::chrono::seconds(1));
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("nccl-or-so"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs of the tokmix executable

TEST(DistTrain, TwoRanksGiveTheWeightsOfOneProcessWithTheGlobalBatch) {
  NEEDS_GLOO();
  const std::string dir = tmpdir("same");
  const std::string cfg = write_config(dir);
  const std::string one = dir + "/one", two = dir + "/two";
  ASSERT_EQ(run({kExe, "train", "--config", cfg, "--out", one, "--batch-size", "16"}, dir + "/one.log"), 0) << slurp(dir + "/one.log");
  ASSERT_EQ(run({kExe, "launch", "--nproc", "2", "--master-port", "0", "--", kExe, "train", "--config", cfg, "--out", two, "--batch-size", "8",
                 "--distributed", "--dist-timeout", "30"},
                dir + "/two.log"),
            0)
      << slurp(dir + "/two.log");
  const std::string log = slurp(dir + "/two.log");
  EXPECT_NE(log.find("[rank 0] step 12/12"), std::string::npos) << log;
  EXPECT_EQ(log.find("[rank 1] step"), std::string::npos) << "rank 1 logged progress:\n" << log;
  EXPECT_NE(log.find("2 processes"), std::string::npos) << log;
  // Adam divides each update by the root of its second moment: where a gradient element is
  // nearly zero, the rounding of a differently-blocked matmul can move that element's update by
  // up to lr, so single elements drift further apart than whole tensors do
  const auto diff = weight_difference(one, two);
  EXPECT_LT(diff.norm, 1e-5) << "weights of 2 ranks x batch 8 differ from 1 process x batch 16";
  EXPECT_LT(diff.element, 1e-4);
  std::printf("2 ranks x batch 8 vs 1 process x batch 16: weights differ by %.2e (norm), %.2e (element), relative\n", diff.norm,
              diff.element);
  auto r1 = result(one), r2 = result(two);
  EXPECT_EQ(r2["world_size"], 2);
  EXPECT_NEAR(r1["final_loss"].get<double>(), r2["final_loss"].get<double>(), 1e-5);
  EXPECT_NEAR(r1["eval_loss"].get<double>(), r2["eval_loss"].get<double>(), 1e-5);
  EXPECT_NEAR(r1["eval_accuracy"].get<double>(), r2["eval_accuracy"].get<double>(), 1e-9);
  // the evaluation covered the same positions
  std::ifstream m1(fs::path(one) / "metrics.jsonl"), m2(fs::path(two) / "metrics.jsonl");
  std::string l1, l2;
  int rows = 0;
  while (std::getline(m1, l1) && std::getline(m2, l2)) {
    auto a = nlohmann::json::parse(l1), b = nlohmann::json::parse(l2);
    EXPECT_EQ(a["step"], b["step"]);
    EXPECT_NEAR(a["loss"].get<double>(), b["loss"].get<double>(), 1e-5) << "step " << a["step"];
    ++rows;
  }
  EXPECT_EQ(rows, 4);
  fs::remove_all(dir);
}

TEST(DistTrain, UnevenSupervisionAndPaddingStillMatchOneProcess) {
  NEEDS_GLOO();
  // sequences of different lengths with few supervised positions: each rank's share of the
  // global batch's supervised positions differs from step to step
  const std::string dir = tmpdir("uneven");
  std::mt19937 rng(11);
  {
    std::ofstream f(dir + "/data.jsonl");
    for (int i = 0; i < 40; ++i) {
      const int n = 2 + int(rng() % 15);
      nlohmann::json in = nlohmann::json::array(), lab = nlohmann::json::array();
      for (int t = 0; t < n; ++t) {
        in.push_back(int(rng() % 10));
        lab.push_back(rng() % 3 == 0 ? int(rng() % 10) : -100);
      }
      lab[0] = int(rng() % 10);  // at least one supervised position per row
      f << nlohmann::json{{"input", in}, {"labels", lab}}.dump() << "\n";
    }
  }
  nlohmann::json extra = {{"data", dir + "/data.jsonl"}, {"steps", 10}, {"eval_every", 5}};
  nlohmann::json j = nlohmann::json::parse(slurp(write_config(dir, extra)));
  j.erase("task");
  std::ofstream(dir + "/train.json") << j.dump(2);
  const std::string cfg = dir + "/train.json";
  const std::string one = dir + "/one", two = dir + "/two";
  ASSERT_EQ(run({kExe, "train", "--config", cfg, "--out", one, "--batch-size", "6"}, dir + "/one.log"), 0) << slurp(dir + "/one.log");
  ASSERT_EQ(run({kExe, "launch", "--nproc", "2", "--master-port", "0", "--", kExe, "train", "--config", cfg, "--out", two, "--batch-size", "3",
                 "--distributed", "--dist-timeout", "30"},
                dir + "/two.log"),
            0)
      << slurp(dir + "/two.log");
  const auto diff = weight_difference(one, two);
  EXPECT_LT(diff.norm, 1e-5);
  EXPECT_LT(diff.element, 1e-4);
  EXPECT_NEAR(result(one)["eval_loss"].get<double>(), result(two)["eval_loss"].get<double>(), 1e-5);
  fs::remove_all(dir);
}

TEST(DistTrain, KilledRankStopsTheOtherAndTheCheckpointResumesWithOneProcess) {
  NEEDS_GLOO();
  const std::string dir = tmpdir("kill");
  const std::string cfg = write_config(dir, {{"steps", 200}, {"checkpoint_every", 5}, {"eval_every", 0}});
  const std::string out = dir + "/run";
  const std::string port = std::to_string(dist::free_port());
  const double timeout_s = 10;
  std::vector<Proc> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(spawn({kExe, "train", "--config", cfg, "--out", out, "--distributed", "--dist-timeout", std::to_string(timeout_s)},
                          {{"RANK", std::to_string(r)}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port}},
                          dir + "/rank" + std::to_string(r) + ".log"));
  // wait for a checkpoint past step 10, then kill rank 1 mid-run
  const std::string ckpt = out + "/checkpoint";
  int64_t seen = 0;
  const auto give_up = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < give_up) {
    try {
      if (fs::exists(ckpt + "/checkpoint.json")) seen = nn::read_checkpoint_info(ckpt).step;
    } catch (const std::exception&) {
    }
    if (seen >= 10) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(seen, 10) << slurp(dir + "/rank0.log") << slurp(dir + "/rank1.log");
  ::kill(ranks[1].pid, SIGKILL);
  const auto killed_at = Clock::now();
  const int rc = wait_for(ranks[0], timeout_s + 20);
  const double took = std::chrono::duration<double>(Clock::now() - killed_at).count();
  if (rc < 0) kill_and_reap(ranks[0]);
  wait_for(ranks[1], 5);
  const std::string log0 = slurp(dir + "/rank0.log");
  EXPECT_GT(rc, 0) << "the surviving rank did not fail:\n" << log0;
  EXPECT_LT(took, timeout_s) << "the surviving rank took " << took << " s to stop";
  EXPECT_NE(log0.find("error: distributed:"), std::string::npos) << log0;
  EXPECT_NE(log0.find("failed on rank 0 of 2"), std::string::npos) << log0;
  EXPECT_EQ(log0.find("step 200/200"), std::string::npos) << "the run finished before the kill:\n" << log0;
  const auto at = log0.find("error:");
  if (at != std::string::npos) std::printf("%s\n", log0.substr(at, log0.find('\n', at) - at).c_str());
  // the checkpoint is whole and resumes with one process and the same global batch (2 x 8)
  auto info = nn::read_checkpoint_info(ckpt);
  EXPECT_GE(info.step, 10);
  EXPECT_LT(info.step, 200);
  EXPECT_EQ(info.step % 5, 0);
  EXPECT_NO_THROW(nn::load_model(ckpt));
  const std::string resume_log = dir + "/resume.log";
  ASSERT_EQ(run({kExe, "train", "--config", cfg, "--out", out, "--batch-size", "16", "--resume"}, resume_log), 0) << slurp(resume_log);
  EXPECT_NE(slurp(resume_log).find("resumed from " + ckpt + " at step " + std::to_string(info.step)), std::string::npos) << slurp(resume_log);
  EXPECT_EQ(nn::read_checkpoint_info(ckpt).step, 200);
  // ... and ends near where one uninterrupted process ends
  const std::string ref = dir + "/ref";
  ASSERT_EQ(run({kExe, "train", "--config", cfg, "--out", ref, "--batch-size", "16"}, dir + "/ref.log"), 0) << slurp(dir + "/ref.log");
  const auto diff = weight_difference(ref, out);
  EXPECT_LT(diff.norm, 1e-4);
  std::printf("killed at checkpoint %lld, survivor stopped after %.2f s, resumed weights differ by %.2e (norm), %.2e (element)\n",
              (long long)info.step, took, diff.norm, diff.element);
  fs::remove_all(dir);
}

TEST(DistTrain, StalledRankTimesOut) {
  NEEDS_GLOO();
  const std::string dir = tmpdir("stall");
  const std::string cfg = write_config(dir, {{"steps", 100000}, {"eval_every", 0}});
  const std::string port = std::to_string(dist::free_port());
  const double timeout_s = 3;
  std::vector<Proc> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(spawn({kExe, "train", "--config", cfg, "--out", dir + "/run", "--distributed", "--dist-timeout", std::to_string(timeout_s)},
                          {{"RANK", std::to_string(r)}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port}},
                          dir + "/rank" + std::to_string(r) + ".log"));
  // let it train a little, then freeze rank 1
  const auto give_up = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < give_up && slurp(dir + "/rank0.log").find("step 20/") == std::string::npos)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(ranks[1].pid, SIGSTOP);
  const auto stopped_at = Clock::now();
  const int rc = wait_for(ranks[0], timeout_s + 30);
  const double took = std::chrono::duration<double>(Clock::now() - stopped_at).count();
  if (rc < 0) kill_and_reap(ranks[0]);
  kill_and_reap(ranks[1]);
  const std::string log0 = slurp(dir + "/rank0.log");
  EXPECT_NE(log0.find("step 20/"), std::string::npos) << log0;
  EXPECT_GT(rc, 0) << log0;
  EXPECT_GE(took, timeout_s * 0.9) << log0;
  EXPECT_LT(took, timeout_s + 10) << log0;
  EXPECT_NE(log0.find("error: distributed:"), std::string::npos) << log0;
  fs::remove_all(dir);
}

TEST(Launch, SetsTheVariablesPrefixesOutputAndStopsTheOthersWhenOneFails) {
  const std::string dir = tmpdir("launch");
  // rank 1 fails only once rank 0 has printed (a file says so): under load, a rank stopped
  // before its first line would otherwise make the output checks below a race
  const std::string script =
      "echo \"vars $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\"; "
      "if [ \"$RANK\" = 0 ]; then touch " + dir + "/rank0-printed; sleep 30; fi; "
      "while [ ! -e " + dir + "/rank0-printed ]; do sleep 0.05; done; echo bye >&2; exit 3";
  const auto t0 = Clock::now();
  const int rc = run({kExe, "launch", "--nproc", "2", "--master-port", "4567", "--grace", "2", "--", "/bin/sh", "-c", script}, dir + "/log", 60);
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::string log = slurp(dir + "/log");
  EXPECT_EQ(rc, 3) << log;
  EXPECT_LT(took, 15) << "the other rank was not stopped:\n" << log;
  EXPECT_NE(log.find("[rank 0] vars 0 2 0 2 127.0.0.1 4567"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] vars 1 2 1 2 127.0.0.1 4567"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] bye"), std::string::npos) << log;
  EXPECT_NE(log.find("rank 1 exited with code 3"), std::string::npos) << log;
  // all succeed: 0
  EXPECT_EQ(run({kExe, "launch", "--nproc", "3", "--", "/bin/sh", "-c", "exit 0"}, dir + "/ok.log"), 0) << slurp(dir + "/ok.log");
  // a command that cannot run fails the job
  EXPECT_NE(run({kExe, "launch", "--nproc", "2", "--", "/nonexistent/program"}, dir + "/bad.log"), 0);
  fs::remove_all(dir);
}
