// The kernel seam: plain functions over raw pointers, shapes and strides. One CPU and one CUDA
// implementation per op; `ops/mix.cpp` is the only caller and the only place that sees tensors.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tokmix/pattern_desc.h"

namespace tokmix::kernels {

enum class Mode : int32_t { Softmax = 0, Gate = 1 };

// A sequence-major view of q, k, v, y: element (b, t, h, d) lives at b*sb + t*st + h*sh + d.
struct Strides {
  int64_t sb, st, sh;
};

struct MixProblem {
  int64_t batch = 0;  // B
  int64_t T = 0;      // tokens per batch row
  int64_t H = 0, Dk = 0, Dv = 0;
  // Packed variable-length sequences (batch == 1): sequence s covers [cu[s], cu[s+1]).
  const int64_t* cu_seqlens = nullptr;
  int64_t num_seqs = 0;
  Strides sq{}, sk{}, sv{}, sy{};
  Mode mode = Mode::Softmax;
  double scale = 1.0;  // softmax: s_ij = scale * q_i.k_j + bias
  double gamma = 1.0;  // damping of B coefficients
  int64_t levels = 0;  // columns of bias / gate tables
  // Units of work: one (sequence, head) pair each.
  int64_t num_units() const { return (num_seqs > 0 ? num_seqs : batch) * H; }
};

// Forward: y and the per-row log-sum-exp (lse, [units, T] laid out as unit*T + t, over the
// unit's own rows) that backward uses to recompute coefficients instead of storing them.
//
// With `copies` ([3]: q, k, v), the forward first fills each unit's rows of q, k, v (dst: the
// buffer passed as q, k or v, laid out as pb.sq/sk/sv) from the caller's [B, T, H, D] tensors,
// unit by unit, right before the unit runs, so that the head's rows are still in cache when it
// reads them; a copy with a null src is skipped (already filled). A NaN or Inf copied sets *bad
// and that unit is not computed.
template <class T>
struct HeadCopy {
  const T* src = nullptr;
  Strides s{};  // of src, elements; [B, T, H, D] with the head width contiguous
  T* dst = nullptr;
  bool* bad = nullptr;
};
// Units with A = {i} and B = offsets run in blocks of rows where that measured faster (float32,
// softmax; perf-notes v22); TOKMIX_CPU_BLOCK_ROWS=R in the environment forces R rows a block for
// every unit longer than R (0: row by row), for tests and measurements.
template <class T>
void mix_forward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v,
                     const T* bias /*[H, levels] or null*/, const T* gate_w /*[H, levels, Dk] (gate)*/, T* y, T* lse,
                     const HeadCopy<T>* copies = nullptr);

// Backward. dk, and dv unless A = {i}, must be zero-filled; every row of dq (and of dv when
// A = {i}) is written, so those need no fill. dy (laid out as y) is overwritten: g =
// (I - B)^{-T} dy is built in place, so it must be a private copy. dbias_units ([units, levels])
// and dgate_units ([units, levels, Dk]) receive per-unit partial sums (zero-filled, may be null
// when unused).
template <class T>
void mix_backward_cpu(const PatternDesc& pat, const MixProblem& pb, const T* q, const T* k, const T* v,
                      const T* bias, const T* gate_w, const T* y, const T* lse, T* dy, T* dq, T* dk, T* dv,
                      T* dbias_units, T* dgate_units);

// One decode step for `batch` sequences, each at its own position pos[b] (0-indexed row).
// Caches are [batch, H, cap, D]; A-cache rows are rings (slot = position % capA); B-cache
// rows are rings (slot = position % capB) unless b_slot_of is given: then entry e of row b
// reads slot b_slot_of[b * max_entries + e] (the lattice's slot table, filled by the caller).
// The new token's k, v and y are written to slots new_a_slot[b] / new_b_slot[b] (-1: keep none).
struct DecodeProblem {
  int64_t batch = 0, H = 0, Dk = 0, Dv = 0;
  int64_t capA = 0, capB = 0;
  const int64_t* pos = nullptr;
  const int64_t* b_slot_of = nullptr;
  int64_t max_entries = 0;
  const int64_t* new_a_slot = nullptr;
  const int64_t* new_b_slot = nullptr;
  Mode mode = Mode::Softmax;
  double scale = 1.0, gamma = 1.0;
  int64_t levels = 0;
  int64_t row_max = 0;  // max |SA(i)| + |SB(i)| over the cache's rows (sizes the CUDA split path)
};

template <class T>
void decode_step_cpu(const PatternDesc& pat, const DecodeProblem& pb, const T* q, const T* k, const T* v /*[batch,H,D]*/,
                     const T* bias, const T* gate_w, T* kA, T* vA, T* kB, T* yB, T* y /*[batch,H,Dv]*/);

// Copies x [B, T, H, D] (any strides, D contiguous) into dst laid out [B, H, T, D] so that a
// head's rows are contiguous, and reports whether every value is finite (one pass for both).
// Large CPU arrays the kernels read far apart (a level's source rows) are backed by 2 MB pages:
// with 4 KB pages a head's arrays span more pages than the TLB holds. Advises the whole 2 MB
// pages inside [p, p + bytes) (madvise MADV_HUGEPAGE: the machines' transparent huge pages are
// often "madvise" only); call before first touch.
constexpr size_t kHugePage = size_t(2) << 20;
void advise_huge_pages(void* p, size_t bytes);

template <class T>
bool relayout_to_heads_cpu(const T* x, int64_t B, int64_t Tn, int64_t H, int64_t D, int64_t sb, int64_t st, int64_t sh, T* dst);

#ifdef TOKMIX_WITH_CUDA
// CUDA backend (src/ops/cuda). Tensors stay sequence-major [B, T, H, D] (no relayout); q, k,
// v, y, dy must be contiguous so that the Strides above describe them. Element types travel as
// a tag with void pointers so that this seam stays free of CUDA and LibTorch headers.
enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct CudaMix {
  PatternDesc host_pat;  // f and a in host memory (planning)
  PatternDesc dev_pat;   // the same pattern with f and a in device memory (kernels)
  MixProblem pb;         // pb.cu_seqlens: host pointer
  int64_t max_seq = 0;   // longest sequence
  int32_t nbl = 0;       // B levels in use: pattern.num_B_levels(max_seq)
  DType dtype = DType::F32;
  void* stream = nullptr;  // cudaStream_t
  // Deferred finiteness report (chunked solver): when set, the mask is copied to this pinned
  // host slot behind the kernels and the call returns 0 without waiting for the stream.
  int32_t* flags_out = nullptr;
  // The call is being captured into a CUDA graph: no finiteness report at all (a capture may not
  // wait for the device or copy to pageable memory); the plan is uploaded from pinned host
  // memory that lives as long as the program, since the graph's copy nodes read it at replay.
  bool capturing = false;
};

// Scratch the op needs on the device (bytes), allocated by the caller and passed as `ws`.
int64_t mix_cuda_workspace_bytes(const CudaMix& m, bool backward);
// Tables the forward writes for the backward (bytes; 0 for the generic solver), passed as
// `saved` to both: coefficients, sources and the chunk inverses, n x (2 |support| + 64) x 4
// bytes (superchunk chains: about n x (3 |support| + 67) x 4). The caller keeps them from forward to
// backward (the backward does not recompute them).
int64_t mix_cuda_saved_bytes(const CudaMix& m);
// Whether the chunked solver (A = self, sparse B) serves this problem; otherwise the generic one.
bool mix_cuda_fast_path(const CudaMix& m);

// Finiteness: the chunked solver checks q, k, v (forward) and dy (backward) while it reads
// them and returns a mask of the ones that held NaN or Inf (bit 0 q, 1 k, 2 v, 3 dy; this costs
// one 4-byte copy and a stream sync); the generic solver checks nothing and returns -1, so the
// caller checks those itself.
// Forward: y [B,T,H,Dv] in the input type, lse [B,H,T] in float32.
int32_t mix_forward_cuda(const CudaMix& m, const void* q, const void* k, const void* v, const void* bias,
                         const void* gate_w, void* y, float* lse, void* ws, void* saved);
// Backward: dq, dk, dv written in full (no zero fill needed); dbias_units [units, levels] and
// dgate_units [units, levels, Dk] are float32, zero-filled, may be null when unused.
int32_t mix_backward_cuda(const CudaMix& m, const void* q, const void* k, const void* v, const void* bias,
                       const void* gate_w, const void* y, const float* lse, const void* dy, void* dq, void* dk, void* dv,
                       float* dbias_units, float* dgate_units, void* ws, const void* saved);

// Decode state that lives on the device between steps, so that a CUDA step needs no copy and no
// host synchronisation: positions and (lattice) the slot table, double-buffered. A step reads
// buffer `par`; block h = 0 of each sequence writes buffer 1 - par (all heads read the old one).
// The caller uploads pos_ / slot_pos_ only when the host state changed outside step() (reset,
// skip_to, prefill). `bad` ([batch], host-mapped) receives position + 1 of a step whose q, k or
// v was not finite (0: none; top bit set: internal slot-table error); the host reads it later
// without a sync.
struct CudaDecodeState {
  const int64_t* pos_in = nullptr;   // [batch]
  int64_t* pos_out = nullptr;        // [batch]
  const int64_t* slot_in = nullptr;  // lattice: [batch, capB] position held by each slot (-1 free)
  int64_t* slot_out = nullptr;
  unsigned long long* bad = nullptr;  // device view of the mapped flags
  int64_t max_context = 0;
  // Long rows (attention, local and dense B over long contexts) are split over many blocks,
  // each a slice of the row's entries, then combined (flash-decoding): decode_split_floats()
  // of workspace, caller-allocated (null: one block per (sequence, head)).
  float* split_ws = nullptr;
};
// Workspace floats a step needs for the split path (0: the longest row, pb.row_max, fits one
// block, or the pattern is a lattice).
int64_t decode_split_floats(const DecodeProblem& pb, bool lattice);
// Host-mapped flags (cudaHostAlloc, zero-filled): returns the host pointer, *dev the device one.
unsigned long long* decode_flags_alloc(int64_t n, unsigned long long** dev);
// Pinned host slots for deferred finiteness reports (CudaMix::flags_out) and the events that
// say when a slot holds its report.
int32_t* flag_slots_alloc(int64_t n);
void flag_slots_free(int32_t* host);
void* event_record(void* stream);              // a new event, recorded on the stream
bool event_done(void* event, bool wait);       // wait: block until it has happened
void event_destroy(void* event);
void decode_flags_free(unsigned long long* host);

// One decode step. pb gives dims, mode, caches' capacities; its pointer fields are unused (the
// positions, slots and new-token slots come from / are derived on the device from `st`).
// nbl: B levels the cache serves (pattern.num_B_levels(max_context)).
void decode_step_cuda(const PatternDesc& dev_pat, const DecodeProblem& pb, const CudaDecodeState& st, int32_t nbl, DType dtype,
                      const void* q, const void* k, const void* v, const void* bias, const void* gate_w, void* kA, void* vA,
                      void* kB, void* yB, void* y, void* stream);
#endif

}  // namespace tokmix::kernels
