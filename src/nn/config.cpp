// Model configs: strict validation (unknown keys, wrong types, impossible values are errors that
// name the key and the accepted values) and the mixer registry.
#include "tokmix/nn/config.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "tokmix/pattern.h"

namespace tokmix::nn {
namespace {

using nlohmann::json;

// Bounds that keep a config (and so a model built from it) within reason; a fuzzed or mistyped
// file must not ask for terabytes.
constexpr int64_t kMaxVocab = int64_t(1) << 24;
constexpr int64_t kMaxWidth = int64_t(1) << 16;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxContext = int64_t(1) << 24;
constexpr int64_t kMaxConv = 256;

std::string type_name(const json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  return v.type_name();
}

std::string show(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

std::string join(const std::vector<std::string>& xs, const char* sep = ", ") {
  std::string out;
  for (const auto& x : xs) out += (out.empty() ? "" : sep) + x;
  return out;
}

struct Reader {
  std::string origin;

  [[noreturn]] void fail(const std::string& key, const std::string& msg) const {
    throw ConfigError(origin + ": " + key + ": " + msg);
  }
  int64_t integer(const json& v, const std::string& key, int64_t lo, int64_t hi) const {
    if (!v.is_number_integer())
      fail(key, "got " + type_name(v) + " " + show(v) + "; expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi))
      fail(key, "value " + show(v) + " is out of range; expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    int64_t x = v.get<int64_t>();
    if (x < lo || x > hi)
      fail(key, "value " + std::to_string(x) + " is out of range; expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return x;
  }
  double number(const json& v, const std::string& key, const std::string& what) const {
    if (!v.is_number()) fail(key, "got " + type_name(v) + " " + show(v) + "; expected a number " + what);
    return v.get<double>();
  }
  bool boolean(const json& v, const std::string& key) const {
    if (!v.is_boolean()) fail(key, "got " + type_name(v) + " " + show(v) + "; expected true or false");
    return v.get<bool>();
  }
  std::string string(const json& v, const std::string& key) const {
    if (!v.is_string()) fail(key, "got " + type_name(v) + " " + show(v) + "; expected a string");
    return v.get<std::string>();
  }
  std::string choice(const json& v, const std::string& key, const std::vector<std::string>& accepted) const {
    if (!v.is_string()) fail(key, "got " + type_name(v) + " " + show(v) + "; expected one of: " + join(accepted, " | "));
    std::string s = v.get<std::string>();
    if (std::find(accepted.begin(), accepted.end(), s) == accepted.end())
      fail(key, "'" + s + "' is not accepted; expected one of: " + join(accepted, " | "));
    return s;
  }
};

const std::vector<std::string> kModelKeys = {"name",     "comment",  "vocab_size", "d_model",  "n_layers", "max_context", "positions",
                                             "rope_theta", "mlp",    "mlp_hidden", "norm_eps", "init_std", "mixer",       "layers"};
const std::vector<std::string> kCommonMixerKeys = {"type", "mode",  "heads",  "d_key", "d_value", "conv",
                                                   "output_gate", "level_bias", "qk_norm", "gamma", "rotary", "impl"};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::vector<MixerType>& registry() {
  static std::vector<MixerType> r = [] {
    auto fixed = [](std::string name, std::string summary) {
      MixerType t;
      t.name = name;
      t.summary = std::move(summary);
      t.example = json{{"type", name}};
      t.spec = [name](const json&) { return name; };
      return t;
    };
    std::vector<MixerType> v;
    v.push_back(fixed("attention", "softmax attention: SA(i) = [1, i]; O(n) per token, O(n) cache"));
    {
      MixerType t;
      t.name = "local";
      t.summary = "local attention, window W: SA(i) = [i-W+1, i]; O(W) per token and cache";
      t.keys = t.required = {"window"};
      t.example = json{{"type", "local"}, {"window", 8}};
      t.spec = [](const json& p) { return "local:" + std::to_string(p.at("window").get<int64_t>()); };
      v.push_back(t);
    }
    v.push_back(fixed("first-order", "first-order recurrence = diagonal SSM: SA = {i}, SB = {i-1}; O(1)"));
    {
      MixerType t;
      t.name = "recurrence";
      t.summary = "k-th order recurrence: SA = {i}, SB = {i-1..i-K}; O(K)";
      t.keys = t.required = {"order"};
      t.example = json{{"type", "recurrence"}, {"order", 3}};
      t.spec = [](const json& p) { return "recurrence:" + std::to_string(p.at("order").get<int64_t>()); };
      v.push_back(t);
    }
    v.push_back(fixed("dense", "dense recurrence: SA = {i}, SB = [1, i-1]; O(n)"));
    v.push_back(fixed("pow2", "f-pattern f(k) = 2^k: SB = {i - 2^k}; O(log n) per token, O(n) cache"));
    v.push_back(fixed("sq1", "f-pattern f(k) = k^2+1: SB = {i - k^2 - 1}; O(sqrt n) per token, O(n) cache"));
    v.push_back(fixed("pow2-lattice", "cache-efficient pow2 lattice; O(log n) per token and cache"));
    v.push_back(fixed("sq1-lattice", "cache-efficient sq1 lattice; O(sqrt n) per token and cache"));
    {
      MixerType t;
      t.name = "f";
      t.summary = "custom f-pattern: f as a formula in k (\"3^k\") or a list (\"1,3,9,27\"); lattice: cache-efficient form";
      t.keys = {"f", "lattice"};
      t.required = {"f"};
      t.example = json{{"type", "f"}, {"f", "3^k"}};
      t.spec = [](const json& p) {
        bool lattice = p.contains("lattice") && p.at("lattice").get<bool>();
        return "f:" + p.at("f").get<std::string>() + (lattice ? "-lattice" : "");
      };
      v.push_back(t);
    }
    {
      MixerType t;
      t.name = "hybrid";
      t.summary = "union of supports: the A side of instance a, the B side of instance b (e.g. a = local:64, b = pow2)";
      t.keys = t.required = {"a", "b"};
      t.example = json{{"type", "hybrid"}, {"a", "local:4"}, {"b", "pow2"}};
      t.spec = [](const json& p) { return "A=" + p.at("a").get<std::string>() + ";B=" + p.at("b").get<std::string>(); };
      v.push_back(t);
    }
    {
      MixerType t;
      t.name = "pattern";
      t.summary = "any pattern spec accepted by `tokmix pattern`";
      t.keys = t.required = {"spec"};
      t.example = json{{"type", "pattern"}, {"spec", "A=attention;B=sq1-lattice"}};
      t.spec = [](const json& p) { return p.at("spec").get<std::string>(); };
      v.push_back(t);
    }
    return v;
  }();
  return r;
}

// Values of a type's own keys: integers >= 1 (window, order), strings (f, a, b, spec), lattice.
void check_type_key(const Reader& rd, const std::string& key, const json& v, const std::string& path) {
  if (key == "window" || key == "order") {
    rd.integer(v, path, 1, kMaxContext);
  } else if (key == "lattice") {
    rd.boolean(v, path);
  } else {
    std::string s = rd.string(v, path);
    if (s.empty()) rd.fail(path, "empty string; expected " + std::string(key == "f" ? "a formula in k or a list" : "a pattern spec"));
    if (key != "spec" && (s.find(';') != std::string::npos || s.find('=') != std::string::npos))
      rd.fail(path, "'" + s + "' contains ';' or '='; expected a single instance (use type 'pattern' for a full spec)");
  }
}

struct Located {
  json value;
  std::string path;
};

MixerConfig resolve_mixer(const Reader& rd, const std::map<std::string, Located>& kv, const ModelConfig& m, const std::string& where) {
  MixerConfig c;
  auto path_of = [&](const std::string& k) { return kv.count(k) ? kv.at(k).path : where + "." + k; };
  auto has = [&](const std::string& k) { return kv.count(k) > 0; };
  auto val = [&](const std::string& k) -> const json& { return kv.at(k).value; };

  if (!has("type")) rd.fail(where + ".type", "missing; expected one of: " + mixer_type_names());
  const std::string type = rd.string(val("type"), path_of("type"));
  const MixerType* t = find_mixer_type(type);
  if (!t) rd.fail(path_of("type"), "mixer type '" + type + "' is not known; expected one of: " + mixer_type_names());
  c.type = type;

  for (const auto& [k, lv] : kv) {
    bool common = std::find(kCommonMixerKeys.begin(), kCommonMixerKeys.end(), k) != kCommonMixerKeys.end();
    bool own = std::find(t->keys.begin(), t->keys.end(), k) != t->keys.end();
    if (common || own) continue;
    std::vector<std::string> owners;
    for (const auto& o : mixer_types())
      if (std::find(o.keys.begin(), o.keys.end(), k) != o.keys.end()) owners.push_back(o.name);
    std::string accepted = "accepted keys for type '" + type + "': " + join(kCommonMixerKeys) + (t->keys.empty() ? "" : ", " + join(t->keys));
    if (!owners.empty()) rd.fail(lv.path, "does not apply to mixer type '" + type + "' (it belongs to: " + join(owners) + "); " + accepted);
    rd.fail(lv.path, "unknown key; " + accepted);
  }
  for (const auto& k : t->required)
    if (!has(k)) rd.fail(where + "." + k, "missing; mixer type '" + type + "' needs: " + join(t->required));
  c.params = json::object();
  for (const auto& k : t->keys)
    if (has(k)) {
      check_type_key(rd, k, val(k), path_of(k));
      c.params[k] = val(k);
    }
  try {
    c.spec = t->spec(c.params);
  } catch (const std::exception& e) {
    rd.fail(where, "mixer type '" + type + "' could not build its pattern: " + e.what());
  }
  std::unique_ptr<Pattern> pat;
  try {
    pat = std::make_unique<Pattern>(Pattern::parse(c.spec));
    pat->check_length(m.max_context);
  } catch (const PatternError& e) {
    std::string key = t->keys.empty() ? path_of("type") : path_of(t->keys.front());
    rd.fail(key, "pattern '" + c.spec + "' (max_context " + std::to_string(m.max_context) + "): " + e.what());
  }

  if (has("mode")) c.mode = rd.choice(val("mode"), path_of("mode"), {"softmax", "gate"});
  const bool explicit_heads = has("heads");
  c.heads = explicit_heads ? rd.integer(val("heads"), path_of("heads"), 1, kMaxWidth) : std::max<int64_t>(1, m.d_model / 64);
  const bool dk_given = has("d_key"), dv_given = has("d_value");
  if ((!dk_given || !dv_given) && m.d_model % c.heads != 0) {
    std::vector<std::string> divisors;
    for (int64_t d = 1; d <= m.d_model && divisors.size() < 24; ++d)
      if (m.d_model % d == 0) divisors.push_back(std::to_string(d));
    rd.fail(path_of("heads"), "heads = " + std::to_string(c.heads) + " does not divide d_model = " + std::to_string(m.d_model) +
                                   "; expected a divisor of d_model (" + join(divisors) + ") or explicit d_key and d_value");
  }
  c.d_key = dk_given ? rd.integer(val("d_key"), path_of("d_key"), 1, kMaxWidth) : m.d_model / c.heads;
  c.d_value = dv_given ? rd.integer(val("d_value"), path_of("d_value"), 1, kMaxWidth) : m.d_model / c.heads;
  if (has("conv")) c.conv = rd.integer(val("conv"), path_of("conv"), 0, kMaxConv);
  if (has("output_gate")) c.output_gate = rd.boolean(val("output_gate"), path_of("output_gate"));
  if (has("level_bias")) c.level_bias = rd.boolean(val("level_bias"), path_of("level_bias"));
  if (has("qk_norm")) c.qk_norm = rd.boolean(val("qk_norm"), path_of("qk_norm"));
  if (has("gamma")) {
    c.gamma = rd.number(val("gamma"), path_of("gamma"), "in (0, 1]");
    if (!(c.gamma > 0.0 && c.gamma <= 1.0)) rd.fail(path_of("gamma"), "value " + show(val("gamma")) + " is out of range; expected 0 < gamma <= 1");
  }
  const bool attention_like = pat->B().kind == SupportKind::None && pat->A().kind == SupportKind::Window;
  const bool window_a = pat->A().kind == SupportKind::Window;
  if (has("rotary")) {
    c.rotary = rd.boolean(val("rotary"), path_of("rotary"));
    if (c.rotary && m.positions != "rotary")
      rd.fail(path_of("rotary"), "true needs positions = \"rotary\" (the model has \"" + m.positions + "\")");
    if (c.rotary && c.mode == "gate") rd.fail(path_of("rotary"), "true needs mode \"softmax\" (gate mode has no keys to rotate)");
  } else {
    // rotary where keys are compared across a window; the recurrences need no positions
    c.rotary = m.positions == "rotary" && c.mode == "softmax" && window_a;
  }
  if (c.rotary && c.d_key % 2 != 0) rd.fail(path_of("d_key"), "d_key = " + std::to_string(c.d_key) + " is odd; rotary positions need an even d_key");
  const bool can_fuse = attention_like && c.mode == "softmax";
  if (has("impl")) {
    c.impl = rd.choice(val("impl"), path_of("impl"), {"fused", "generic"});
    if (c.impl == "fused" && !can_fuse)
      rd.fail(path_of("impl"), "\"fused\" needs an attention pattern (attention, local:W) in softmax mode; pattern '" + c.spec +
                                   "' in mode " + c.mode + " accepts only \"generic\"");
  } else {
    c.impl = can_fuse ? "fused" : "generic";
  }
  return c;
}

}  // namespace

const std::vector<MixerType>& mixer_types() { return registry(); }

const MixerType* find_mixer_type(const std::string& name) {
  for (const auto& t : registry())
    if (t.name == name) return &t;
  return nullptr;
}

void register_mixer_type(MixerType t) {
  std::lock_guard<std::mutex> lk(registry_mutex());
  if (find_mixer_type(t.name)) throw ConfigError("mixer type '" + t.name + "' is already registered");
  if (!t.spec) throw ConfigError("mixer type '" + t.name + "' has no spec builder");
  registry().push_back(std::move(t));
}

std::string mixer_type_names() {
  std::vector<std::string> n;
  for (const auto& t : registry()) n.push_back(t.name);
  return join(n, " | ");
}

json MixerConfig::to_json() const {
  json j = {{"type", type}};
  for (auto it = params.begin(); it != params.end(); ++it) j[it.key()] = it.value();
  j["mode"] = mode;
  j["heads"] = heads;
  j["d_key"] = d_key;
  j["d_value"] = d_value;
  j["conv"] = conv;
  j["output_gate"] = output_gate;
  j["level_bias"] = level_bias;
  j["qk_norm"] = qk_norm;
  j["gamma"] = gamma;
  j["rotary"] = rotary;
  j["impl"] = impl;
  return j;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& origin) {
  Reader rd{origin};
  if (!j.is_object()) rd.fail("(top level)", "got " + type_name(j) + "; expected a JSON object with keys " + join(kModelKeys));
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(kModelKeys.begin(), kModelKeys.end(), it.key()) == kModelKeys.end())
      rd.fail(it.key(), "unknown key; accepted keys: " + join(kModelKeys));
  auto need = [&](const char* k) -> const json& {
    if (!j.contains(k)) rd.fail(k, "missing; it is required");
    return j.at(k);
  };
  ModelConfig m;
  if (j.contains("name")) m.name = rd.string(j.at("name"), "name");
  if (j.contains("comment")) rd.string(j.at("comment"), "comment");
  m.vocab_size = rd.integer(need("vocab_size"), "vocab_size", 2, kMaxVocab);
  m.d_model = rd.integer(need("d_model"), "d_model", 1, kMaxWidth);
  m.n_layers = rd.integer(need("n_layers"), "n_layers", 1, kMaxLayers);
  m.max_context = rd.integer(need("max_context"), "max_context", 1, kMaxContext);
  if (j.contains("positions")) m.positions = rd.choice(j.at("positions"), "positions", {"rotary", "learned", "none"});
  if (j.contains("rope_theta")) {
    m.rope_theta = rd.number(j.at("rope_theta"), "rope_theta", "> 0");
    if (!(m.rope_theta > 0)) rd.fail("rope_theta", "value " + show(j.at("rope_theta")) + "; expected a number > 0");
  }
  if (j.contains("mlp")) m.mlp = rd.boolean(j.at("mlp"), "mlp");
  m.mlp_hidden = j.contains("mlp_hidden") ? rd.integer(j.at("mlp_hidden"), "mlp_hidden", 1, kMaxWidth * 8)
                                          : std::max<int64_t>(8, (8 * m.d_model / 3 + 7) / 8 * 8);
  if (j.contains("mlp_hidden") && !m.mlp) rd.fail("mlp_hidden", "given but mlp is false; remove it or set mlp to true");
  if (j.contains("norm_eps")) {
    m.norm_eps = rd.number(j.at("norm_eps"), "norm_eps", "in (0, 1)");
    if (!(m.norm_eps > 0 && m.norm_eps < 1)) rd.fail("norm_eps", "value " + show(j.at("norm_eps")) + "; expected a number in (0, 1)");
  }
  if (j.contains("init_std")) {
    m.init_std = rd.number(j.at("init_std"), "init_std", "in (0, 1]");
    if (!(m.init_std > 0 && m.init_std <= 1)) rd.fail("init_std", "value " + show(j.at("init_std")) + "; expected a number in (0, 1]");
  }

  // Layers: `mixer` holds defaults, `layers` (optional) per-layer entries repeated cyclically.
  json defaults = json::object();
  if (j.contains("mixer")) {
    if (!j.at("mixer").is_object()) rd.fail("mixer", "got " + type_name(j.at("mixer")) + "; expected an object such as {\"type\": \"pow2\"}");
    defaults = j.at("mixer");
  }
  json entries = json::array({json::object()});
  if (j.contains("layers")) {
    const json& l = j.at("layers");
    if (!l.is_array() || l.empty())
      rd.fail("layers", "got " + show(l) + "; expected a non-empty array of mixer objects, repeated cyclically over n_layers");
    if (m.n_layers % int64_t(l.size()) != 0)
      rd.fail("layers", "has " + std::to_string(l.size()) + " entries, which does not divide n_layers = " + std::to_string(m.n_layers) +
                            "; expected a divisor of n_layers (the entries repeat cyclically)");
    entries = l;
  }
  if (!j.contains("mixer") && !j.contains("layers")) rd.fail("mixer", "missing; give \"mixer\" (every layer) or \"layers\" (cyclic list)");
  std::vector<MixerConfig> distinct;
  for (size_t e = 0; e < entries.size(); ++e) {
    const std::string where = j.contains("layers") ? "layers[" + std::to_string(e) + "]" : "mixer";
    if (!entries[e].is_object()) rd.fail(where, "got " + type_name(entries[e]) + "; expected an object such as {\"type\": \"pow2\"}");
    std::map<std::string, Located> kv;
    for (auto it = defaults.begin(); it != defaults.end(); ++it) kv[it.key()] = {it.value(), "mixer." + it.key()};
    // a layer that names another type drops the defaults' type-specific keys
    if (entries[e].contains("type") && defaults.contains("type") && entries[e].at("type") != defaults.at("type") &&
        defaults.at("type").is_string())
      if (const MixerType* dt = find_mixer_type(defaults.at("type").get<std::string>()))
        for (const auto& k : dt->keys) kv.erase(k);
    for (auto it = entries[e].begin(); it != entries[e].end(); ++it) kv[it.key()] = {it.value(), where + "." + it.key()};
    distinct.push_back(resolve_mixer(rd, kv, m, where));
  }
  for (int64_t l = 0; l < m.n_layers; ++l) m.layers.push_back(distinct[l % distinct.size()]);
  return m;
}

ModelConfig ModelConfig::from_text(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ConfigError(origin + ": not valid JSON: " + e.what());
  }
  return from_json(j, origin);
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ConfigError(path + ": cannot open the config file");
  std::stringstream ss;
  ss << f.rdbuf();
  return from_text(ss.str(), path);
}

json ModelConfig::to_json() const {
  json j;
  if (!name.empty()) j["name"] = name;
  j["vocab_size"] = vocab_size;
  j["d_model"] = d_model;
  j["n_layers"] = n_layers;
  j["max_context"] = max_context;
  j["positions"] = positions;
  j["rope_theta"] = rope_theta;
  j["mlp"] = mlp;
  if (mlp) j["mlp_hidden"] = mlp_hidden;
  j["norm_eps"] = norm_eps;
  j["init_std"] = init_std;
  j["layers"] = json::array();
  for (const auto& l : layers) j["layers"].push_back(l.to_json());
  return j;
}

std::string config_diff(const ModelConfig& a, const ModelConfig& b) {
  json ja = a.to_json(), jb = b.to_json();
  std::string out;
  std::set<std::string> keys;
  for (auto it = ja.begin(); it != ja.end(); ++it) keys.insert(it.key());
  for (auto it = jb.begin(); it != jb.end(); ++it) keys.insert(it.key());
  for (const auto& k : keys) {
    if (k == "layers") continue;
    json va = ja.value(k, json()), vb = jb.value(k, json());
    if (va != vb) out += k + ": " + show(va) + " != " + show(vb) + "\n";
  }
  const json &la = ja["layers"], &lb = jb["layers"];
  if (la.size() != lb.size()) return out + "layers: " + std::to_string(la.size()) + " != " + std::to_string(lb.size()) + "\n";
  for (size_t l = 0; l < la.size(); ++l) {
    std::set<std::string> lk;
    for (auto it = la[l].begin(); it != la[l].end(); ++it) lk.insert(it.key());
    for (auto it = lb[l].begin(); it != lb[l].end(); ++it) lk.insert(it.key());
    for (const auto& k : lk) {
      json va = la[l].value(k, json()), vb = lb[l].value(k, json());
      if (va != vb) out += "layers[" + std::to_string(l) + "]." + k + ": " + show(va) + " != " + show(vb) + "\n";
    }
  }
  return out;
}

}  // namespace tokmix::nn
