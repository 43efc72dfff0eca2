// The generalized mixing op  Y = (I - B)^{-1} A X  on [B, T, H, D] tensors, with autograd,
// and the decoding cache of one layer.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>

#include "tokmix/pattern.h"

namespace tokmix {

struct MixOptions {
  std::string mode = "softmax";  // "softmax": s_ij = scale q_i.k_j + b; "gate": s_ij = q_i.w_level + b
  double scale = -1;             // softmax scale; < 0 means 1/sqrt(Dk)
  double gamma = 1.0;            // damping of B, in (0, 1]
  torch::Tensor bias;            // optional [H, L], L >= pattern.num_levels(T)
  torch::Tensor gate_weight;     // gate mode: [H, L, Dk]
  torch::Tensor cu_seqlens;      // optional [N+1] int32/int64, packed sequences with B == 1
};

// y = mix(q, k, v): q, k [B, T, H, Dk], v [B, T, H, Dv] -> y [B, T, H, Dv].
// Differentiable in q, k, v, bias and gate_weight. In gate mode k is not read (pass any tensor
// of q's shape, or an undefined tensor) and gets no gradient.
torch::Tensor mix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Pattern& pattern,
                  const MixOptions& opt = {});
torch::Tensor mix(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const std::string& pattern,
                  const MixOptions& opt = {});

// The same op as one dense solve: the coefficients [A | B] are materialized as T x T matrices per
// (batch, head) and (I - B) Y = A X is solved with a triangular solve, differentiable through
// LibTorch. O(T^2) time and memory per head, for short sequences of patterns whose supports are
// windows (attention, local, dense recurrence and their hybrids): there the generic kernel runs
// each head's rows one after another, while this form is a few batched matrix products and one
// batched triangular solve (the layer uses it on the GPU up to dense_solve_max_T). Computes in
// float32 (float64 for float64 inputs) whatever autocast says; returns v's dtype. No
// cu_seqlens; offsets and lattices on the B side are refused (use mix). NaN or Inf in q, k, v
// is refused at the call, except on CUDA with FiniteCheck::Deferred, where it reaches the loss
// (which the trainer refuses) without a read of the device here.
torch::Tensor mix_dense(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Pattern& pattern,
                        const MixOptions& opt = {});
// Both supports are windows (or self, or no B).
bool mix_dense_serves(const Pattern& pattern);
// Where the layer takes mix_dense on the GPU: a B side that is a window (dense recurrence),
// T <= dense_solve_max_T and B * H * T^2 at most dense_solve_max_elements (the backward keeps
// ~12 bytes per element: 1.6 GB a layer at most). Its outputs equal mix's to float32 rounding
// (decoding goes through MixCache).
constexpr int64_t dense_solve_max_T = 1024;
constexpr int64_t dense_solve_max_elements = int64_t(1) << 27;
bool mix_dense_preferred(const Pattern& pattern, int64_t batch, int64_t H, int64_t T);
// window_level(d) of every element of an int64 tensor of distances 0 <= d <= max_distance, on
// its device, without a host table (a step captured into a CUDA graph may not copy from
// pageable memory). Negative distances give level 0 (callers mask them).
torch::Tensor window_levels(const torch::Tensor& distance, int64_t max_distance);

// When NaN or Inf in q, k, v (forward) or dy (backward) is reported on CUDA. AtCall (default):
// the call waits for its kernels and throws. Deferred: the kernels' report is copied behind them
// and the call returns at once, so the host runs ahead of the GPU as with any CUDA op; a report
// throws (naming the input, as at the call) at the first of: the next mix call on any thread
// whose GPU work has finished by then, or check_finite_pending(). The trainer defers and calls
// check_finite_pending() where it reads the loss and the gradient norm, which wait for the GPU
// anyway, so a bad input still stops the step before the update. CPU calls always check at the
// call. TOKMIX_FINITE_CHECK=deferred sets the mode at start-up.
enum class FiniteCheck { AtCall, Deferred };
void set_finite_check(FiniteCheck mode);
FiniteCheck finite_check();
// Waits for the GPU work of every deferred report and throws the first bad one.
void check_finite_pending();

// Parsed patterns are cached by spec (parsing expands f and its lattice once).
std::shared_ptr<const Pattern> pattern_from_spec(const std::string& spec);

// Per-layer decoding cache: holds, per sequence and head, exactly the past (k, x) the A support
// and the past (k, y) the B support of future rows will read (spec section 6).
class MixCache {
 public:
  MixCache(std::shared_ptr<const Pattern> pattern, int64_t batch, int64_t H, int64_t Dk, int64_t Dv,
           int64_t max_context, torch::ScalarType dtype = torch::kFloat32, torch::Device device = torch::kCPU);

  // Runs the parallel form over prompts and fills the cache. Either q,k,v are [batch, T, H, D]
  // (all prompts of length T) or packed [1, total, H, D] with opt.cu_seqlens of batch+1 entries.
  // Returns y in the layout of q. Every sequence must be empty (fresh cache or reset()).
  torch::Tensor prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const MixOptions& opt = {});
  // The same, when the caller already has the prompt's outputs y = mix(q, k, v, pattern, opt)
  // (a fused attention kernel computed them): only fills the cache.
  void prefill_outputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& y,
                       const MixOptions& opt = {});
  // One token for every sequence: q, k [batch, H, Dk], v [batch, H, Dv] -> y [batch, H, Dv].
  torch::Tensor step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const MixOptions& opt = {});

  void reset();
  // Marks every sequence as having seen `context` tokens whose stored keys and values are the
  // stores' current contents (zeros when fresh): measures a step at a given depth without
  // paying for the prompt.
  void skip_to(int64_t context);
  int64_t batch() const { return batch_; }
  const std::vector<int64_t>& positions() const { return pos_; }  // tokens seen per sequence
  // Past positions held for sequence b (A and B stores together); what the pattern says it needs.
  int64_t entries(int64_t b) const;
  std::vector<int64_t> held_positions_B(int64_t b) const;
  int64_t capacity_entries() const { return capA_ + capB_; }
  int64_t bytes() const;  // allocated bytes of the key/value stores
  const Pattern& pattern() const { return *pattern_; }

  // CUDA graphs (infer::GraphDecoder). A replayed graph runs a captured step()'s kernels but not
  // its host side; replayed_step() is that host side alone (positions, lattice slots, which of
  // the two device buffers the next step reads, the NaN flags of earlier steps). A capture runs
  // the host side without the kernels: HostState taken before it is restored after it.
  struct HostState {
    std::vector<int64_t> pos, slot_pos, dev_pos, dev_slots;
    int parity = 0;
  };
  HostState host_state() const;
  void restore_host_state(const HostState& s);
  void replayed_step();
  // Throws what the next step would throw on entry (NaN flags of earlier steps), and a
  // logic_error when the device state is not in step with the host's; for use before a capture.
  void check_device_state();
  // Device buffer the next CUDA step reads (0 or 1); steps alternate, so a graph is captured per
  // parity. -1 before the first CUDA step.
  int device_parity() const;

 private:
  void store_from_prompt(int64_t b, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& y, int64_t len);
  void check_prefill(const torch::Tensor& q, const MixOptions& opt) const;
  // fills the cache from checked prompts and their outputs
  void store_prompts(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& y, const MixOptions& opt);
  void check_room() const;  // every sequence has a row left
  // the host side of a finished CUDA step (run or replayed): positions, parity, what the device holds
  void cuda_step_done();
  // lattice: evicts what row i + 1 no longer reads, gives token i a free slot (or -1: not kept)
  int64_t lattice_advance(int64_t b, int64_t i);
  // CUDA: NaN flags of earlier steps (throws, restoring `before`), or upload of a host state
  // the device does not hold yet (reset, skip_to, prefill); never both
  void cuda_sync_state(const std::vector<int64_t>& pos_before, const std::vector<int64_t>& slots_before, bool capturing);
  std::shared_ptr<const Pattern> pattern_;
  int64_t batch_, H_, Dk_, Dv_, max_context_;
  int64_t capA_, capB_;
  bool lattice_;
  int64_t row_max_ = 0;                 // non-lattice: max |SA(i)| + |SB(i)| for i < max_context
  torch::Tensor kA_, vA_, kB_, yB_;     // [batch, H, cap, D]
  std::vector<int64_t> pos_;            // next row per sequence
  std::vector<int64_t> slot_pos_;       // lattice: [batch, capB] position held by each slot (-1 free)
};

// Sets LibTorch's and OpenMP's thread counts to the number of cores (or n > 0).
void set_threads(int n = 0);

}  // namespace tokmix
