// Data-parallel training over LibTorch's c10d: one process per device, rendezvous through a
// TCPStore hosted by rank 0, Gloo on CPU and NCCL on CUDA (in builds that have them), gradients
// averaged by bucketed all-reduce launched from gradient hooks while backward still runs.
// Semantics and failure behaviour: docs/distributed.md.
//
// c10d's headers stay inside src/train/distributed.cpp (they need backend macros and pull in
// Gloo/NCCL headers); this header only needs LibTorch's.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tokmix/data/tasks.h"
#include "tokmix/nn/model.h"
#include "tokmix/train/trainer.h"

namespace tokmix::dist {

// Where a process stands in its job, from the variables torchrun (and `tokmix launch`) set:
// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
struct Env {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;

  // Throws std::invalid_argument naming a missing or malformed variable (and how to start a job).
  static Env from_environment();
};

// The backends this build can use ("gloo", "nccl").
std::vector<std::string> available_backends();

// A c10d process group (Gloo or NCCL backend) and its TCPStore. Every collective waits at most
// the timeout for its peers; a failure (peer died, timed out) is a std::runtime_error naming the
// operation, the rank and the cause. After one, the group is abandoned, not torn down: its
// worker threads may still be blocked on the dead peer.
class ProcessGroup {
 public:
  ProcessGroup(const Env& env, const std::string& backend, std::chrono::milliseconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& backend() const { return backend_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // In place over all ranks. The tensor must be contiguous and on the group's device kind.
  void allreduce_sum(torch::Tensor& t, const std::string& what);
  void allreduce_max(torch::Tensor& t, const std::string& what);
  void broadcast(torch::Tensor& t, int root, const std::string& what);
  void barrier(const std::string& what);

  // Asynchronous sum: returns a ticket for wait(); calls must come in the same order on all ranks.
  size_t allreduce_sum_async(torch::Tensor& t);
  void wait(size_t ticket, const std::string& what);

  // Turns an exception from c10d into the error this class throws, and marks the group failed.
  [[noreturn]] void fail(const std::string& what, const std::string& cause);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
  std::string backend_;
  std::chrono::milliseconds timeout_;
};

// Averages the gradients of a set of parameters over the ranks of a group. Parameters are put,
// in reverse order (roughly the order backward produces their gradients), into buckets of about
// `bucket_bytes`; a hook on each parameter copies its gradient into its bucket's flat buffer,
// and a bucket whose gradients have all arrived is all-reduced asynchronously right away, in
// bucket order (the same on every rank), while backward goes on with earlier layers.
class GradientAverager {
 public:
  GradientAverager(ProcessGroup& group, std::vector<torch::Tensor> params, int64_t bucket_bytes);
  ~GradientAverager();  // removes the hooks
  GradientAverager(const GradientAverager&) = delete;
  GradientAverager& operator=(const GradientAverager&) = delete;

  // After backward: launches what the hooks did not (parameters without a gradient this step
  // count as zeros), waits for every bucket, divides by the world size and writes the result to
  // each parameter's .grad. A parameter no rank produced a gradient for keeps its .grad as it
  // was, as in a single process. `extra` (1-D float, may be empty) is summed over ranks in the
  // same step; returns it.
  torch::Tensor finish(const torch::Tensor& extra = {});

  size_t num_buckets() const { return buckets_.size(); }
  // Buckets launched from a hook during the last backward (the rest waited for finish()).
  int64_t launched_in_backward() const { return launched_early_; }

 private:
  struct Slot {
    size_t bucket = 0;
    int64_t offset = 0, numel = 0;
    bool ready = false;
  };
  struct Bucket {
    std::vector<size_t> params;
    torch::Tensor flat;
    size_t pending = 0;
    bool launched = false;
    size_t ticket = 0;
  };
  void on_grad(size_t i, const torch::Tensor& grad);
  void launch_ready();  // with mu_ held

  ProcessGroup& group_;
  std::vector<torch::Tensor> params_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  std::vector<unsigned> hook_ids_;
  size_t next_launch_ = 0;
  int64_t launched_early_ = 0, early_ = 0;
  bool in_finish_ = false;
  std::mutex mu_;
};

// What the trainer adds for a distributed run (`"distributed": true`).
class DataParallel {
 public:
  struct Options {
    std::string device = "cpu";  // "cpu" (Gloo) | "cuda" (NCCL, device LOCAL_RANK)
    double timeout_s = 300;
    double bucket_mb = 25;
  };
  explicit DataParallel(const Options& o, const Env& env = Env::from_environment());
  ~DataParallel();

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  bool is_root() const { return env_.rank == 0; }
  const Env& env() const { return env_; }
  torch::Device device() const { return device_; }
  ProcessGroup& group() { return *group_; }
  // CPU threads for this rank when the config leaves them to the machine: cores / local ranks.
  int default_threads() const;

  // This rank's rows of a global batch: [rank*b, (rank+1)*b) for b = rows / world_size. Also
  // counts the global batch's supervised positions for loss().
  data::Batch shard(const data::Batch& global);
  // Summed cross-entropy of this rank's rows times world_size / (global supervised positions):
  // the average of these over ranks, and so the averaged gradient, is the mean over the global
  // batch, as one process would compute it, whatever the padding of each shard.
  torch::Tensor loss(const torch::Tensor& logits2d, const torch::Tensor& labels1d) const;

  // Once the model is on its device and resumed: checks that every rank starts at `step`,
  // copies rank 0's weights to all ranks and hooks the gradients.
  void attach(nn::LanguageModelImpl& model, int64_t step);
  // After backward: gradients averaged over ranks; returns the mean of `local_loss` over ranks.
  double finish_backward(double local_loss);
  // Sums the evaluation counts of all ranks (each evaluated its own part).
  train::EvalResult reduce(const train::EvalResult& local);
  void barrier(const std::string& what);

  GradientAverager* averager() { return averager_.get(); }

 private:
  Options opt_;
  Env env_;
  torch::Device device_;
  std::unique_ptr<ProcessGroup> group_;
  std::unique_ptr<GradientAverager> averager_;
  int64_t global_supervised_ = 0;
};

// A TCP port on the loopback interface that was free a moment ago (bind to port 0).
int free_port();

}  // namespace tokmix::dist
