// Data-parallel training over c10d. The only translation unit that includes c10d's headers: it
// is compiled with USE_C10D_GLOO / USE_C10D_NCCL when the build found those backends (see
// CMakeLists.txt). LibTorch 1.13 (Debian) has ProcessGroupGloo/NCCL deriving from
// c10d::ProcessGroup; from 2.0 on they are c10d::Backends with the same collective calls.
#include "tokmix/train/distributed.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/version.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <thread>

#ifdef TOKMIX_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef TOKMIX_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#ifdef TOKMIX_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace tokmix::dist {
using torch::Tensor;

namespace {

#if TORCH_VERSION_MAJOR >= 2
using BackendBase = c10d::Backend;
#else
using BackendBase = c10d::ProcessGroup;
#endif

std::string describe(const std::exception& e) {
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string seconds(std::chrono::milliseconds t) {
  std::ostringstream os;
  os << double(t.count()) / 1000.0 << " s";
  return os.str();
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Environment

Env Env::from_environment() {
  const std::string how = " (start the processes with `tokmix launch --nproc N -- tokmix train ... --distributed`, or set "
                          "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun does)";
  auto get = [&](const char* name, bool required) -> std::string {
    const char* v = std::getenv(name);
    if (!v || !*v) {
      if (required) throw std::invalid_argument(std::string("distributed: environment variable ") + name + " is not set" + how);
      return "";
    }
    return v;
  };
  auto to_int = [&](const char* name, const std::string& s, long lo, long hi) {
    char* end = nullptr;
    errno = 0;
    long x = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || *end || errno || x < lo || x > hi)
      throw std::invalid_argument(std::string("distributed: ") + name + "='" + s + "' is not an integer in [" + std::to_string(lo) +
                                  ", " + std::to_string(hi) + "]");
    return int(x);
  };
  Env e;
  e.world_size = to_int("WORLD_SIZE", get("WORLD_SIZE", true), 1, 1 << 20);
  e.rank = to_int("RANK", get("RANK", true), 0, e.world_size - 1);
  e.master_addr = get("MASTER_ADDR", true);
  e.master_port = to_int("MASTER_PORT", get("MASTER_PORT", true), 1, 65535);
  const std::string lr = get("LOCAL_RANK", false), lws = get("LOCAL_WORLD_SIZE", false);
  e.local_world_size = lws.empty() ? e.world_size : to_int("LOCAL_WORLD_SIZE", lws, 1, e.world_size);
  e.local_rank = lr.empty() ? e.rank : to_int("LOCAL_RANK", lr, 0, e.local_world_size - 1);
  return e;
}

std::vector<std::string> available_backends() {
  std::vector<std::string> b;
#ifdef TOKMIX_WITH_GLOO
  b.push_back("gloo");
#endif
#ifdef TOKMIX_WITH_NCCL
  b.push_back("nccl");
#endif
  return b;
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("free_port: socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(std::string("free_port: bind: ") + std::strerror(err));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

// ---------------------------------------------------------------------------------------------
// Process group

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<BackendBase> pg;
  std::map<size_t, c10::intrusive_ptr<c10d::Work>> works;
  size_t next_ticket = 0;
  torch::Device device{torch::kCPU};
  bool failed = false;
};

ProcessGroup::ProcessGroup(const Env& env, const std::string& backend, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()), rank_(env.rank), size_(env.world_size), backend_(backend), timeout_(timeout) {
  const auto have = available_backends();
  if (std::find(have.begin(), have.end(), backend) == have.end()) {
    std::string list;
    for (auto& b : have) list += (list.empty() ? "" : ", ") + b;
    throw std::invalid_argument("distributed: backend '" + backend + "' is not in this build (it has: " + (list.empty() ? "none" : list) +
                                "); Gloo needs its headers (Debian: libgloo-dev), NCCL a CUDA build (-DTOKMIX_CUDA=ON) with nccl.h");
  }
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<std::size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    impl_->failed = true;
    throw std::runtime_error("distributed: rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                             " could not meet the others at the rendezvous " + where + " (TCPStore, hosted by rank 0) within " +
                             seconds(timeout) + ": " + describe(e));
  }
  try {
    if (backend == "gloo") {
#ifdef TOKMIX_WITH_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (is_loopback(env.master_addr))
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      else
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, env.rank, env.world_size, opts);
#endif
    } else {
#ifdef TOKMIX_WITH_NCCL
      // wait() then blocks (at most the timeout) and throws, instead of the watchdog aborting
      // the process later
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      setenv("NCCL_BLOCKING_WAIT", "1", 0);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      impl_->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, env.rank, env.world_size, opts);
      impl_->device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
#endif
    }
  } catch (const std::exception& e) {
    impl_->failed = true;
    throw std::runtime_error("distributed: rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " could not set up the " +
                             backend + " process group (rendezvous " + where + ", timeout " + seconds(timeout) + "): " + describe(e));
  }
}

ProcessGroup::~ProcessGroup() {
  if (impl_ && impl_->failed) {
    // A collective failed: the backend's threads may still wait on a dead or stalled peer, and
    // its destructor would wait for them. Leave it to the process's exit.
    impl_->works.clear();
    if (impl_->pg) impl_->pg.release();
    if (impl_->store) impl_->store.release();
    return;
  }
#if defined(TOKMIX_WITH_NCCL) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4))
  if (impl_ && impl_->pg && backend_ == "nccl") {
    try {
      static_cast<c10d::ProcessGroupNCCL*>(impl_->pg.get())->shutdown();
    } catch (...) {
    }
  }
#endif
}

void ProcessGroup::fail(const std::string& what, const std::string& cause) {
  impl_->failed = true;
  throw std::runtime_error("distributed: " + what + " failed on rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " (" +
                           backend_ + ", timeout " + seconds(timeout_) + "): " + cause +
                           ". Another rank has probably died or stalled; stopping. Checkpoints written before are intact "
                           "(continue with --resume, with any number of processes).");
}

size_t ProcessGroup::allreduce_sum_async(Tensor& t) {
  if (impl_->failed) fail("all-reduce", "the group failed before");
  std::vector<Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  try {
    auto w = impl_->pg->allreduce(v, o);
    impl_->works.emplace(impl_->next_ticket, std::move(w));
  } catch (const std::exception& e) {
    fail("all-reduce", describe(e));
  }
  return impl_->next_ticket++;
}

void ProcessGroup::wait(size_t ticket, const std::string& what) {
  auto it = impl_->works.find(ticket);
  if (it == impl_->works.end()) throw std::logic_error("ProcessGroup::wait: unknown ticket " + std::to_string(ticket));
  auto w = it->second;
  impl_->works.erase(it);
  try {
    w->wait();
  } catch (const std::exception& e) {
    fail(what, describe(e));
  }
}

void ProcessGroup::allreduce_sum(Tensor& t, const std::string& what) {
  wait(allreduce_sum_async(t), what);
}

void ProcessGroup::allreduce_max(Tensor& t, const std::string& what) {
  if (impl_->failed) fail(what, "the group failed before");
  std::vector<Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  try {
    impl_->pg->allreduce(v, o)->wait();
  } catch (const std::exception& e) {
    fail(what, describe(e));
  }
}

void ProcessGroup::broadcast(Tensor& t, int root, const std::string& what) {
  if (impl_->failed) fail(what, "the group failed before");
  std::vector<Tensor> v{t};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  try {
    impl_->pg->broadcast(v, o)->wait();
  } catch (const std::exception& e) {
    fail(what, describe(e));
  }
}

void ProcessGroup::barrier(const std::string& what) {
  // a one-element all-reduce on the group's device: NCCL's barrier() guesses the device
  Tensor t = torch::ones({1}, torch::TensorOptions().dtype(torch::kFloat32).device(impl_->device));
  allreduce_sum(t, what);
  if (impl_->device.is_cuda()) t.cpu();  // the host waits too
}

// ---------------------------------------------------------------------------------------------
// Gradient averaging

GradientAverager::GradientAverager(ProcessGroup& group, std::vector<Tensor> params, int64_t bucket_bytes) : group_(group) {
  for (auto& p : params)
    if (p.requires_grad()) params_.push_back(p);
  if (params_.empty()) throw std::invalid_argument("GradientAverager: no parameter requires a gradient");
  if (bucket_bytes <= 0) throw std::invalid_argument("GradientAverager: bucket size must be > 0, got " + std::to_string(bucket_bytes));
  slots_.resize(params_.size());
  // reverse order: the last layers' gradients come first in backward
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const Tensor& p = params_[k];
    const bool new_bucket = buckets_.empty() || bytes >= bucket_bytes ||
                            params_[buckets_.back().params.front()].scalar_type() != p.scalar_type() ||
                            params_[buckets_.back().params.front()].device() != p.device();
    if (new_bucket) {
      buckets_.emplace_back();
      bytes = 0;
    }
    Bucket& b = buckets_.back();
    slots_[k].bucket = buckets_.size() - 1;
    slots_[k].offset = 0;
    for (size_t j : b.params) slots_[k].offset += params_[j].numel();
    slots_[k].numel = p.numel();
    b.params.push_back(k);
    bytes += p.numel() * int64_t(p.element_size());
  }
  for (auto& b : buckets_) {
    int64_t n = 0;
    for (size_t j : b.params) n += params_[j].numel();
    const Tensor& first = params_[b.params.front()];
    b.flat = torch::zeros({n}, torch::TensorOptions().dtype(first.scalar_type()).device(first.device()));
    b.pending = b.params.size();
  }
  for (size_t i = 0; i < params_.size(); ++i)
    hook_ids_.push_back(params_[i].register_hook([this, i](Tensor g) { on_grad(i, g); }));
}

GradientAverager::~GradientAverager() {
  for (size_t i = 0; i < hook_ids_.size(); ++i) {
    try {
      params_[i].remove_hook(hook_ids_[i]);
    } catch (...) {
    }
  }
}

void GradientAverager::on_grad(size_t i, const Tensor& g) {
  std::lock_guard<std::mutex> lock(mu_);
  Slot& s = slots_[i];
  if (s.ready)
    throw std::runtime_error("distributed: a second gradient for parameter " + std::to_string(i) +
                             " in one step; gradient accumulation over several backward passes is not supported");
  Bucket& b = buckets_[s.bucket];
  b.flat.narrow(0, s.offset, s.numel).copy_(g.reshape({-1}));
  s.ready = true;
  if (--b.pending == 0) launch_ready();
}

void GradientAverager::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& b = buckets_[next_launch_];
    b.ticket = group_.allreduce_sum_async(b.flat);
    b.launched = true;
    if (!in_finish_) ++early_;
    ++next_launch_;
  }
}

Tensor GradientAverager::finish(const Tensor& extra) {
  std::vector<float> used(params_.size(), 1.0f);
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_finish_ = true;
    for (size_t i = 0; i < params_.size(); ++i) {
      Slot& s = slots_[i];
      if (s.ready) continue;
      used[i] = 0;
      Bucket& b = buckets_[s.bucket];
      b.flat.narrow(0, s.offset, s.numel).zero_();
      --b.pending;
    }
    launch_ready();
  }
  for (size_t k = 0; k < buckets_.size(); ++k)
    group_.wait(buckets_[k].ticket, "gradient all-reduce (bucket " + std::to_string(k + 1) + " of " + std::to_string(buckets_.size()) + ")");
  // which parameters got a gradient on some rank, and the caller's numbers, in one all-reduce
  const auto dev = buckets_.front().flat.device();
  Tensor flags = torch::from_blob(used.data(), {int64_t(used.size())}, torch::kFloat32).to(torch::kFloat64);
  Tensor stats = extra.defined() && extra.numel() > 0 ? torch::cat({extra.to(torch::kFloat64).cpu().reshape({-1}), flags}) : flags;
  stats = stats.to(dev).contiguous();
  group_.allreduce_sum(stats, "gradient bookkeeping all-reduce");
  stats = stats.cpu();
  const int64_t n_extra = stats.numel() - int64_t(used.size());
  auto acc = stats.accessor<double, 1>();
  torch::NoGradGuard ng;
  const double inv = 1.0 / double(group_.size());
  for (auto& b : buckets_) b.flat.mul_(inv);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (acc[n_extra + int64_t(i)] == 0) continue;  // no rank produced one: .grad stays as backward left it
    const Slot& s = slots_[i];
    Tensor avg = buckets_[s.bucket].flat.narrow(0, s.offset, s.numel).view(params_[i].sizes());
    Tensor& g = params_[i].mutable_grad();
    if (g.defined()) g.copy_(avg);
    else g = avg.clone();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : slots_) s.ready = false;
    for (auto& b : buckets_) {
      b.pending = b.params.size();
      b.launched = false;
    }
    next_launch_ = 0;
    launched_early_ = early_;
    early_ = 0;
    in_finish_ = false;
  }
  return n_extra > 0 ? stats.narrow(0, 0, n_extra).clone() : Tensor();
}

// ---------------------------------------------------------------------------------------------
// Data parallel training

DataParallel::DataParallel(const Options& o, const Env& env) : opt_(o), env_(env), device_(torch::kCPU) {
  if (o.timeout_s <= 0 || !std::isfinite(o.timeout_s))
    throw std::invalid_argument("distributed: timeout must be > 0 seconds, got " + std::to_string(o.timeout_s));
  if (!(o.bucket_mb > 0)) throw std::invalid_argument("distributed: bucket size must be > 0 MB, got " + std::to_string(o.bucket_mb));
  std::string backend;
  if (o.device == "cpu") {
    backend = "gloo";
  } else if (o.device == "cuda") {
    backend = "nccl";
#ifdef TOKMIX_WITH_CUDA
    if (!torch::cuda::is_available()) throw std::invalid_argument("distributed: device 'cuda' requested but no CUDA device is available");
    const int64_t n = int64_t(torch::cuda::device_count());
    if (env.local_rank >= n)
      throw std::invalid_argument("distributed: LOCAL_RANK=" + std::to_string(env.local_rank) + " but this machine has " + std::to_string(n) +
                                  " CUDA device(s); expected one process per device (--nproc <= " + std::to_string(n) + ")");
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(env.local_rank));
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
#else
    throw std::invalid_argument("distributed: device 'cuda' needs a CUDA build (-DTOKMIX_CUDA=ON)");
#endif
  } else {
    throw std::invalid_argument("distributed: device '" + o.device + "'; accepted: cpu, cuda");
  }
  const auto ms = std::chrono::milliseconds(int64_t(std::llround(o.timeout_s * 1000)));
  group_ = std::make_unique<ProcessGroup>(env, backend, ms);
}

DataParallel::~DataParallel() = default;

int DataParallel::default_threads() const {
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, env_.local_world_size));
}

data::Batch DataParallel::shard(const data::Batch& global) {
  const int64_t rows = global.input.size(0);
  if (rows % env_.world_size != 0)
    throw std::invalid_argument("distributed: a global batch of " + std::to_string(rows) + " rows does not split over " +
                                std::to_string(env_.world_size) + " ranks");
  const int64_t b = rows / env_.world_size;
  global_supervised_ = (global.labels != data::kIgnore).sum().item<int64_t>();
  return {global.input.narrow(0, env_.rank * b, b), global.labels.narrow(0, env_.rank * b, b)};
}

Tensor DataParallel::loss(const Tensor& logits2d, const Tensor& labels1d) const {
  if (global_supervised_ <= 0)
    throw std::runtime_error("distributed: the global batch of this step has no supervised position (every label is " +
                             std::to_string(data::kIgnore) + ")");
  namespace F = torch::nn::functional;
  Tensor sum = F::cross_entropy(logits2d, labels1d, F::CrossEntropyFuncOptions().ignore_index(data::kIgnore).reduction(torch::kSum));
  return sum * (double(env_.world_size) / double(global_supervised_));
}

void DataParallel::attach(nn::LanguageModelImpl& model, int64_t step) {
  torch::NoGradGuard ng;
  Tensor s = torch::tensor({double(step), -double(step)}, torch::TensorOptions().dtype(torch::kFloat64)).to(device_);
  group_->allreduce_max(s, "start-step check");
  s = s.cpu();
  const auto hi = int64_t(s[0].item<double>()), lo = int64_t(-s[1].item<double>());
  if (hi != lo)
    throw std::runtime_error("distributed: the ranks start at different steps (" + std::to_string(lo) + " to " + std::to_string(hi) +
                             "); every rank must resume from the same checkpoint (a run directory all of them see)");
  std::vector<Tensor> params;
  for (auto& p : model.parameters()) {
    Tensor d = p.detach();
    group_->broadcast(d, 0, "weight broadcast from rank 0");
    params.push_back(p);
  }
  averager_ = std::make_unique<GradientAverager>(*group_, params, int64_t(opt_.bucket_mb * 1024 * 1024));
}

double DataParallel::finish_backward(double local_loss) {
  if (!averager_) throw std::logic_error("DataParallel::finish_backward before attach");
  Tensor out = averager_->finish(torch::tensor({local_loss}, torch::kFloat64));
  return out[0].item<double>() / double(env_.world_size);
}

train::EvalResult DataParallel::reduce(const train::EvalResult& local) {
  const double sup = double(local.supervised);
  Tensor t = torch::tensor({local.loss * sup, std::round(local.accuracy * sup), sup}, torch::kFloat64).to(device_);
  group_->allreduce_sum(t, "evaluation all-reduce");
  t = t.cpu();
  train::EvalResult r;
  r.supervised = int64_t(std::llround(t[2].item<double>()));
  r.loss = r.supervised ? t[0].item<double>() / double(r.supervised) : 0;
  r.accuracy = r.supervised ? t[1].item<double>() / double(r.supervised) : 0;
  return r;
}

void DataParallel::barrier(const std::string& what) { group_->barrier(what); }

}  // namespace tokmix::dist
