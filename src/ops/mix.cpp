// The only place where tensors meet kernels: input checks, layout, backend choice, autograd.
#include "tokmix/mix.h"

#include <malloc.h>
#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "tokmix/kernels.h"

#ifdef TOKMIX_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include "tokmix/cuda_capture.h"
#endif

namespace tokmix {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("tokmix::mix: " + msg); }

// Whether work on t's device is being captured into a CUDA graph (current stream). A capture
// may not read the device, so the finiteness checks are skipped there: the eager call before a
// capture checked the same kind of inputs, and a captured training step reports a non-finite
// loss or gradient norm after each replay (the trainer's CudaStep).
bool capturing_on(const Tensor& t) {
#ifdef TOKMIX_WITH_CUDA
  if (t.defined() && t.is_cuda()) return stream_capturing(at::cuda::getCurrentCUDAStream(t.device().index()).stream());
#endif
  (void)t;
  return false;
}

void check_finite(const Tensor& t, const char* name) {
  if (t.defined() && t.numel() > 0 && !capturing_on(t) && !torch::isfinite(t).all().item<bool>())
    bad(std::string(name) + " contains NaN or Inf; expected finite values");
}

kernels::Mode parse_mode(const std::string& m) {
  if (m == "softmax") return kernels::Mode::Softmax;
  if (m == "gate") return kernels::Mode::Gate;
  bad("mode '" + m + "' is not known; expected 'softmax' or 'gate'");
}

// Validated problem: everything the kernels need besides pointers.
struct Checked {
  kernels::MixProblem pb;
  std::vector<int64_t> cu;  // host copy of cu_seqlens
  int64_t max_seq = 0;      // longest sequence
};

Checked check(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pat, const MixOptions& opt) {
  Checked c;
  auto& pb = c.pb;
  pb.mode = parse_mode(opt.mode);
  const bool gate = pb.mode == kernels::Mode::Gate;
  if (!q.defined() || !v.defined()) bad("q and v must be defined tensors");
  if (q.dim() != 4) bad("q has shape " + shape_str(q) + "; expected [B, T, H, Dk]");
  if (v.dim() != 4) bad("v has shape " + shape_str(v) + "; expected [B, T, H, Dv]");
  if (q.scalar_type() != torch::kFloat32 && q.scalar_type() != torch::kFloat64 &&
      !(q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat16)))
    bad(std::string("dtype ") + c10::toString(q.scalar_type()) + " is not supported; expected float32 or float64 (CPU)");
  if (v.scalar_type() != q.scalar_type())
    bad(std::string("v has dtype ") + c10::toString(v.scalar_type()) + " but q has " + c10::toString(q.scalar_type()) + "; expected the same");
  if (v.device() != q.device()) bad("q and v are on different devices");
  pb.batch = q.size(0);
  pb.T = q.size(1);
  pb.H = q.size(2);
  pb.Dk = q.size(3);
  pb.Dv = v.size(3);
  if (pb.H < 1) bad("H = " + std::to_string(pb.H) + "; expected H >= 1");
  if (pb.Dk < 1) bad("Dk = " + std::to_string(pb.Dk) + "; expected Dk >= 1");
  if (pb.Dv < 1) bad("Dv = " + std::to_string(pb.Dv) + "; expected Dv >= 1");
  if (v.size(0) != pb.batch || v.size(1) != pb.T || v.size(2) != pb.H)
    bad("v has shape " + shape_str(v) + " but q has " + shape_str(q) + "; expected the same B, T, H");
  if (!gate || k.defined()) {
    if (!k.defined()) bad("k must be a defined tensor in softmax mode");
    if (!k.sizes().equals(q.sizes()))
      bad("k has shape " + shape_str(k) + " but q has " + shape_str(q) + "; expected the same [B, T, H, Dk]");
    if (k.scalar_type() != q.scalar_type()) bad("k has a different dtype from q");
    if (k.device() != q.device()) bad("q and k are on different devices");
  }
  if (!(opt.gamma > 0.0 && opt.gamma <= 1.0)) bad("gamma = " + std::to_string(opt.gamma) + "; expected 0 < gamma <= 1");
  pb.gamma = opt.gamma;
  pb.scale = opt.scale < 0 ? 1.0 / std::sqrt(static_cast<double>(pb.Dk)) : opt.scale;
  if (!std::isfinite(pb.scale)) bad("scale is not finite");

  // Sequences.
  if (opt.cu_seqlens.defined()) {
    const Tensor& cu = opt.cu_seqlens;
    if (cu.dim() != 1 || (cu.scalar_type() != torch::kInt32 && cu.scalar_type() != torch::kInt64))
      bad("cu_seqlens must be a 1-D int32 or int64 tensor [N+1]; got " + shape_str(cu) + " of " + c10::toString(cu.scalar_type()));
    if (cu.numel() < 2) bad("cu_seqlens has " + std::to_string(cu.numel()) + " entries; expected N+1 >= 2");
    if (pb.batch != 1) bad("with cu_seqlens the batch must be 1 (packed sequences); got B = " + std::to_string(pb.batch));
    Tensor h = cu.to(torch::kCPU, torch::kInt64).contiguous();
    c.cu.assign(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
    if (c.cu[0] != 0) bad("cu_seqlens[0] = " + std::to_string(c.cu[0]) + "; expected 0");
    for (size_t s = 1; s < c.cu.size(); ++s) {
      if (c.cu[s] < c.cu[s - 1])
        bad("cu_seqlens is not increasing: cu_seqlens[" + std::to_string(s) + "] = " + std::to_string(c.cu[s]) + " < cu_seqlens[" +
            std::to_string(s - 1) + "] = " + std::to_string(c.cu[s - 1]));
      c.max_seq = std::max(c.max_seq, c.cu[s] - c.cu[s - 1]);
    }
    if (c.cu.back() != pb.T)
      bad("cu_seqlens ends at " + std::to_string(c.cu.back()) + "; expected T = " + std::to_string(pb.T));
    pb.num_seqs = static_cast<int64_t>(c.cu.size()) - 1;
  } else {
    c.max_seq = pb.T;
  }
  try {
    pat.check_length(c.max_seq);
  } catch (const PatternError& e) {
    bad(e.what());
  }

  // Level tables.
  const int64_t need = pat.num_levels(std::max<int64_t>(c.max_seq, 1));
  auto check_levels = [&](const Tensor& t, const char* name, int64_t dim) {
    if (t.dim() != dim || t.size(0) != pb.H)
      bad(std::string(name) + " has shape " + shape_str(t) + "; expected [H = " + std::to_string(pb.H) + ", L" + (dim == 3 ? ", Dk]" : "]"));
    if (t.size(1) < need)
      bad(std::string(name) + " has " + std::to_string(t.size(1)) + " levels; pattern '" + pat.spec() + "' at length " +
          std::to_string(c.max_seq) + " needs " + std::to_string(need) + " (sequence longer than the table allows)");
    if (dim == 3 && t.size(2) != pb.Dk) bad(std::string(name) + " has width " + std::to_string(t.size(2)) + "; expected Dk = " + std::to_string(pb.Dk));
    if (t.scalar_type() != q.scalar_type()) bad(std::string(name) + " has a different dtype from q");
    if (t.device() != q.device()) bad(std::string(name) + " is on a different device from q");
  };
  int64_t levels = 0;
  if (opt.bias.defined()) {
    check_levels(opt.bias, "bias", 2);
    levels = opt.bias.size(1);
  }
  if (gate) {
    if (!opt.gate_weight.defined()) bad("gate mode needs gate_weight [H, L, Dk]");
    check_levels(opt.gate_weight, "gate_weight", 3);
    if (levels && opt.gate_weight.size(1) != levels) bad("bias and gate_weight have different level counts");
    levels = opt.gate_weight.size(1);
  }
  pb.levels = levels;
  // q, k, v are checked for NaN/Inf while they are laid out by head (one pass, see heads())
  check_finite(opt.bias, "bias");
  check_finite(opt.gate_weight, "gate_weight");
  return c;
}

// Large CPU buffers of the op (relayouts, outputs, gradients) come from a cache of freed blocks.
// glibc serves every allocation above 32 MB (its largest mmap threshold) with a mapping of its
// own and unmaps it when freed, so each call of the op faulted in, and the kernel cleared, fresh
// pages: with page faults about a fifth of the time of a pow2 forward and backward at
// T = 65536 (perf). Buffers from 64 KB up come from here too: with glibc's default (dynamic)
// thresholds, which set_threads() raises but a library caller need not call, such buffers go
// back to the kernel when freed, and a pow2 forward at T = 1024 (B 1, H 8, D 64) took 3.5 ms
// instead of 0.7 ms. Blocks are reused at their exact size (training repeats its shapes); the
// cache keeps at most 256 blocks and an eighth of the memory (8 GB at most), oldest out first.
// Blocks of 4 MB and more are backed by 2 MB pages (madvise; the machines' transparent huge
// pages are often "madvise" only): the kernels read rows of a level far apart, and with 4 KB
// pages a head's arrays span more pages than the TLB holds (pow2 forward at T = 65536, one
// thread: 190 -> 157 ms).
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* c = new BlockCache;  // never destroyed: tensors may be freed at exit
    return *c;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it)  // the most recent block of that size
        if (it->bytes == bytes) {
          void* p = it->p;
          free_.erase(std::next(it).base());
          cached_ -= bytes;
          return p;
        }
    }
    if (bytes < kHugeBytes) {  // 4 KB pages, 64-byte aligned
      void* p = std::aligned_alloc(64, (bytes + 4095) / 4096 * 4096);
      if (!p) throw std::bad_alloc();
      return p;
    }
    const size_t size = (bytes + kernels::kHugePage - 1) / kernels::kHugePage * kernels::kHugePage;
    void* p = std::aligned_alloc(kernels::kHugePage, size);  // 2 MB pages (above)
    if (!p) throw std::bad_alloc();
    kernels::advise_huge_pages(p, size);
    return p;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    free_.push_back({bytes, p});
    cached_ += bytes;
    // the oldest blocks go first: sizes that stopped recurring (other shapes) leave
    while ((cached_ > limit_ || free_.size() > kMaxBlocks) && !free_.empty()) {
      cached_ -= free_.front().bytes;
      std::free(free_.front().p);
      free_.pop_front();
    }
  }

 private:
  struct Block {
    size_t bytes;
    void* p;
  };
  static constexpr size_t kMaxBlocks = 256;
  static constexpr size_t kHugeBytes = size_t(4) << 20;  // from here on, 2 MB pages
  // an eighth of the memory this process may use (the machine's, or its cgroup's if lower),
  // at most 8 GB
  BlockCache() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    size_t mem = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : (size_t(8) << 30);
    for (const char* f : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
      std::ifstream in(f);
      unsigned long long v = 0;
      if (in >> v && v > 0 && v < mem) mem = size_t(v);  // "max" (no limit) does not parse
    }
    limit_ = std::min(mem / 8, size_t(8) << 30);
  }
  std::mutex mu_;
  std::deque<Block> free_;
  size_t cached_ = 0, limit_ = 0;
};

constexpr size_t kCachedBufferBytes = size_t(4) << 20;  // glibc's mmap threshold under set_threads()
constexpr size_t kSmallCachedBytes = size_t(64) << 10;   // below: LibTorch's allocator

// An uninitialised CPU tensor, from the block cache unless small.
Tensor cpu_buffer(at::IntArrayRef sizes, const torch::TensorOptions& o) {
  size_t n = 1;
  for (auto d : sizes) n *= size_t(d);
  const size_t bytes = n * c10::elementSize(c10::typeMetaToScalarType(o.dtype()));
  if (bytes < kSmallCachedBytes) return torch::empty(sizes, o);
  void* p = BlockCache::get().take(bytes);
  return torch::from_blob(p, sizes, [bytes](void* q) { BlockCache::get().give(q, bytes); }, o);
}
Tensor buffer_like(const Tensor& t) { return t.is_cuda() ? torch::empty_like(t) : cpu_buffer(t.sizes(), t.options()); }

// An uninitialised CPU buffer for t ([B, T, H, D]) laid out by head: [B, H, T, D].
Tensor heads_buffer(const Tensor& t) { return cpu_buffer({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()); }

// [B, T, H, D] -> memory [B, H, T, D] so that a head's rows are contiguous; refuses NaN/Inf.
// On the CPU the result is always a fresh buffer: the backward builds g in dy's.
Tensor to_heads(const Tensor& t, const char* name) {
  if (!t.is_cuda() && t.numel() > 0 && t.stride(3) == 1) {
    Tensor out = heads_buffer(t);
    bool finite = true;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "relayout", [&] {
      finite = kernels::relayout_to_heads_cpu<scalar_t>(t.data_ptr<scalar_t>(), t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0),
                                                        t.stride(1), t.stride(2), out.data_ptr<scalar_t>());
    });
    if (!finite) bad(std::string(name) + " contains NaN or Inf; expected finite values");
    return out;
  }
  // the CUDA kernels read [B, T, H, D] as it is (a relayout would cost more than their forward),
  // and check finiteness while they read it (see finite_or_throw)
  if (t.is_cuda()) return t.contiguous();
  check_finite(t, name);
  return t.transpose(1, 2).clone(at::MemoryFormat::Contiguous);
}
// FiniteCheck set by set_finite_check or TOKMIX_FINITE_CHECK.
std::atomic<int> g_finite_mode{-1};  // -1: not read from the environment yet
FiniteCheck finite_mode() {
  int m = g_finite_mode.load();
  if (m < 0) {
    const char* e = std::getenv("TOKMIX_FINITE_CHECK");
    m = e && std::string(e) == "deferred" ? 1 : 0;
    int expected = -1;
    g_finite_mode.compare_exchange_strong(expected, m);
    m = g_finite_mode.load();
  }
  return m == 1 ? FiniteCheck::Deferred : FiniteCheck::AtCall;
}
#ifdef TOKMIX_WITH_CUDA
// After a CUDA kernel: its finiteness mask (bit per input, see kernels.h) or, when it checked
// nothing (-1), a check of the inputs here. Each named input is checked, none is skipped.
void finite_or_throw(int32_t flags, std::initializer_list<std::pair<const Tensor*, const char*>> ins) {
  int bit = 0;
  for (const auto& in : ins) {
    if (flags < 0)
      check_finite(*in.first, in.second);
    else if (flags & (1 << bit))
      bad(std::string(in.second) + " contains NaN or Inf; expected finite values");
    ++bit;
  }
}

// Deferred finiteness reports (FiniteCheck::Deferred): a pool of pinned slots, and the reports
// in flight in call order, each with the event after which its slot holds the kernels' mask.
struct PendingReport {
  int slot;
  void* event;
  std::vector<std::pair<int, std::string>> names;  // bit -> input name
};
struct FlagPool {
  static constexpr int kSlots = 1024;
  std::mutex mu;
  int32_t* host = nullptr;
  std::vector<int> free_slots;
  std::deque<PendingReport> pending;
  ~FlagPool() {
    for (auto& p : pending) kernels::event_destroy(p.event);
    kernels::flag_slots_free(host);
  }
};
FlagPool& flag_pool() {
  static FlagPool pool;
  return pool;
}
// Resolves reports in call order: with `wait`, all of them; else those whose work has finished.
// The first bad one is thrown once every report then pending has been drained, so that the
// outputs a bad input spread to (later layers' reports) do not fail later, unrelated calls.
// Events are waited on outside the lock (other threads' calls, autograd's, go on meanwhile).
void resolve_reports(bool wait) {
  FlagPool& pool = flag_pool();
  std::string error;
  int more = 0;
  for (;;) {
    PendingReport r;
    {
      std::lock_guard<std::mutex> lk(pool.mu);
      if (pool.pending.empty()) break;
      if (!wait && error.empty() && !kernels::event_done(pool.pending.front().event, false)) break;
      r = std::move(pool.pending.front());
      pool.pending.pop_front();
    }
    bool ok = true;
    try {
      kernels::event_done(r.event, true);
    } catch (...) {  // a failed stream: the report is lost with it; the caller's CUDA error says why
      ok = false;
    }
    std::lock_guard<std::mutex> lk(pool.mu);
    const int32_t mask = ok ? pool.host[r.slot] : 0;
    for (const auto& n : r.names)
      if (mask & (1 << n.first)) {
        if (error.empty())
          error = n.second + " contains NaN or Inf; expected finite values (reported after the call: finiteness checks are deferred)";
        else
          ++more;
        break;
      }
    kernels::event_destroy(r.event);
    pool.free_slots.push_back(r.slot);
  }
  if (!error.empty()) bad(more ? error + "; " + std::to_string(more) + " later call(s) reported non-finite inputs too" : error);
}
// A slot for the next CUDA call's report, or nullptr when reports are not deferred. Reports
// left from an earlier deferred period are resolved either way.
int32_t* take_report_slot(int* slot) {
  FlagPool& pool = flag_pool();
  resolve_reports(false);
  if (finite_mode() != FiniteCheck::Deferred) return nullptr;
  for (;;) {
    {
      std::lock_guard<std::mutex> lk(pool.mu);
      if (!pool.host) {
        pool.host = kernels::flag_slots_alloc(FlagPool::kSlots);
        for (int i = FlagPool::kSlots - 1; i >= 0; --i) pool.free_slots.push_back(i);
      }
      if (!pool.free_slots.empty()) {
        *slot = pool.free_slots.back();
        pool.free_slots.pop_back();
        pool.host[*slot] = 0;
        return pool.host + *slot;
      }
      if (pool.pending.empty()) throw std::logic_error("tokmix: every finiteness report slot is taken and none is pending");
    }
    resolve_reports(true);  // every slot in flight: wait for the reports
  }
}
// Gives a slot back when its call failed before queueing a report.
void release_report_slot(int slot) {
  if (slot < 0) return;
  FlagPool& pool = flag_pool();
  std::lock_guard<std::mutex> lk(pool.mu);
  pool.free_slots.push_back(slot);
}
void queue_report(int slot, void* stream, std::vector<std::pair<int, std::string>> names) {
  FlagPool& pool = flag_pool();
  void* ev = nullptr;
  try {
    ev = kernels::event_record(stream);
    std::lock_guard<std::mutex> lk(pool.mu);
    pool.pending.push_back(PendingReport{slot, ev, std::move(names)});
  } catch (...) {
    if (ev) kernels::event_destroy(ev);
    release_report_slot(slot);
    throw;
  }
}
// Runs a CUDA forward or backward call with its finiteness report deferred when the mode says
// so (chunked solver only: the generic one checks nothing and returns -1). Returns the call's
// mask, or 0 once its report is queued.
template <class Call>
int32_t run_reported(kernels::CudaMix& m, std::vector<std::pair<int, std::string>> names, Call&& call) {
  int slot = -1;
  m.capturing = stream_capturing(static_cast<cudaStream_t>(m.stream));
  if (m.capturing) {
    m.flags_out = nullptr;
    return call();  // no report: see capturing_on
  }
  m.flags_out = kernels::mix_cuda_fast_path(m) ? take_report_slot(&slot) : nullptr;
  int32_t flags = 0;
  try {
    flags = call();
  } catch (...) {
    release_report_slot(slot);  // no copy was queued: the call failed before its last step
    throw;
  }
  if (m.flags_out) queue_report(slot, m.stream, std::move(names));
  return flags;
}
#endif
// The logical [B, T, H, D] view of a tensor in kernel layout.
Tensor from_heads(const Tensor& th) { return th.is_cuda() ? th : th.transpose(1, 2); }
kernels::Strides heads_strides(const Tensor& th) {  // th is [B, H, T, D] contiguous ([B, T, H, D] on CUDA)
  if (th.is_cuda()) return {th.stride(0), th.stride(1), th.stride(2)};
  return {th.stride(0), th.stride(2), th.stride(1)};
}

#ifdef TOKMIX_WITH_CUDA
// Device copies of a pattern's f and a, made once per (pattern, device); patterns live for the
// program (pattern_from_spec caches them), so the key never dangles.
std::mutex g_dev_mu;
std::map<std::pair<const Pattern*, int>, std::vector<Tensor>> g_dev_pat;

PatternDesc device_desc(const Pattern& pat, const torch::Device& dev) {
  PatternDesc d = pat.desc();
  std::lock_guard<std::mutex> lk(g_dev_mu);
  auto key = std::make_pair(&pat, static_cast<int>(dev.index()));
  auto it = g_dev_pat.find(key);
  if (it == g_dev_pat.end()) {
    auto up = [&](const std::vector<int64_t>& x) {
      return x.empty() ? torch::zeros({1}, torch::kInt64).to(dev) : torch::tensor(x, torch::kInt64).to(dev);
    };
    it = g_dev_pat.emplace(key, std::vector<Tensor>{up(pat.A().seq.f), up(pat.A().a), up(pat.B().seq.f), up(pat.B().a)}).first;
  }
  auto ptr = [](const Tensor& t, const int64_t* host) { return host ? t.data_ptr<int64_t>() : nullptr; };
  d.A.f = ptr(it->second[0], d.A.f);
  d.A.a = ptr(it->second[1], d.A.a);
  d.B.f = ptr(it->second[2], d.B.f);
  d.B.a = ptr(it->second[3], d.B.a);
  return d;
}

kernels::DType cuda_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kernels::DType::F32;
    case torch::kBFloat16: return kernels::DType::BF16;
    case torch::kFloat16: return kernels::DType::F16;
    default: bad(std::string("dtype ") + c10::toString(t.scalar_type()) + " is not supported on CUDA; expected float32, bfloat16 or float16");
  }
}

kernels::CudaMix cuda_problem(const Pattern& pat, const Checked& c, const kernels::MixProblem& pb, const Tensor& q) {
  kernels::CudaMix m;
  m.host_pat = pat.desc();
  m.dev_pat = device_desc(pat, q.device());
  m.pb = pb;
  m.max_seq = c.max_seq;
  m.nbl = pat.num_B_levels(std::max<int64_t>(c.max_seq, 1));
  m.dtype = cuda_dtype(q);
  m.stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  return m;
}
const void* cptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }
void* mptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

// Decode state a CUDA cache keeps on the device (kernels::CudaDecodeState). MixCache's members
// are shared with the CPU path, so the state lives beside it, keyed by the cache's kA_ storage
// and held weakly: an entry whose cache died is recognised (and dropped) even if the address is
// reused.
struct DecodeDev {
  c10::weak_intrusive_ptr<c10::StorageImpl> owner{c10::intrusive_ptr<c10::StorageImpl>()};
  Tensor buf;  // int64 on the device: pos[2][batch], then slot_pos[2][batch * capB]
  unsigned long long* flags_host = nullptr;  // [batch], host-mapped
  unsigned long long* flags_dev = nullptr;
  std::vector<int64_t> pos_seen, slots_seen;  // the host state right after the last step
  int par = 0;                                // buffer the next step reads
  std::vector<cudaStream_t> streams;          // streams recorded on buf
  DecodeDev() = default;
  DecodeDev(const DecodeDev&) = delete;
  DecodeDev& operator=(const DecodeDev&) = delete;
  ~DecodeDev() { kernels::decode_flags_free(flags_host); }
};
std::mutex g_dec_mu;
std::map<const void*, std::unique_ptr<DecodeDev>> g_dec;

DecodeDev& decode_dev(const Tensor& owner, int64_t batch, int64_t capB, bool lattice) {
  std::lock_guard<std::mutex> lk(g_dec_mu);
  const void* key = owner.storage().unsafeGetStorageImpl();
  auto it = g_dec.find(key);
  if (it != g_dec.end() && !it->second->owner.expired()) return *it->second;
  for (auto e = g_dec.begin(); e != g_dec.end();) e = e->second->owner.expired() ? g_dec.erase(e) : std::next(e);
  auto d = std::make_unique<DecodeDev>();
  d->owner = owner.storage().getWeakStorageImpl();
  d->buf = torch::empty({2 * batch + (lattice ? 2 * batch * capB : 0)}, owner.options().dtype(torch::kInt64));
  d->flags_host = kernels::decode_flags_alloc(batch, &d->flags_dev);
  return *g_dec.emplace(key, std::move(d)).first->second;
}
#endif

// LibTorch 1.13's Function::apply cannot take undefined tensors: absent optional inputs travel
// as empty placeholders and are turned back into undefined tensors inside.
Tensor placeholder(const Tensor& t) { return t.defined() ? t : torch::empty({0}); }
Tensor absent_if_empty(const Tensor& t) { return t.defined() && t.dim() == 1 && t.numel() == 0 ? Tensor() : t; }

std::mutex g_pat_mu;
std::map<std::string, std::shared_ptr<const Pattern>> g_patterns;

class MixFunction : public torch::autograd::Function<MixFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor gate_w, Tensor cu,
                               std::string spec, std::string mode, double scale, double gamma) {
    bias = absent_if_empty(bias);
    gate_w = absent_if_empty(gate_w);
    cu = absent_if_empty(cu);
    auto pat = pattern_from_spec(spec);
    MixOptions opt;
    opt.mode = mode;
    opt.scale = scale;
    opt.gamma = gamma;
    opt.bias = bias;
    opt.gate_weight = gate_w;
    opt.cu_seqlens = cu;
    Checked c = check(q, k, v, *pat, opt);
    const bool gate = c.pb.mode == kernels::Mode::Gate;
    // CPU, head width contiguous: the kernel copies each unit's rows into the head-major buffers
    // right before the unit runs, so they are still in cache when it reads them (1.1-1.3x on the
    // forward up to T = 16384, perf-notes v17); otherwise relayout first.
    const bool copy_in_kernel = !q.is_cuda() && c.pb.T > 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
    Tensor qh, kh, vh;
    if (copy_in_kernel) {
      qh = heads_buffer(q);
      vh = heads_buffer(v);
      kh = gate ? qh : heads_buffer(k);
    } else {
      qh = to_heads(q, "q");
      vh = to_heads(v, "v");
      kh = gate ? qh : to_heads(k, "k");
    }
    Tensor yh = q.is_cuda() ? torch::empty({c.pb.batch, c.pb.T, c.pb.H, c.pb.Dv}, v.options())
                            : cpu_buffer({c.pb.batch, c.pb.H, c.pb.T, c.pb.Dv}, v.options());
    Tensor lse = q.is_cuda() ? torch::empty({c.pb.batch, c.pb.H, c.pb.T}, q.options().dtype(torch::kFloat32))
                             : cpu_buffer({c.pb.batch, c.pb.H, c.pb.T}, q.options());
    Tensor tables;  // CUDA chunked solver: coefficient tables the backward reads
    const Tensor* sources[3] = {&q, gate ? nullptr : &k, &v};
    run_forward(*pat, c, qh, kh, vh, bias, gate_w, yh, lse, tables, copy_in_kernel ? sources : nullptr);
    ctx->save_for_backward({qh, kh, vh, yh, lse, placeholder(bias), placeholder(gate_w), placeholder(cu), placeholder(tables)});
    ctx->saved_data["spec"] = spec;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["gamma"] = gamma;
    return {from_heads(yh)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor qh = saved[0], kh = saved[1], vh = saved[2], yh = saved[3], lse = saved[4], bias = absent_if_empty(saved[5]),
           gate_w = absent_if_empty(saved[6]), cu = absent_if_empty(saved[7]), tables = absent_if_empty(saved[8]);
    auto pat = pattern_from_spec(ctx->saved_data["spec"].toStringRef());
    MixOptions opt;
    opt.mode = ctx->saved_data["mode"].toStringRef();
    opt.scale = ctx->saved_data["scale"].toDouble();
    opt.gamma = ctx->saved_data["gamma"].toDouble();
    opt.bias = bias;
    opt.gate_weight = gate_w;
    opt.cu_seqlens = cu;
    Tensor q = from_heads(qh), k = from_heads(kh), v = from_heads(vh);
    Checked c = check(q, k, v, *pat, opt);
    const bool gate = c.pb.mode == kernels::Mode::Gate;
    Tensor dy = grads[0];
    if (!dy.defined()) dy = torch::zeros_like(v);
    Tensor dyh = to_heads(dy.to(v.scalar_type()), "dy");  // CPU: a fresh buffer, g is built in it
    // the CUDA kernels write every element of dq, dk, dv; the CPU kernel every element of dq
    auto zeros = [](const Tensor& t) { return t.is_cuda() ? buffer_like(t) : buffer_like(t).zero_(); };
    // and, when A = {i}, every element of dv (each row has one contribution)
    Tensor dq = buffer_like(qh), dv = pat->desc().A.kind == SupportKind::Self ? buffer_like(vh) : zeros(vh);
    Tensor dk = gate ? Tensor() : zeros(kh);
    const int64_t units = c.pb.num_units();
    // per-unit partial sums; float32 on CUDA whatever the input type
    auto popt = q.is_cuda() ? q.options().dtype(torch::kFloat32) : q.options();
    Tensor dbias_u = bias.defined() ? torch::zeros({units, c.pb.levels}, popt) : Tensor();
    Tensor dgate_u = gate ? torch::zeros({units, c.pb.levels, c.pb.Dk}, popt) : Tensor();
    run_backward(*pat, c, qh, kh, vh, bias, gate_w, yh, lse, tables, dyh, dq, dk, dv, dbias_u, dgate_u);
    Tensor dbias = bias.defined() ? dbias_u.view({units / c.pb.H, c.pb.H, c.pb.levels}).sum(0).to(q.scalar_type()) : Tensor();
    Tensor dgate = gate ? dgate_u.view({units / c.pb.H, c.pb.H, c.pb.levels, c.pb.Dk}).sum(0).to(q.scalar_type()) : Tensor();
    return {from_heads(dq), gate ? Tensor() : from_heads(dk), from_heads(dv), dbias, dgate, Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }

 private:
  static kernels::MixProblem problem(const Checked& c, const Tensor& qh, const Tensor& kh, const Tensor& vh, const Tensor& yh) {
    kernels::MixProblem pb = c.pb;
    pb.sq = heads_strides(qh);
    pb.sk = heads_strides(kh);
    pb.sv = heads_strides(vh);
    pb.sy = heads_strides(yh);
    pb.cu_seqlens = c.cu.empty() ? nullptr : c.cu.data();
    return pb;
  }

  // sources: the caller's q, k, v ([B, T, H, D]; k null in gate mode) when the CPU kernel is to
  // fill qh, kh, vh itself; null when they are filled already.
  static void run_forward(const Pattern& pat, const Checked& c, const Tensor& qh, const Tensor& kh, const Tensor& vh,
                          const Tensor& bias, const Tensor& gate_w, Tensor& yh, Tensor& lse, [[maybe_unused]] Tensor& tables,
                          const Tensor* const* sources = nullptr) {
    if (c.pb.T == 0) return;
    kernels::MixProblem pb = problem(c, qh, kh, vh, yh);
    const PatternDesc d = pat.desc();
    Tensor b = bias.defined() ? bias.contiguous() : Tensor(), g = gate_w.defined() ? gate_w.contiguous() : Tensor();
    if (qh.is_cuda()) {
#ifdef TOKMIX_WITH_CUDA
      const c10::cuda::CUDAGuard device(qh.device());  // kernels, occupancy and plan on the tensors' device
      kernels::CudaMix m = cuda_problem(pat, c, pb, qh);
      Tensor ws = torch::empty({kernels::mix_cuda_workspace_bytes(m, false)}, qh.options().dtype(torch::kUInt8));
      const int64_t tb = kernels::mix_cuda_saved_bytes(m);
      if (tb > 0) tables = torch::empty({tb}, qh.options().dtype(torch::kUInt8));
      const int32_t flags = run_reported(m, {{0, "q"}, {1, "k"}, {2, "v"}}, [&] {
        return kernels::mix_forward_cuda(m, cptr(qh), cptr(kh), cptr(vh), cptr(b), cptr(g), mptr(yh), lse.data_ptr<float>(), ws.data_ptr(),
                                         tb > 0 ? tables.data_ptr() : nullptr);
      });
      finite_or_throw(flags, {{&qh, "q"}, {&kh, "k"}, {&vh, "v"}});
      return;
#else
      bad("this build has no CUDA backend (configure with -DTOKMIX_CUDA=ON)");
#endif
    }
    bool bad_in[3] = {false, false, false};
    AT_DISPATCH_FLOATING_TYPES(qh.scalar_type(), "mix_forward", [&] {
      kernels::HeadCopy<scalar_t> copies[3];
      const Tensor* dst[3] = {&qh, &kh, &vh};
      for (int i = 0; sources && i < 3; ++i) {
        if (!sources[i]) continue;
        const Tensor& x = *sources[i];
        copies[i] = {x.data_ptr<scalar_t>(), {x.stride(0), x.stride(1), x.stride(2)}, dst[i]->data_ptr<scalar_t>(), &bad_in[i]};
      }
      kernels::mix_forward_cpu<scalar_t>(d, pb, qh.data_ptr<scalar_t>(), kh.data_ptr<scalar_t>(), vh.data_ptr<scalar_t>(),
                                         b.defined() ? b.data_ptr<scalar_t>() : nullptr, g.defined() ? g.data_ptr<scalar_t>() : nullptr,
                                         yh.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), sources ? copies : nullptr);
    });
    // reported in the order the relayout checks them: q, v, k
    const char* names[3] = {"q", "k", "v"};
    for (int i : {0, 2, 1})
      if (bad_in[i]) bad(std::string(names[i]) + " contains NaN or Inf; expected finite values");
  }

  static void run_backward(const Pattern& pat, const Checked& c, const Tensor& qh, const Tensor& kh, const Tensor& vh,
                           const Tensor& bias, const Tensor& gate_w, const Tensor& yh, const Tensor& lse, [[maybe_unused]] const Tensor& tables, const Tensor& dyh,
                           Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias_u, Tensor& dgate_u) {
    if (c.pb.T == 0) return;
    kernels::MixProblem pb = problem(c, qh, kh, vh, yh);
    const PatternDesc d = pat.desc();
    Tensor b = bias.defined() ? bias.contiguous() : Tensor(), g = gate_w.defined() ? gate_w.contiguous() : Tensor();
    if (qh.is_cuda()) {
#ifdef TOKMIX_WITH_CUDA
      const c10::cuda::CUDAGuard device(qh.device());
      kernels::CudaMix m = cuda_problem(pat, c, pb, qh);
      Tensor ws = torch::empty({kernels::mix_cuda_workspace_bytes(m, true)}, qh.options().dtype(torch::kUInt8));
      const int64_t tb = kernels::mix_cuda_saved_bytes(m);
      if (tb > 0 && !(tables.defined() && tables.numel() == tb && tables.is_cuda()))
        bad("the saved coefficient tables are missing or of another size (" + std::to_string(tables.defined() ? tables.numel() : 0) +
            " bytes; expected " + std::to_string(tb) + ")");
      auto fptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr; };
      const int32_t flags = run_reported(m, {{3, "dy"}}, [&] {
        return kernels::mix_backward_cuda(m, cptr(qh), cptr(kh), cptr(vh), cptr(b), cptr(g), cptr(yh), lse.data_ptr<float>(), cptr(dyh),
                                          mptr(dq), mptr(dk), mptr(dv), fptr(dbias_u), fptr(dgate_u), ws.data_ptr(),
                                          tb > 0 ? tables.data_ptr() : nullptr);
      });
      // q, k, v were checked by the forward; dy is bit 3
      const Tensor none;
      finite_or_throw(flags < 0 ? flags : (flags & 8), {{&none, "q"}, {&none, "k"}, {&none, "v"}, {&dyh, "dy"}});
      return;
#else
      bad("this build has no CUDA backend (configure with -DTOKMIX_CUDA=ON)");
#endif
    }
    AT_DISPATCH_FLOATING_TYPES(qh.scalar_type(), "mix_backward", [&] {
      auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      kernels::mix_backward_cpu<scalar_t>(d, pb, ptr(qh), ptr(kh), ptr(vh), ptr(b), ptr(g), ptr(yh), ptr(lse), ptr(dyh), ptr(dq),
                                          ptr(dk), ptr(dv), ptr(dbias_u), ptr(dgate_u));
    });
  }
};

}  // namespace

void set_finite_check(FiniteCheck mode) { g_finite_mode.store(mode == FiniteCheck::Deferred ? 1 : 0); }
FiniteCheck finite_check() { return finite_mode(); }
void check_finite_pending() {
#ifdef TOKMIX_WITH_CUDA
  resolve_reports(true);
#endif
}

std::shared_ptr<const Pattern> pattern_from_spec(const std::string& spec) {
  std::lock_guard<std::mutex> lk(g_pat_mu);
  auto it = g_patterns.find(spec);
  if (it != g_patterns.end()) return it->second;
  auto p = std::make_shared<const Pattern>(Pattern::parse(spec));
  g_patterns.emplace(spec, p);
  return p;
}

torch::Tensor mix(const Tensor& q, const Tensor& k, const Tensor& v, const std::string& spec, const MixOptions& opt) {
  std::shared_ptr<const Pattern> pat;
  try {
    pat = pattern_from_spec(spec);
  } catch (const PatternError& e) {
    bad(e.what());
  }
  const bool gate = parse_mode(opt.mode) == kernels::Mode::Gate;
  if (!gate && !k.defined()) bad("k must be a defined tensor in softmax mode");
  Tensor kk = k.defined() ? k : q;
  return MixFunction::apply(q, kk, v, placeholder(opt.bias), placeholder(opt.gate_weight), placeholder(opt.cu_seqlens), pat->spec(), opt.mode, opt.scale, opt.gamma)[0];
}

torch::Tensor mix(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern, const MixOptions& opt) {
  return mix(q, k, v, pattern.spec(), opt);
}

bool mix_dense_serves(const Pattern& pattern) {
  const SupportKind a = pattern.A().kind, b = pattern.B().kind;
  return (a == SupportKind::Self || a == SupportKind::Window) && (b == SupportKind::None || b == SupportKind::Window);
}

bool mix_dense_preferred(const Pattern& pattern, int64_t batch, int64_t H, int64_t T) {
  return mix_dense_serves(pattern) && pattern.B().kind == SupportKind::Window && T <= dense_solve_max_T &&
         batch * H * T * T <= dense_solve_max_elements;
}

// d below 16, else 16 + floor(log2 d) - 4, with floor(log2 d) = #{l >= 1 : 2^l <= d} (integers,
// exact at any d)
torch::Tensor window_levels(const Tensor& distance, int64_t max_distance) {
  Tensor dd = distance.clamp_min(0);
  Tensor lg = torch::zeros_like(dd);
  for (int64_t l = 1; (int64_t(1) << l) <= max_distance; ++l) lg = lg + dd.ge(int64_t(1) << l).to(dd.scalar_type());
  return torch::where(dd.lt(16), dd, lg + 12);
}

torch::Tensor mix_dense(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pat, const MixOptions& opt) {
  const Checked c = check(q, k, v, pat, opt);
  if (opt.cu_seqlens.defined()) bad("mix_dense takes no cu_seqlens (use mix for packed sequences)");
  if (!mix_dense_serves(pat))
    bad("mix_dense serves patterns whose A and B supports are windows (attention, local, dense and their hybrids); pattern '" +
        pat.spec() + "' is not one (use mix)");
  const bool gate = c.pb.mode == kernels::Mode::Gate;
  const bool at_call = !(q.is_cuda() && finite_mode() == FiniteCheck::Deferred);  // deferred: the trainer checks the loss
  if (at_call) {
    check_finite(q, "q");
    if (!gate) check_finite(k, "k");
    check_finite(v, "v");
  }
  const int64_t T = c.pb.T;
  if (T == 0) return torch::zeros_like(v);
  // float32 arithmetic whatever autocast says (the kernels' contract), float64 kept
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto ct = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  Tensor qh = q.to(ct).transpose(1, 2), vh = v.to(ct).transpose(1, 2);  // [B, H, T, D]
  auto oi = torch::TensorOptions().dtype(torch::kInt64).device(q.device());
  Tensor ar = torch::arange(T, oi);
  Tensor d = ar.unsqueeze(1) - ar.unsqueeze(0);  // i - j
  Tensor lv = window_levels(d, T);
  const Side& A = pat.A();
  const Side& Bs = pat.B();
  Tensor maskA = A.kind == SupportKind::Self ? d.eq(0) : (A.window > 0 ? d.ge(0).logical_and(d.lt(A.window)) : d.ge(0));
  Tensor lvA = A.kind == SupportKind::Self ? torch::zeros_like(d) : lv;
  const bool hasB = Bs.kind == SupportKind::Window;
  Tensor maskB, lvB;
  if (hasB) {
    maskB = Bs.window > 0 ? d.ge(1).logical_and(d.le(Bs.window)) : d.ge(1);
    lvB = window_levels(d - 1, T) + pat.num_A_levels();
  }
  // scores of each side, [B, H, T, T]
  Tensor qk;
  if (!gate) qk = torch::matmul(qh, k.to(ct).transpose(1, 2).transpose(-2, -1)) * c.pb.scale;
  Tensor qw = gate ? torch::einsum("bhtd,hld->bhtl", {qh, opt.gate_weight.to(ct)}) : Tensor();  // [B, H, T, L]
  auto side_scores = [&](const Tensor& mask, const Tensor& lvl) {
    Tensor s;
    // check() made the level tables at least num_levels(T) long; the clamps only keep masked
    // entries (distances outside the window) inside the table
    if (gate) {
      Tensor idx = lvl.clamp(0, qw.size(-1) - 1).unsqueeze(0).unsqueeze(0).expand({qw.size(0), qw.size(1), T, T});
      s = qw.gather(-1, idx);
    } else {
      s = qk;
    }
    if (opt.bias.defined()) {
      const int64_t H = opt.bias.size(0);
      s = s + opt.bias.to(ct).index_select(1, lvl.clamp(0, opt.bias.size(1) - 1).flatten()).view({H, T, T}).unsqueeze(0);
    }
    return s.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  };
  Tensor sA = side_scores(maskA, lvA);
  Tensor y;
  if (!hasB) {
    y = torch::matmul(torch::softmax(sA, -1), vh);
  } else {
    // one softmax over SA(i) and SB(i) together (a position in both is two entries)
    Tensor p = torch::softmax(torch::cat({sA, side_scores(maskB, lvB)}, -1), -1);
    Tensor pA = p.narrow(-1, 0, T), pB = p.narrow(-1, T, T);
    // (I - gamma pB) y = pA v; pB is strictly lower, so I - gamma pB is unit lower triangular
    Tensor m = pB * (-c.pb.gamma);
    y = torch::linalg_solve_triangular(m, torch::matmul(pA, vh), /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  }
  return y.transpose(1, 2).to(v.scalar_type());
}

void set_threads(int n) {
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Keep large tensor buffers in the heap between calls: glibc's default returns each one to the
  // kernel, and every step then pays page faults to clear fresh pages (measured: a third of the
  // time of a small mixer's forward at T = 4096).
  // (32 MB is the largest threshold glibc accepts; larger buffers of the op use BlockCache)
  mallopt(M_MMAP_THRESHOLD, int(kCachedBufferBytes));
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  torch::set_num_threads(n);
  omp_set_num_threads(n);
}

// ---------------------------------------------------------------------------------------------
// Decoding cache

MixCache::MixCache(std::shared_ptr<const Pattern> pattern, int64_t batch, int64_t H, int64_t Dk, int64_t Dv,
                   int64_t max_context, torch::ScalarType dtype, torch::Device device)
    : pattern_(std::move(pattern)), batch_(batch), H_(H), Dk_(Dk), Dv_(Dv), max_context_(max_context) {
  if (batch < 1 || H < 1 || Dk < 1 || Dv < 1 || max_context < 1)
    throw std::invalid_argument("tokmix::MixCache: batch, H, Dk, Dv and max_context must be >= 1 (got " + std::to_string(batch) + ", " +
                                std::to_string(H) + ", " + std::to_string(Dk) + ", " + std::to_string(Dv) + ", " +
                                std::to_string(max_context) + ")");
  pattern_->check_length(max_context);
  capA_ = pattern_->cache_A(max_context);
  capB_ = pattern_->cache_B(max_context);
  lattice_ = pattern_->B().kind == SupportKind::Lattice;
  row_max_ = lattice_ ? 0 : pattern_->max_row_size(max_context);
  auto o = torch::TensorOptions().dtype(dtype).device(device);
  kA_ = torch::zeros({batch, H, capA_, Dk}, o);
  vA_ = torch::zeros({batch, H, capA_, Dv}, o);
  kB_ = torch::zeros({batch, H, capB_, Dk}, o);
  yB_ = torch::zeros({batch, H, capB_, Dv}, o);
  reset();
}

void MixCache::reset() {
  pos_.assign(batch_, 0);
  slot_pos_.assign(lattice_ ? batch_ * capB_ : 0, -1);
}

void MixCache::skip_to(int64_t context) {
  if (context < 0 || context > max_context_)
    throw std::invalid_argument("tokmix::MixCache::skip_to: context " + std::to_string(context) + " outside [0, " + std::to_string(max_context_) + "]");
  reset();
  pos_.assign(batch_, context);
  if (lattice_) {
    auto row = pattern_->row_B(context);
    for (int64_t b = 0; b < batch_; ++b)
      for (size_t s = 0; s < row.size(); ++s) slot_pos_[b * capB_ + s] = row[s].pos;
  }
}

int64_t MixCache::entries(int64_t b) const {
  int64_t a = std::min(pos_[b], capA_);
  int64_t bb = 0;
  if (lattice_) {
    for (int64_t s = 0; s < capB_; ++s) bb += slot_pos_[b * capB_ + s] >= 0;
  } else {
    bb = std::min(pos_[b], capB_);
  }
  return a + bb;
}

std::vector<int64_t> MixCache::held_positions_B(int64_t b) const {
  std::vector<int64_t> out;
  if (lattice_) {
    for (int64_t s = 0; s < capB_; ++s)
      if (slot_pos_[b * capB_ + s] >= 0) out.push_back(slot_pos_[b * capB_ + s]);
  } else {
    for (int64_t p = std::max<int64_t>(0, pos_[b] - capB_); p < pos_[b]; ++p) out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}

int64_t MixCache::bytes() const {
  return (kA_.numel() + vA_.numel() + kB_.numel() + yB_.numel()) * static_cast<int64_t>(kA_.element_size());
}

void MixCache::store_from_prompt(int64_t b, const Tensor& k, const Tensor& v, const Tensor& y, int64_t len) {
  // k, v, y: [len, H, D] of sequence b
  auto put = [&](Tensor& store, const Tensor& src, const std::vector<int64_t>& positions, const std::vector<int64_t>& slots) {
    if (positions.empty()) return;
    auto o = torch::TensorOptions().dtype(torch::kInt64).device(src.device());
    Tensor pi = torch::tensor(positions, o), si = torch::tensor(slots, o);
    store[b].index_copy_(1, si, src.index_select(0, pi).transpose(0, 1));
  };
  std::vector<int64_t> ps, ss;
  for (int64_t p = std::max<int64_t>(0, len - capA_); p < len && capA_ > 0; ++p) {
    ps.push_back(p);
    ss.push_back(p % capA_);
  }
  put(kA_, k, ps, ss);
  put(vA_, v, ps, ss);
  ps.clear();
  ss.clear();
  if (lattice_ && len < max_context_) {
    int64_t s = 0;
    for (const Entry& e : pattern_->row_B(len)) {
      ps.push_back(e.pos);
      ss.push_back(s);
      slot_pos_[b * capB_ + s] = e.pos;
      ++s;
    }
  } else {
    for (int64_t p = std::max<int64_t>(0, len - capB_); p < len && capB_ > 0; ++p) {
      ps.push_back(p);
      ss.push_back(p % capB_);
    }
  }
  put(kB_, k, ps, ss);
  put(yB_, y, ps, ss);
  pos_[b] = len;
}

torch::Tensor MixCache::prefill(const Tensor& q, const Tensor& k, const Tensor& v, const MixOptions& opt) {
  check_prefill(q, opt);
  Tensor y = mix(q, k, v, *pattern_, opt);
  store_prompts(q, k, v, y, opt);
  return y;
}

void MixCache::check_prefill(const Tensor& q, const MixOptions& opt) const {
  for (int64_t b = 0; b < batch_; ++b)
    if (pos_[b] != 0) throw std::invalid_argument("tokmix::MixCache::prefill: sequence " + std::to_string(b) + " already holds " +
                                                  std::to_string(pos_[b]) + " tokens; expected an empty cache (call reset())");
  if (opt.cu_seqlens.defined()) {
    Tensor cu = opt.cu_seqlens.to(torch::kCPU, torch::kInt64);
    if (cu.numel() - 1 != batch_)
      throw std::invalid_argument("tokmix::MixCache::prefill: cu_seqlens has " + std::to_string(cu.numel() - 1) + " sequences; the cache holds " +
                                  std::to_string(batch_));
    for (int64_t b = 0; b < batch_; ++b) {  // every length first: a refused prefill stores nothing
      int64_t len = cu[b + 1].item<int64_t>() - cu[b].item<int64_t>();
      if (len > max_context_)
        throw std::invalid_argument("tokmix::MixCache::prefill: prompt " + std::to_string(b) + " has " + std::to_string(len) +
                                    " tokens; the cache was made for max_context = " + std::to_string(max_context_));
    }
  } else {
    if (q.size(0) != batch_)
      throw std::invalid_argument("tokmix::MixCache::prefill: batch " + std::to_string(q.size(0)) + "; the cache holds " + std::to_string(batch_));
    if (q.size(1) > max_context_)
      throw std::invalid_argument("tokmix::MixCache::prefill: prompt of " + std::to_string(q.size(1)) + " tokens; max_context = " +
                                  std::to_string(max_context_));
  }
}

void MixCache::prefill_outputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y, const MixOptions& opt) {
  check_prefill(q, opt);
  if (!y.defined() || y.dim() != 4 || y.size(0) != v.size(0) || y.size(1) != v.size(1) || y.size(2) != H_ || y.size(3) != Dv_)
    throw std::invalid_argument("tokmix::MixCache::prefill: outputs y of shape " + shape_str(y) + "; expected v's shape " + shape_str(v));
  store_prompts(q, k, v, y, opt);
}

void MixCache::store_prompts(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y, const MixOptions& opt) {
  const bool gate = opt.mode == "gate";
  Tensor kk = gate ? q : k;
  Tensor yd = y.detach();
  if (opt.cu_seqlens.defined()) {
    Tensor cu = opt.cu_seqlens.to(torch::kCPU, torch::kInt64);
    for (int64_t b = 0; b < batch_; ++b) {
      int64_t t0 = cu[b].item<int64_t>(), t1 = cu[b + 1].item<int64_t>();
      store_from_prompt(b, kk[0].slice(0, t0, t1).detach(), v[0].slice(0, t0, t1).detach(), yd[0].slice(0, t0, t1), t1 - t0);
    }
  } else {
    for (int64_t b = 0; b < batch_; ++b) store_from_prompt(b, kk[b].detach(), v[b].detach(), yd[b], q.size(1));
  }
}

torch::Tensor MixCache::step(const Tensor& q, const Tensor& k, const Tensor& v, const MixOptions& opt) {
  auto badstep = [](const std::string& m) { throw std::invalid_argument("tokmix::MixCache::step: " + m); };
  const auto mode = parse_mode(opt.mode);
  const bool gate = mode == kernels::Mode::Gate;
  if (q.dim() != 3 || q.size(0) != batch_ || q.size(1) != H_ || q.size(2) != Dk_)
    badstep("q has shape " + shape_str(q) + "; expected [" + std::to_string(batch_) + ", " + std::to_string(H_) + ", " + std::to_string(Dk_) + "]");
  if (v.dim() != 3 || v.size(0) != batch_ || v.size(1) != H_ || v.size(2) != Dv_)
    badstep("v has shape " + shape_str(v) + "; expected [" + std::to_string(batch_) + ", " + std::to_string(H_) + ", " + std::to_string(Dv_) + "]");
  Tensor kk = gate ? q : k;
  if (!kk.defined() || !kk.sizes().equals(q.sizes())) badstep("k must have q's shape " + shape_str(q));
  if (q.scalar_type() != kA_.scalar_type() || v.scalar_type() != kA_.scalar_type() || kk.scalar_type() != kA_.scalar_type())
    badstep(std::string("dtype must be the cache's ") + c10::toString(kA_.scalar_type()));
  // CUDA: the kernel checks q, k, v itself (no host sync; see the CUDA branch below)
  if (!q.is_cuda()) {
    check_finite(q, "q");
    check_finite(kk, "k");
    check_finite(v, "v");
  }
  check_room();
  // Levels: the tables must cover the longest row this cache serves.
  const int64_t need = pattern_->num_levels(max_context_);
  if (!(opt.gamma > 0.0 && opt.gamma <= 1.0)) badstep("gamma = " + std::to_string(opt.gamma) + "; expected 0 < gamma <= 1");
  if (opt.scale >= 0 && !std::isfinite(opt.scale)) badstep("scale is not finite");
  if (q.device() != kA_.device() || v.device() != kA_.device() || kk.device() != kA_.device())
    badstep("q, k, v must be on the cache's device " + kA_.device().str());
  for (const Tensor* t : {&opt.bias, &opt.gate_weight})
    if (t->defined() && (t->scalar_type() != kA_.scalar_type() || t->device() != kA_.device()))
      badstep("bias and gate_weight must have the cache's dtype and device");
  // skipped while a step is captured into a CUDA graph (check_finite): the eager step before the
  // capture checked the same weights
  check_finite(opt.bias, "bias");
  if (gate) check_finite(opt.gate_weight, "gate_weight");
  if (gate && opt.bias.defined() && opt.gate_weight.defined() && opt.bias.size(-1) != opt.gate_weight.size(1))
    badstep("bias has " + std::to_string(opt.bias.size(-1)) + " levels and gate_weight " + std::to_string(opt.gate_weight.size(1)) +
            "; expected the same");
  int64_t levels = 0;
  if (opt.bias.defined()) {
    if (opt.bias.dim() != 2 || opt.bias.size(0) != H_ || opt.bias.size(1) < need)
      badstep("bias has shape " + shape_str(opt.bias) + "; expected [" + std::to_string(H_) + ", >= " + std::to_string(need) + "]");
    levels = opt.bias.size(1);
  }
  if (gate) {
    if (!opt.gate_weight.defined() || opt.gate_weight.dim() != 3 || opt.gate_weight.size(0) != H_ || opt.gate_weight.size(1) < need ||
        opt.gate_weight.size(2) != Dk_)
      badstep("gate mode needs gate_weight [" + std::to_string(H_) + ", >= " + std::to_string(need) + ", " + std::to_string(Dk_) + "]");
    levels = opt.gate_weight.size(1);
  }
  kernels::DecodeProblem pb;
  pb.batch = batch_;
  pb.H = H_;
  pb.Dk = Dk_;
  pb.Dv = Dv_;
  pb.capA = capA_;
  pb.capB = capB_;
  pb.mode = mode;
  pb.scale = opt.scale < 0 ? 1.0 / std::sqrt(static_cast<double>(Dk_)) : opt.scale;
  pb.gamma = opt.gamma;
  pb.levels = levels;
  pb.row_max = row_max_;
  pb.pos = pos_.data();
  std::vector<int64_t> new_a(batch_, -1), new_b(batch_, -1), slot_of;
  std::vector<int64_t> pos_before, slots_before;  // CUDA: the host state on entry (see the CUDA branch)
  if (q.is_cuda()) {
    pos_before = pos_;
    slots_before = slot_pos_;
  }
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t i = pos_[b];
    if (capA_ > 0) new_a[b] = i % capA_;
    if (!lattice_ && capB_ > 0) new_b[b] = i % capB_;
  }
  if (lattice_) {
    // Resolve this row's entries to slots (the CUDA kernel resolves them from its own copy of the
    // table: only the update runs here), then make room for the new token.
    const bool resolve = !q.is_cuda();
    pb.max_entries = std::max<int64_t>(1, capB_);
    if (resolve) slot_of.assign(batch_ * pb.max_entries, -1);
    const int64_t* sp = slot_pos_.data();
    for (int64_t b = 0; b < batch_; ++b) {
      const int64_t i = pos_[b];
      int64_t e = 0;
      if (resolve) {
        for (const Entry& en : pattern_->row_B(i)) {
          int64_t s = 0;
          while (s < capB_ && sp[b * capB_ + s] != en.pos) ++s;
          if (s == capB_) badstep("internal: lattice position " + std::to_string(en.pos) + " is not in the cache");
          slot_of[b * pb.max_entries + e++] = s;
        }
      }
      new_b[b] = lattice_advance(b, i);
    }
    pb.b_slot_of = slot_of.data();
  }
  pb.new_a_slot = new_a.data();
  pb.new_b_slot = new_b.data();
  Tensor qc = q.contiguous(), kc = kk.contiguous(), vc = v.contiguous();
  Tensor bias = opt.bias.defined() ? opt.bias.contiguous() : Tensor();
  Tensor gw = gate ? opt.gate_weight.contiguous() : Tensor();
  Tensor y = torch::empty({batch_, H_, Dv_}, v.options());
  const PatternDesc d = pattern_->desc();
  if (q.is_cuda()) {
#ifdef TOKMIX_WITH_CUDA
    // No host synchronisation and no copy per step: positions and the lattice slot table live on
    // the device (uploaded only when reset, skip_to or prefill changed the host state), and the
    // kernel checks q, k, v for NaN/Inf into a host-mapped flag read here at a later step. So a
    // non-finite input is reported by the first step() called after the device finished the
    // step that saw it (its output and the cache entries it wrote are then non-finite too), and
    // every step throws until the cache is reset, skipped or refilled.
    DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
    auto stream = at::cuda::getCurrentCUDAStream(q.device().index());
    int64_t* dbuf = dd.buf.data_ptr<int64_t>();
    auto dpos = [&](int p) { return dbuf + p * batch_; };
    auto dslot = [&](int p) { return dbuf + 2 * batch_ + p * batch_ * capB_; };
    cuda_sync_state(pos_before, slots_before, capturing_on(q));
    kernels::CudaDecodeState st;
    st.pos_in = dpos(dd.par);
    st.pos_out = dpos(1 - dd.par);
    st.slot_in = lattice_ ? dslot(dd.par) : nullptr;
    st.slot_out = lattice_ ? dslot(1 - dd.par) : nullptr;
    st.bad = dd.flags_dev;
    st.max_context = max_context_;
    Tensor split_ws;
    if (const int64_t nf = kernels::decode_split_floats(pb, lattice_)) {
      split_ws = torch::empty({nf}, kA_.options().dtype(torch::kFloat32));
      st.split_ws = split_ws.data_ptr<float>();
    }
    kernels::DecodeProblem dpb = pb;
    dpb.pos = dpb.b_slot_of = dpb.new_a_slot = dpb.new_b_slot = nullptr;
    const PatternDesc ddesc = device_desc(*pattern_, q.device());
    kernels::decode_step_cuda(ddesc, dpb, st, pattern_->num_B_levels(max_context_), cuda_dtype(q), cptr(qc), cptr(kc), cptr(vc), cptr(bias),
                              cptr(gw), mptr(kA_), mptr(vA_), mptr(kB_), mptr(yB_), mptr(y), stream.stream());
    cuda_step_done();
    return y;
#else
    badstep("this build has no CUDA decode backend (configure with -DTOKMIX_CUDA=ON)");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decode_step", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
    kernels::decode_step_cpu<scalar_t>(d, pb, ptr(qc), ptr(kc), ptr(vc), ptr(bias), ptr(gw), ptr(kA_), ptr(vA_), ptr(kB_), ptr(yB_),
                                       y.data_ptr<scalar_t>());
  });
  for (auto& p : pos_) ++p;
  return y;
}

void MixCache::check_room() const {
  for (int64_t b = 0; b < batch_; ++b)
    if (pos_[b] >= max_context_)
      throw std::invalid_argument("tokmix::MixCache::step: sequence " + std::to_string(b) + " is at position " + std::to_string(pos_[b]) +
                                  "; the cache was made for max_context = " + std::to_string(max_context_));
}

void MixCache::cuda_step_done() {
  for (auto& p : pos_) ++p;
#ifdef TOKMIX_WITH_CUDA
  DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
  dd.par = 1 - dd.par;
  dd.pos_seen = pos_;
  dd.slots_seen = slot_pos_;
#endif
}

int64_t MixCache::lattice_advance(int64_t b, int64_t i) {
  int64_t* sp = slot_pos_.data() + b * capB_;
  // no row follows the last one the cache was made for: keep nothing new
  std::vector<Entry> next = i + 1 < max_context_ ? pattern_->row_B(i + 1) : std::vector<Entry>{};
  for (int64_t s = 0; s < capB_; ++s)
    if (sp[s] >= 0 && std::none_of(next.begin(), next.end(), [&](const Entry& x) { return x.pos == sp[s]; })) sp[s] = -1;
  if (std::none_of(next.begin(), next.end(), [&](const Entry& x) { return x.pos == i; })) return -1;
  int64_t s = 0;
  while (s < capB_ && sp[s] >= 0) ++s;
  if (s == capB_) throw std::logic_error("tokmix::MixCache::step: internal: lattice cache full");
  sp[s] = i;
  return s;
}

void MixCache::cuda_sync_state(const std::vector<int64_t>& pos_before, const std::vector<int64_t>& slots_before, bool capturing) {
#ifdef TOKMIX_WITH_CUDA
  DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
  auto stream = at::cuda::getCurrentCUDAStream(kA_.device().index());
  // the table may be used on several streams (a GraphDecoder's, the caller's): the allocator
  // must not reuse it before all of them are done
  if (std::find(dd.streams.begin(), dd.streams.end(), stream.stream()) == dd.streams.end()) {
    c10::cuda::CUDACachingAllocator::recordStream(dd.buf.storage().data_ptr(), stream);
    dd.streams.push_back(stream.stream());
  }
  if (dd.pos_seen != pos_before || dd.slots_seen != slots_before) {
    if (capturing) {
      pos_ = pos_before;
      slot_pos_ = slots_before;
      throw std::logic_error("tokmix::MixCache::step: a step captured in a CUDA graph needs the device state in step with the host's; run one "
                             "step outside the capture first (after reset, skip_to or prefill)");
    }
    stream.synchronize();  // a step still in flight may yet raise a flag of the old contents
    Tensor up = torch::empty({batch_ + (lattice_ ? batch_ * capB_ : 0)}, torch::TensorOptions().dtype(torch::kInt64).pinned_memory(true));
    std::copy(pos_before.begin(), pos_before.end(), up.data_ptr<int64_t>());
    if (lattice_) std::copy(slots_before.begin(), slots_before.end(), up.data_ptr<int64_t>() + batch_);
    dd.par = 0;
    dd.buf.slice(0, 0, batch_).copy_(up.slice(0, 0, batch_), /*non_blocking=*/true);
    if (lattice_) dd.buf.slice(0, 2 * batch_, 2 * batch_ + batch_ * capB_).copy_(up.slice(0, batch_), /*non_blocking=*/true);
    std::fill(dd.flags_host, dd.flags_host + batch_, 0ull);
    return;
  }
  for (int64_t b = 0; b < batch_; ++b) {
    const unsigned long long f = reinterpret_cast<volatile unsigned long long*>(dd.flags_host)[b];
    if (f == 0) continue;
    // restore the host state of this call: the step did not happen
    pos_ = pos_before;
    slot_pos_ = slots_before;
    const int64_t at = static_cast<int64_t>(f & ~(1ull << 63)) - 1;
    if (f >> 63)
      throw std::invalid_argument("tokmix::MixCache::step: internal: lattice slot table lost a position at sequence " + std::to_string(b) +
                                  ", position " + std::to_string(at));
    throw std::invalid_argument("tokmix::MixCache::step: q, k or v of sequence " + std::to_string(b) + " at position " + std::to_string(at) +
                                " contained NaN or Inf (checked on the device, reported at a later step); reset() the cache");
  }
#else
  (void)pos_before;
  (void)slots_before;
  (void)capturing;
#endif
}

MixCache::HostState MixCache::host_state() const {
  HostState s;
  s.pos = pos_;
  s.slot_pos = slot_pos_;
#ifdef TOKMIX_WITH_CUDA
  if (kA_.is_cuda()) {
    DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
    s.dev_pos = dd.pos_seen;
    s.dev_slots = dd.slots_seen;
    s.parity = dd.par;
  }
#endif
  return s;
}

void MixCache::restore_host_state(const HostState& s) {
  if (int64_t(s.pos.size()) != batch_ || s.slot_pos.size() != slot_pos_.size())
    throw std::invalid_argument("tokmix::MixCache::restore_host_state: a state of another cache (" + std::to_string(s.pos.size()) +
                                " positions and " + std::to_string(s.slot_pos.size()) + " lattice slots; expected " + std::to_string(batch_) +
                                " and " + std::to_string(slot_pos_.size()) + ")");
  pos_ = s.pos;
  slot_pos_ = s.slot_pos;
#ifdef TOKMIX_WITH_CUDA
  if (kA_.is_cuda()) {
    DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
    dd.pos_seen = s.dev_pos;
    dd.slots_seen = s.dev_slots;
    dd.par = s.parity;
  }
#endif
}

void MixCache::check_device_state() {
#ifdef TOKMIX_WITH_CUDA
  if (kA_.is_cuda()) cuda_sync_state(pos_, slot_pos_, /*capturing=*/true);
#endif
}

int MixCache::device_parity() const {
#ifdef TOKMIX_WITH_CUDA
  if (kA_.is_cuda()) {
    DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
    return dd.pos_seen == pos_ && dd.slots_seen == slot_pos_ ? dd.par : -1;
  }
#endif
  return -1;
}

void MixCache::replayed_step() {
#ifdef TOKMIX_WITH_CUDA
  if (!kA_.is_cuda()) throw std::logic_error("tokmix::MixCache::replayed_step: only for a CUDA cache");
  DecodeDev& dd = decode_dev(kA_, batch_, capB_, lattice_);
  if (dd.pos_seen != pos_ || dd.slots_seen != slot_pos_)
    throw std::logic_error("tokmix::MixCache::replayed_step: the host state changed since the captured step (reset, skip_to or prefill); "
                           "capture again");
  check_room();
  const std::vector<int64_t> pos_before = pos_, slots_before = slot_pos_;
  cuda_sync_state(pos_before, slots_before, /*capturing=*/true);  // flags only: the state is in step
  if (lattice_) {
    try {
      for (int64_t b = 0; b < batch_; ++b) lattice_advance(b, pos_[b]);
    } catch (...) {
      slot_pos_ = slots_before;  // all or nothing
      throw;
    }
  }
  cuda_step_done();
#else
  throw std::logic_error("tokmix::MixCache::replayed_step: this build has no CUDA backend");
#endif
}

}  // namespace tokmix
