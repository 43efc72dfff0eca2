#include "tokmix/data/corpus.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <dlfcn.h>

#include <mutex>

#include "tokmix_build_config.h"

#include "tokmix/nn/checkpoint.h"  // write_file_atomic, fnv1a64

namespace tokmix::data {
namespace fs = std::filesystem;

namespace {

std::string base64_encode(const std::string& in) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += tbl[(v >> s) & 63];
  }
  if (i < in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    if (i + 1 < in.size()) v |= uint8_t(in[i + 1]) << 8;
    out += tbl[(v >> 18) & 63];
    out += tbl[(v >> 12) & 63];
    out += i + 1 < in.size() ? tbl[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string base64_decode(const std::string& in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (in.size() % 4) throw std::invalid_argument("tokenizer: model bytes are not base64 (length " + std::to_string(in.size()) + ")");
  std::string out;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    for (int k = 0; k < 4; ++k) {
      v[k] = in[i + k] == '=' ? 0 : val(in[i + k]);
      if (v[k] < 0) throw std::invalid_argument("tokenizer: model bytes are not base64 (character at " + std::to_string(i + k) + ")");
    }
    uint32_t w = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out += char(w >> 16);
    if (in[i + 2] != '=') out += char((w >> 8) & 255);
    if (in[i + 3] != '=') out += char(w & 255);
  }
  return out;
}

void check_ids(const std::vector<int64_t>& ids, int64_t V) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= V)
      throw std::invalid_argument("token id " + std::to_string(ids[i]) + " (at " + std::to_string(i) + ") is outside the vocabulary [0, " +
                                  std::to_string(V) + ")");
}

class ByteTokenizer final : public Tokenizer {
 public:
  std::string type() const override { return "byte"; }
  int64_t vocab_size() const override { return 256; }
  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = uint8_t(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    check_ids(ids, 256);
    std::string s(ids.size(), '\0');
    for (size_t i = 0; i < ids.size(); ++i) s[i] = char(uint8_t(ids[i]));
    return s;
  }
  nlohmann::json to_json() const override { return {{"type", "byte"}, {"vocab_size", 256}}; }
};

// sentencepiece lives in its own shared object (src/data/spm/spm_shim.cpp says why), loaded on
// first use: next to the executable, at $TOKMIX_SPM_LIBRARY, or where this build put it.
struct Spm {
  void (*free_)(void*) = nullptr;
  int (*train)(const char*, char**, size_t*, char**) = nullptr;
  void* (*load)(const char*, size_t, char**) = nullptr;
  void (*unload)(void*) = nullptr;
  int (*vocab)(void*) = nullptr;
  int (*encode)(void*, const char*, size_t, int**, size_t*, char**) = nullptr;
  int (*decode)(void*, const int*, size_t, char**, size_t*, char**) = nullptr;
  std::string error;
  bool ok() const { return decode != nullptr; }
};

const Spm& spm() {
  static Spm s;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> paths;
    if (const char* e = std::getenv("TOKMIX_SPM_LIBRARY")) paths.push_back(e);
    std::error_code ec;
    auto exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) paths.push_back((exe.parent_path() / "libtokmix_spm.so").string());
#ifdef TOKMIX_SPM_BUILD_PATH
    paths.push_back(TOKMIX_SPM_BUILD_PATH);
#endif
    void* h = nullptr;
    std::string tried;
    for (auto& p : paths) {
      if (!fs::exists(p)) {
        tried += " " + p + " (absent)";
        continue;
      }
      h = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (h) break;
      tried += " " + p + " (" + dlerror() + ")";
    }
    if (!h) {
      s.error = "the sentencepiece module libtokmix_spm.so is not available (tried:" + tried +
                "); build with libsentencepiece-dev installed, or use the byte tokenizer";
      return;
    }
    s.free_ = reinterpret_cast<void (*)(void*)>(dlsym(h, "tokmix_spm_free"));
    s.train = reinterpret_cast<int (*)(const char*, char**, size_t*, char**)>(dlsym(h, "tokmix_spm_train"));
    s.load = reinterpret_cast<void* (*)(const char*, size_t, char**)>(dlsym(h, "tokmix_spm_load"));
    s.unload = reinterpret_cast<void (*)(void*)>(dlsym(h, "tokmix_spm_unload"));
    s.vocab = reinterpret_cast<int (*)(void*)>(dlsym(h, "tokmix_spm_vocab"));
    s.encode = reinterpret_cast<int (*)(void*, const char*, size_t, int**, size_t*, char**)>(dlsym(h, "tokmix_spm_encode"));
    s.decode = reinterpret_cast<int (*)(void*, const int*, size_t, char**, size_t*, char**)>(dlsym(h, "tokmix_spm_decode"));
    if (!(s.free_ && s.train && s.load && s.unload && s.vocab && s.encode && s.decode)) {
      s.decode = nullptr;
      s.error = "libtokmix_spm.so lacks its entry points";
    }
  });
  return s;
}

const Spm& spm_or_throw() {
  const Spm& s = spm();
  if (!s.ok()) throw std::invalid_argument(s.error);
  return s;
}

std::string take_error(const Spm& s, char* err) {
  std::string e = err ? err : "unknown error";
  if (err) s.free_(err);
  return e;
}

class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(std::string model) : model_(std::move(model)) {
    const Spm& s = spm_or_throw();
    char* err = nullptr;
    h_ = s.load(model_.data(), model_.size(), &err);
    if (!h_) throw std::invalid_argument("tokenizer: the BPE model cannot be loaded: " + take_error(s, err));
  }
  ~BpeTokenizer() override { spm().unload(h_); }
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;
  std::string type() const override { return "bpe"; }
  int64_t vocab_size() const override { return spm().vocab(h_); }
  std::vector<int64_t> encode(const std::string& text) const override {
    const int64_t bad = first_invalid_utf8(text);
    if (bad >= 0)
      throw std::invalid_argument("text is not valid UTF-8 at byte " + std::to_string(bad) + " (value " +
                                  std::to_string(int(uint8_t(text[bad]))) + "); the BPE tokenizer needs UTF-8 text");
    const Spm& s = spm();
    int* ids = nullptr;
    size_t n = 0;
    char* err = nullptr;
    if (s.encode(h_, text.data(), text.size(), &ids, &n, &err) != 0) throw std::runtime_error("BPE encode failed: " + take_error(s, err));
    std::vector<int64_t> out(ids, ids + n);
    s.free_(ids);
    return out;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    check_ids(ids, vocab_size());
    const Spm& s = spm();
    std::vector<int> v(ids.begin(), ids.end());
    char* text = nullptr;
    size_t len = 0;
    char* err = nullptr;
    if (s.decode(h_, v.data(), v.size(), &text, &len, &err) != 0) throw std::runtime_error("BPE decode failed: " + take_error(s, err));
    std::string out(text, len);
    s.free_(text);
    return out;
  }
  nlohmann::json to_json() const override {
    return {{"type", "bpe"}, {"vocab_size", vocab_size()}, {"library", "sentencepiece"}, {"model_base64", base64_encode(model_)}};
  }

 private:
  std::string model_;
  void* h_ = nullptr;
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::invalid_argument("cannot read '" + path + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// End of the block that starts at pos: the first line break at or after pos + bytes (or the end).
size_t block_end(const std::string& t, size_t pos, size_t bytes) {
  const size_t end = std::min(t.size(), pos + bytes);
  if (end == t.size()) return end;
  const size_t nl = t.find('\n', end);
  return nl == std::string::npos ? t.size() : nl + 1;
}

// "Ge1:1 In the beginning ..." -> "In the beginning ..."
std::string strip_verse_refs(const std::string& raw) {
  std::string out;
  out.reserve(raw.size());
  size_t pos = 0;
  while (pos < raw.size()) {
    size_t end = raw.find('\n', pos);
    if (end == std::string::npos) end = raw.size();
    size_t sp = raw.find(' ', pos);
    size_t start = pos;
    if (sp != std::string::npos && sp < end && sp > pos) {
      std::string ref = raw.substr(pos, sp - pos);
      if (ref.find(':') != std::string::npos && std::isdigit(uint8_t(ref.back()))) start = sp + 1;
    }
    out.append(raw, start, end - start);
    out += '\n';
    pos = end + 1;
  }
  return out;
}

std::string kjv_text() {
  // the whole Bible as one passage; `bible` prints "Ref text" lines
  FILE* p = popen("bible -f 'Gen1:1-Rev22:21' 2>/dev/null", "r");
  std::string raw;
  if (p) {
    std::array<char, 1 << 16> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) raw.append(buf.data(), n);
    pclose(p);
  }
  if (raw.size() < 1000000)
    throw std::invalid_argument("source 'kjv' needs Debian's bible-kjv package (`apt-get install bible-kjv`; the `bible` command printed " +
                                std::to_string(raw.size()) + " bytes)");
  return strip_verse_refs(raw);
}

}  // namespace

bool sentencepiece_available() { return spm().ok(); }

int64_t first_invalid_utf8(const std::string& s) {
  const auto* b = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t c = b[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return int64_t(i);
    }
    if (i + len > n) return int64_t(i);
    for (size_t k = 1; k < len; ++k) {
      if ((b[i + k] & 0xC0) != 0x80) return int64_t(i);
      cp = (cp << 6) | (b[i + k] & 0x3F);
    }
    // overlong forms, surrogates, beyond U+10FFFF
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || (cp >= 0xD800 && cp <= 0xDFFF) ||
        cp > 0x10FFFF)
      return int64_t(i);
    i += len;
  }
  return -1;
}

std::unique_ptr<Tokenizer> Tokenizer::byte_level() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> Tokenizer::from_json(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    throw std::invalid_argument("tokenizer description must be an object with a 'type' (byte or bpe), got " + j.dump().substr(0, 200));
  const std::string t = j["type"];
  if (t == "byte") return byte_level();
  if (t == "bpe") {
    if (!j.contains("model_base64") || !j["model_base64"].is_string())
      throw std::invalid_argument("BPE tokenizer description lacks 'model_base64'");
    return std::make_unique<BpeTokenizer>(base64_decode(j["model_base64"].get<std::string>()));
  }
  throw std::invalid_argument("tokenizer type '" + t + "' is not known; accepted: byte, bpe (this tokenizer belongs to a " +
                              "synthetic-task or token-id checkpoint and has no text form)");
}

bool Tokenizer::spec_valid(const std::string& spec, std::string* why) {
  if (spec == "byte") return true;
  if (spec.rfind("bpe:", 0) == 0) {
    try {
      size_t used = 0;
      long long n = std::stoll(spec.substr(4), &used);
      if (used == spec.size() - 4 && n >= 300 && n <= 65536) return true;
    } catch (...) {
    }
    if (why) *why = "'" + spec + "': BPE vocabulary must be an integer in [300, 65536]";
    return false;
  }
  if (why) *why = "tokenizer '" + spec + "' is not known; accepted: byte, bpe:N (N in [300, 65536])";
  return false;
}

std::unique_ptr<Tokenizer> Tokenizer::train_bpe(const std::string& text_path, int64_t vocab, int threads, std::ostream* log) {
  const Spm& s = spm_or_throw();
  const std::vector<std::pair<std::string, std::string>> kw = {
      {"input", text_path},
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab)},
      {"character_coverage", "1.0"},
      {"byte_fallback", "true"},
      // faithful round trips: no normalization, no dummy prefix, whitespace kept as is
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"split_digits", "true"},
      {"bos_id", "-1"},
      {"eos_id", "-1"},
      {"unk_id", "0"},
      {"num_threads", std::to_string(std::max(1, threads > 0 ? threads : int(std::thread::hardware_concurrency())))},
      {"minloglevel", "2"},
  };
  std::string args;
  for (auto& [k, v] : kw) args += k + "=" + v + "\n";
  if (log) *log << "[corpus] training a BPE tokenizer (vocabulary " << vocab << ") on " << text_path << "\n";
  char* model = nullptr;
  size_t len = 0;
  char* err = nullptr;
  if (s.train(args.c_str(), &model, &len, &err) != 0) throw std::runtime_error("BPE training failed: " + take_error(s, err));
  std::string bytes(model, len);
  s.free_(model);
  return std::make_unique<BpeTokenizer>(bytes);
}

std::string read_text_sources(const std::vector<std::string>& sources) {
  if (sources.empty()) throw std::invalid_argument("no text sources given; accepted: kjv, a file, a folder");
  std::string text;
  for (const auto& s : sources) {
    std::string part;
    if (s == "kjv") {
      part = kjv_text();
    } else if (fs::is_directory(s)) {
      std::vector<fs::path> files;
      for (auto& e : fs::recursive_directory_iterator(s))
        if (e.is_regular_file()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
      if (files.empty()) throw std::invalid_argument("source folder '" + s + "' holds no regular files");
      for (auto& f : files) {
        if (!part.empty()) part += "\n\n";
        part += read_all(f.string());
      }
    } else if (fs::is_regular_file(s)) {
      part = read_all(s);
    } else {
      throw std::invalid_argument("source '" + s + "' is neither 'kjv', a file nor a folder");
    }
    if (!text.empty()) text += "\n\n";
    text += part;
  }
  if (text.empty()) throw std::invalid_argument("the sources hold no text");
  return text;
}

std::string CorpusInfo::path(const std::string& split) const { return (fs::path(dir) / (split + ".bin")).string(); }

CorpusInfo read_corpus_info(const std::string& dir) {
  const auto p = fs::path(dir) / "corpus.json";
  if (!fs::exists(p)) throw std::invalid_argument("'" + dir + "' is not a corpus directory (no corpus.json; build one with `tokmix corpus`)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_all(p.string()));
  } catch (const std::exception& e) {
    throw std::invalid_argument(p.string() + ": " + e.what());
  }
  CorpusInfo c;
  c.dir = dir;
  try {
    c.dtype = j.at("dtype");
    c.vocab_size = j.at("vocab_size");
    c.train_tokens = j.at("train_tokens");
    c.val_tokens = j.at("val_tokens");
    c.train_bytes = j.at("train_bytes");
    c.val_bytes = j.at("val_bytes");
    c.tokenizer = j.at("tokenizer");
    c.sources = j.value("sources", nlohmann::json::array());
  } catch (const std::exception& e) {
    throw std::invalid_argument(p.string() + ": " + e.what());
  }
  if (c.dtype != "uint16" && c.dtype != "uint32") throw std::invalid_argument(p.string() + ": dtype '" + c.dtype + "'; expected uint16 or uint32");
  const int w = c.dtype == "uint16" ? 2 : 4;
  for (auto [split, n] : {std::pair<std::string, int64_t>{"train", c.train_tokens}, {"val", c.val_tokens}}) {
    std::error_code ec;
    const auto sz = fs::file_size(c.path(split), ec);
    if (ec || int64_t(sz) != n * w)
      throw std::invalid_argument(c.path(split) + ": expected " + std::to_string(n * w) + " bytes (" + std::to_string(n) + " tokens of " +
                                  c.dtype + "), found " + (ec ? "no file" : std::to_string(sz)));
  }
  return c;
}

CorpusInfo build_corpus(const CorpusOptions& o, std::ostream* log) {
  std::string why;
  if (!Tokenizer::spec_valid(o.tokenizer, &why)) throw std::invalid_argument(why);
  if (o.out.empty()) throw std::invalid_argument("corpus: an output directory is required");
  if (o.val_every < 2) throw std::invalid_argument("corpus: val_every = " + std::to_string(o.val_every) + "; expected >= 2");
  std::string text;
  try {
    text = read_text_sources(o.sources);
  } catch (const std::invalid_argument& e) {
    // the sources are not here (a GPU machine without the bible-kjv package), but a corpus built
    // from them with the same options travelled with the work tree: use it
    try {
      auto j = nlohmann::json::parse(read_all((fs::path(o.out) / "corpus.json").string()));
      auto k = j.at("key");
      if (k.at("sources") == nlohmann::json(o.sources) && k.at("tokenizer") == o.tokenizer && k.at("val_every") == o.val_every &&
          k.at("block_bytes") == o.block_bytes) {
        auto info = read_corpus_info(o.out);
        if (log) *log << "[corpus] sources unavailable (" << e.what() << "); using the corpus already built in " << o.out << "\n";
        return info;
      }
    } catch (const std::exception&) {
    }
    throw;
  }
  const uint64_t text_hash = nn::fnv1a64(text.data(), text.size());
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)text_hash);
  nlohmann::json key = {{"sources", o.sources}, {"tokenizer", o.tokenizer}, {"val_every", o.val_every},
                        {"block_bytes", o.block_bytes}, {"text_fnv1a64", hex}};
  // reuse: same text, same options
  try {
    const auto p = fs::path(o.out) / "corpus.json";
    if (fs::exists(p)) {
      auto j = nlohmann::json::parse(read_all(p.string()));
      if (j.value("key", nlohmann::json()) == key) {
        auto info = read_corpus_info(o.out);
        if (log) *log << "[corpus] " << o.out << " is up to date (" << info.train_tokens << " train / " << info.val_tokens << " val tokens)\n";
        return info;
      }
    }
  } catch (const std::exception&) {
    // unreadable or stale: rebuild
  }
  fs::create_directories(o.out);
  // deterministic split: blocks that end at a line break; every val_every-th block is validation
  std::string train_text, val_text;
  size_t pos = 0;
  int64_t block = 0;
  while (pos < text.size()) {
    const size_t end = block_end(text, pos, size_t(o.block_bytes));
    ((block % o.val_every) == o.val_every - 1 ? val_text : train_text).append(text, pos, end - pos);
    pos = end;
    ++block;
  }
  if (val_text.empty()) {  // a short text: the last tenth, at a line break, is validation
    size_t cut = train_text.size() * 9 / 10;
    size_t nl = train_text.find('\n', cut);
    cut = nl == std::string::npos ? cut : nl + 1;
    val_text = train_text.substr(cut);
    train_text.resize(cut);
  }
  if (train_text.empty() || val_text.empty())
    throw std::invalid_argument("corpus: the text (" + std::to_string(text.size()) + " bytes) is too short to split into train and validation");

  std::unique_ptr<Tokenizer> tok;
  if (o.tokenizer == "byte") {
    tok = Tokenizer::byte_level();
  } else {
    const auto tmp = fs::path(o.out) / "train.txt.tmp";
    {
      std::ofstream f(tmp, std::ios::binary);
      f << train_text;
    }
    tok = Tokenizer::train_bpe(tmp.string(), std::stoll(o.tokenizer.substr(4)), o.threads, log);
    fs::remove(tmp);
    // for users and other tools; the checkpoint carries its own copy
    nn::write_file_atomic((fs::path(o.out) / "tokenizer.model").string(),
                          base64_decode(tok->to_json()["model_base64"].get<std::string>()));
  }
  CorpusInfo info;
  info.dir = o.out;
  info.vocab_size = tok->vocab_size();
  info.dtype = info.vocab_size <= 65536 ? "uint16" : "uint32";
  info.tokenizer = tok->to_json();
  info.sources = o.sources;
  info.train_bytes = int64_t(train_text.size());
  info.val_bytes = int64_t(val_text.size());
  auto tokenize = [&](const std::string& t, const std::string& split) {
    std::string bytes;
    int64_t count = 0;
    // encode block by block at line breaks: bounded memory, and BPE pieces never cross lines
    size_t p = 0;
    while (p < t.size()) {
      const size_t end = block_end(t, p, size_t(1) << 16);
      auto ids = tok->encode(t.substr(p, end - p));
      for (int64_t id : ids) {
        if (info.dtype == "uint16") {
          uint16_t v = uint16_t(id);
          bytes.append(reinterpret_cast<const char*>(&v), 2);
        } else {
          uint32_t v = uint32_t(id);
          bytes.append(reinterpret_cast<const char*>(&v), 4);
        }
      }
      count += int64_t(ids.size());
      p = end;
    }
    nn::write_file_atomic(info.path(split), bytes);
    if (log) *log << "[corpus] " << split << ": " << t.size() << " bytes -> " << count << " tokens\n";
    return count;
  };
  info.train_tokens = tokenize(train_text, "train");
  info.val_tokens = tokenize(val_text, "val");
  nlohmann::json j = {{"format", "tokmix-corpus"}, {"version", 1},
                      {"dtype", info.dtype},        {"vocab_size", info.vocab_size},
                      {"train_tokens", info.train_tokens}, {"val_tokens", info.val_tokens},
                      {"train_bytes", info.train_bytes},   {"val_bytes", info.val_bytes},
                      {"tokenizer", info.tokenizer},        {"sources", info.sources},
                      {"key", key}};
  nn::write_file_atomic((fs::path(o.out) / "corpus.json").string(), j.dump(1) + "\n");
  return info;
}

// --- memory-mapped token files ---------------------------------------------------------------

TokenFile::TokenFile(const std::string& path, const std::string& dtype, int64_t vocab_size) : path_(path) {
  if (dtype != "uint16" && dtype != "uint32") throw std::invalid_argument("token file dtype '" + dtype + "'; expected uint16 or uint32");
  width_ = dtype == "uint16" ? 2 : 4;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::invalid_argument("cannot open token file '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size % width_ != 0) {
    ::close(fd);
    throw std::invalid_argument("token file '" + path + "' has " + std::to_string(st.st_size) + " bytes, not a multiple of " +
                                std::to_string(width_));
  }
  bytes_ = size_t(st.st_size);
  n_ = int64_t(bytes_ / width_);
  if (bytes_ > 0) {
    void* p = mmap(nullptr, bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw std::runtime_error("cannot map token file '" + path + "': " + std::strerror(errno));
    }
    madvise(p, bytes_, MADV_RANDOM);
    data_ = p;
  }
  ::close(fd);
  // a corrupted file must not feed the embedding an id it does not have
  int64_t max_id = 0;
  for (int64_t i = 0; i < n_; ++i) max_id = std::max(max_id, at(i));
  if (n_ > 0 && max_id >= vocab_size) {
    release();
    throw std::invalid_argument("token file '" + path + "' holds id " + std::to_string(max_id) + ", outside the vocabulary [0, " +
                                std::to_string(vocab_size) + ")");
  }
}

TokenFile::~TokenFile() { release(); }
void TokenFile::release() {
  if (data_) munmap(const_cast<void*>(data_), bytes_);
  data_ = nullptr;
  bytes_ = 0;
  n_ = 0;
}
TokenFile::TokenFile(TokenFile&& o) noexcept { *this = std::move(o); }
TokenFile& TokenFile::operator=(TokenFile&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    n_ = o.n_;
    width_ = o.width_;
    path_ = std::move(o.path_);
    o.data_ = nullptr;
    o.bytes_ = 0;
    o.n_ = 0;
  }
  return *this;
}

int64_t TokenFile::at(int64_t i) const {
  return width_ == 2 ? int64_t(static_cast<const uint16_t*>(data_)[i]) : int64_t(static_cast<const uint32_t*>(data_)[i]);
}

void TokenFile::read(int64_t start, int64_t len, int64_t* dst) const {
  if (start < 0 || len < 0 || start + len > n_)
    throw std::out_of_range("token window [" + std::to_string(start) + ", " + std::to_string(start + len) + ") outside '" + path_ +
                            "' of " + std::to_string(n_) + " tokens");
  if (width_ == 2) {
    const auto* p = static_cast<const uint16_t*>(data_) + start;
    for (int64_t i = 0; i < len; ++i) dst[i] = p[i];
  } else {
    const auto* p = static_cast<const uint32_t*>(data_) + start;
    for (int64_t i = 0; i < len; ++i) dst[i] = p[i];
  }
}

int64_t train_window_start(uint64_t seed, int64_t step, int64_t row, int64_t file_tokens, int64_t T) {
  const int64_t span = file_tokens - T;  // starts 0 .. file_tokens - T - 1 leave T + 1 tokens
  if (span <= 0)
    throw std::invalid_argument("the training split has " + std::to_string(file_tokens) + " tokens, fewer than a window of context " +
                                std::to_string(T) + " + 1");
  // splitmix64 of (seed, step, row)
  uint64_t x = seed * 0x9E3779B97F4A7C15ULL ^ (uint64_t(step) * 0xBF58476D1CE4E5B9ULL) ^ (uint64_t(row) * 0x94D049BB133111EBULL);
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return int64_t(x % uint64_t(span));
}

int64_t num_val_windows(int64_t file_tokens, int64_t T, int64_t max_windows) {
  const int64_t fit = file_tokens > T ? (file_tokens - 1) / T : 0;
  return max_windows > 0 ? std::min(fit, max_windows) : fit;
}

}  // namespace tokmix::data
