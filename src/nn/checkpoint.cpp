// Checkpoints (atomic directory replacement, checksummed files, validation before any change)
// and the safetensors format, written and read here without outside code.
#include "tokmix/nn/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

namespace tokmix::nn {

namespace fs = std::filesystem;
using nlohmann::json;
using torch::Tensor;

namespace detail {
std::function<void(const std::string& stage)> save_hook;
}

namespace {

constexpr const char* kFormat = "tokmix-checkpoint";
constexpr int64_t kVersion = 1;
constexpr size_t kMaxSmallFile = size_t(16) << 20;          // manifest, config, tokenizer
constexpr uint64_t kMaxSafetensorsHeader = uint64_t(100) << 20;

[[noreturn]] void fail(const std::string& msg) { throw CheckpointError(msg); }

bool little_endian_host() {
  const uint16_t one = 1;
  unsigned char c;
  std::memcpy(&c, &one, 1);
  return c == 1;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string sys_error(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) fail(sys_error("cannot open for fsync", path));
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail(sys_error("fsync failed on", path));
}

// Writes and fsyncs one file (not atomic by itself).
void write_file_synced(const std::string& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(sys_error("cannot create", path));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      errno = e;
      fail(sys_error("write failed on", path));
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    errno = e;
    fail(sys_error("fsync failed on", path));
  }
  if (::close(fd) != 0) fail(sys_error("close failed on", path));
}

std::string parent_of(const std::string& path) {
  fs::path p = fs::absolute(fs::path(path)).parent_path();
  return p.empty() ? "." : p.string();
}

std::string unique_suffix() {
  static std::atomic<int64_t> counter{0};
  return std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

struct DType {
  const char* name;
  torch::ScalarType type;
  int64_t size;
};
const std::vector<DType>& dtypes() {
  static const std::vector<DType> d = {{"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
                                       {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
                                       {"I16", torch::kInt16, 2},     {"I8", torch::kInt8, 1},    {"U8", torch::kUInt8, 1},
                                       {"BOOL", torch::kBool, 1}};
  return d;
}

std::string optimizer_kind(torch::optim::Optimizer& o) {
  if (dynamic_cast<torch::optim::AdamW*>(&o)) return "AdamW";
  if (dynamic_cast<torch::optim::Adam*>(&o)) return "Adam";
  if (dynamic_cast<torch::optim::SGD*>(&o)) return "SGD";
  if (dynamic_cast<torch::optim::RMSprop*>(&o)) return "RMSprop";
  if (dynamic_cast<torch::optim::Adagrad*>(&o)) return "Adagrad";
  if (dynamic_cast<torch::optim::LBFGS*>(&o)) return "LBFGS";
  return typeid(o).name();
}

json optimizer_layout(torch::optim::Optimizer& o) {
  json groups = json::array();
  for (auto& g : o.param_groups()) {
    json sizes = json::array();
    for (auto& p : g.params()) sizes.push_back(p.numel());
    groups.push_back(sizes);
  }
  return groups;
}

NamedTensors model_tensors(LanguageModelImpl& model) {
  NamedTensors out;
  for (const auto& kv : model.named_parameters(/*recurse=*/true)) out.emplace_back(kv.key(), kv.value());
  return out;
}

const std::vector<std::string> kFiles = {"config.json", "tokenizer.json", "model.safetensors", "optimizer.pt"};

struct Manifest {
  int64_t step = 0;
  std::string optimizer;
  json optimizer_layout;
  std::map<std::string, std::pair<uint64_t, std::string>> files;  // name -> (bytes, checksum)
};

Manifest read_manifest(const std::string& dir) {
  if (!fs::is_directory(dir)) fail("checkpoint '" + dir + "': no such directory");
  const std::string path = dir + "/checkpoint.json";
  if (!fs::exists(path)) fail("checkpoint '" + dir + "': checkpoint.json is missing (not a checkpoint, or an interrupted write)");
  std::string text = read_file(path, kMaxSmallFile);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(path + ": not valid JSON (truncated or corrupted): " + e.what());
  }
  auto bad = [&](const std::string& m) { fail(path + ": " + m); };
  if (!j.is_object()) bad("expected a JSON object");
  if (j.value("format", json()) != json(kFormat)) bad("format is not \"" + std::string(kFormat) + "\"");
  if (!j.contains("version") || !j["version"].is_number_integer() || j["version"].get<int64_t>() != kVersion)
    bad("version " + (j.contains("version") ? j["version"].dump() : std::string("(missing)")) + " is not supported; expected " +
        std::to_string(kVersion));
  Manifest m;
  if (!j.contains("step") || !j["step"].is_number_integer() || j["step"].get<int64_t>() < 0) bad("step: expected an integer >= 0");
  m.step = j["step"].get<int64_t>();
  if (!j.contains("optimizer") || !j["optimizer"].is_string()) bad("optimizer: expected a string");
  m.optimizer = j["optimizer"].get<std::string>();
  m.optimizer_layout = j.value("optimizer_layout", json());
  if (!j.contains("files") || !j["files"].is_object()) bad("files: expected an object");
  for (auto it = j["files"].begin(); it != j["files"].end(); ++it) {
    if (std::find(kFiles.begin(), kFiles.end(), it.key()) == kFiles.end()) bad("files: unknown file '" + it.key() + "'");
    const json& e = it.value();
    if (!e.is_object() || !e.contains("bytes") || !e["bytes"].is_number_unsigned() || !e.contains("fnv1a64") || !e["fnv1a64"].is_string() ||
        e["fnv1a64"].get<std::string>().size() != 16)
      bad("files." + it.key() + ": expected {\"bytes\": integer, \"fnv1a64\": 16 hex digits}");
    m.files[it.key()] = {e["bytes"].get<uint64_t>(), e["fnv1a64"].get<std::string>()};
  }
  for (const char* f : {"config.json", "tokenizer.json", "model.safetensors"})
    if (!m.files.count(f)) bad(std::string("files: '") + f + "' is not listed");
  if (m.optimizer.empty() != (m.files.count("optimizer.pt") == 0)) bad("optimizer and files.optimizer.pt disagree");
  return m;
}

std::string read_verified(const std::string& dir, const Manifest& m, const std::string& name) {
  const std::string path = dir + "/" + name;
  const auto& [bytes, sum] = m.files.at(name);
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path + ": missing (the manifest lists it)");
  const uint64_t size = fs::file_size(path, ec);
  if (ec) fail(path + ": cannot read its size: " + ec.message());
  if (size != bytes)
    fail(path + ": " + std::to_string(size) + " bytes where the manifest says " + std::to_string(bytes) + " (truncated or replaced)");
  std::string data = read_file(path, size_t(bytes) + 1);
  if (hex64(fnv1a64(data.data(), data.size())) != sum) fail(path + ": checksum mismatch (corrupted)");
  return data;
}

json parse_json_file(const std::string& path, const std::string& text) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(path + ": not valid JSON: " + e.what());
  }
}

}  // namespace

uint64_t fnv1a64(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

std::string read_file(const std::string& path, size_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open '" + path + "'");
  f.seekg(0, std::ios::end);
  const std::streamoff size = f.tellg();
  if (size < 0) fail("cannot read '" + path + "'");
  if (uint64_t(size) > max_bytes)
    fail("'" + path + "' has " + std::to_string(size) + " bytes; expected at most " + std::to_string(max_bytes));
  f.seekg(0);
  std::string data(size_t(size), '\0');
  if (size > 0 && !f.read(&data[0], size)) fail("cannot read '" + path + "'");
  return data;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp-" + unique_suffix();
  try {
    write_file_synced(tmp, bytes);
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(sys_error("cannot rename onto", path));
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  fsync_path(parent_of(path), true);
}

// ---------------------------------------------------------------------------------------------
// safetensors

std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  if (!little_endian_host()) fail("safetensors: this host is big-endian; writing is not supported");
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> data;
  std::set<std::string> names;
  uint64_t off = 0;
  for (const auto& [name, t0] : tensors) {
    if (name.empty() || name == "__metadata__") fail("safetensors: tensor name '" + name + "' is not allowed");
    if (!names.insert(name).second) fail("safetensors: tensor name '" + name + "' appears twice");
    Tensor t = t0.detach().to(torch::kCPU).contiguous();
    const DType* dt = nullptr;
    for (const auto& d : dtypes())
      if (d.type == t.scalar_type()) dt = &d;
    if (!dt) fail(std::string("safetensors: tensor '") + name + "' has dtype " + c10::toString(t.scalar_type()) + ", which has no safetensors code");
    const uint64_t n = uint64_t(t.numel()) * uint64_t(dt->size);
    header[name] = {{"dtype", dt->name}, {"shape", t.sizes().vec()}, {"data_offsets", {off, off + n}}};
    off += n;
    data.push_back(t);
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::string out(8, '\0');
  const uint64_t hl = h.size();
  for (int b = 0; b < 8; ++b) out[b] = char((hl >> (8 * b)) & 0xff);
  out += h;
  out.reserve(out.size() + off);
  for (const auto& t : data) out.append(static_cast<const char*>(t.data_ptr()), size_t(t.numel()) * t.element_size());
  return out;
}

NamedTensors parse_safetensors(const std::string& bytes, std::map<std::string, std::string>* metadata) {
  auto bad = [](const std::string& m) { fail("safetensors: " + m); };
  if (!little_endian_host()) bad("this host is big-endian; reading is not supported");
  if (bytes.size() < 8) bad("file of " + std::to_string(bytes.size()) + " bytes is shorter than the 8-byte header length");
  uint64_t hl = 0;
  for (int b = 0; b < 8; ++b) hl |= uint64_t(static_cast<unsigned char>(bytes[b])) << (8 * b);
  if (hl > kMaxSafetensorsHeader) bad("header length " + std::to_string(hl) + " exceeds the limit of " + std::to_string(kMaxSafetensorsHeader));
  if (hl > bytes.size() - 8)
    bad("header length " + std::to_string(hl) + " exceeds the " + std::to_string(bytes.size() - 8) + " bytes that follow (truncated)");
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(hl));
  } catch (const json::exception& e) {
    bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) bad("header is not a JSON object");
  const uint64_t data_size = bytes.size() - 8 - hl;
  const char* data = bytes.data() + 8 + hl;
  struct Item {
    std::string name;
    const DType* dt;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Item> items;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) bad("__metadata__ is not an object of strings");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) bad("__metadata__." + m.key() + " is not a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (name.empty()) bad("a tensor has an empty name");
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") || e.size() != 3)
      bad("tensor '" + name + "': expected exactly {dtype, shape, data_offsets}");
    if (!e["dtype"].is_string()) bad("tensor '" + name + "': dtype is not a string");
    Item item{name, nullptr, {}, 0, 0};
    const std::string dn = e["dtype"].get<std::string>();
    for (const auto& d : dtypes())
      if (dn == d.name) item.dt = &d;
    if (!item.dt) bad("tensor '" + name + "': dtype '" + dn + "' is not supported; expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL");
    const json& sh = e["shape"];
    if (!sh.is_array() || sh.size() > 16) bad("tensor '" + name + "': shape must be an array of at most 16 integers");
    uint64_t numel = 1;
    for (const auto& d : sh) {
      if (!d.is_number_unsigned()) bad("tensor '" + name + "': shape entry " + d.dump() + " is not a non-negative integer");
      const uint64_t v = d.get<uint64_t>();
      if (v > (uint64_t(1) << 40) || __builtin_mul_overflow(numel, v, &numel) || numel > (uint64_t(1) << 40))
        bad("tensor '" + name + "': shape is too large");
      item.shape.push_back(int64_t(v));
    }
    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad("tensor '" + name + "': data_offsets must be [begin, end] with non-negative integers");
    item.begin = off[0].get<uint64_t>();
    item.end = off[1].get<uint64_t>();
    if (item.begin > item.end || item.end > data_size)
      bad("tensor '" + name + "': data_offsets [" + std::to_string(item.begin) + ", " + std::to_string(item.end) + "] lie outside the " +
          std::to_string(data_size) + " data bytes (truncated?)");
    if (item.end - item.begin != numel * uint64_t(item.dt->size))
      bad("tensor '" + name + "': data_offsets span " + std::to_string(item.end - item.begin) + " bytes; dtype and shape need " +
          std::to_string(numel * uint64_t(item.dt->size)));
    items.push_back(std::move(item));
  }
  std::vector<const Item*> order;
  for (const auto& i : items) order.push_back(&i);
  std::sort(order.begin(), order.end(), [](const Item* a, const Item* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t at = 0;
  for (const Item* i : order) {
    if (i->begin != at) bad("tensor '" + i->name + "' starts at byte " + std::to_string(i->begin) + "; expected " + std::to_string(at) + " (gap or overlap)");
    at = i->end;
  }
  if (at != data_size) bad("the tensors cover " + std::to_string(at) + " of " + std::to_string(data_size) + " data bytes");
  NamedTensors out;  // in file order
  for (const Item* i : order) {
    Tensor t = torch::empty(i->shape, torch::TensorOptions().dtype(i->dt->type));
    if (i->end > i->begin) std::memcpy(t.data_ptr(), data + i->begin, size_t(i->end - i->begin));
    out.emplace_back(i->name, t);
  }
  return out;
}

void write_safetensors(const std::string& path, const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, safetensors_bytes(tensors, metadata));
}

NamedTensors read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  try {
    return parse_safetensors(read_file(path), metadata);
  } catch (const CheckpointError& e) {
    fail(path + ": " + e.what());
  }
}

// Pairs (parameter, tensor of the file) after checking that the file holds exactly the
// model's tensors, by name, with their dtypes and shapes, and finite; `where` names the file in
// errors. Nothing is copied, so a refused file changes nothing.
static std::vector<std::pair<Tensor, Tensor>> match_weights(LanguageModelImpl& model, const NamedTensors& file, const std::string& where) {
  std::map<std::string, Tensor> by_name;
  for (auto& [n, t] : file) by_name[n] = t;
  std::vector<std::pair<Tensor, Tensor>> copies;
  std::set<std::string> used;
  for (auto& [name, p] : model_tensors(model)) {
    auto it = by_name.find(name);
    if (it == by_name.end()) fail(where + ": tensor '" + name + "' of the model is missing");
    const Tensor& t = it->second;
    if (t.scalar_type() != p.scalar_type())
      fail(where + ": tensor '" + name + "' has dtype " + c10::toString(t.scalar_type()) + "; the model has " +
           c10::toString(p.scalar_type()));
    if (!t.sizes().equals(p.sizes())) {
      std::ostringstream os;
      os << "tensor '" << name << "' has shape " << t.sizes() << "; the model has " << p.sizes();
      fail(where + ": " + os.str());
    }
    if (t.is_floating_point() && !torch::isfinite(t).all().item<bool>()) fail(where + ": tensor '" + name + "' contains NaN or Inf");
    copies.emplace_back(p, t);
    used.insert(name);
  }
  for (const auto& [n, t] : by_name)
    if (!used.count(n)) fail(where + ": tensor '" + n + "' is not a parameter of this model");
  return copies;
}

void export_safetensors(const std::string& path, LanguageModelImpl& model) {
  write_safetensors(path, model_tensors(model), {{"format", "pt"}, {"tokmix_config", model.config().to_json().dump()}});
}

LanguageModel import_safetensors(const std::string& path) {
  std::map<std::string, std::string> meta;
  NamedTensors file = read_safetensors(path, &meta);
  auto it = meta.find("tokmix_config");
  if (it == meta.end()) fail(path + ": no tokmix_config in the safetensors metadata; expected a file from export_safetensors");
  LanguageModel model(ModelConfig::from_text(it->second, path + " (tokmix_config)"));
  torch::NoGradGuard ng;
  for (auto& [p, t] : match_weights(*model, file, path)) p.copy_(t);
  return model;
}

// ---------------------------------------------------------------------------------------------
// checkpoints

void save_checkpoint(const std::string& dir_in, LanguageModelImpl& model, const json& tokenizer, int64_t step,
                     torch::optim::Optimizer* optimizer) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (dir.empty()) fail("save_checkpoint: empty directory name");
  if (step < 0) fail("save_checkpoint: step " + std::to_string(step) + "; expected >= 0");
  if (fs::exists(dir) && !fs::is_directory(dir)) fail("save_checkpoint: '" + dir + "' exists and is not a directory");
  // a diverged model must not replace a good checkpoint
  NamedTensors weights = model_tensors(model);
  for (const auto& [name, t] : weights)
    if (t.is_floating_point() && !torch::isfinite(t).all().item<bool>())
      fail("save_checkpoint: parameter '" + name + "' contains NaN or Inf; nothing written, the previous checkpoint is kept");
  const fs::path parent = fs::absolute(fs::path(dir)).parent_path();
  fs::create_directories(parent);
  std::string tokenizer_text;
  try {
    tokenizer_text = tokenizer.dump(2) + "\n";
  } catch (const json::exception& e) {
    fail(std::string("save_checkpoint: the tokenizer description cannot be written as JSON: ") + e.what());
  }
  // Leftovers of an interrupted save: unfinished new ones go; a previous checkpoint moved
  // aside (where no atomic exchange exists) comes back if nothing replaced it.
  const std::string base = fs::path(dir).filename().string();
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(parent)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(base + ".tmp-", 0) == 0) stale.push_back(e.path());
    if (n.rfind(base + ".old-", 0) == 0) {
      if (!fs::exists(dir))
        fs::rename(e.path(), dir);
      else
        stale.push_back(e.path());
    }
  }
  for (const auto& p : stale) fs::remove_all(p);
  const std::string tmp = dir + ".tmp-" + unique_suffix();
  fs::create_directories(tmp);
  auto hook = [](const char* stage) {
    if (detail::save_hook) detail::save_hook(stage);
  };
  json files = json::object();
  auto put = [&](const std::string& name, const std::string& bytes) {
    write_file_synced(tmp + "/" + name, bytes);
    files[name] = {{"bytes", uint64_t(bytes.size())}, {"fnv1a64", hex64(fnv1a64(bytes.data(), bytes.size()))}};
  };
  put("config.json", model.config().to_json().dump(2) + "\n");
  hook("config");
  put("tokenizer.json", tokenizer_text);
  hook("tokenizer");
  put("model.safetensors", safetensors_bytes(weights, {{"format", "pt"}}));
  hook("weights");
  json manifest = {{"format", kFormat}, {"version", kVersion}, {"step", step}, {"optimizer", ""}};
  if (optimizer) {
    std::ostringstream os;
    try {
      torch::serialize::OutputArchive ar;
      optimizer->save(ar);
      ar.save_to(os);
    } catch (const std::exception& e) {
      fail(std::string("save_checkpoint: cannot serialise the optimizer: ") + e.what());
    }
    put("optimizer.pt", os.str());
    manifest["optimizer"] = optimizer_kind(*optimizer);
    manifest["optimizer_layout"] = optimizer_layout(*optimizer);
    hook("optimizer");
  }
  manifest["files"] = files;
  write_file_synced(tmp + "/checkpoint.json", manifest.dump(2) + "\n");
  hook("manifest");
  fsync_path(tmp, true);
  hook("before-rename");
  if (fs::exists(dir)) {
    // swap new and old in one step; the old one then sits at `tmp` and is removed
    long rc = -1;
#if defined(__linux__) && defined(SYS_renameat2)
    rc = ::syscall(SYS_renameat2, AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE);
#endif
    if (rc != 0) {
      // no atomic exchange here: move the old one aside first (a crash in between leaves it
      // at dir.old-*, complete)
      const std::string old = dir + ".old-" + unique_suffix();
      if (std::rename(dir.c_str(), old.c_str()) != 0) fail(sys_error("cannot move the previous checkpoint aside", dir));
      if (std::rename(tmp.c_str(), dir.c_str()) != 0) fail(sys_error("cannot rename the new checkpoint onto", dir));
      fs::remove_all(old);
    } else {
      fs::remove_all(tmp);
    }
  } else if (std::rename(tmp.c_str(), dir.c_str()) != 0) {
    fail(sys_error("cannot rename the new checkpoint onto", dir));
  }
  fsync_path(parent.string(), true);
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  Manifest m = read_manifest(dir);
  CheckpointInfo info;
  info.step = m.step;
  info.optimizer = m.optimizer;
  const std::string cfg_text = read_verified(dir, m, "config.json");
  try {
    info.config = ModelConfig::from_text(cfg_text, dir + "/config.json");
  } catch (const ConfigError& e) {
    fail(e.what());
  }
  info.tokenizer = parse_json_file(dir + "/tokenizer.json", read_verified(dir, m, "tokenizer.json"));
  return info;
}

CheckpointInfo load_checkpoint(const std::string& dir, LanguageModelImpl& model, torch::optim::Optimizer* optimizer) {
  CheckpointInfo info = read_checkpoint_info(dir);
  Manifest m = read_manifest(dir);
  if (info.config != model.config())
    fail("checkpoint '" + dir + "' was written for a different model (checkpoint != this model):\n" + config_diff(info.config, model.config()));
  NamedTensors file;
  try {
    file = parse_safetensors(read_verified(dir, m, "model.safetensors"));
  } catch (const CheckpointError& e) {
    fail(dir + "/model.safetensors: " + e.what());
  }
  const auto copies = match_weights(model, file, dir + "/model.safetensors");
  if (optimizer) {
    if (m.optimizer.empty()) fail("checkpoint '" + dir + "' holds no optimizer state; load without an optimizer");
    const std::string kind = optimizer_kind(*optimizer);
    if (kind != m.optimizer) fail("checkpoint '" + dir + "' holds " + m.optimizer + " state; the optimizer given is " + kind);
    if (m.optimizer_layout != optimizer_layout(*optimizer))
      fail("checkpoint '" + dir + "': the optimizer state covers parameter groups " + m.optimizer_layout.dump() +
           "; the optimizer given has " + optimizer_layout(*optimizer).dump());
    const std::string bytes = read_verified(dir, m, "optimizer.pt");
    try {
      torch::serialize::InputArchive ar;
      std::istringstream is(bytes);
      ar.load_from(is);
      optimizer->load(ar);
    } catch (const std::exception& e) {
      fail(dir + "/optimizer.pt: cannot load the optimizer state: " + e.what());
    }
  }
  torch::NoGradGuard ng;
  for (auto& [p, t] : copies) p.copy_(t);
  return info;
}

std::pair<LanguageModel, CheckpointInfo> load_model(const std::string& dir) {
  CheckpointInfo info = read_checkpoint_info(dir);
  LanguageModel model(info.config);
  load_checkpoint(dir, *model);
  return {model, info};
}

}  // namespace tokmix::nn
