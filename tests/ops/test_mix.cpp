// The mixing op against a float64 dense reference (materialise A and B, solve (I - B) Y = A X),
// forward and backward, on every instance and both coefficient modes; the conformance vectors;
// packed batches; decoding against the parallel form; bad input.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <ATen/autocast_mode.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "tokmix/mix.h"

using namespace tokmix;
using torch::Tensor;

namespace {

const std::vector<std::string> kSpecs = {"attention",    "local:3",     "first-order", "recurrence:3", "dense",
                                         "pow2",         "sq1",         "pow2-lattice", "sq1-lattice", "f:1,3,9",
                                         "f:2*k+1-lattice", "A=local:3;B=pow2", "A=attention;B=sq1-lattice"};

uint64_t fresh_seed() {
  static std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

// Dense reference for one sequence [T, H, D] (float64, differentiable through LibTorch).
Tensor reference_seq(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p, const MixOptions& o) {
  const int64_t T = q.size(0), H = q.size(1), Dk = q.size(2);
  auto bo = torch::TensorOptions().dtype(torch::kBool);
  auto lo = torch::TensorOptions().dtype(torch::kLong);
  Tensor MA = torch::zeros({T, T}, bo), MB = torch::zeros({T, T}, bo);
  Tensor LA = torch::zeros({T, T}, lo), LB = torch::zeros({T, T}, lo);
  for (int64_t i = 0; i < T; ++i) {
    for (auto& e : p.row_A(i)) {
      MA[i][e.pos] = true;
      LA[i][e.pos] = e.level;
    }
    for (auto& e : p.row_B(i)) {
      MB[i][e.pos] = true;
      LB[i][e.pos] = e.level;
    }
  }
  const double scale = o.scale < 0 ? 1.0 / std::sqrt(double(Dk)) : o.scale;
  std::vector<Tensor> ys;
  for (int64_t h = 0; h < H; ++h) {
    Tensor qh = q.select(1, h), kh = k.select(1, h), vh = v.select(1, h);
    Tensor SA, SB;
    if (o.mode == "softmax") {
      SA = SB = scale * torch::mm(qh, kh.t());
    } else {
      Tensor G = torch::mm(qh, o.gate_weight[h].t());  // [T, L]
      SA = G.gather(1, LA);
      SB = G.gather(1, LB);
    }
    if (o.bias.defined()) {
      SA = SA + o.bias[h].index({LA});
      SB = SB + o.bias[h].index({LB});
    }
    const double ninf = -std::numeric_limits<double>::infinity();
    Tensor logits = torch::cat({SA.masked_fill(MA.logical_not(), ninf), SB.masked_fill(MB.logical_not(), ninf)}, 1);
    Tensor P = torch::softmax(logits, 1);
    Tensor A = P.slice(1, 0, T), Bm = o.gamma * P.slice(1, T, 2 * T);
    Tensor I = torch::eye(T, q.options());
    ys.push_back(torch::linalg_solve_triangular(I - Bm, torch::mm(A, vh), /*upper=*/false));
  }
  return torch::stack(ys, 1);
}

Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p, const MixOptions& o) {
  std::vector<Tensor> out;
  if (o.cu_seqlens.defined()) {
    auto cu = o.cu_seqlens.to(torch::kLong);
    for (int64_t s = 0; s + 1 < cu.numel(); ++s) {
      int64_t a = cu[s].item<int64_t>(), b = cu[s + 1].item<int64_t>();
      out.push_back(reference_seq(q[0].slice(0, a, b), k[0].slice(0, a, b), v[0].slice(0, a, b), p, o));
    }
    return torch::cat(out, 0).unsqueeze(0);
  }
  for (int64_t b = 0; b < q.size(0); ++b) out.push_back(reference_seq(q[b], k[b], v[b], p, o));
  return torch::stack(out, 0);
}

double rel_err(const Tensor& a, const Tensor& b) {
  EXPECT_TRUE(torch::isfinite(a).all().item<bool>()) << "NaN/Inf in result";
  double den = b.abs().max().item<double>();
  return (a - b).abs().max().item<double>() / std::max(den, 1e-30);
}

struct Case {
  std::string spec, mode;
  int64_t B, T, H, Dk, Dv;
  bool bias;
  double gamma;
};

std::string name(const Case& c) {
  return c.spec + " " + c.mode + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " H" + std::to_string(c.H) + " Dk" +
         std::to_string(c.Dk) + " Dv" + std::to_string(c.Dv) + (c.bias ? " bias" : "") + " gamma" + std::to_string(c.gamma);
}

// Forward and every gradient of the op (or of its dense form) against the dense reference in float64.
void check_case(const Case& c, bool dense_form = false) {
  SCOPED_TRACE(name(c));
  torch::manual_seed(fresh_seed());
  auto d = torch::TensorOptions().dtype(torch::kFloat64);
  auto pat = pattern_from_spec(c.spec);
  const int64_t L = pat->num_levels(c.T) + 2;
  Tensor q = torch::randn({c.B, c.T, c.H, c.Dk}, d).requires_grad_();
  Tensor k = torch::randn({c.B, c.T, c.H, c.Dk}, d).requires_grad_();
  Tensor v = torch::randn({c.B, c.T, c.H, c.Dv}, d).requires_grad_();
  MixOptions o;
  o.mode = c.mode;
  o.gamma = c.gamma;
  if (c.bias) o.bias = torch::randn({c.H, L}, d).requires_grad_();
  if (c.mode == "gate") o.gate_weight = torch::randn({c.H, L, c.Dk}, d).requires_grad_();
  Tensor dy = torch::randn({c.B, c.T, c.H, c.Dv}, d);

  Tensor y = dense_form ? mix_dense(q, k, v, *pat, o) : mix(q, k, v, *pat, o);
  Tensor yr = reference(q, k, v, *pat, o);
  EXPECT_LT(rel_err(y, yr), 1e-11);
  std::vector<Tensor> inputs = {q, v};
  if (c.mode == "softmax") inputs.push_back(k);
  if (c.bias) inputs.push_back(o.bias);
  if (c.mode == "gate") inputs.push_back(o.gate_weight);
  auto g = torch::autograd::grad({y}, inputs, {dy});
  auto gr = torch::autograd::grad({yr}, inputs, {dy});
  for (size_t i = 0; i < inputs.size(); ++i) EXPECT_LT(rel_err(g[i], gr[i]), 1e-10) << "gradient of input " << i;
}

}  // namespace

TEST(Mix, EveryInstanceBothModesAgainstDenseReference) {
  for (const auto& s : kSpecs)
    for (std::string mode : {"softmax", "gate"}) {
      check_case({s, mode, 2, 29, 2, 5, 3, false, 1.0});
      check_case({s, mode, 1, 17, 1, 3, 6, true, 0.9});
    }
}

TEST(Mix, EdgeSizes) {
  for (const auto& s : kSpecs) {
    check_case({s, "softmax", 1, 1, 1, 4, 4, true, 1.0});   // T = 1
    check_case({s, "softmax", 3, 2, 2, 7, 5, false, 1.0});  // T = 2
    check_case({s, "softmax", 1, 37, 3, 12, 10, true, 0.7});  // prime T, D not a power of two
  }
}

TEST(Mix, DenseFormAgainstDenseReference) {
  // mix_dense builds its masks and levels on the device from distances; the reference reads them
  // from the pattern row by row. T = 300 reaches window levels 16..20 (distances 16..299).
  for (std::string s : {"attention", "local:5", "dense", "A=local:3;B=dense", "A=attention;B=dense", "A=local:40;B=dense"})
    for (std::string mode : {"softmax", "gate"}) {
      check_case({s, mode, 2, 29, 2, 5, 3, true, 1.0}, true);
      check_case({s, mode, 1, 1, 1, 4, 4, true, 0.9}, true);   // T = 1
      check_case({s, mode, 1, 300, 2, 6, 7, true, 0.8}, true);  // D not a power of two
      check_case({s, mode, 3, 17, 1, 3, 6, false, 1.0}, true);
    }
}

// The dense form computes in float32 whatever autocast says: with CPU autocast to bfloat16 on,
// its products would otherwise run in bfloat16 (errors ~1e-2).
TEST(Mix, DenseFormIgnoresAutocast) {
  torch::manual_seed(fresh_seed());
  auto pat = pattern_from_spec("dense");
  const int64_t T = 40, H = 2, D = 16;
  Tensor q = torch::randn({2, T, H, D}), k = torch::randn({2, T, H, D}), v = torch::randn({2, T, H, D});
  MixOptions o;
  o.bias = torch::randn({H, pat->num_levels(T)});
  Tensor plain = mix_dense(q, k, v, *pat, o);
  const auto was_dtype = at::autocast::get_autocast_cpu_dtype();
  auto cpu_autocast = [](bool on, at::ScalarType dt) {
#if TORCH_VERSION_MAJOR >= 2
    at::autocast::set_autocast_dtype(at::kCPU, dt);
    at::autocast::set_autocast_enabled(at::kCPU, on);
#else
    at::autocast::set_autocast_cpu_dtype(dt);
    at::autocast::set_cpu_enabled(on);
#endif
  };
  cpu_autocast(true, at::kBFloat16);
  Tensor mm = torch::matmul(q, k.transpose(-2, -1));  // autocast is on: a bfloat16 product
  Tensor under = mix_dense(q, k, v, *pat, o);
  cpu_autocast(false, was_dtype);
  at::autocast::clear_cache();
  ASSERT_EQ(mm.scalar_type(), torch::kBFloat16) << "CPU autocast did not take effect; the test proves nothing";
  EXPECT_EQ(under.scalar_type(), torch::kFloat32);
  EXPECT_LT(rel_err(under, plain), 1e-6);
}

TEST(Mix, WindowLevelsOnTensorsEqualWindowLevel) {
  const int64_t maxd = 70000;
  Tensor d = torch::arange(-3, maxd + 1, torch::kInt64);
  Tensor got = window_levels(d, maxd);
  for (int64_t i = 0; i < d.numel(); ++i) {
    const int64_t di = d[i].item<int64_t>();
    ASSERT_EQ(got[i].item<int64_t>(), di < 0 ? 0 : window_level(di)) << "distance " << di;
  }
}

TEST(Mix, DenseFormRefusesWhatItDoesNotServe) {
  auto d = torch::TensorOptions().dtype(torch::kFloat64);
  Tensor q = torch::randn({1, 8, 2, 4}, d);
  for (std::string s : {"pow2", "first-order", "sq1-lattice", "A=local:3;B=pow2"}) {
    EXPECT_FALSE(mix_dense_serves(*pattern_from_spec(s))) << s;
    try {
      mix_dense(q, q, q, *pattern_from_spec(s));
      ADD_FAILURE() << s << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("'" + s + "' is not one"), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(mix_dense_serves(*pattern_from_spec("dense")));
  EXPECT_EQ(mix_dense(q.narrow(1, 0, 0), q.narrow(1, 0, 0), q.narrow(1, 0, 0), *pattern_from_spec("dense")).size(1), 0) << "T = 0";
  MixOptions o;
  o.cu_seqlens = torch::tensor({0, 3, 8}, torch::kInt64);
  EXPECT_THROW(mix_dense(q, q, q, *pattern_from_spec("dense"), o), std::invalid_argument);
  Tensor bad = q.clone();
  bad[0][2][1][0] = std::numeric_limits<double>::quiet_NaN();
  try {
    mix_dense(q, q, bad, *pattern_from_spec("dense"));
    ADD_FAILURE() << "NaN in v accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("v contains NaN"), std::string::npos) << e.what();
  }
}

TEST(Mix, GradientsMatchFiniteDifferences) {
  // central differences on a few random coordinates, float64
  // pow2, first-order, recurrence:3, local:4 and the hybrid take the gathering backward, the others scatter
  for (const auto& s : {"pow2", "sq1-lattice", "A=local:3;B=pow2", "dense", "first-order", "recurrence:3", "local:4"}) {
    for (std::string mode : {"softmax", "gate"}) {
      SCOPED_TRACE(std::string(s) + " " + mode);
      torch::manual_seed(fresh_seed());
      auto d = torch::TensorOptions().dtype(torch::kFloat64);
      auto pat = pattern_from_spec(s);
      const int64_t T = 13, H = 2, D = 3, L = pat->num_levels(T);
      Tensor q = torch::randn({1, T, H, D}, d), k = torch::randn({1, T, H, D}, d), v = torch::randn({1, T, H, D}, d);
      Tensor bias = torch::randn({H, L}, d), gw = torch::randn({H, L, D}, d), dy = torch::randn({1, T, H, D}, d);
      std::vector<Tensor> ins = {q, k, v, bias, gw};
      auto loss = [&](const std::vector<Tensor>& x) {
        MixOptions o;
        o.mode = mode;
        o.gamma = 0.8;
        o.bias = x[3];
        if (mode == "gate") o.gate_weight = x[4];
        return (mix(x[0], x[1], x[2], *pat, o) * dy).sum();
      };
      std::vector<Tensor> req;
      for (auto& t : ins) req.push_back(t.clone().requires_grad_());
      auto grads = torch::autograd::grad({loss(req)}, req, {}, false, false, /*allow_unused=*/true);
      std::mt19937 rng(fresh_seed());
      for (size_t t = 0; t < ins.size(); ++t) {
        if ((mode == "gate" && t == 1) || (mode == "softmax" && t == 4)) continue;  // not read in that mode
        for (int r = 0; r < 6; ++r) {
          int64_t idx = rng() % ins[t].numel();
          const double h = 1e-6;
          auto plus = ins, minus = ins;
          plus[t] = ins[t].clone();
          minus[t] = ins[t].clone();
          plus[t].view(-1)[idx] += h;
          minus[t].view(-1)[idx] -= h;
          double fd = (loss(plus).item<double>() - loss(minus).item<double>()) / (2 * h);
          double an = grads[t].reshape(-1)[idx].item<double>();
          EXPECT_NEAR(an, fd, 1e-6 * std::max(1.0, std::abs(fd))) << "input " << t << " index " << idx;
        }
      }
    }
  }
}

TEST(Mix, ConformanceVectors) {
  std::ifstream f(std::string(TOKMIX_TESTDATA) + "/mix_vectors.json");
  ASSERT_TRUE(f.good()) << "missing tests/data/mix_vectors.json";
  nlohmann::json doc = nlohmann::json::parse(f);
  ASSERT_EQ(doc["cases"].size(), 11u);
  auto d = torch::TensorOptions().dtype(torch::kFloat64);
  auto to_t = [&](const nlohmann::json& j, int64_t B, int64_t T, int64_t H, int64_t D) {
    std::vector<double> flat;
    for (auto& b : j)
      for (auto& t : b)
        for (auto& h : t)
          for (auto& x : h) flat.push_back(x.get<double>());
    return torch::tensor(flat, d).view({B, T, H, D});
  };
  for (auto& c : doc["cases"]) {
    const std::string spec = c["pattern"];
    SCOPED_TRACE(spec);
    const int64_t B = c["B"], T = c["T"], H = c["H"], Dk = c["Dk"], Dv = c["Dv"];
    auto pat = pattern_from_spec(spec);
    // supports, 1-indexed
    for (auto& row : c["support_1indexed"]) {
      int64_t i = row["row"].get<int64_t>() - 1;
      std::vector<int64_t> sa, sb, wa = row["SA"], wb = row["SB"];
      for (auto& e : pat->row_A(i)) sa.push_back(e.pos + 1);
      for (auto& e : pat->row_B(i)) sb.push_back(e.pos + 1);
      std::sort(sa.begin(), sa.end());
      std::sort(sb.begin(), sb.end());
      std::sort(wa.begin(), wa.end());
      std::sort(wb.begin(), wb.end());
      EXPECT_EQ(sa, wa) << "SA row " << i + 1;
      EXPECT_EQ(sb, wb) << "SB row " << i + 1;
    }
    Tensor q = to_t(c["q"], B, T, H, Dk).requires_grad_(), k = to_t(c["k"], B, T, H, Dk).requires_grad_(),
           v = to_t(c["v"], B, T, H, Dv).requires_grad_();
    MixOptions o;
    o.scale = c["scale"];
    Tensor y = mix(q, k, v, *pat, o);
    auto g = torch::autograd::grad({y}, {q, k, v}, {to_t(c["dy"], B, T, H, Dv)});
    EXPECT_LT((y - to_t(c["y"], B, T, H, Dv)).abs().max().item<double>(), 1e-12);
    EXPECT_LT((g[0] - to_t(c["dq"], B, T, H, Dk)).abs().max().item<double>(), 1e-12);
    EXPECT_LT((g[1] - to_t(c["dk"], B, T, H, Dk)).abs().max().item<double>(), 1e-12);
    EXPECT_LT((g[2] - to_t(c["dv"], B, T, H, Dv)).abs().max().item<double>(), 1e-12);
  }
}

TEST(Mix, PackedBatchEqualsSequencesOneByOne) {
  for (const auto& s : kSpecs) {
    for (std::string mode : {"softmax", "gate"}) {
      SCOPED_TRACE(s + " " + mode);
      torch::manual_seed(fresh_seed());
      auto d = torch::TensorOptions().dtype(torch::kFloat64);
      auto pat = pattern_from_spec(s);
      std::vector<int64_t> lens = {5, 1, 23, 0, 11};
      std::vector<int64_t> cu = {0};
      for (auto l : lens) cu.push_back(cu.back() + l);
      const int64_t T = cu.back(), H = 2, D = 4, L = pat->num_levels(23);
      Tensor q = torch::randn({1, T, H, D}, d).requires_grad_(), k = torch::randn({1, T, H, D}, d).requires_grad_(),
             v = torch::randn({1, T, H, D}, d).requires_grad_();
      MixOptions o;
      o.mode = mode;
      o.bias = torch::randn({H, L}, d).requires_grad_();
      if (mode == "gate") o.gate_weight = torch::randn({H, L, D}, d).requires_grad_();
      MixOptions op = o;
      op.cu_seqlens = torch::tensor(cu, torch::kInt32);
      Tensor dy = torch::randn({1, T, H, D}, d);
      Tensor y = mix(q, k, v, *pat, op);
      std::vector<Tensor> ins = {q, k, v, o.bias};
      if (mode == "gate") ins.push_back(o.gate_weight);
      auto g = torch::autograd::grad({y}, ins, {dy}, false, false, true);
      std::vector<Tensor> parts;
      for (size_t i = 0; i < lens.size(); ++i) {
        if (lens[i] == 0) continue;
        parts.push_back(mix(q.slice(1, cu[i], cu[i + 1]), k.slice(1, cu[i], cu[i + 1]), v.slice(1, cu[i], cu[i + 1]), *pat, o));
      }
      Tensor y1 = torch::cat(parts, 1);
      auto g1 = torch::autograd::grad({y1}, ins, {dy}, false, false, true);
      EXPECT_LT(rel_err(y, y1), 1e-13);
      for (size_t i = 0; i < ins.size(); ++i)
        if (g[i].defined()) EXPECT_LT(rel_err(g[i], g1[i]), 1e-12) << "grad " << i;
      // and the packed batch against the dense reference
      EXPECT_LT(rel_err(y, reference(q, k, v, *pat, op)), 1e-11);
    }
  }
}

TEST(Mix, Float32MatchesFloat64) {
  for (const auto& s : kSpecs) {
    SCOPED_TRACE(s);
    torch::manual_seed(fresh_seed());
    auto pat = pattern_from_spec(s);
    Tensor q = torch::randn({2, 100, 3, 16}, torch::kFloat64), k = torch::randn_like(q), v = torch::randn_like(q);
    Tensor y64 = mix(q, k, v, *pat), y32 = mix(q.to(torch::kFloat32), k.to(torch::kFloat32), v.to(torch::kFloat32), *pat);
    EXPECT_EQ(y32.scalar_type(), torch::kFloat32);
    EXPECT_LT(rel_err(y32.to(torch::kFloat64), y64), 1e-5);
  }
}

TEST(Mix, Float32GradientsMatchFloat64) {
  // the float32 kernels (vector rows for head widths 16..128, the generic loops otherwise)
  // against float64, with bias and gamma, at lengths no block size divides and T = 1, both
  // coefficient modes
  for (const auto& s : kSpecs) {
    for (std::string mode : {"softmax", "gate"})
    for (auto shape : {std::vector<int64_t>{2, 100, 3, 16}, std::vector<int64_t>{1, 77, 2, 64}, std::vector<int64_t>{1, 1, 2, 64},
                       std::vector<int64_t>{1, 45, 2, 24}}) {
      SCOPED_TRACE(s + " " + mode + " T=" + std::to_string(shape[1]) + " D=" + std::to_string(shape[3]));
      torch::manual_seed(fresh_seed());
      auto pat = pattern_from_spec(s);
      const int64_t H = shape[2], L = pat->num_levels(shape[1]);
      auto d64 = torch::TensorOptions().dtype(torch::kFloat64);
      Tensor q = torch::randn(shape, d64), k = torch::randn(shape, d64), v = torch::randn(shape, d64), dy = torch::randn(shape, d64);
      Tensor bias = 0.3 * torch::randn({H, L}, d64), gw = torch::randn({H, L, shape[3]}, d64);
      auto grads = [&](torch::ScalarType t) {
        std::vector<Tensor> x = {q.to(t).requires_grad_(), v.to(t).requires_grad_(), bias.to(t).requires_grad_(),
                                 mode == "gate" ? gw.to(t).requires_grad_() : k.to(t).requires_grad_()};
        MixOptions o;
        o.mode = mode;
        o.gamma = 0.9;
        o.bias = x[2];
        if (mode == "gate") o.gate_weight = x[3];
        Tensor y = mix(x[0], mode == "gate" ? k.to(t) : x[3], x[1], *pat, o);
        return torch::autograd::grad({(y * dy.to(t)).sum()}, x);
      };
      auto g64 = grads(torch::kFloat64), g32 = grads(torch::kFloat32);
      for (size_t i = 0; i < g64.size(); ++i) {
        ASSERT_EQ(g32[i].scalar_type(), torch::kFloat32);
        EXPECT_TRUE(torch::isfinite(g32[i]).all().item<bool>()) << "gradient " << i;
        EXPECT_LT(rel_err(g32[i].to(torch::kFloat64), g64[i]), 2e-5) << "gradient " << i;
      }
    }
  }
}

TEST(Mix, BlockedOffsetsMatchFloat64) {
  // The float32 kernels in blocks of R rows (A = {i}, B = offsets, softmax; perf-notes v22), forced
  // here with small blocks, against float64, which always runs row by row: R = 1 (every B entry
  // far), blocks that do not divide T, packed sequences, bias and gamma, every head width the
  // blocks serve; then sq1 at T = 2048, where the forward and backward choose blocks themselves.
  struct Env {
    explicit Env(const char* r) { setenv("TOKMIX_CPU_BLOCK_ROWS", r, 1); }
    ~Env() { unsetenv("TOKMIX_CPU_BLOCK_ROWS"); }
  };
  for (const char* R : {"1", "7", "16", ""}) {
    Env env(R);
    if (!*R) unsetenv("TOKMIX_CPU_BLOCK_ROWS");  // the automatic choice
    for (std::string spec : {"sq1", "pow2", "f:1,3,9", "f:2,5,6,7,30"})
      for (auto shape : {std::vector<int64_t>{2, 100, 3, 16}, std::vector<int64_t>{1, 77, 2, 64}, std::vector<int64_t>{1, 1, 2, 64},
                         std::vector<int64_t>{1, 45, 1, 32}, std::vector<int64_t>{1, 50, 1, 128}, std::vector<int64_t>{1, 2048, 1, 16}})
        for (bool packed : {false, true}) {
          if ((shape[1] == 2048) != (!*R && spec == "sq1")) continue;  // the long case: automatic blocks, sq1 only
          if (packed && shape[0] != 1) continue;
          SCOPED_TRACE(spec + " R=" + R + " T=" + std::to_string(shape[1]) + " D=" + std::to_string(shape[3]) + (packed ? " packed" : ""));
          torch::manual_seed(fresh_seed());
          auto pat = pattern_from_spec(spec);
          const int64_t H = shape[2], L = pat->num_levels(shape[1]);
          auto d64 = torch::TensorOptions().dtype(torch::kFloat64);
          Tensor q = torch::randn(shape, d64), k = torch::randn(shape, d64), v = torch::randn(shape, d64), dy = torch::randn(shape, d64);
          Tensor bias = 0.3 * torch::randn({H, L}, d64);
          auto run = [&](torch::ScalarType t) {
            std::vector<Tensor> x = {q.to(t).requires_grad_(), k.to(t).requires_grad_(), v.to(t).requires_grad_(),
                                     bias.to(t).requires_grad_()};
            MixOptions o;
            o.gamma = 0.9;
            o.bias = x[3];
            if (packed) o.cu_seqlens = torch::tensor({int64_t(0), shape[1] / 3, shape[1]}, torch::kInt32);
            Tensor y = mix(x[0], x[1], x[2], *pat, o);
            auto g = torch::autograd::grad({(y * dy.to(t)).sum()}, x);
            g.insert(g.begin(), y.detach());
            return g;
          };
          auto r64 = run(torch::kFloat64), r32 = run(torch::kFloat32);
          for (size_t i = 0; i < r64.size(); ++i) {
            ASSERT_EQ(r32[i].scalar_type(), torch::kFloat32);
            EXPECT_LT(rel_err(r32[i].to(torch::kFloat64), r64[i]), 2e-5) << (i == 0 ? "y" : "gradient " + std::to_string(i - 1));
          }
        }
  }
}

TEST(Mix, BackwardLeavesTheIncomingGradientUntouched) {
  // the CPU backward builds g = (I - B)^{-T} dy in its own copy of dy, never in the caller's
  torch::manual_seed(fresh_seed());
  auto pat = pattern_from_spec("pow2");
  Tensor q = torch::randn({2, 50, 3, 16}).requires_grad_(), k = torch::randn({2, 50, 3, 16}).requires_grad_(),
         v = torch::randn({2, 50, 3, 16}).requires_grad_();
  Tensor base = torch::randn({2, 3, 16, 50});
  for (Tensor dy : {torch::randn({2, 50, 3, 16}), base.permute({0, 3, 1, 2})}) {  // contiguous; last dim strided
    Tensor before = dy.clone();
    Tensor y = mix(q, k, v, *pat);
    auto g = torch::autograd::grad({y}, {q, k, v}, {dy});
    EXPECT_TRUE(torch::equal(dy, before));
    EXPECT_TRUE(torch::isfinite(g[0]).all().item<bool>());
  }
}

TEST(Mix, OutputsAreConvexCombinations) {
  // softmax rows of [A | B] are probability vectors: max|y| <= max|x| at any length
  for (const auto& s : {"pow2", "sq1-lattice", "dense", "first-order"}) {
    Tensor v = torch::randn({1, 3000, 2, 8});
    Tensor y = mix(torch::randn({1, 3000, 2, 8}) * 4, torch::randn({1, 3000, 2, 8}) * 4, v, s);
    EXPECT_LE(y.abs().max().item<float>(), v.abs().max().item<float>() * (1 + 1e-5)) << s;
  }
}

// ----------------------------------------------------------------------------------------------
// Decoding

namespace {

void check_decode(const std::string& spec, const std::string& mode, int64_t prefill_len, bool with_bias) {
  SCOPED_TRACE(spec + " " + mode + " prefill " + std::to_string(prefill_len));
  torch::manual_seed(fresh_seed());
  auto pat = pattern_from_spec(spec);
  const int64_t B = 2, T = 70, H = 2, Dk = 6, Dv = 5, L = pat->num_levels(T);
  Tensor q = torch::randn({B, T, H, Dk}), k = torch::randn({B, T, H, Dk}), v = torch::randn({B, T, H, Dv});
  MixOptions o;
  o.mode = mode;
  o.gamma = 0.95;
  if (with_bias) o.bias = torch::randn({H, L});
  if (mode == "gate") o.gate_weight = torch::randn({H, L, Dk});
  torch::NoGradGuard ng;
  Tensor y = mix(q, k, v, *pat, o);
  MixCache cache(pat, B, H, Dk, Dv, T);
  if (prefill_len > 0) {
    Tensor yp = cache.prefill(q.slice(1, 0, prefill_len), k.slice(1, 0, prefill_len), v.slice(1, 0, prefill_len), o);
    EXPECT_LT(rel_err(yp, y.slice(1, 0, prefill_len)), 1e-5);
  }
  for (int64_t t = prefill_len; t < T; ++t) {
    Tensor yt = cache.step(q.select(1, t), k.select(1, t), v.select(1, t), o);
    EXPECT_LT(rel_err(yt, y.select(1, t)), 1e-5) << "step " << t;
    // the cache holds exactly the past positions that the next rows read
    std::vector<int64_t> want_b;
    if (pat->B().kind == SupportKind::Lattice) {
      if (t + 1 < T)  // after the last row the cache was made for, nothing is kept
        for (auto& e : pat->row_B(t + 1)) want_b.push_back(e.pos);
      std::sort(want_b.begin(), want_b.end());
      EXPECT_EQ(cache.held_positions_B(0), want_b) << "after step " << t;
    }
    EXPECT_LE(cache.entries(0), pat->cache_entries(T));
  }
}

}  // namespace

TEST(Decode, StepEqualsParallelOnEveryPrefix) {
  for (const auto& s : kSpecs)
    for (std::string mode : {"softmax", "gate"}) {
      check_decode(s, mode, 0, true);
      check_decode(s, mode, 1, false);
      check_decode(s, mode, 33, true);
    }
}

TEST(Decode, PromptsOfDifferentLengthsThenStepTogether) {
  for (const auto& s : kSpecs) {
    SCOPED_TRACE(s);
    torch::manual_seed(fresh_seed());
    auto pat = pattern_from_spec(s);
    const int64_t H = 2, D = 4, steps = 25;
    std::vector<int64_t> lens = {1, 17, 40};
    const int64_t N = lens.size();
    std::vector<Tensor> qs, ks, vs;
    for (auto l : lens) {
      qs.push_back(torch::randn({1, l + steps, H, D}));
      ks.push_back(torch::randn({1, l + steps, H, D}));
      vs.push_back(torch::randn({1, l + steps, H, D}));
    }
    torch::NoGradGuard ng;
    MixCache cache(pat, N, H, D, D, 40 + steps);
    std::vector<int64_t> cu = {0};
    std::vector<Tensor> pq, pk, pv;
    for (int64_t b = 0; b < N; ++b) {
      cu.push_back(cu.back() + lens[b]);
      pq.push_back(qs[b].slice(1, 0, lens[b]));
      pk.push_back(ks[b].slice(1, 0, lens[b]));
      pv.push_back(vs[b].slice(1, 0, lens[b]));
    }
    MixOptions o;
    o.cu_seqlens = torch::tensor(cu, torch::kInt64);
    cache.prefill(torch::cat(pq, 1), torch::cat(pk, 1), torch::cat(pv, 1), o);
    std::vector<Tensor> full;
    for (int64_t b = 0; b < N; ++b) full.push_back(mix(qs[b], ks[b], vs[b], *pat));
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<Tensor> sq, sk, sv;
      for (int64_t b = 0; b < N; ++b) {
        sq.push_back(qs[b][0][lens[b] + t]);
        sk.push_back(ks[b][0][lens[b] + t]);
        sv.push_back(vs[b][0][lens[b] + t]);
      }
      Tensor y = cache.step(torch::stack(sq), torch::stack(sk), torch::stack(sv), MixOptions{});
      for (int64_t b = 0; b < N; ++b) EXPECT_LT(rel_err(y[b], full[b][0][lens[b] + t]), 1e-5) << "seq " << b << " step " << t;
    }
  }
}

TEST(Decode, CacheOfPow2LatticeAtContext65536HasAtMost17Entries) {
  auto pat = pattern_from_spec("pow2-lattice");
  MixCache cache(pat, 1, 2, 4, 4, 65536 + 8);
  EXPECT_LE(cache.capacity_entries(), 17);
  cache.skip_to(65536 - 300);
  torch::NoGradGuard ng;
  int64_t most = 0;
  for (int t = 0; t < 300; ++t) {
    cache.step(torch::randn({1, 2, 4}), torch::randn({1, 2, 4}), torch::randn({1, 2, 4}), MixOptions{});
    most = std::max(most, cache.entries(0));
    EXPECT_EQ(cache.entries(0), (int64_t)pat->row_B(cache.positions()[0]).size());
  }
  EXPECT_LE(most, 17);
  EXPECT_GT(most, 10);
  // A and B stores together, allocated for the whole context
  EXPECT_EQ(cache.bytes(), int64_t(cache.capacity_entries()) * 2 * (4 + 4) * 4);
}

TEST(Decode, CacheSizesFollowThePattern) {
  const int64_t n = 4096;
  struct W { std::string spec; int64_t entries; };
  for (auto& w : std::vector<W>{{"attention", n - 1}, {"local:64", 63}, {"first-order", 1}, {"recurrence:4", 4}, {"dense", n - 1},
                                {"pow2", 2048}, {"A=local:8;B=recurrence:2", 9}}) {
    auto pat = pattern_from_spec(w.spec);
    MixCache cache(pat, 1, 1, 2, 2, n);
    EXPECT_EQ(cache.capacity_entries(), w.entries) << w.spec;
    cache.skip_to(n - 1);
    EXPECT_EQ(cache.entries(0), w.entries) << w.spec;
  }
}

// The host state a CUDA graph capture saves and restores (infer::GraphDecoder): a snapshot
// brings positions and the lattice's slot table back exactly; a state of another cache is
// refused; replaying needs a CUDA cache.
TEST(Decode, HostStateRoundTrip) {
  auto pat = pattern_from_spec("sq1-lattice");
  MixCache cache(pat, 2, 1, 4, 4, 600);
  torch::NoGradGuard ng;
  auto step = [&] { cache.step(torch::randn({2, 1, 4}), torch::randn({2, 1, 4}), torch::randn({2, 1, 4}), MixOptions{}); };
  for (int t = 0; t < 130; ++t) step();
  const MixCache::HostState snap = cache.host_state();
  const auto held = cache.held_positions_B(1);
  for (int t = 0; t < 57; ++t) step();  // evictions and new slots past the snapshot
  ASSERT_NE(cache.held_positions_B(1), held);
  cache.restore_host_state(snap);
  EXPECT_EQ(cache.positions(), std::vector<int64_t>({130, 130}));
  EXPECT_EQ(cache.held_positions_B(1), held);
  EXPECT_EQ(cache.entries(0), (int64_t)pat->row_B(130).size());
  MixCache other(pat, 3, 1, 4, 4, 600);
  const std::string msg = [&] {
    try {
      cache.restore_host_state(other.host_state());
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_NE(msg.find("expected 2"), std::string::npos) << msg;
  EXPECT_EQ(cache.device_parity(), -1);
  EXPECT_THROW(cache.replayed_step(), std::logic_error);
}

// ----------------------------------------------------------------------------------------------
// Bad input: a clear error naming the value, never a crash

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Mix, BadInputGetsClearErrors) {
  auto q = torch::randn({1, 8, 2, 4}), k = torch::randn({1, 8, 2, 4}), v = torch::randn({1, 8, 2, 4});
  auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "message '" << msg << "' lacks '" << part << "'";
  };
  has(error_of([&] { mix(q, k.slice(1, 0, 5), v, "pow2"); }), "k has shape");
  has(error_of([&] { mix(q, k, v.to(torch::kFloat64), "pow2"); }), "dtype");
  has(error_of([&] { mix(q.to(torch::kInt32), k, v, "pow2"); }), "dtype");
  has(error_of([&] { mix(q[0], k, v, "pow2"); }), "expected [B, T, H, Dk]");
  has(error_of([&] { mix(torch::randn({1, 8, 2, 0}), torch::randn({1, 8, 2, 0}), v, "pow2"); }), "Dk = 0");
  has(error_of([&] { mix(torch::randn({1, 8, 0, 4}), torch::randn({1, 8, 0, 4}), torch::randn({1, 8, 0, 4}), "pow2"); }), "H = 0");
  has(error_of([&] { mix(q, k, v, "pow3x"); }), "Accepted forms");
  has(error_of([&] { mix(q, k, v, "f:3,2,1"); }), "not strictly increasing");
  has(error_of([&] { mix(q, k, v, "f:0,1"); }), "f(0) >= 1");
  auto qn = q.clone();
  qn[0][3][1][2] = std::numeric_limits<float>::quiet_NaN();
  has(error_of([&] { mix(qn, k, v, "pow2"); }), "q contains NaN or Inf");
  auto vi = v.clone();
  vi[0][0][0][0] = std::numeric_limits<float>::infinity();
  has(error_of([&] { mix(q, k, vi, "pow2"); }), "v contains NaN or Inf");
  auto kn = k.clone();
  kn[0][7][0][3] = -std::numeric_limits<float>::infinity();  // the last token: the last unit's copy
  has(error_of([&] { mix(q, kn, v, "pow2"); }), "k contains NaN or Inf");
  has(error_of([&] { mix(q.transpose(1, 2).contiguous().transpose(1, 2), kn, v, "sq1"); }), "k contains NaN or Inf");  // q head-major
  // deferred reports are a GPU mode: CPU calls still check at the call
  set_finite_check(FiniteCheck::Deferred);
  has(error_of([&] { mix(qn, k, v, "pow2"); }), "q contains NaN or Inf");
  EXPECT_NO_THROW(check_finite_pending());
  set_finite_check(FiniteCheck::AtCall);
  MixOptions o;
  o.cu_seqlens = torch::tensor({0, 5, 3, 8});
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "not increasing");
  o.cu_seqlens = torch::tensor({0, 5, 7});
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "expected T = 8");
  o.cu_seqlens = torch::tensor({1, 8});
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "expected 0");
  o = MixOptions{};
  o.mode = "linear";
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "'softmax' or 'gate'");
  o = MixOptions{};
  o.gamma = 1.5;
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "gamma");
  o = MixOptions{};
  o.bias = torch::zeros({2, 2});
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "longer than the table allows");
  o = MixOptions{};
  o.mode = "gate";
  has(error_of([&] { mix(q, k, v, "pow2", o); }), "gate_weight");
  // a length beyond what the pattern's f is expanded to
  auto pk = pattern_from_spec("f:k+1");
  EXPECT_NE(error_of([&] { pk->check_length(int64_t(1) << 22); }).find("longer than pattern"), std::string::npos);
  // gradients stay finite and the op did not crash; a NaN upstream gradient is refused
  auto qg = q.clone().requires_grad_();
  auto y = mix(qg, k, v, "pow2");
  auto dy = torch::ones_like(y);
  dy[0][0][0][0] = std::numeric_limits<float>::quiet_NaN();
  has(error_of([&] { y.backward(dy); }), "dy contains NaN");
  // decode: wrong shapes and a full cache
  MixCache cache(pattern_from_spec("pow2-lattice"), 1, 2, 4, 4, 3);
  has(error_of([&] { cache.step(torch::randn({2, 2, 4}), torch::randn({2, 2, 4}), torch::randn({2, 2, 4})); }), "q has shape");
  for (int t = 0; t < 3; ++t) cache.step(torch::randn({1, 2, 4}), torch::randn({1, 2, 4}), torch::randn({1, 2, 4}));
  has(error_of([&] { cache.step(torch::randn({1, 2, 4}), torch::randn({1, 2, 4}), torch::randn({1, 2, 4})); }), "max_context = 3");
}

// ---------------------------------------------------------------------------------------------
// The dispatcher registration (libtokmix_torch.so, what Python's torch.ops.tokmix loads): the op
// found by its schema gives what tokmix::mix gives, forward and backward, and the same errors.
#ifdef TOKMIX_TORCH_LIBRARY
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

namespace {
using OptT = c10::optional<Tensor>;
using MixSig = Tensor(const Tensor&, const OptT&, const Tensor&, c10::string_view, c10::string_view, const OptT&, const OptT&, const OptT&,
                      double, double);

c10::TypedOperatorHandle<MixSig> dispatcher_mix() {
  static void* lib = dlopen(TOKMIX_TORCH_LIBRARY, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) throw std::runtime_error(std::string("cannot load ") + TOKMIX_TORCH_LIBRARY + ": " + dlerror());
  return c10::Dispatcher::singleton().findSchemaOrThrow("tokmix::mix", "").typed<MixSig>();
}
}  // namespace

TEST(Dispatcher, MixThroughTheDispatcherEqualsTokmixMix) {
  auto op = dispatcher_mix();
  EXPECT_EQ(op.schema().arguments().size(), 10u);
  torch::manual_seed(fresh_seed());
  auto d = torch::TensorOptions().dtype(torch::kFloat64);
  for (const std::string spec : {"pow2", "A=local:3;B=pow2", "sq1-lattice"})
    for (const std::string mode : {"softmax", "gate"}) {
      SCOPED_TRACE(spec + " " + mode);
      const int64_t B = 2, T = 19, H = 2, Dk = 5, Dv = 3;
      const int64_t L = pattern_from_spec(spec)->num_levels(T);
      Tensor q = torch::randn({B, T, H, Dk}, d), k = torch::randn({B, T, H, Dk}, d), v = torch::randn({B, T, H, Dv}, d);
      Tensor bias = torch::randn({H, L}, d), gw = torch::randn({H, L, Dk}, d);
      const bool gate = mode == "gate";
      auto run = [&](bool through_dispatcher) {
        Tensor qq = q.clone().requires_grad_(), kk = k.clone().requires_grad_(), vv = v.clone().requires_grad_(),
               bb = bias.clone().requires_grad_(), gg = gw.clone().requires_grad_();
        Tensor y;
        if (through_dispatcher) {
          y = op.call(qq, gate ? OptT() : OptT(kk), vv, spec, mode, OptT(bb), gate ? OptT(gg) : OptT(), OptT(), 0.7, 0.9);
        } else {
          MixOptions o;
          o.mode = mode;
          o.bias = bb;
          if (gate) o.gate_weight = gg;
          o.scale = 0.7;
          o.gamma = 0.9;
          y = mix(qq, gate ? Tensor() : kk, vv, spec, o);
        }
        (y * torch::cos(y)).sum().backward();
        std::vector<Tensor> out = {y.detach(), qq.grad(), vv.grad(), bb.grad()};
        out.push_back(gate ? gg.grad() : kk.grad());
        return out;
      };
      auto a = run(true), b = run(false);
      for (size_t i = 0; i < a.size(); ++i) {
        ASSERT_TRUE(a[i].defined()) << "output " << i;
        EXPECT_TRUE(torch::equal(a[i], b[i])) << "output " << i << " differs";
      }
    }
}

TEST(Dispatcher, ErrorsAreTheCppMessages) {
  auto op = dispatcher_mix();
  Tensor q = torch::randn({2, 3}), v = torch::randn({1, 4, 1, 2});
  std::string direct, dispatched;
  try {
    mix(q, q, v, "pow2");
  } catch (const std::exception& e) {
    direct = e.what();
  }
  try {
    op.call(q, OptT(q), v, "pow2", "softmax", OptT(), OptT(), OptT(), -1.0, 1.0);
  } catch (const std::exception& e) {
    dispatched = e.what();
  }
  EXPECT_NE(direct.find("q has shape [2, 3]; expected [B, T, H, Dk]"), std::string::npos) << direct;
  EXPECT_EQ(direct, dispatched);
}
#endif
