// Task generators against their definitions in docs/tasks.md: spec strings, determinism,
// supervised positions, the MQAR construction and its gap distribution, multi-hop chains, and
// JSONL datasets (round trip, padding, every error with its line number).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "tokmix/data/tasks.h"

using namespace tokmix::data;
using torch::Tensor;

namespace {

// Row b of a batch as vectors.
struct Row {
  std::vector<int64_t> in, lab;
};
Row row(const Batch& b, int64_t i) {
  Row r;
  Tensor in = b.input[i].contiguous(), lab = b.labels[i].contiguous();
  r.in.assign(in.data_ptr<int64_t>(), in.data_ptr<int64_t>() + in.numel());
  r.lab.assign(lab.data_ptr<int64_t>(), lab.data_ptr<int64_t>() + lab.numel());
  return r;
}

std::vector<int64_t> supervised(const Row& r) {
  std::vector<int64_t> p;
  for (size_t t = 0; t < r.lab.size(); ++t)
    if (r.lab[t] != kIgnore) p.push_back(static_cast<int64_t>(t));
  return p;
}

bool equal(const Batch& a, const Batch& b) { return torch::equal(a.input, b.input) && torch::equal(a.labels, b.labels); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

const std::vector<std::string> kSpecs = {"copy:T=64,L=16,V=32", "mqar:T=256,N=16,V=8192", "multihop:T=128,N=8,hops=3,V=512",
                                         "selective-copy:T=64,L=8,V=16", "induction:T=64,V=32"};

// Normalized Zoology power-law weights over gaps 0 .. space-1: p_g ∝ a·(g+1)^(a-1).
std::vector<double> power_law(int64_t space, double a) {
  std::vector<double> p(space);
  double sum = 0;
  for (int64_t g = 0; g < space; ++g) sum += p[g] = a * std::pow(double(g + 1), a - 1);
  for (auto& x : p) x /= sum;
  return p;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("tokmix_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Spec strings

TEST(TaskSpec, ParsesAndRoundTrips) {
  TaskSpec s = parse_task_spec("mqar:T=256,N=16,V=8192");
  EXPECT_EQ(s.task, Task::MQAR);
  EXPECT_EQ(s.T, 256);
  EXPECT_EQ(s.N, 16);
  EXPECT_EQ(s.V, 8192);
  EXPECT_DOUBLE_EQ(s.power_a, 0.01);
  EXPECT_EQ(s.str(), "mqar:T=256,N=16,V=8192,a=0.01");
  TaskSpec m = parse_task_spec("multihop:T=96,N=4,hops=5");
  EXPECT_EQ(m.hops, 5);
  EXPECT_EQ(m.V, 8192);  // default
  EXPECT_EQ(parse_task_spec("copy"), parse_task_spec("copy:T=64,L=16,V=32"));
  EXPECT_EQ(parse_task_spec("mqar:a=0.5").power_a, 0.5);
  for (const std::string& spec : kSpecs) {
    TaskSpec p = parse_task_spec(spec);
    EXPECT_EQ(parse_task_spec(p.str()), p) << spec;
    EXPECT_EQ(vocab_size(p), p.V);
  }
}

TEST(TaskSpec, BadStringsListAcceptedForms) {
  for (const std::string bad : {"cpy:T=4", "copy:T=64,X=3", "copy:T=64,T=32", "copy:T=x", "copy:T=-3", "copy:T=64,", "copy:T",
                                "mqar:a=abc", "", "induction:L=3"}) {
    const std::string msg = error_of([&] { parse_task_spec(bad); });
    EXPECT_NE(msg.find("bad task spec"), std::string::npos) << bad << ": " << msg;
    for (const char* form : {"copy:T=", "mqar:T=", "multihop:T=", "selective-copy:T=", "induction:T="})
      EXPECT_NE(msg.find(form), std::string::npos) << bad << ": " << msg;
  }
  EXPECT_NE(error_of([] { parse_task_spec("copy:T=64,X=3"); }).find("its keys: T, L, V"), std::string::npos);
  EXPECT_NE(error_of([] { parse_task_spec("multihop:K=1"); }).find("its keys: T, N, hops, V, a"), std::string::npos);
  // sizes the task cannot be built with
  for (const std::string bad : {"copy:T=32,L=16", "copy:V=2", "mqar:T=63", "mqar:T=64,N=17", "mqar:N=5,V=10", "mqar:a=0",
                                "multihop:T=64,N=8,hops=4", "multihop:N=4,hops=3,V=16", "induction:T=2", "selective-copy:T=16,L=8"})
    EXPECT_THROW(parse_task_spec(bad), std::invalid_argument) << bad;
}

// ---------------------------------------------------------------------------------------------
// Determinism

TEST(Tasks, DeterministicBySeedAndBatchIndex) {
  for (const std::string& spec : kSpecs) {
    TaskSpec s = parse_task_spec(spec);
    Batch a = make_batch(s, 8, 42, 3);
    EXPECT_EQ(a.input.sizes(), torch::IntArrayRef({8, s.T}));
    EXPECT_EQ(a.input.scalar_type(), torch::kInt64);
    EXPECT_EQ(a.labels.scalar_type(), torch::kInt64);
    // same arguments after other draws: same batch
    make_batch(s, 8, 42, 0);
    make_batch(s, 8, 7, 3);
    EXPECT_TRUE(equal(a, make_batch(s, 8, 42, 3))) << spec;
    EXPECT_FALSE(equal(a, make_batch(s, 8, 43, 3))) << spec;
    EXPECT_FALSE(equal(a, make_batch(s, 8, 42, 4))) << spec;
    // rows are examples batch_index*B + i: batch 3 of 8 is rows 24..31 of batch 0 of 32
    Batch big = make_batch(s, 32, 42, 0);
    EXPECT_TRUE(torch::equal(a.input, big.input.slice(0, 24, 32))) << spec;
    EXPECT_TRUE(torch::equal(a.labels, big.labels.slice(0, 24, 32))) << spec;
    std::vector<int64_t> in(s.T), lab(s.T);
    generate_example(s, 42, 25, in.data(), lab.data());
    Row r = row(a, 1);
    EXPECT_EQ(in, r.in);
    EXPECT_EQ(lab, r.lab);
    // rows differ from each other
    EXPECT_FALSE(torch::equal(a.input[0], a.input[1])) << spec;
    // every token and label fits the vocabulary
    EXPECT_GE(big.input.min().item<int64_t>(), 0);
    EXPECT_LT(big.input.max().item<int64_t>(), vocab_size(s));
    EXPECT_LT(big.labels.max().item<int64_t>(), vocab_size(s));
    EXPECT_TRUE(((big.labels == kIgnore) | (big.labels >= 0)).all().item<bool>());
  }
}

TEST(Tasks, BadBatchArguments) {
  TaskSpec s = parse_task_spec("copy");
  EXPECT_THROW(make_batch(s, 0, 1, 0), std::invalid_argument);
  EXPECT_THROW(make_batch(s, 4, 1, -1), std::invalid_argument);
  s.L = 40;  // built by hand past the limits: refused too
  EXPECT_THROW(make_batch(s, 4, 1, 0), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Copy, selective copy, induction

TEST(Tasks, Copy) {
  TaskSpec s = parse_task_spec("copy:T=40,L=12,V=20");
  Batch b = make_batch(s, 64, 1, 0);
  for (int64_t i = 0; i < 64; ++i) {
    Row r = row(b, i);
    const int64_t L = s.L;
    std::vector<int64_t> str(r.in.begin(), r.in.begin() + L);
    for (int64_t x : str) EXPECT_TRUE(x >= 2 && x < s.V);
    EXPECT_EQ(r.in[L], 1);  // separator
    // supervised: exactly positions L .. 2L-1, and what they ask for is the string
    std::vector<int64_t> want_pos;
    for (int64_t t = L; t < 2 * L; ++t) want_pos.push_back(t);
    EXPECT_EQ(supervised(r), want_pos);
    EXPECT_EQ(std::vector<int64_t>(r.lab.begin() + L, r.lab.begin() + 2 * L), str);
    // teacher forcing: the copy is in the input, one position after its label
    EXPECT_EQ(std::vector<int64_t>(r.in.begin() + L + 1, r.in.begin() + 2 * L + 1), str);
    for (int64_t t = 2 * L + 1; t < s.T; ++t) EXPECT_EQ(r.in[t], 0);
  }
}

TEST(Tasks, SelectiveCopy) {
  TaskSpec s = parse_task_spec("selective-copy:T=48,L=10,V=12");
  Batch b = make_batch(s, 64, 2, 0);
  const int64_t L = s.L, D = s.T - L - 1;
  for (int64_t i = 0; i < 64; ++i) {
    Row r = row(b, i);
    std::vector<int64_t> data;  // the non-blank tokens of the noisy region, in order
    for (int64_t t = 0; t < D; ++t) {
      EXPECT_NE(r.in[t], 1);
      if (r.in[t] != 0) data.push_back(r.in[t]);
    }
    ASSERT_EQ(static_cast<int64_t>(data.size()), L);
    EXPECT_EQ(r.in[D], 1);
    std::vector<int64_t> want_pos;
    for (int64_t t = D; t < D + L; ++t) want_pos.push_back(t);
    EXPECT_EQ(supervised(r), want_pos);
    EXPECT_EQ(std::vector<int64_t>(r.lab.begin() + D, r.lab.begin() + D + L), data);
    EXPECT_EQ(std::vector<int64_t>(r.in.begin() + D + 1, r.in.end()), data);
  }
}

TEST(Tasks, Induction) {
  TaskSpec s = parse_task_spec("induction:T=32,V=10");
  Batch b = make_batch(s, 256, 3, 0);
  std::set<int64_t> trigger_positions;
  for (int64_t i = 0; i < 256; ++i) {
    Row r = row(b, i);
    EXPECT_EQ(supervised(r), std::vector<int64_t>{s.T - 1});
    std::vector<int64_t> triggers;
    for (int64_t t = 0; t < s.T; ++t)
      if (r.in[t] == 1) triggers.push_back(t);
    ASSERT_EQ(triggers.size(), 2u);
    EXPECT_EQ(triggers[1], s.T - 1);
    EXPECT_LE(triggers[0], s.T - 3);
    EXPECT_EQ(r.lab[s.T - 1], r.in[triggers[0] + 1]);
    EXPECT_GE(r.lab[s.T - 1], 2);
    trigger_positions.insert(triggers[0]);
  }
  EXPECT_GT(trigger_positions.size(), 20u);  // the trigger moves
}

// ---------------------------------------------------------------------------------------------
// MQAR

TEST(Tasks, MQARConstruction) {
  TaskSpec s = parse_task_spec("mqar:T=128,N=16,V=8192");
  const int64_t N = s.N, half = s.V / 2, ctx = 2 * N;
  Batch b = make_batch(s, 64, 4, 0);
  int64_t filler_low = 0, filler_total = 0;
  for (int64_t i = 0; i < 64; ++i) {
    Row r = row(b, i);
    std::map<int64_t, int64_t> kv;
    std::set<int64_t> values;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t k = r.in[2 * j], v = r.in[2 * j + 1];
      EXPECT_TRUE(k >= 1 && k < half) << k;
      EXPECT_TRUE(v >= half && v < s.V) << v;
      EXPECT_TRUE(kv.emplace(k, v).second) << "key " << k << " repeated";
      EXPECT_TRUE(values.insert(v).second) << "value " << v << " repeated";
    }
    // supervised: N positions, all after the context, at even offsets from its end
    std::vector<int64_t> pos = supervised(r);
    ASSERT_EQ(static_cast<int64_t>(pos.size()), N);
    std::set<int64_t> queried;
    for (int64_t p : pos) {
      EXPECT_GE(p, ctx);
      EXPECT_EQ((p - ctx) % 2, 0) << p;
      ASSERT_TRUE(kv.count(r.in[p])) << "query " << r.in[p] << " is not a key of the context";
      EXPECT_EQ(r.lab[p], kv[r.in[p]]);  // the value paired with that key
      queried.insert(r.in[p]);
    }
    EXPECT_EQ(static_cast<int64_t>(queried.size()), N);  // every key queried once
    for (int64_t t = ctx; t < s.T; ++t) {
      if (r.lab[t] != kIgnore) continue;
      ++filler_total;
      filler_low += r.in[t] < half;
    }
  }
  // unused positions hold tokens uniform in [0, V): about half fall below V/2
  const double frac = double(filler_low) / filler_total, sd = 0.5 / std::sqrt(double(filler_total));
  EXPECT_NEAR(frac, 0.5, 5 * sd);
}

// The gap of the key drawn j-th (the j-th key of the context) has the marginal of the j-th
// successive draw without replacement from p: for j = 0 exactly p, for j = 1
// sum_i p_i p_g / (1 - p_i). Checked on log-spaced buckets, each within 5 standard errors.
TEST(Tasks, MQARGapsFollowPowerLaw) {
  for (double a : {0.01, 1.0}) {
    TaskSpec s = parse_task_spec("mqar:T=256,N=16,V=8192,a=" + std::to_string(a));
    const int64_t ctx = 2 * s.N, space = (s.T - ctx) / 2, n = 20000;
    const std::vector<double> p = power_law(space, a);
    std::vector<double> p2(space, 0.0);
    for (int64_t g = 0; g < space; ++g)
      for (int64_t i = 0; i < space; ++i)
        if (i != g) p2[g] += p[i] * p[g] / (1 - p[i]);
    std::vector<std::vector<int64_t>> counts(2, std::vector<int64_t>(space, 0));
    Batch b = make_batch(s, n, 5, 0);
    const int64_t* in = b.input.data_ptr<int64_t>();
    const int64_t* lab = b.labels.data_ptr<int64_t>();
    for (int64_t e = 0; e < n; ++e) {
      const int64_t* x = in + e * s.T;
      const int64_t* y = lab + e * s.T;
      for (int64_t t = ctx; t < s.T; ++t) {
        if (y[t] == kIgnore) continue;
        for (int j = 0; j < 2; ++j)
          if (x[t] == x[2 * j]) ++counts[j][(t - ctx) / 2];
      }
    }
    const std::vector<int64_t> edges = {0, 1, 2, 4, 8, 16, 32, 64, space};
    for (int j = 0; j < 2; ++j) {
      const std::vector<double>& want = j == 0 ? p : p2;
      for (size_t k = 0; k + 1 < edges.size(); ++k) {
        double pw = 0, emp = 0;
        for (int64_t g = edges[k]; g < edges[k + 1]; ++g) {
          pw += want[g];
          emp += counts[j][g];
        }
        emp /= n;
        const double se = std::sqrt(pw * (1 - pw) / n);
        EXPECT_NEAR(emp, pw, 5 * se + 1e-9) << "a=" << a << " draw " << j << " gaps [" << edges[k] << ", " << edges[k + 1] << ")";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Multi-hop

TEST(Tasks, MultiHopNeedsEveryHop) {
  for (int64_t hops : {1, 2, 4}) {
    TaskSpec s = parse_task_spec("multihop:T=160,N=6,hops=" + std::to_string(hops) + ",V=64");
    const int64_t N = s.N, ctx = 2 * N * hops;
    Batch b = make_batch(s, 128, 6, 0);
    for (int64_t i = 0; i < 128; ++i) {
      Row r = row(b, i);
      std::map<int64_t, int64_t> next;  // the key -> value map of the context
      std::set<int64_t> tokens;
      for (int64_t e = 0; e < N * hops; ++e) {
        const int64_t k = r.in[2 * e], v = r.in[2 * e + 1];
        EXPECT_TRUE(k >= 1 && k < s.V && v >= 1 && v < s.V);
        EXPECT_TRUE(next.emplace(k, v).second) << "key " << k << " has two values";
        tokens.insert(k);
        tokens.insert(v);
      }
      EXPECT_EQ(static_cast<int64_t>(tokens.size()), N * (hops + 1));  // chains are disjoint paths
      std::vector<int64_t> pos = supervised(r);
      ASSERT_EQ(static_cast<int64_t>(pos.size()), N);
      for (int64_t p : pos) {
        EXPECT_GE(p, ctx);
        EXPECT_EQ((p - ctx) % 2, 0);
        int64_t x = r.in[p];
        for (int64_t k = 0; k < hops; ++k) {
          EXPECT_NE(x, r.lab[p]) << "answer reached after only " << k << " hops";
          auto it = next.find(x);
          ASSERT_NE(it, next.end()) << "chain broken after " << k << " hops";
          x = it->second;
        }
        EXPECT_EQ(x, r.lab[p]);
        EXPECT_EQ(next.count(x), 0u);  // the answer ends its chain
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// JSONL

TEST(Jsonl, RoundTrip) {
  for (const std::string& spec : kSpecs) {
    Batch b = make_batch(parse_task_spec(spec), 5, 9, 1);
    const std::string path = temp_path("roundtrip.jsonl");
    write_jsonl(path, b);
    Dataset d = read_jsonl(path);
    std::remove(path.c_str());
    ASSERT_EQ(d.size(), 5);
    EXPECT_TRUE(equal(d.batch(0, 5), b)) << spec;
    EXPECT_TRUE(equal(to_dataset(b).batch(0, 5), b)) << spec;
    std::ostringstream os;
    write_jsonl(os, d);
    std::istringstream is(os.str());
    EXPECT_TRUE(equal(read_jsonl(is).batch(0, 5), b));
  }
}

TEST(Jsonl, FixtureWithDifferentLengths) {
  Dataset d = read_jsonl(std::string(TOKMIX_TESTDATA) + "/jsonl/small.jsonl");
  ASSERT_EQ(d.size(), 3);
  EXPECT_EQ(d.max_length(), 5);
  EXPECT_EQ(d.vocab_size(), 10);
  Batch b = d.batch(std::vector<int64_t>{2, 0});
  EXPECT_TRUE(torch::equal(b.input, torch::tensor({{5, 6, 0}, {1, 2, 3}}, torch::kInt64)));  // padded to the longest chosen row
  EXPECT_TRUE(torch::equal(b.labels, torch::tensor({{6, -100, -100}, {-100, 3, 9}}, torch::kInt64)));
  EXPECT_EQ(d.batch(0, 3).input.size(1), 5);
  EXPECT_THROW(d.batch(std::vector<int64_t>{3}), std::invalid_argument);
  EXPECT_THROW(d.batch(std::vector<int64_t>{}), std::invalid_argument);
}

TEST(Jsonl, ErrorsNameTheLine) {
  const std::string good = "{\"input\": [1, 2, 3], \"labels\": [2, 3, -100]}";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"input\": [1, 2, 3], \"labels\": [2, 3, -100]", "bad JSON"},
      {"[1, 2, 3]", "must be a JSON object"},
      {"{\"labels\": [1]}", "missing key 'input'"},
      {"{\"input\": [1]}", "missing key 'labels'"},
      {"{\"input\": 5, \"labels\": [1]}", "'input' is number"},
      {"{\"input\": [1, 2], \"labels\": [1]}", "'input' has 2 tokens but 'labels' has 1"},
      {"{\"input\": [1, 2.5], \"labels\": [1, 2]}", "input[1] = 2.5 is not an integer"},
      {"{\"input\": [1, \"a\"], \"labels\": [1, 2]}", "input[1] = \"a\" is not an integer"},
      {"{\"input\": [1, 2], \"labels\": [1, true]}", "labels[1] = true is not an integer"},
      {"{\"input\": [1, -1], \"labels\": [1, 2]}", "input[1] = -1 is negative"},
      {"{\"input\": [1, 2], \"labels\": [-5, 2]}", "labels[0] = -5; expected -100"},
      {"{\"input\": [1, 18446744073709551615], \"labels\": [1, 2]}", "is too large"},
      {"{\"input\": [], \"labels\": []}", "empty sequence"},
  };
  for (auto& [line, what] : cases) {
    // line 1 good, line 2 blank (skipped but counted), line 3 good, line 4 bad
    std::istringstream in(good + "\n\n" + good + "\n" + line + "\n" + good + "\n");
    const std::string msg = error_of([&] { read_jsonl(in, "f.jsonl"); });
    EXPECT_EQ(msg.rfind("f.jsonl:4: ", 0), 0u) << line << " -> " << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << line << " -> " << msg;
  }
  std::istringstream crlf(good + "\r\n" + good + "\r\n");
  EXPECT_EQ(read_jsonl(crlf).size(), 2);
  const std::string missing = error_of([] { read_jsonl(std::string("/nonexistent/x.jsonl")); });
  EXPECT_NE(missing.find("/nonexistent/x.jsonl: cannot open"), std::string::npos) << missing;
}
