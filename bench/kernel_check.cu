// Kernel-level check and timing of the CUDA mixing op without LibTorch: the CUDA kernels against
// the CPU kernels in float64 on the same (rounded) inputs, fresh random values each run, then
// forward and backward times of the chunked solver at the benchmark shapes, for each variant
// that TOKMIX_CUDA_VARIANT / TOKMIX_CHAIN_G select. Built and run by scripts/kernel-check.sh;
// scripts/gpu-check.sh remains the check of the whole op (autograd, decode, SDPA beside it).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifndef TOKMIX_WITH_CUDA
#define TOKMIX_WITH_CUDA
#endif
#include "tokmix/kernels.h"
#include "tokmix/pattern.h"

using namespace tokmix;
using namespace tokmix::kernels;

namespace {

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

int g_pass = 0, g_fail = 0;
std::mt19937_64 g_rng(std::random_device{}());

uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// A host array of values exactly representable in the device type.
struct Arr {
  std::vector<double> h;
  bool bf = false;
  void* d = nullptr;
  size_t esize() const { return bf ? 2 : 4; }
  void fill(size_t n, double sd, bool bf16) {
    bf = bf16;
    std::normal_distribution<double> nd(0.0, sd);
    h.resize(n);
    for (auto& x : h) {
      const float f = static_cast<float>(nd(g_rng));
      x = bf ? from_bf16(to_bf16(f)) : f;
    }
  }
  void upload() {
    if (h.empty()) return;
    CK(cudaMalloc(&d, h.size() * esize()));
    if (bf) {
      std::vector<uint16_t> b(h.size());
      for (size_t i = 0; i < h.size(); ++i) b[i] = to_bf16(static_cast<float>(h[i]));
      CK(cudaMemcpy(d, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    } else {
      std::vector<float> f(h.begin(), h.end());
      CK(cudaMemcpy(d, f.data(), f.size() * 4, cudaMemcpyHostToDevice));
    }
  }
  void alloc(size_t n, bool bf16) {
    bf = bf16;
    h.assign(n, 0.0);
    CK(cudaMalloc(&d, std::max<size_t>(1, n) * esize()));
    CK(cudaMemset(d, 0xff, std::max<size_t>(1, n) * esize()));  // poison: NaN in both types
  }
  std::vector<double> download() const {
    std::vector<double> r(h.size());
    if (bf) {
      std::vector<uint16_t> b(h.size());
      CK(cudaMemcpy(b.data(), d, b.size() * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < b.size(); ++i) r[i] = from_bf16(b[i]);
    } else {
      std::vector<float> f(h.size());
      CK(cudaMemcpy(f.data(), d, f.size() * 4, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < f.size(); ++i) r[i] = f[i];
    }
    return r;
  }
  ~Arr() {
    if (d) cudaFree(d);
  }
};

double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::max(num, std::fabs(got[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return num / den;
}

struct DevPattern {
  std::vector<void*> bufs;
  PatternDesc d;
  explicit DevPattern(const Pattern& p) {
    d = p.desc();
    auto up = [&](const int64_t*& ptr, const std::vector<int64_t>& x) {
      if (!ptr) return;
      void* b;
      CK(cudaMalloc(&b, std::max<size_t>(1, x.size()) * 8));
      CK(cudaMemcpy(b, x.data(), x.size() * 8, cudaMemcpyHostToDevice));
      bufs.push_back(b);
      ptr = static_cast<const int64_t*>(b);
    };
    up(d.A.f, p.A().seq.f);
    up(d.A.a, p.A().a);
    up(d.B.f, p.B().seq.f);
    up(d.B.a, p.B().a);
  }
  ~DevPattern() {
    for (void* b : bufs) cudaFree(b);
  }
};

struct Case {
  std::string spec, mode;
  int64_t B, T, H, Dk, Dv;
  bool bias;
  double gamma;
  std::vector<int64_t> lens;
};

void check_case(const Case& c, bool bf) {
  const Pattern pat = Pattern::parse(c.spec);
  int64_t T = c.T;
  std::vector<int64_t> cu;
  if (!c.lens.empty()) {
    cu.push_back(0);
    for (auto l : c.lens) cu.push_back(cu.back() + l);
    T = cu.back();
  }
  const int64_t maxlen = c.lens.empty() ? T : *std::max_element(c.lens.begin(), c.lens.end());
  const int64_t L = pat.num_levels(std::max<int64_t>(maxlen, 1)) + 1;
  const bool gate = c.mode == "gate";
  MixProblem pb;
  pb.batch = c.B;
  pb.T = T;
  pb.H = c.H;
  pb.Dk = c.Dk;
  pb.Dv = c.Dv;
  pb.cu_seqlens = cu.empty() ? nullptr : cu.data();
  pb.num_seqs = cu.empty() ? 0 : static_cast<int64_t>(cu.size()) - 1;
  pb.sq = pb.sk = {T * c.H * c.Dk, c.H * c.Dk, c.Dk};
  pb.sv = pb.sy = {T * c.H * c.Dv, c.H * c.Dv, c.Dv};
  pb.mode = gate ? Mode::Gate : Mode::Softmax;
  pb.scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
  pb.gamma = c.gamma;
  pb.levels = (c.bias || gate) ? L : 0;
  const size_t nk = c.B * T * c.H * c.Dk, nv = c.B * T * c.H * c.Dv;
  const int64_t units = pb.num_units();
  Arr q, k, v, dy, bias, gw;
  q.fill(nk, 1.0, bf);
  k.fill(nk, 1.0, bf);
  v.fill(nv, 1.0, bf);
  dy.fill(nv, 1.0, bf);
  if (c.bias) bias.fill(c.H * L, 1.0, bf);
  if (gate) gw.fill(c.H * L * c.Dk, 0.5, bf);
  const double* kref = gate ? q.h.data() : k.h.data();
  // reference
  std::vector<double> y(nv), lse(units * std::max<int64_t>(T, 1)), dq(nk, 0.0), dk(nk, 0.0), dv(nv, 0.0), db(units * std::max<int64_t>(L, 1), 0.0),
      dg(units * L * c.Dk, 0.0);
  mix_forward_cpu<double>(pat.desc(), pb, q.h.data(), kref, v.h.data(), c.bias ? bias.h.data() : nullptr, gate ? gw.h.data() : nullptr,
                          y.data(), lse.data());
  // device
  q.upload();
  k.upload();
  v.upload();
  dy.upload();
  bias.upload();
  gw.upload();
  DevPattern dp(pat);
  CudaMix m;
  m.host_pat = pat.desc();
  m.dev_pat = dp.d;
  m.pb = pb;
  m.max_seq = maxlen;
  m.nbl = pat.num_B_levels(std::max<int64_t>(maxlen, 1));
  m.dtype = bf ? DType::BF16 : DType::F32;
  m.stream = nullptr;
  Arr gy, gdq, gdk, gdv;
  gy.alloc(nv, bf);
  gdq.alloc(nk, bf);
  gdk.alloc(nk, bf);
  gdv.alloc(nv, bf);
  float *glse, *gdb = nullptr, *gdg = nullptr;
  CK(cudaMalloc(&glse, sizeof(float) * c.B * c.H * std::max<int64_t>(T, 1)));
  if (c.bias) {
    CK(cudaMalloc(&gdb, sizeof(float) * units * L));
    CK(cudaMemset(gdb, 0, sizeof(float) * units * L));
  }
  if (gate) {
    CK(cudaMalloc(&gdg, sizeof(float) * units * L * c.Dk));
    CK(cudaMemset(gdg, 0, sizeof(float) * units * L * c.Dk));
  }
  void *ws, *tab;
  const int64_t wsb = std::max(mix_cuda_workspace_bytes(m, false), mix_cuda_workspace_bytes(m, true));
  CK(cudaMalloc(&ws, wsb));
  CK(cudaMalloc(&tab, std::max<int64_t>(1, mix_cuda_saved_bytes(m))));
  const void* kd = gate ? q.d : k.d;
  int32_t f1 = 0, f2 = 0;
  if (T > 0) {
    f1 = mix_forward_cuda(m, q.d, kd, v.d, bias.d, gw.d, gy.d, glse, ws, tab);
    f2 = mix_backward_cuda(m, q.d, kd, v.d, bias.d, gw.d, gy.d, glse, dy.d, gdq.d, gate ? nullptr : gdk.d, gdv.d, gdb, gdg, ws, tab);
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  // The reference backward reads the output as the device stored it (bfloat16: rounded), so
  // that the gradients check the backward kernels and not the rounding of y: sums over many
  // rows such as the level-bias gradient cancel, and would magnify it past any fixed tolerance.
  const std::vector<double> ydev = T > 0 ? gy.download() : y;
  mix_backward_cpu<double>(pat.desc(), pb, q.h.data(), kref, v.h.data(), c.bias ? bias.h.data() : nullptr, gate ? gw.h.data() : nullptr,
                           ydev.data(), lse.data(), dy.h.data(), dq.data(), gate ? nullptr : dk.data(), dv.data(), c.bias ? db.data() : nullptr,
                           gate ? dg.data() : nullptr);
  std::vector<std::pair<const char*, double>> errs;
  if (T > 0) {
    errs.push_back({"y", rel_err(ydev, y)});
    errs.push_back({"dq", rel_err(gdq.download(), dq)});
    errs.push_back({"dv", rel_err(gdv.download(), dv)});
    if (!gate) errs.push_back({"dk", rel_err(gdk.download(), dk)});
    auto sum_units = [&](const float* dptr, int64_t per_h) {
      std::vector<float> u(units * per_h);
      CK(cudaMemcpy(u.data(), dptr, u.size() * 4, cudaMemcpyDeviceToHost));
      std::vector<double> got(c.H * per_h, 0.0), ref(c.H * per_h, 0.0);
      return std::make_pair(u, got);
    };
    if (c.bias) {
      auto pr = sum_units(gdb, L);
      std::vector<double> got(c.H * L, 0.0), ref(c.H * L, 0.0);
      for (int64_t un = 0; un < units; ++un)
        for (int64_t l = 0; l < L; ++l) {
          got[(un % c.H) * L + l] += pr.first[un * L + l];
          ref[(un % c.H) * L + l] += db[un * L + l];
        }
      errs.push_back({"dbias", rel_err(got, ref)});
    }
    if (gate) {
      auto pr = sum_units(gdg, L * c.Dk);
      std::vector<double> got(c.H * L * c.Dk, 0.0), ref(c.H * L * c.Dk, 0.0);
      for (int64_t un = 0; un < units; ++un)
        for (int64_t l = 0; l < L * c.Dk; ++l) {
          got[(un % c.H) * L * c.Dk + l] += pr.first[un * L * c.Dk + l];
          ref[(un % c.H) * L * c.Dk + l] += dg[un * L * c.Dk + l];
        }
      errs.push_back({"dgate", rel_err(got, ref)});
    }
  }
  const double tol_f = bf ? 1e-2 : 1e-4, tol_b = bf ? 2e-2 : 5e-4;
  bool ok = f1 <= 0 && f2 <= 0;  // no input is non-finite here
  std::string msg;
  char buf[64];
  for (size_t i = 0; i < errs.size(); ++i) {
    const bool pass = errs[i].second <= (i == 0 ? tol_f : tol_b);
    ok = ok && pass;
    std::snprintf(buf, sizeof buf, " %s=%.2e%s", errs[i].first, errs[i].second, pass ? "" : "(FAIL)");
    msg += buf;
  }
  std::printf("%s %s %s %s B%ld T%ld H%ld Dk%ld Dv%ld%s%s flags %d/%d:%s\n", ok ? "PASS" : "FAIL", c.spec.c_str(), c.mode.c_str(),
              bf ? "bf16" : "fp32", (long)c.B, (long)T, (long)c.H, (long)c.Dk, (long)c.Dv, c.bias ? " bias" : "", c.lens.empty() ? "" : " packed",
              f1, f2, msg.c_str());
  (ok ? g_pass : g_fail)++;
  cudaFree(glse);
  if (gdb) cudaFree(gdb);
  if (gdg) cudaFree(gdg);
  cudaFree(ws);
  cudaFree(tab);
}

// NaN in one input: the kernels must report it (bit per input), never pass it silently.
void check_nan_flags(const std::string& spec, bool bf) {
  const Pattern pat = Pattern::parse(spec);
  const int64_t B = 1, T = 300, H = 2, D = 64;
  for (int which = 0; which < 4; ++which) {
    MixProblem pb;
    pb.batch = B;
    pb.T = T;
    pb.H = H;
    pb.Dk = pb.Dv = D;
    pb.sq = pb.sk = pb.sv = pb.sy = {T * H * D, H * D, D};
    pb.scale = 0.125;
    Arr q, k, v, dy;
    q.fill(B * T * H * D, 1, bf);
    k.fill(B * T * H * D, 1, bf);
    v.fill(B * T * H * D, 1, bf);
    dy.fill(B * T * H * D, 1, bf);
    Arr* tgt[] = {&q, &k, &v, &dy};
    tgt[which]->h[(std::uniform_int_distribution<int64_t>(0, B * T * H * D - 1))(g_rng)] = NAN;
    q.upload();
    k.upload();
    v.upload();
    dy.upload();
    DevPattern dp(pat);
    CudaMix m;
    m.host_pat = pat.desc();
    m.dev_pat = dp.d;
    m.pb = pb;
    m.max_seq = T;
    m.nbl = pat.num_B_levels(T);
    m.dtype = bf ? DType::BF16 : DType::F32;
    Arr y, dq, dk, dv;
    y.alloc(B * T * H * D, bf);
    dq.alloc(B * T * H * D, bf);
    dk.alloc(B * T * H * D, bf);
    dv.alloc(B * T * H * D, bf);
    float* lse;
    CK(cudaMalloc(&lse, sizeof(float) * B * H * T));
    void *ws, *tab;
    CK(cudaMalloc(&ws, std::max(mix_cuda_workspace_bytes(m, false), mix_cuda_workspace_bytes(m, true))));
    CK(cudaMalloc(&tab, std::max<int64_t>(1, mix_cuda_saved_bytes(m))));
    const int32_t f1 = mix_forward_cuda(m, q.d, k.d, v.d, nullptr, nullptr, y.d, lse, ws, tab);
    const int32_t f2 = mix_backward_cuda(m, q.d, k.d, v.d, nullptr, nullptr, y.d, lse, dy.d, dq.d, dk.d, dv.d, nullptr, nullptr, ws, tab);
    CK(cudaDeviceSynchronize());
    const bool ok = which < 3 ? (f1 & (1 << which)) != 0 : (f2 & 8) != 0;
    std::printf("%s NaN in %s (%s %s): forward flags %d, backward flags %d\n", ok ? "PASS" : "FAIL", which == 0 ? "q" : which == 1 ? "k" : which == 2 ? "v" : "dy",
                spec.c_str(), bf ? "bf16" : "fp32", f1, f2);
    (ok ? g_pass : g_fail)++;
    cudaFree(lse);
    cudaFree(ws);
    cudaFree(tab);
  }
}

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void bench(const std::string& spec, int64_t B, int64_t T, int64_t H, int64_t D, const char* label) {
  const Pattern pat = Pattern::parse(spec);
  MixProblem pb;
  pb.batch = B;
  pb.T = T;
  pb.H = H;
  pb.Dk = pb.Dv = D;
  pb.sq = pb.sk = pb.sv = pb.sy = {T * H * D, H * D, D};
  pb.scale = 1.0 / std::sqrt(static_cast<double>(D));
  const size_t n = B * T * H * D;
  std::vector<uint16_t> hb(n);
  std::normal_distribution<float> nd;
  void *q, *k, *v, *dy, *y, *dq, *dk, *dv, *ws;
  for (void** p : {&q, &k, &v, &dy}) {
    for (auto& x : hb) x = to_bf16(nd(g_rng));
    CK(cudaMalloc(p, n * 2));
    CK(cudaMemcpy(*p, hb.data(), n * 2, cudaMemcpyHostToDevice));
  }
  for (void** p : {&y, &dq, &dk, &dv}) CK(cudaMalloc(p, n * 2));
  float* lse;
  CK(cudaMalloc(&lse, sizeof(float) * B * H * T));
  DevPattern dp(pat);
  CudaMix m;
  m.host_pat = pat.desc();
  m.dev_pat = dp.d;
  m.pb = pb;
  m.max_seq = T;
  m.nbl = pat.num_B_levels(T);
  m.dtype = DType::BF16;
  const int64_t wsf = mix_cuda_workspace_bytes(m, false), wsb = mix_cuda_workspace_bytes(m, true), tbytes = mix_cuda_saved_bytes(m);
  CK(cudaMalloc(&ws, std::max(wsf, wsb)));
  void* tab;
  CK(cudaMalloc(&tab, std::max<int64_t>(1, tbytes)));
  cudaEvent_t e0, e1, e2;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventCreate(&e2));
  std::vector<float> tf, tb;
  for (int r = 0; r < 12; ++r) {
    CK(cudaEventRecord(e0));
    mix_forward_cuda(m, q, k, v, nullptr, nullptr, y, lse, ws, tab);
    CK(cudaEventRecord(e1));
    mix_backward_cuda(m, q, k, v, nullptr, nullptr, y, lse, dy, dq, dk, dv, nullptr, nullptr, ws, tab);
    CK(cudaEventRecord(e2));
    CK(cudaEventSynchronize(e2));
    float a, b;
    CK(cudaEventElapsedTime(&a, e0, e1));
    CK(cudaEventElapsedTime(&b, e1, e2));
    if (r >= 2) {
      tf.push_back(a);
      tb.push_back(b);
    }
  }
  CK(cudaGetLastError());
  const double floor_ms = 4.0 * n * 2 / 4.3e12 * 1e3;
  const double f = median(tf), b = median(tb);
  std::printf("%-12s %-16s (%ld,%6ld,%ld,%3ld) fwd %7.3f ms  bwd %7.3f ms  fwd+bwd %7.3f ms  fwd/io-floor %5.1fx  ws fwd %.0f MB bwd %.0f MB tables %.0f MB\n",
              spec.c_str(), label, (long)B, (long)T, (long)H, (long)D, f, b, f + b, f / floor_ms, wsf / 1e6, wsb / 1e6, tbytes / 1e6);
  for (void* p : {q, k, v, dy, y, dq, dk, dv, ws, tab}) cudaFree(p);
  cudaFree(lse);
}

}  // namespace

// One forward + backward (twice) of a bf16 shape, for a profiler: --one SPEC B T H D
// (--checks-only: the checks without the timings; --bench-only: the timings alone)
void one(const std::string& spec, int64_t B, int64_t T, int64_t H, int64_t D) {
  const Pattern pat = Pattern::parse(spec);
  MixProblem pb;
  pb.batch = B;
  pb.T = T;
  pb.H = H;
  pb.Dk = pb.Dv = D;
  pb.sq = pb.sk = pb.sv = pb.sy = {T * H * D, H * D, D};
  pb.scale = 1.0 / std::sqrt(static_cast<double>(D));
  const size_t n = B * T * H * D;
  std::vector<uint16_t> hb(n);
  std::normal_distribution<float> nd;
  void *q, *k, *v, *dy, *y, *dq, *dk, *dv, *ws;
  for (void** p : {&q, &k, &v, &dy}) {
    for (auto& x : hb) x = to_bf16(nd(g_rng));
    CK(cudaMalloc(p, n * 2));
    CK(cudaMemcpy(*p, hb.data(), n * 2, cudaMemcpyHostToDevice));
  }
  for (void** p : {&y, &dq, &dk, &dv}) CK(cudaMalloc(p, n * 2));
  float* lse;
  CK(cudaMalloc(&lse, sizeof(float) * B * H * T));
  DevPattern dp(pat);
  CudaMix m;
  m.host_pat = pat.desc();
  m.dev_pat = dp.d;
  m.pb = pb;
  m.max_seq = T;
  m.nbl = pat.num_B_levels(T);
  m.dtype = DType::BF16;
  CK(cudaMalloc(&ws, std::max(mix_cuda_workspace_bytes(m, false), mix_cuda_workspace_bytes(m, true))));
  void* tab;
  CK(cudaMalloc(&tab, std::max<int64_t>(1, mix_cuda_saved_bytes(m))));
  for (int r = 0; r < 2; ++r) {
    mix_forward_cuda(m, q, k, v, nullptr, nullptr, y, lse, ws, tab);
    mix_backward_cuda(m, q, k, v, nullptr, nullptr, y, lse, dy, dq, dk, dv, nullptr, nullptr, ws, tab);
  }
  CK(cudaDeviceSynchronize());
}

int main(int argc, char** argv) {
  if (argc == 7 && std::string(argv[1]) == "--one") {
    one(argv[2], std::stol(argv[3]), std::stol(argv[4]), std::stol(argv[5]), std::stol(argv[6]));
    return 0;
  }
  const bool check = !(argc > 1 && std::string(argv[1]) == "--bench-only");
  const bool bench_too = !(argc > 1 && std::string(argv[1]) == "--checks-only");
  const auto t_start = std::chrono::steady_clock::now();
  // default selection (superchunk chains where they serve), then the 64-row chains forced: the
  // (4, 1) and (2, 2) layouts, and the 512-thread chain with the v12 row passes (no slab passes,
  // no tensor-core product); pass = (TOKMIX_CUDA_VARIANT, TOKMIX_CHAIN_G). 64 and 128: the
  // superchunk chains with M2 fetched per thread, with coefficients fetched 4 bytes at a time (v14h).
  const std::pair<const char*, const char*> passes[] = {{"0", ""}, {"64", ""}, {"128", ""}, {"16", "4"}, {"16", "2"}, {"29", ""}};
  // KC_PASSES (e.g. "0,64"): only those passes, by their TOKMIX_CUDA_VARIANT value
  const char* only = std::getenv("KC_PASSES");
  for (const auto& pass : passes) {
    if (!check) break;
    if (only && ("," + std::string(only) + ",").find("," + std::string(pass.first) + ",") == std::string::npos) continue;
    setenv("TOKMIX_CUDA_VARIANT", pass.first, 1);
    if (*pass.second) setenv("TOKMIX_CHAIN_G", pass.second, 1);
    else unsetenv("TOKMIX_CHAIN_G");
    std::printf("-- checks with TOKMIX_CUDA_VARIANT=%s TOKMIX_CHAIN_G=%s\n", pass.first, pass.second);
    const char* specs[] = {"pow2", "sq1", "pow2-lattice", "sq1-lattice", "first-order", "recurrence:3", "f:1,3,9", "f:2*k+1-lattice", "attention"};
    for (bool bf : {false, true}) {
      for (const char* s : specs) {
        for (const char* mode : {"softmax", "gate"}) {
          check_case({s, mode, 2, 29, 2, 5, 3, false, 1.0, {}}, bf);
          check_case({s, mode, 1, 200, 2, 64, 64, true, 0.9, {}}, bf);
          check_case({s, mode, 1, 0, 2, 8, 8, true, 1.0, {5, 1, 23, 0, 11, 130}}, bf);
          check_case({s, mode, 1, 333, 2, 128, 128, true, 0.95, {}}, bf);
        }
        check_case({s, "softmax", 1, 1, 1, 4, 4, true, 1.0, {}}, bf);
        check_case({s, "softmax", 1, 37, 3, 12, 12, true, 0.7, {}}, bf);
        check_case({s, "softmax", 1, 150, 2, 32, 20, true, 0.8, {}}, bf);
        check_case({s, "softmax", 1, 0, 2, 16, 16, false, 1.0, {300, 64, 1, 129}}, bf);
        check_case({s, "softmax", 1, 0, 2, 64, 64, true, 0.9, {300, 64, 1, 129}}, bf);  // packed, slab widths
      }
      for (const char* s : {"pow2", "sq1-lattice", "pow2-lattice", "sq1"}) check_case({s, "softmax", 1, 1500, 2, 32, 32, false, 1.0, {}}, bf);
      // sq1 at T = 700: 28 entries a row, the slab passes' 32-entry form at D = 64
      for (const char* s : {"sq1", "f:1,2,3,5,8,13,21,34,55,89,144,233,377,610"}) check_case({s, "softmax", 2, 700, 2, 64, 64, true, 1.0, {}}, bf);
      // superchunk chains (v14) at their boundaries: T a multiple of 256, no level inside a
      // superchunk (f >= 256), many steps (the double-buffered M2 flips 20 times), packed
      // sequences of 256 and 512 rows beside odd ones
      check_case({"pow2", "softmax", 1, 512, 2, 64, 64, true, 1.0, {}}, bf);
      check_case({"f:300,600", "softmax", 1, 1100, 2, 16, 16, false, 1.0, {}}, bf);
      check_case({"pow2", "softmax", 1, 5000, 2, 64, 64, false, 0.9, {}}, bf);
      check_case({"pow2", "softmax", 1, 0, 2, 64, 64, true, 1.0, {512, 256, 300, 1, 767}}, bf);
      for (const char* s : {"pow2", "sq1-lattice"}) check_nan_flags(s, bf);
    }
    std::printf("kernel check: %d passed, %d failed (%.1f s)\n", g_pass, g_fail, std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
    unsetenv("TOKMIX_CHAIN_G");
    unsetenv("TOKMIX_CUDA_VARIANT");
  }
  struct V {
    const char* env_variant;
    const char* env_g;
    const char* label;
  };
  const V variants[] = {{"0", "", "auto (v14 superchunks)"}, {"64", "", "v14h, M2 per thread"}, {"128", "", "v14h, coef 4 B"},
                        {"16", "", "v13 chains"}, {"28", "", "v12 passes+product"}};
  const int64_t shapes[][4] = {{4, 4096, 16, 64}, {2, 16384, 16, 128}, {1, 65536, 16, 64}};
  for (const auto& sh : shapes)
    for (const char* spec : {"pow2", "sq1-lattice"})
      for (const auto& var : variants) {
        if (!bench_too) break;
        if (std::string(spec) == "sq1-lattice" && (std::string(var.env_g).size() || std::string(var.env_variant) != "0")) continue;
        setenv("TOKMIX_CUDA_VARIANT", var.env_variant, 1);
        if (*var.env_g) setenv("TOKMIX_CHAIN_G", var.env_g, 1); else unsetenv("TOKMIX_CHAIN_G");
        bench(spec, sh[0], sh[1], sh[2], sh[3], var.label);
      }
  unsetenv("TOKMIX_CUDA_VARIANT");
  unsetenv("TOKMIX_CHAIN_G");
  if (check) std::printf("kernel check: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
