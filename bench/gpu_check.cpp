// GPU check and benchmark of the CUDA backend (run by scripts/gpu-check.sh on the GPU machine).
//  1. correctness: CUDA against the CPU float64 op (itself tested against a dense solve) for every
//     pattern family, both coefficient modes, float32 and bfloat16, forward and every gradient,
//     edge sizes and packed batches; fresh random inputs each run; NaN fails;
//  2. decoding on the GPU equals the parallel form on every prefix;
//  3. timings (median of CUDA-event timings) beside SDPA and a dense triangular solve, the decode
//     step against context, and peak device memory.
// Prints a short table last; exits 1 when a check failed.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tokmix/mix.h"

using namespace tokmix;
using torch::Tensor;

namespace {

int g_fail = 0, g_pass = 0;
std::vector<std::string> g_summary;

double rel_err(const Tensor& a, const Tensor& b) {
  Tensor x = a.to(torch::kCPU, torch::kFloat64), y = b.to(torch::kCPU, torch::kFloat64);
  if (!torch::isfinite(x).all().item<bool>()) return INFINITY;
  const double den = std::max(y.abs().max().item<double>(), 1e-30);
  return (x - y).abs().max().item<double>() / den;
}

struct Case {
  std::string spec, mode;
  int64_t B, T, H, Dk, Dv;
  bool bias;
  double gamma;
  std::vector<int64_t> lens;  // packed when non-empty (B must be 1)
  bool dense_form = false;    // CUDA side through mix_dense (the CPU side is always mix)
};

// CUDA in `dt` against the CPU op in float64 on the same (rounded) inputs.
void check_case(const Case& c, torch::ScalarType dt) {
  auto pat = pattern_from_spec(c.spec);
  int64_t T = c.T;
  std::vector<int64_t> cu;
  if (!c.lens.empty()) {
    cu.push_back(0);
    for (auto l : c.lens) cu.push_back(cu.back() + l);
    T = cu.back();
  }
  const int64_t maxlen = c.lens.empty() ? T : *std::max_element(c.lens.begin(), c.lens.end());
  const int64_t L = pat->num_levels(std::max<int64_t>(maxlen, 1)) + 1;
  auto gpu = torch::TensorOptions().device(torch::kCUDA).dtype(dt);
  Tensor q = torch::randn({c.B, T, c.H, c.Dk}, gpu), k = torch::randn({c.B, T, c.H, c.Dk}, gpu), v = torch::randn({c.B, T, c.H, c.Dv}, gpu);
  Tensor dy = torch::randn({c.B, T, c.H, c.Dv}, gpu);
  Tensor bias = c.bias ? torch::randn({c.H, L}, gpu) : Tensor();
  Tensor gw = c.mode == "gate" ? torch::randn({c.H, L, c.Dk}, gpu) * 0.5 : Tensor();
  auto run = [&](torch::Device dev, torch::ScalarType t) {
    auto cv = [&](const Tensor& x) { return x.defined() ? x.detach().to(dev, t).requires_grad_() : Tensor(); };
    Tensor qq = cv(q), kk = cv(k), vv = cv(v), bb = cv(bias), gg = cv(gw);
    MixOptions o;
    o.mode = c.mode;
    o.gamma = c.gamma;
    o.bias = bb;
    o.gate_weight = gg;
    if (!cu.empty()) o.cu_seqlens = torch::tensor(cu, torch::kInt64);
    Tensor y = c.dense_form && dev.is_cuda() ? mix_dense(qq, kk, vv, *pat, o) : mix(qq, kk, vv, *pat, o);
    std::vector<Tensor> ins = {qq, vv};
    if (c.mode == "softmax") ins.push_back(kk);
    if (bb.defined()) ins.push_back(bb);
    if (gg.defined()) ins.push_back(gg);
    auto g = torch::autograd::grad({y}, ins, {dy.to(dev, t)});
    std::vector<Tensor> out = {y.detach()};
    for (auto& x : g) out.push_back(x);
    return out;
  };
  auto ref = run(torch::kCPU, torch::kFloat64);
  auto got = run(torch::kCUDA, dt);
  const bool bf = dt != torch::kFloat32;
  const double tol_f = bf ? 1e-2 : 1e-4, tol_b = bf ? 2e-2 : 5e-4;
  const char* names[] = {"y", "dq", "dv", "dk/db/dg", "db/dg", "dg"};
  std::ostringstream os;
  bool ok = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = rel_err(got[i], ref[i]);
    const bool pass = e <= (i == 0 ? tol_f : tol_b);  // NaN and Inf fail here
    ok = ok && pass;
    os << " " << names[std::min<size_t>(i, 5)] << "=" << e << (pass ? "" : "(FAIL)");
  }
  std::ostringstream head;
  head << c.spec << " " << c.mode << " " << (bf ? "bf16" : "fp32") << " B" << c.B << " T" << T << " H" << c.H << " Dk" << c.Dk
       << " Dv" << c.Dv << (c.bias ? " bias" : "") << " gamma" << c.gamma << (c.lens.empty() ? "" : " packed") << (c.dense_form ? " dense-form" : "");
  std::printf("%s %s:%s\n", ok ? "PASS" : "FAIL", head.str().c_str(), os.str().c_str());
  (ok ? g_pass : g_fail)++;
}

void check_decode(const std::string& spec, const std::string& mode, int64_t prefill, int64_t T = 70) {
  auto pat = pattern_from_spec(spec);
  const int64_t B = 2, H = 2, Dk = 6, Dv = 5, L = pat->num_levels(T);
  auto o32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
  Tensor q = torch::randn({B, T, H, Dk}, o32), k = torch::randn({B, T, H, Dk}, o32), v = torch::randn({B, T, H, Dv}, o32);
  MixOptions o;
  o.mode = mode;
  o.gamma = 0.95;
  o.bias = torch::randn({H, L}, o32);
  if (mode == "gate") o.gate_weight = torch::randn({H, L, Dk}, o32);
  torch::NoGradGuard ng;
  Tensor y = mix(q, k, v, *pat, o);
  MixCache cache(pat, B, H, Dk, Dv, T, torch::kFloat32, torch::kCUDA);
  double worst = 0;
  if (prefill > 0) worst = rel_err(cache.prefill(q.slice(1, 0, prefill), k.slice(1, 0, prefill), v.slice(1, 0, prefill), o), y.slice(1, 0, prefill));
  for (int64_t t = prefill; t < T; ++t)
    worst = std::max(worst, rel_err(cache.step(q.select(1, t), k.select(1, t), v.select(1, t), o), y.select(1, t)));
  const bool ok = worst < 1e-4;
  std::printf("%s decode=parallel %s %s T %ld prefill %ld: worst rel err %.3g\n", ok ? "PASS" : "FAIL", spec.c_str(), mode.c_str(), (long)T,
              (long)prefill, worst);
  (ok ? g_pass : g_fail)++;
}

// The CUDA step checks q, k, v on the device: a NaN step must make a later step throw (once the
// device finished it), every step after must throw too, and reset() must clear it.
void check_decode_nan(const std::string& spec) {
  auto pat = pattern_from_spec(spec);
  const int64_t B = 3, H = 2, D = 8;
  auto o32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
  // attention: a context long enough for the split decode path
  MixCache cache(pat, B, H, D, D, spec == "attention" ? 2000 : 100, torch::kFloat32, torch::kCUDA);
  torch::NoGradGuard ng;
  auto rnd = [&] { return torch::randn({B, H, D}, o32); };
  bool ok = true;
  for (int t = 0; t < 5; ++t) cache.step(rnd(), rnd(), rnd());
  Tensor bad = rnd();
  bad[1][0][3] = NAN;
  cache.step(rnd(), rnd(), bad);  // sequence 1 at position 5
  torch::cuda::synchronize();
  std::string msg;
  for (int r = 0; r < 2; ++r) {
    try {
      cache.step(rnd(), rnd(), rnd());
      ok = false;
    } catch (const std::invalid_argument& e) {
      msg = e.what();
      ok = ok && msg.find("sequence 1 at position 5") != std::string::npos;
    }
  }
  ok = ok && cache.positions()[0] == 6;  // the refused steps did not advance
  cache.reset();
  try {
    for (int t = 0; t < 3; ++t) ok = ok && torch::isfinite(cache.step(rnd(), rnd(), rnd())).all().item<bool>();
  } catch (const std::exception& e) {
    ok = false;
    msg = e.what();
  }
  std::printf("%s decode NaN flag %s: %s\n", ok ? "PASS" : "FAIL", spec.c_str(), msg.c_str());
  (ok ? g_pass : g_fail)++;
}

// A NaN in q, k, v (forward) or dy (backward) of a CUDA mix must raise an error naming it (the
// chunked solver checks while it reads, the generic one beforehand), never return quietly.
void check_mix_nan(const std::string& spec, torch::ScalarType dt) {
  auto pat = pattern_from_spec(spec);
  auto gpu = torch::TensorOptions().device(torch::kCUDA).dtype(dt);
  const char* names[] = {"q", "k", "v", "dy"};
  for (int which = 0; which < 4; ++which) {
    Tensor t[4];
    for (auto& x : t) x = torch::randn({2, 300, 2, 64}, gpu);
    t[which].view(-1)[std::rand() % t[which].numel()] = NAN;
    std::string msg;
    bool thrown = false;
    try {
      Tensor q = t[0].requires_grad_(), k = t[1].requires_grad_(), v = t[2].requires_grad_();
      Tensor y = mix(q, k, v, *pat);
      torch::autograd::grad({y}, {q, k, v}, {t[3]});
    } catch (const std::exception& e) {
      thrown = true;
      msg = e.what();
    }
    const bool ok = thrown && msg.find(std::string(names[which]) + " contains NaN") != std::string::npos;
    std::printf("%s mix NaN in %s %s %s: %s\n", ok ? "PASS" : "FAIL", names[which], spec.c_str(), dt == torch::kFloat32 ? "fp32" : "bf16",
                thrown ? msg.c_str() : "no error");
    (ok ? g_pass : g_fail)++;
    // deferred reports: the calls return, and check_finite_pending() (or a later call) throws
    // the same error; a clean call after it reports nothing
    set_finite_check(FiniteCheck::Deferred);
    thrown = false;
    msg.clear();
    try {
      Tensor q = t[0].detach().requires_grad_(), k = t[1].detach().requires_grad_(), v = t[2].detach().requires_grad_();
      Tensor y = mix(q, k, v, *pat);
      torch::autograd::grad({y}, {q, k, v}, {t[3]});
      check_finite_pending();
    } catch (const std::exception& e) {
      thrown = true;
      msg = e.what();
    }
    bool clean = true;
    try {
      Tensor c = torch::randn({2, 300, 2, 64}, gpu);
      mix(c, c, c, *pat);
      check_finite_pending();
    } catch (const std::exception&) {
      clean = false;
    }
    set_finite_check(FiniteCheck::AtCall);
    const bool okd = thrown && clean && msg.find(std::string(names[which]) + " contains NaN") != std::string::npos;
    std::printf("%s mix NaN in %s %s %s (deferred): %s%s\n", okd ? "PASS" : "FAIL", names[which], spec.c_str(),
                dt == torch::kFloat32 ? "fp32" : "bf16", thrown ? msg.c_str() : "no error", clean ? "" : "; a clean call then failed");
    (okd ? g_pass : g_fail)++;
  }
}

// Median of `reps` CUDA-event timings of fn (after warm-up), in ms.
double time_ms(const std::function<void()>& fn, int reps = 10, int warm = 2) {
  for (int i = 0; i < warm; ++i) fn();
  cudaStream_t st = at::cuda::getCurrentCUDAStream().stream();
  std::vector<float> ts;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, st);
    fn();
    cudaEventRecord(b, st);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int64_t peak_bytes(const std::function<void()>& fn) {
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const int64_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
  fn();
  torch::cuda::synchronize();
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak - before;
}

void bench_shape(int64_t B, int64_t T, int64_t H, int64_t D) {
  auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  char buf[400];
  const double io_bytes = 4.0 * B * T * H * D * 2;  // q, k, v read, y written once (bf16)
  const double floor_ms = io_bytes / 4.3e12 * 1e3;
  // SDPA (flash) in its own layout [B, H, T, D]
  double sdpa_f, sdpa_fb;
  int64_t sdpa_mem;
  {
    Tensor q = torch::randn({B, H, T, D}, bf).requires_grad_(), k = torch::randn({B, H, T, D}, bf).requires_grad_(),
           v = torch::randn({B, H, T, D}, bf).requires_grad_(), dy = torch::randn({B, H, T, D}, bf);
    sdpa_f = time_ms([&] {
      torch::NoGradGuard ng;
      at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
    });
    auto fb = [&] {
      Tensor y = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
      torch::autograd::grad({y}, {q, k, v}, {dy});
    };
    sdpa_fb = time_ms(fb, 5);
    sdpa_mem = peak_bytes(fb);
  }
  std::snprintf(buf, sizeof buf, "%-12s (%ld,%6ld,%ld,%3ld)  fwd %8.3f ms  fwd+bwd %8.3f ms  peak %8.1f MB", "sdpa", (long)B, (long)T,
                (long)H, (long)D, sdpa_f, sdpa_fb, sdpa_mem / 1e6);
  std::printf("%s\n", buf);
  g_summary.push_back(buf);
  for (const char* spec : {"pow2", "sq1-lattice"}) {
    Tensor q = torch::randn({B, T, H, D}, bf).requires_grad_(), k = torch::randn({B, T, H, D}, bf).requires_grad_(),
           v = torch::randn({B, T, H, D}, bf).requires_grad_(), dy = torch::randn({B, T, H, D}, bf);
    auto pat = pattern_from_spec(spec);
    const double f = time_ms([&] {
      torch::NoGradGuard ng;
      mix(q, k, v, *pat);
    });
    auto fb = [&] {
      Tensor y = mix(q, k, v, *pat);
      torch::autograd::grad({y}, {q, k, v}, {dy});
    };
    const double fbt = time_ms(fb, 5);
    // the same with deferred finiteness reports (as the trainer runs): no stream sync per call
    set_finite_check(FiniteCheck::Deferred);
    const double fd = time_ms([&] {
      torch::NoGradGuard ng;
      mix(q, k, v, *pat);
    });
    const double fbd = time_ms(fb, 5);
    check_finite_pending();
    set_finite_check(FiniteCheck::AtCall);
    const int64_t mem = peak_bytes(fb);
    std::snprintf(buf, sizeof buf,
                  "%-12s (%ld,%6ld,%ld,%3ld)  fwd %8.3f ms  fwd+bwd %8.3f ms  peak %8.1f MB  fwd/io-floor %.1fx (floor %.3f ms)  "
                  "vs sdpa fwd+bwd %.2fx;  deferred checks: fwd %8.3f ms  fwd+bwd %8.3f ms  vs sdpa %.2fx",
                  spec, (long)B, (long)T, (long)H, (long)D, f, fbt, mem / 1e6, f / floor_ms, floor_ms, sdpa_fb / fbt, fd, fbd,
                  sdpa_fb / fbd);
    std::printf("%s\n", buf);
    g_summary.push_back(buf);
  }
}

void bench_dense_solve() {
  // the paper's own approach: a dense unit-triangular solve per head, fp32, pow2 B matrix
  const int64_t B = 4, T = 4096, H = 16, D = 64;
  auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
  auto pat = pattern_from_spec("pow2");
  Tensor Bm = torch::zeros({T, T});
  auto acc = Bm.accessor<float, 2>();
  for (int64_t i = 0; i < T; ++i)
    for (auto& e : pat->row_B(i)) acc[i][e.pos] = 0.5f / (1 + e.level);
  Tensor IB = (torch::eye(T) - Bm).to(f32).expand({B * H, T, T}).contiguous();
  Tensor Z = torch::randn({B * H, T, D}, f32);
  const double t = time_ms([&] { torch::linalg_solve_triangular(IB, Z, /*upper=*/false); }, 5, 1);
  char buf[200];
  std::snprintf(buf, sizeof buf, "%-12s (%ld,%6ld,%ld,%3ld)  solve only %8.3f ms (fp32, dense (I-B) per head)", "dense-solve", (long)B,
                (long)T, (long)H, (long)D, t);
  std::printf("%s\n", buf);
  g_summary.push_back(buf);
}

// The dense form (mix_dense: batched products and one triangular solve) against the generic
// kernel on the shapes where the layer picks it: MQAR-sized training batches of a dense B.
void bench_dense_form(int64_t B, int64_t T, int64_t H, int64_t D) {
  auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto pat = pattern_from_spec("dense");
  MixOptions o;
  o.bias = torch::zeros({H, pat->num_levels(T)}, bf).requires_grad_();
  Tensor q = torch::randn({B, T, H, D}, bf).requires_grad_(), k = torch::randn({B, T, H, D}, bf).requires_grad_(),
         v = torch::randn({B, T, H, D}, bf).requires_grad_(), dy = torch::randn({B, T, H, D}, bf);
  auto fb = [&](bool dense) {
    return [&, dense] {
      Tensor y = dense ? mix_dense(q, k, v, *pat, o) : mix(q, k, v, *pat, o);
      torch::autograd::grad({y}, {q, k, v, o.bias}, {dy});
    };
  };
  set_finite_check(FiniteCheck::Deferred);  // as the trainer runs both
  const double tg = time_ms(fb(false), 10, 2), td = time_ms(fb(true), 10, 2);
  check_finite_pending();
  set_finite_check(FiniteCheck::AtCall);
  Tensor qh = q.transpose(1, 2).detach().requires_grad_(), kh = k.transpose(1, 2).detach().requires_grad_(),
         vh = v.transpose(1, 2).detach().requires_grad_();
  const double ts = time_ms([&] {
    Tensor y = at::scaled_dot_product_attention(qh, kh, vh, c10::nullopt, 0.0, true);
    torch::autograd::grad({y}, {qh, kh, vh}, {dy.transpose(1, 2)});
  });
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "%-12s (%ld,%6ld,%ld,%3ld)  fwd+bwd: generic kernel %8.3f ms  dense form %8.3f ms (%.1fx)  sdpa %7.3f ms", "dense B",
                (long)B, (long)T, (long)H, (long)D, tg, td, tg / td, ts);
  std::printf("%s\n", buf);
  g_summary.push_back(buf);
}

void dense_form_checks() {
  for (auto dt : {torch::kFloat32, torch::kBFloat16})
    for (const char* s : {"dense", "A=local:3;B=dense", "A=attention;B=dense", "attention"})
      for (std::string mode : {"softmax", "gate"}) {
        check_case({s, mode, 2, 29, 2, 5, 3, false, 1.0, {}, true}, dt);
        check_case({s, mode, 1, 200, 2, 64, 64, true, 0.9, {}, true}, dt);
        check_case({s, mode, 1, 1, 1, 4, 4, true, 1.0, {}, true}, dt);
        check_case({s, mode, 1, 37, 3, 12, 10, true, 0.7, {}, true}, dt);
      }
}

// SDPA over a KV cache of ctx tokens: the attention decode step of a serving stack
double sdpa_decode_ms(int64_t batch, int64_t ctx, int64_t H, int64_t D) {
  auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  Tensor q = torch::randn({batch, H, 1, D}, bf), k = torch::randn({batch, H, ctx, D}, bf), v = torch::randn({batch, H, ctx, D}, bf);
  torch::NoGradGuard ng;
  return time_ms([&] { at::scaled_dot_product_attention(q, k, v); }, 50, 5);
}

void bench_decode(const std::string& spec) {
  const int64_t batch = 16, H = 16, D = 128;
  auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto pat = pattern_from_spec(spec);
  const bool linear = spec == "attention";  // the cache grows with the context
  for (int64_t ctx : {1024L, 4096L, 32768L, 131072L, 1048576L}) {
    if (linear && ctx > 131072) break;
    const double sdpa = linear ? sdpa_decode_ms(batch, ctx, H, D) : -1;
    MixCache cache(pat, batch, H, D, D, ctx + 64, torch::kBFloat16, torch::kCUDA);
    cache.skip_to(ctx);
    Tensor q = torch::randn({batch, H, D}, bf), k = torch::randn({batch, H, D}, bf), v = torch::randn({batch, H, D}, bf);
    torch::NoGradGuard ng;
    int steps = 0;
    auto one = [&] {
      if (++steps >= 60) {
        cache.skip_to(ctx);
        steps = 0;
      }
      cache.step(q, k, v);
    };
    const double t = time_ms(one, 200, 5);
    // the same step captured in a CUDA graph (two steps per graph: the device state is
    // double-buffered), replayed on a cache with room for every replay
    double tg = -1;
    try {
      MixCache gc(pat, batch, H, D, D, ctx + 4096, torch::kBFloat16, torch::kCUDA);
      gc.skip_to(ctx);
      c10::cuda::CUDAStreamGuard sg(c10::cuda::getStreamFromPool());
      gc.step(q, k, v);  // uploads the state outside the capture
      gc.step(q, k, v);
      at::cuda::CUDAGraph graph;
      graph.capture_begin();
      gc.step(q, k, v);
      gc.step(q, k, v);
      graph.capture_end();
      tg = time_ms([&] { graph.replay(); }, 200, 5) / 2;
    } catch (const std::exception& e) {
      std::printf("decode graph capture failed: %s\n", e.what());
    }
    char buf[240];
    std::snprintf(buf, sizeof buf,
                  "decode %-12s batch %ld ctx %8ld H %ld D %ld  step %7.4f ms (whole MixCache::step)  in a graph %7.4f ms  cache %.2f MB%s",
                  spec.c_str(), (long)batch, (long)ctx, (long)H, (long)D, t, tg, cache.bytes() / 1e6,
                  sdpa >= 0 ? ("  SDPA on a KV cache " + std::to_string(sdpa).substr(0, 6) + " ms").c_str() : "");
    std::printf("%s\n", buf);
    g_summary.push_back(buf);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 2;
  }
  if (argc == 7 && std::string(argv[1]) == "--one") {
    // one forward + backward of a shape (bf16), for a profiler: gpu_check --one SPEC B T H D
    const int64_t B = std::stol(argv[3]), T = std::stol(argv[4]), H = std::stol(argv[5]), D = std::stol(argv[6]);
    auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
    Tensor q = torch::randn({B, T, H, D}, bf).requires_grad_(), k = torch::randn({B, T, H, D}, bf).requires_grad_(),
           v = torch::randn({B, T, H, D}, bf).requires_grad_(), dy = torch::randn({B, T, H, D}, bf);
    for (int r = 0; r < 2; ++r) {
      Tensor y = mix(q, k, v, argv[2]);
      torch::autograd::grad({y}, {q, k, v}, {dy});
    }
    torch::cuda::synchronize();
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--dense") {
    // only the dense form: its checks and its timing against the generic kernel
    torch::manual_seed(std::random_device{}());
    dense_form_checks();
    std::printf("correctness: %d passed, %d failed\n", g_pass, g_fail);
    bench_dense_form(64, 256, 2, 64);
    bench_dense_form(8, 1024, 8, 64);
    for (auto& l : g_summary) std::printf("%s\n", l.c_str());
    return g_fail ? 1 : 0;
  }
  const bool bench = !(argc > 1 && std::string(argv[1]) == "--check-only");
  // --decode: only the decode checks and the decode benchmark
  const bool decode_only = argc > 1 && std::string(argv[1]) == "--decode";
  torch::manual_seed(std::random_device{}());
  const std::vector<std::string> specs = {"attention", "local:3", "first-order", "recurrence:3", "dense", "pow2", "sq1", "pow2-lattice",
                                          "sq1-lattice", "f:1,3,9", "f:2*k+1-lattice", "A=local:3;B=pow2", "A=attention;B=sq1-lattice"};
  for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
    if (decode_only) break;
    for (const auto& s : specs) {
      for (std::string mode : {"softmax", "gate"}) {
        check_case({s, mode, 2, 29, 2, 5, 3, false, 1.0, {}}, dt);
        check_case({s, mode, 1, 200, 2, 64, 64, true, 0.9, {}}, dt);  // several chunks, T not a multiple of 64
        check_case({s, mode, 1, 0, 2, 8, 8, true, 1.0, {5, 1, 23, 0, 11, 130}}, dt);
      }
      check_case({s, "softmax", 1, 1, 1, 4, 4, true, 1.0, {}}, dt);     // T = 1
      check_case({s, "softmax", 1, 37, 3, 12, 10, true, 0.7, {}}, dt);  // odd sizes
    }
    for (const char* s : {"pow2", "sq1-lattice", "pow2-lattice", "sq1"})
      check_case({s, "softmax", 1, 1500, 2, 32, 32, false, 1.0, {}}, dt);  // long: far taps, lattice runs
  }
  // the chunked solver has two chains and three layouts of one, chosen by size: the same cases
  // again with the 512-thread chain forced (small problems take the 4-channel one)
  setenv("TOKMIX_CUDA_VARIANT", "1", 1);
  std::printf("-- again with the 512-thread chain forced (TOKMIX_CUDA_VARIANT=1)\n");
  for (auto dt : {torch::kFloat32, torch::kBFloat16})
    for (const char* s : {"first-order", "recurrence:3", "pow2", "sq1", "pow2-lattice", "sq1-lattice", "f:1,3,9", "f:2*k+1-lattice"}) {
      if (decode_only) break;
      for (std::string mode : {"softmax", "gate"}) {
        check_case({s, mode, 1, 200, 2, 64, 64, true, 0.9, {}}, dt);
        check_case({s, mode, 1, 0, 2, 8, 8, true, 1.0, {5, 1, 23, 0, 11, 130}}, dt);
      }
      check_case({s, "softmax", 1, 1, 1, 4, 4, true, 1.0, {}}, dt);
      check_case({s, "softmax", 1, 1500, 2, 32, 32, false, 1.0, {}}, dt);
    }
  unsetenv("TOKMIX_CUDA_VARIANT");
  for (const auto& s : specs)
    for (std::string mode : {"softmax", "gate"})
      for (int64_t pf : {0L, 1L, 33L}) check_decode(s, mode, pf);
  // long lattice decodes: many evictions and slot reuses of the device-side slot table
  for (const char* s : {"pow2-lattice", "sq1-lattice", "f:2*k+1-lattice"})
    for (int64_t pf : {0L, 257L}) check_decode(s, "softmax", pf, 700);
  // rows longer than one decode block: the split (flash-decoding) path, attention and dense B
  for (const char* s : {"attention", "dense", "A=attention;B=pow2"})
    for (std::string mode : {"softmax", "gate"}) {
      check_decode(s, mode, 0, 1100);
      check_decode(s, mode, 1250, 1300);
    }
  for (const char* s : {"pow2-lattice", "pow2", "first-order", "attention"}) check_decode_nan(s);
  for (const char* s : {"pow2", "sq1-lattice", "attention"})
    for (auto dt : {torch::kFloat32, torch::kBFloat16})
      if (!decode_only) check_mix_nan(s, dt);
  if (!decode_only) dense_form_checks();
  std::printf("correctness: %d passed, %d failed\n", g_pass, g_fail);
  if (decode_only) {
    bench_decode("pow2-lattice");
    bench_decode("attention");
  } else if (bench) {
    bench_shape(4, 4096, 16, 64);
    bench_shape(2, 16384, 16, 128);
    bench_shape(1, 65536, 16, 64);
    bench_dense_solve();
    bench_decode("pow2-lattice");
    bench_decode("attention");
  }
  // the card that ran them, not the one the targets were written for
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  std::printf("\n==== summary (bf16, %s; median CUDA-event times) ====\n", prop->name);
  for (auto& l : g_summary) std::printf("%s\n", l.c_str());
  std::printf("correctness: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
