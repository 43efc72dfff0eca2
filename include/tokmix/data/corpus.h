// Text corpora for language modeling: tokenizers (byte-level, sentencepiece BPE), a corpus built
// once into memory-mapped token files with a deterministic train/validation split, and random
// windows of the context length drawn from them. Definitions: docs/lm.md.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tokmix::data {

// Text <-> token ids. A tokenizer describes itself as JSON that holds everything needed to
// rebuild it (a BPE model's bytes included), so a checkpoint carries its tokenizer.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string type() const = 0;  // "byte" | "bpe"
  virtual int64_t vocab_size() const = 0;
  // Byte-level accepts any bytes; BPE needs valid UTF-8 (an error names the first bad byte).
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  // Ids outside [0, vocab_size) are an error naming the id.
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual nlohmann::json to_json() const = 0;

  static std::unique_ptr<Tokenizer> from_json(const nlohmann::json& j);
  static std::unique_ptr<Tokenizer> byte_level();
  // Trains a sentencepiece BPE model on a text file (byte fallback on, so every UTF-8 text
  // encodes). Throws when this build has no sentencepiece.
  static std::unique_ptr<Tokenizer> train_bpe(const std::string& text_path, int64_t vocab_size, int threads,
                                              std::ostream* log = nullptr);
  // "byte" or "bpe:N": what build_corpus accepts.
  static bool spec_valid(const std::string& spec, std::string* why = nullptr);
};

bool sentencepiece_available();

// Position of the first byte that breaks UTF-8, or -1 when the text is valid.
int64_t first_invalid_utf8(const std::string& s);

// Reads the sources into one text. A source is "kjv" (the King James Bible from Debian's
// bible-kjv package, verse references stripped, one verse per line), a file, or a folder (its
// regular files, recursively, in sorted order). Sources are joined by a blank line.
std::string read_text_sources(const std::vector<std::string>& sources);

struct CorpusOptions {
  std::vector<std::string> sources = {"kjv"};
  std::string tokenizer = "byte";  // "byte" | "bpe:N"
  std::string out;                 // corpus directory
  int64_t val_every = 20;          // every val_every-th block goes to validation (5%)
  int64_t block_bytes = 1 << 16;   // split unit: blocks end at a line break at or after this size
  int threads = 0;
};

// What a corpus directory holds (corpus.json): token files train.bin / val.bin (little-endian
// uint16 when the vocabulary fits, else uint32), their token and byte counts, the tokenizer.
struct CorpusInfo {
  std::string dir;
  std::string dtype;  // "uint16" | "uint32"
  int64_t vocab_size = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  int64_t train_bytes = 0, val_bytes = 0;
  nlohmann::json tokenizer;
  nlohmann::json sources;
  std::string path(const std::string& split) const;  // train.bin | val.bin
};

// Builds (or, when the directory already holds a corpus of the same options, reuses) a corpus.
// Files are written atomically; corpus.json last.
CorpusInfo build_corpus(const CorpusOptions& o, std::ostream* log = nullptr);
CorpusInfo read_corpus_info(const std::string& dir);

// A memory-mapped token file.
class TokenFile {
 public:
  TokenFile() = default;
  TokenFile(const std::string& path, const std::string& dtype, int64_t vocab_size);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;
  TokenFile(TokenFile&& o) noexcept;
  TokenFile& operator=(TokenFile&& o) noexcept;

  int64_t size() const { return n_; }
  int64_t at(int64_t i) const;
  // Copies tokens [start, start + len) as int64.
  void read(int64_t start, int64_t len, int64_t* dst) const;

 private:
  void release();
  const void* data_ = nullptr;
  size_t bytes_ = 0;
  int64_t n_ = 0;
  int width_ = 2;
  std::string path_;
};

// Windows of T + 1 tokens: input = tokens[s, s+T), labels = tokens[s+1, s+T+1).
// Training window (seed, step, row) starts at a position drawn from a hash of the three, so a
// batch is a function of them alone (exact resume; data-parallel shards of one global batch).
int64_t train_window_start(uint64_t seed, int64_t step, int64_t row, int64_t file_tokens, int64_t T);
// Validation windows: consecutive non-overlapping windows from the start of val.bin, at most
// max_windows of them (0 = all that fit).
int64_t num_val_windows(int64_t file_tokens, int64_t T, int64_t max_windows);

}  // namespace tokmix::data
