// Task generators and JSONL datasets. Definitions (and why each is built the way it is) are in
// docs/tasks.md; this file follows it line for line.
#include "tokmix/data/tasks.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <unordered_set>

namespace tokmix::data {
namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("tokmix::data: " + msg); }

// ---------------------------------------------------------------------------------------------
// Spec strings

struct TaskInfo {
  Task task;
  const char* name;
  std::vector<std::string> keys;  // accepted keys, in canonical order
  TaskSpec defaults;
};

TaskSpec make_defaults(Task t, int64_t T, int64_t V, int64_t L, int64_t N, int64_t hops) {
  TaskSpec s;
  s.task = t;
  s.T = T;
  s.V = V;
  s.L = L;
  s.N = N;
  s.hops = hops;
  return s;
}

const std::vector<TaskInfo>& task_table() {
  static const std::vector<TaskInfo> table = {
      {Task::Copy, "copy", {"T", "L", "V"}, make_defaults(Task::Copy, 64, 32, 16, 0, 0)},
      {Task::MQAR, "mqar", {"T", "N", "V", "a"}, make_defaults(Task::MQAR, 64, 8192, 0, 8, 0)},
      {Task::MultiHop, "multihop", {"T", "N", "hops", "V", "a"}, make_defaults(Task::MultiHop, 128, 8192, 0, 8, 2)},
      {Task::SelectiveCopy, "selective-copy", {"T", "L", "V"}, make_defaults(Task::SelectiveCopy, 64, 16, 8, 0, 0)},
      {Task::Induction, "induction", {"T", "V"}, make_defaults(Task::Induction, 64, 32, 0, 0, 0)},
  };
  return table;
}

const TaskInfo& info(Task t) {
  for (auto& i : task_table())
    if (i.task == t) return i;
  bad("unknown task enum value " + std::to_string(static_cast<int>(t)));
}

// Shortest decimal that reads back as the same double, so str() round-trips.
std::string fmt_double(double x) {
  for (int prec = 1; prec <= 17; ++prec) {
    std::ostringstream os;
    os.precision(prec);
    os << x;
    if (std::stod(os.str()) == x) return os.str();
  }
  std::ostringstream os;
  os.precision(17);
  os << x;
  return os.str();
}

std::string key_value(const TaskSpec& s, const std::string& key) {
  if (key == "T") return std::to_string(s.T);
  if (key == "V") return std::to_string(s.V);
  if (key == "L") return std::to_string(s.L);
  if (key == "N") return std::to_string(s.N);
  if (key == "hops") return std::to_string(s.hops);
  return fmt_double(s.power_a);  // "a"
}

std::string accepted_forms() {
  std::string out;
  for (auto& i : task_table()) out += "\n  " + i.defaults.str();
  return "accepted forms (shown with their defaults; any key may be omitted):" + out;
}

// The constraints under which a task can be built (docs/tasks.md lists them per task).
void validate(const TaskSpec& s) {
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) bad("task '" + s.str() + "': " + what);
  };
  need(s.T >= 1, "T must be >= 1");
  switch (s.task) {
    case Task::Copy:
    case Task::SelectiveCopy:
      need(s.V >= 3, "V must be >= 3 (tokens 0 and 1 are reserved, strings use [2, V))");
      need(s.L >= 1, "L must be >= 1");
      need(2 * s.L + 1 <= s.T, "needs 2*L + 1 <= T (string, separator, copy)");
      break;
    case Task::MQAR:
      need(s.T % 2 == 0, "T must be even (queries sit at even offsets)");
      need(s.N >= 1, "N must be >= 1");
      need(s.V >= 4, "V must be >= 4");
      need(4 * s.N <= s.T, "needs 4*N <= T (2N context tokens and room for N queries at even offsets)");
      need(s.N <= s.V / 2 - 1, "needs N <= V/2 - 1 distinct keys in [1, V/2)");
      need(std::isfinite(s.power_a) && s.power_a > 0, "a must be > 0");
      break;
    case Task::MultiHop:
      need(s.T % 2 == 0, "T must be even (queries sit at even offsets)");
      need(s.N >= 1, "N must be >= 1");
      need(s.hops >= 1, "hops must be >= 1");
      need(2 * s.N * s.hops + 2 * s.N <= s.T, "needs 2*N*hops + 2*N <= T (N*hops edges and room for N queries)");
      need(s.N * (s.hops + 1) <= s.V - 1, "needs N*(hops+1) <= V - 1 distinct chain tokens in [1, V)");
      need(std::isfinite(s.power_a) && s.power_a > 0, "a must be > 0");
      break;
    case Task::Induction:
      need(s.V >= 3, "V must be >= 3 (token 1 is the trigger, content uses [2, V))");
      need(s.T >= 3, "T must be >= 3");
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Randomness. std::mt19937_64's output is fixed by the standard, but the std distributions are
// not (libstdc++ and libc++ differ), so the few draws needed are written out here: a stream is
// the same with every compiler.

uint64_t mix64(uint64_t z) {  // splitmix64 finalizer
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class Rng {
 public:
  Rng(uint64_t seed, int64_t index) : g_(mix64(mix64(seed) ^ static_cast<uint64_t>(index))) {}
  // Uniform in [0, n), unbiased: rejects the low 2^64 mod n outputs.
  int64_t below(int64_t n) {
    const uint64_t un = static_cast<uint64_t>(n);
    const uint64_t threshold = (0 - un) % un;
    for (;;) {
      const uint64_t x = g_();
      if (x >= threshold) return static_cast<int64_t>(x % un);
    }
  }
  double open01() { return (static_cast<double>(g_() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)

 private:
  std::mt19937_64 g_;
};

// n distinct values of [lo, hi) in uniformly random order.
std::vector<int64_t> distinct(Rng& r, int64_t lo, int64_t hi, int64_t n) {
  const int64_t range = hi - lo;
  std::vector<int64_t> out;
  out.reserve(n);
  if (2 * n <= range) {  // sparse: rejection is cheaper than touching the whole range
    std::unordered_set<int64_t> seen;
    seen.reserve(2 * n);
    while (static_cast<int64_t>(out.size()) < n) {
      const int64_t x = lo + r.below(range);
      if (seen.insert(x).second) out.push_back(x);
    }
    return out;
  }
  std::vector<int64_t> pool(range);
  for (int64_t i = 0; i < range; ++i) pool[i] = lo + i;
  for (int64_t i = 0; i < n; ++i) {  // partial Fisher-Yates
    std::swap(pool[i], pool[i + r.below(range - i)]);
    out.push_back(pool[i]);
  }
  return out;
}

void shuffle(Rng& r, std::vector<std::pair<int64_t, int64_t>>& v) {
  for (int64_t i = static_cast<int64_t>(v.size()) - 1; i > 0; --i) std::swap(v[i], v[r.below(i + 1)]);
}

// n distinct gaps g in [0, space), drawn one after another with probability ∝ a·(g+1)^(a-1)
// among those not yet drawn. Gumbel-top-k: the order of log w + Gumbel noise is exactly that
// successive draw, in O(space log space) instead of O(n·space).
std::vector<int64_t> power_law_gaps(Rng& r, int64_t space, int64_t n, double a) {
  std::vector<std::pair<double, int64_t>> keyed(space);
  for (int64_t g = 0; g < space; ++g) {
    const double gumbel = -std::log(-std::log(r.open01()));
    keyed[g] = {(a - 1.0) * std::log(static_cast<double>(g + 1)) + gumbel, g};
  }
  std::partial_sort(keyed.begin(), keyed.begin() + n, keyed.end(),
                    [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<int64_t> out(n);
  for (int64_t j = 0; j < n; ++j) out[j] = keyed[j].second;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Generators: each writes T tokens and T labels (labels prefilled with kIgnore).

void gen_copy(const TaskSpec& s, Rng& r, int64_t* in, int64_t* lab) {
  const int64_t L = s.L;
  std::fill(in, in + s.T, 0);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t tok = 2 + r.below(s.V - 2);
    in[i] = tok;
    in[L + 1 + i] = tok;  // teacher forcing: the copy is also the input
    lab[L + i] = tok;     // the separator predicts s_0, copy position i predicts s_{i+1}
  }
  in[L] = 1;
}

void gen_selective_copy(const TaskSpec& s, Rng& r, int64_t* in, int64_t* lab) {
  const int64_t L = s.L, D = s.T - L - 1;  // D: the noisy region holding the L data tokens
  std::fill(in, in + s.T, 0);
  std::vector<int64_t> pos = distinct(r, 0, D, L);
  std::sort(pos.begin(), pos.end());
  for (int64_t i = 0; i < L; ++i) {
    const int64_t tok = 2 + r.below(s.V - 2);
    in[pos[i]] = tok;
    in[D + 1 + i] = tok;
    lab[D + i] = tok;
  }
  in[D] = 1;
}

void gen_induction(const TaskSpec& s, Rng& r, int64_t* in, int64_t* lab) {
  for (int64_t t = 0; t < s.T; ++t) in[t] = 2 + r.below(s.V - 2);
  const int64_t p = r.below(s.T - 2);  // trigger at p in [0, T-3], its answer at p+1 <= T-2
  in[p] = 1;
  in[s.T - 1] = 1;
  lab[s.T - 1] = in[p + 1];
}

// Queries sit at even offsets 2*g after the context; every other free position gets a token
// uniform in [0, V) (Zoology's random_non_queries).
void place_queries(const TaskSpec& s, Rng& r, int64_t ctx, const std::vector<int64_t>& q, const std::vector<int64_t>& ans,
                   int64_t* in, int64_t* lab) {
  const int64_t n = static_cast<int64_t>(q.size());
  const std::vector<int64_t> gaps = power_law_gaps(r, (s.T - ctx) / 2, n, s.power_a);
  std::vector<char> used(s.T, 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = ctx + 2 * gaps[j];
    in[p] = q[j];
    lab[p] = ans[j];
    used[p] = 1;
  }
  for (int64_t t = ctx; t < s.T; ++t)
    if (!used[t]) in[t] = r.below(s.V);
}

void gen_mqar(const TaskSpec& s, Rng& r, int64_t* in, int64_t* lab) {
  const int64_t N = s.N, half = s.V / 2;
  const std::vector<int64_t> keys = distinct(r, 1, half, N);
  const std::vector<int64_t> vals = distinct(r, half, s.V, N);
  for (int64_t j = 0; j < N; ++j) {
    in[2 * j] = keys[j];
    in[2 * j + 1] = vals[j];
  }
  place_queries(s, r, 2 * N, keys, vals, in, lab);  // gap j belongs to key j
}

void gen_multihop(const TaskSpec& s, Rng& r, int64_t* in, int64_t* lab) {
  const int64_t N = s.N, h = s.hops;
  // Chain c is x_{c,0} -> x_{c,1} -> ... -> x_{c,h}; all N*(h+1) tokens distinct, so the map is a
  // function, no chain meets another or itself, and stopping after fewer hops gives another token.
  const std::vector<int64_t> nodes = distinct(r, 1, s.V, N * (h + 1));
  std::vector<std::pair<int64_t, int64_t>> edges;
  edges.reserve(N * h);
  std::vector<int64_t> heads(N), ends(N);
  for (int64_t c = 0; c < N; ++c) {
    const int64_t* x = nodes.data() + c * (h + 1);
    for (int64_t i = 0; i < h; ++i) edges.emplace_back(x[i], x[i + 1]);
    heads[c] = x[0];
    ends[c] = x[h];
  }
  shuffle(r, edges);  // edge order carries no hint of the chains
  for (int64_t e = 0; e < N * h; ++e) {
    in[2 * e] = edges[e].first;
    in[2 * e + 1] = edges[e].second;
  }
  place_queries(s, r, 2 * N * h, heads, ends, in, lab);
}

// ---------------------------------------------------------------------------------------------
// JSONL

[[noreturn]] void bad_line(const std::string& name, int64_t line, const std::string& msg) {
  throw std::runtime_error(name + ":" + std::to_string(line) + ": " + msg);
}

std::vector<int64_t> read_tokens(const nlohmann::json& obj, const char* key, bool is_labels, const std::string& name,
                                 int64_t line) {
  auto it = obj.find(key);
  if (it == obj.end()) bad_line(name, line, std::string("missing key '") + key + "'");
  if (!it->is_array()) bad_line(name, line, std::string("'") + key + "' is " + it->type_name() + "; expected an array of integers");
  std::vector<int64_t> out;
  out.reserve(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    const nlohmann::json& v = (*it)[i];
    const std::string where = std::string(key) + "[" + std::to_string(i) + "] = " + v.dump();
    if (!v.is_number_integer()) bad_line(name, line, where + " is not an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      bad_line(name, line, where + " is too large");
    const int64_t x = v.get<int64_t>();
    if (is_labels && x < 0 && x != kIgnore) bad_line(name, line, where + "; expected -100 (unsupervised) or a token >= 0");
    if (!is_labels && x < 0) bad_line(name, line, where + " is negative; expected a token >= 0");
    out.push_back(x);
  }
  return out;
}

void write_row(std::ostream& out, const int64_t* in, const int64_t* lab, int64_t T) {
  out << "{\"input\": [";
  for (int64_t t = 0; t < T; ++t) out << (t ? ", " : "") << in[t];
  out << "], \"labels\": [";
  for (int64_t t = 0; t < T; ++t) out << (t ? ", " : "") << lab[t];
  out << "]}\n";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string TaskSpec::name() const { return info(task).name; }

std::string TaskSpec::str() const {
  const TaskInfo& i = info(task);
  std::string out = std::string(i.name) + ":";
  for (size_t k = 0; k < i.keys.size(); ++k) out += (k ? "," : "") + i.keys[k] + "=" + key_value(*this, i.keys[k]);
  return out;
}

bool TaskSpec::operator==(const TaskSpec& o) const {
  return task == o.task && T == o.T && V == o.V && L == o.L && N == o.N && hops == o.hops && power_a == o.power_a;
}

TaskSpec parse_task_spec(const std::string& spec) {
  auto fail = [&](const std::string& why) { bad("bad task spec '" + spec + "': " + why + "; " + accepted_forms()); };
  const size_t colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  const TaskInfo* ti = nullptr;
  for (auto& i : task_table())
    if (name == i.name) ti = &i;
  if (!ti) fail("unknown task '" + name + "'");
  TaskSpec s = ti->defaults;
  if (colon == std::string::npos) {
    validate(s);
    return s;
  }
  std::map<std::string, bool> seen;
  std::stringstream rest(spec.substr(colon + 1));
  std::string item;
  while (std::getline(rest, item, ',')) {
    if (item.empty()) fail("empty item");
    const size_t eq = item.find('=');
    if (eq == std::string::npos) fail("item '" + item + "' is not key=value");
    const std::string key = item.substr(0, eq), val = item.substr(eq + 1);
    if (std::find(ti->keys.begin(), ti->keys.end(), key) == ti->keys.end()) {
      std::string keys;
      for (auto& k : ti->keys) keys += (keys.empty() ? "" : ", ") + k;
      fail("key '" + key + "' is not known to " + ti->name + " (its keys: " + keys + ")");
    }
    if (seen[key]) fail("key '" + key + "' given twice");
    seen[key] = true;
    if (key == "a") {
      size_t used = 0;
      double x = 0;
      try {
        x = std::stod(val, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (val.empty() || used != val.size()) fail("a = '" + val + "' is not a number");
      s.power_a = x;
      continue;
    }
    if (val.empty() || val.size() > 12 || val.find_first_not_of("0123456789") != std::string::npos)
      fail(key + " = '" + val + "' is not a positive integer");
    const int64_t x = std::stoll(val);
    if (key == "T") s.T = x;
    if (key == "V") s.V = x;
    if (key == "L") s.L = x;
    if (key == "N") s.N = x;
    if (key == "hops") s.hops = x;
  }
  if (!spec.empty() && spec.back() == ',') fail("empty item");
  validate(s);
  return s;
}

int64_t vocab_size(const TaskSpec& spec) { return spec.V; }

void generate_example(const TaskSpec& spec, uint64_t seed, int64_t index, int64_t* input, int64_t* labels) {
  Rng r(seed, index);
  std::fill(labels, labels + spec.T, kIgnore);
  switch (spec.task) {
    case Task::Copy: gen_copy(spec, r, input, labels); break;
    case Task::MQAR: gen_mqar(spec, r, input, labels); break;
    case Task::MultiHop: gen_multihop(spec, r, input, labels); break;
    case Task::SelectiveCopy: gen_selective_copy(spec, r, input, labels); break;
    case Task::Induction: gen_induction(spec, r, input, labels); break;
  }
}

Batch make_batch(const TaskSpec& spec, int64_t batch_size, uint64_t seed, int64_t batch_index) {
  validate(spec);
  if (batch_size < 1) bad("batch size " + std::to_string(batch_size) + "; expected >= 1");
  if (batch_index < 0) bad("batch index " + std::to_string(batch_index) + "; expected >= 0");
  Batch b{torch::empty({batch_size, spec.T}, torch::kInt64), torch::empty({batch_size, spec.T}, torch::kInt64)};
  int64_t* in = b.input.data_ptr<int64_t>();
  int64_t* lab = b.labels.data_ptr<int64_t>();
  // rows are independent streams, so threads cannot change the result
  at::parallel_for(0, batch_size, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      generate_example(spec, seed, batch_index * batch_size + i, in + i * spec.T, lab + i * spec.T);
  });
  return b;
}

// ---------------------------------------------------------------------------------------------

int64_t Dataset::max_length() const {
  int64_t m = 0;
  for (auto& r : input) m = std::max<int64_t>(m, static_cast<int64_t>(r.size()));
  return m;
}

int64_t Dataset::vocab_size() const {
  int64_t m = -1;
  for (auto* rows : {&input, &labels})
    for (auto& r : *rows)
      for (int64_t x : r) m = std::max(m, x);
  return m + 1;
}

Batch Dataset::batch(const std::vector<int64_t>& rows) const {
  if (rows.empty()) bad("Dataset::batch: no rows requested");
  int64_t T = 0;
  for (int64_t r : rows) {
    if (r < 0 || r >= size()) bad("Dataset::batch: row " + std::to_string(r) + " is outside [0, " + std::to_string(size()) + ")");
    if (input[r].size() != labels[r].size()) bad("Dataset::batch: row " + std::to_string(r) + " has input and labels of different lengths");
    T = std::max<int64_t>(T, static_cast<int64_t>(input[r].size()));
  }
  const int64_t B = static_cast<int64_t>(rows.size());
  Batch b{torch::zeros({B, T}, torch::kInt64), torch::full({B, T}, kIgnore, torch::kInt64)};
  int64_t* in = b.input.data_ptr<int64_t>();
  int64_t* lab = b.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    std::copy(input[rows[i]].begin(), input[rows[i]].end(), in + i * T);
    std::copy(labels[rows[i]].begin(), labels[rows[i]].end(), lab + i * T);
  }
  return b;
}

Batch Dataset::batch(int64_t first, int64_t count) const {
  if (count < 1) bad("Dataset::batch: count " + std::to_string(count) + "; expected >= 1");
  std::vector<int64_t> rows(count);
  for (int64_t i = 0; i < count; ++i) rows[i] = first + i;
  return batch(rows);
}

Dataset read_jsonl(std::istream& in, const std::string& name) {
  Dataset d;
  std::string text;
  int64_t line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    nlohmann::json obj;
    try {
      obj = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      bad_line(name, line, std::string("bad JSON: ") + e.what());
    }
    if (!obj.is_object()) bad_line(name, line, std::string("a line must be a JSON object {\"input\": [...], \"labels\": [...]}; got ") + obj.type_name());
    std::vector<int64_t> x = read_tokens(obj, "input", false, name, line);
    std::vector<int64_t> y = read_tokens(obj, "labels", true, name, line);
    if (x.size() != y.size())
      bad_line(name, line, "'input' has " + std::to_string(x.size()) + " tokens but 'labels' has " + std::to_string(y.size()) +
                               "; expected equal lengths");
    if (x.empty()) bad_line(name, line, "empty sequence; expected at least one token");
    d.input.push_back(std::move(x));
    d.labels.push_back(std::move(y));
  }
  if (in.bad()) throw std::runtime_error(name + ": read error");
  return d;
}

Dataset read_jsonl(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(path + ": cannot open for reading");
  return read_jsonl(f, path);
}

void write_jsonl(std::ostream& out, const Batch& batch) {
  const torch::Tensor in = batch.input.to(torch::kCPU, torch::kInt64).contiguous();
  const torch::Tensor lab = batch.labels.to(torch::kCPU, torch::kInt64).contiguous();
  if (in.dim() != 2 || !in.sizes().equals(lab.sizes())) bad("write_jsonl: input and labels must both be [B, T]");
  const int64_t B = in.size(0), T = in.size(1);
  for (int64_t b = 0; b < B; ++b) write_row(out, in.data_ptr<int64_t>() + b * T, lab.data_ptr<int64_t>() + b * T, T);
}

void write_jsonl(std::ostream& out, const Dataset& data) {
  for (int64_t i = 0; i < data.size(); ++i) {
    if (data.input[i].size() != data.labels[i].size()) bad("write_jsonl: row " + std::to_string(i) + " has input and labels of different lengths");
    write_row(out, data.input[i].data(), data.labels[i].data(), static_cast<int64_t>(data.input[i].size()));
  }
}

void write_jsonl(const std::string& path, const Batch& batch) {
  std::ofstream f(path);
  if (!f) throw std::runtime_error(path + ": cannot open for writing");
  write_jsonl(f, batch);
  if (!f) throw std::runtime_error(path + ": write error");
}

Dataset to_dataset(const Batch& batch) {
  const torch::Tensor in = batch.input.to(torch::kCPU, torch::kInt64).contiguous();
  const torch::Tensor lab = batch.labels.to(torch::kCPU, torch::kInt64).contiguous();
  if (in.dim() != 2 || !in.sizes().equals(lab.sizes())) bad("to_dataset: input and labels must both be [B, T]");
  Dataset d;
  const int64_t B = in.size(0), T = in.size(1);
  for (int64_t b = 0; b < B; ++b) {
    d.input.emplace_back(in.data_ptr<int64_t>() + b * T, in.data_ptr<int64_t>() + (b + 1) * T);
    d.labels.emplace_back(lab.data_ptr<int64_t>() + b * T, lab.data_ptr<int64_t>() + (b + 1) * T);
  }
  return d;
}

}  // namespace tokmix::data
