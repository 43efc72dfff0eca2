// Corpora and tokenizers: byte round trips, UTF-8 validation, the deterministic split, memory-
// mapped token files, BPE round trips (when sentencepiece is present), the KJV source.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "tokmix/data/corpus.h"

using namespace tokmix::data;
namespace fs = std::filesystem;

namespace {

std::string tmpdir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("tokmix-corpus-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

// Lines of random words (a small vocabulary, so BPE finds merges), with some UTF-8.
std::string random_text(size_t bytes, uint64_t seed) {
  static const char* words[] = {"the", "and", "of", "lord", "said", "unto", "him", "that", "shall", "be", "ye", "Jerusalem",
                                "Ætheling", "naïve", "λόγος", "thee", "it", "is", "in", "was"};
  std::mt19937_64 rng(seed);
  std::string s;
  while (s.size() < bytes) {
    const int n = 3 + int(rng() % 12);
    for (int i = 0; i < n; ++i) s += std::string(i ? " " : "") + words[rng() % 20];
    s += rng() % 5 == 0 ? ".  \n" : ".\n";
  }
  return s;
}

std::string write_text(const std::string& dir, const std::string& text) {
  auto p = fs::path(dir) / "text.txt";
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

std::vector<int64_t> read_tokens(const CorpusInfo& c, const std::string& split) {
  TokenFile f(c.path(split), c.dtype, c.vocab_size);
  std::vector<int64_t> v(f.size());
  f.read(0, f.size(), v.data());
  return v;
}

}  // namespace

TEST(Tokenizer, ByteLevelRoundTripsAnyBytes) {
  auto t = Tokenizer::byte_level();
  std::mt19937_64 rng(std::random_device{}());
  std::string s(1000, '\0');
  for (auto& c : s) c = char(rng() & 255);
  auto ids = t->encode(s);
  ASSERT_EQ(ids.size(), s.size());
  for (auto id : ids) ASSERT_TRUE(id >= 0 && id < 256);
  EXPECT_EQ(t->decode(ids), s);
  EXPECT_EQ(t->vocab_size(), 256);
  try {
    t->decode({65, 256});
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("256"), std::string::npos) << e.what();
  }
  auto again = Tokenizer::from_json(t->to_json());
  EXPECT_EQ(again->encode(s), ids);
  EXPECT_THROW(Tokenizer::from_json(nlohmann::json{{"type", "synthetic"}}), std::invalid_argument);
}

TEST(Tokenizer, Utf8Validation) {
  EXPECT_EQ(first_invalid_utf8("plain ascii"), -1);
  EXPECT_EQ(first_invalid_utf8("na\xc3\xafve \xce\xbb\xcf\x8c\xce\xb3\xce\xbf\xcf\x82 \xf0\x9f\x98\x80"), -1);
  EXPECT_EQ(first_invalid_utf8("ab\xff"), 2);            // not a lead byte
  EXPECT_EQ(first_invalid_utf8("abc\xc3"), 3);           // truncated
  EXPECT_EQ(first_invalid_utf8("a\xc0\xaf"), 1);         // overlong '/'
  EXPECT_EQ(first_invalid_utf8("x\xed\xa0\x80"), 1);     // surrogate
  EXPECT_EQ(first_invalid_utf8("\xf4\x90\x80\x80"), 0);  // beyond U+10FFFF
  EXPECT_EQ(first_invalid_utf8("ok\xe2\x82"), 2);        // truncated 3-byte
}

TEST(Corpus, ByteCorpusSplitIsDeterministicAndLossless) {
  const auto dir = tmpdir("byte");
  const std::string text = random_text(300000, std::random_device{}());
  CorpusOptions o;
  o.sources = {write_text(dir, text)};
  o.out = dir + "/corpus";
  o.val_every = 10;
  o.block_bytes = 4096;
  auto c = build_corpus(o);
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.dtype, "uint16");
  EXPECT_EQ(c.train_bytes + c.val_bytes, int64_t(text.size()));
  EXPECT_EQ(c.train_tokens, c.train_bytes);
  EXPECT_EQ(c.val_tokens, c.val_bytes);
  const double frac = double(c.val_bytes) / double(text.size());
  EXPECT_GT(frac, 0.07);
  EXPECT_LT(frac, 0.13);
  // the splits are blocks of the text, in order: re-interleave them and compare
  auto train = read_tokens(c, "train"), val = read_tokens(c, "val");
  std::string tr(train.begin(), train.end()), va(val.begin(), val.end());
  std::string rebuilt;
  size_t pos = 0, tp = 0, vp = 0;
  int64_t block = 0;
  while (pos < text.size()) {
    size_t end = std::min(text.size(), pos + size_t(o.block_bytes));
    if (end < text.size()) {
      size_t nl = text.find('\n', end);
      end = nl == std::string::npos ? text.size() : nl + 1;
    }
    const size_t len = end - pos;
    if (block % o.val_every == o.val_every - 1) {
      rebuilt += va.substr(vp, len);
      vp += len;
    } else {
      rebuilt += tr.substr(tp, len);
      tp += len;
    }
    pos = end;
    ++block;
  }
  EXPECT_EQ(rebuilt, text);
  // same options, same text: reused without rewriting
  const auto mtime = fs::last_write_time(c.path("train"));
  auto c2 = build_corpus(o);
  EXPECT_EQ(fs::last_write_time(c2.path("train")), mtime);
  EXPECT_EQ(c2.train_tokens, c.train_tokens);
  // a different split rebuilds
  o.val_every = 4;
  auto c3 = build_corpus(o);
  EXPECT_GT(c3.val_tokens, c.val_tokens);
  fs::remove_all(dir);
}

TEST(Corpus, TokenFileChecksSizeAndVocabulary) {
  const auto dir = tmpdir("tokfile");
  {
    std::ofstream f(dir + "/odd.bin", std::ios::binary);
    f << "abc";
  }
  EXPECT_THROW(TokenFile(dir + "/odd.bin", "uint16", 256), std::invalid_argument);
  {
    std::ofstream f(dir + "/big.bin", std::ios::binary);
    uint16_t v[3] = {1, 2, 300};
    f.write(reinterpret_cast<const char*>(v), sizeof v);
  }
  try {
    TokenFile t(dir + "/big.bin", "uint16", 256);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("300"), std::string::npos) << e.what();
  }
  TokenFile ok(dir + "/big.bin", "uint16", 301);
  EXPECT_EQ(ok.size(), 3);
  EXPECT_EQ(ok.at(2), 300);
  int64_t buf[2];
  EXPECT_THROW(ok.read(2, 2, buf), std::out_of_range);
  EXPECT_THROW(TokenFile(dir + "/missing.bin", "uint16", 256), std::invalid_argument);
  EXPECT_THROW(TokenFile(dir + "/big.bin", "int8", 256), std::invalid_argument);
  EXPECT_THROW(read_corpus_info(dir), std::invalid_argument);
  fs::remove_all(dir);
}

TEST(Corpus, TrainWindowsAreInRangeAndDeterministic) {
  const int64_t n = 10000, T = 512;
  std::vector<int> hits(n, 0);
  for (int64_t s = 0; s < 200; ++s)
    for (int64_t r = 0; r < 8; ++r) {
      const int64_t a = train_window_start(3, s, r, n, T);
      ASSERT_GE(a, 0);
      ASSERT_LE(a + T + 1, n);
      ASSERT_EQ(a, train_window_start(3, s, r, n, T));
      hits[a]++;
    }
  // spread over the file, not stuck in a corner
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) (i < n / 2 ? lo : hi) += hits[i];
  EXPECT_GT(lo, 500);
  EXPECT_GT(hi, 500);
  EXPECT_NE(train_window_start(3, 0, 0, n, T), train_window_start(4, 0, 0, n, T));
  EXPECT_THROW(train_window_start(0, 0, 0, T, T), std::invalid_argument);
  EXPECT_EQ(num_val_windows(1025, 512, 0), 2);
  EXPECT_EQ(num_val_windows(1024, 512, 0), 1);
  EXPECT_EQ(num_val_windows(1025, 512, 1), 1);
  EXPECT_EQ(num_val_windows(100, 512, 0), 0);
}

TEST(Corpus, BpeRoundTripsAndRejectsBadUtf8) {
  if (!sentencepiece_available()) GTEST_SKIP() << "this build has no sentencepiece";
  const auto dir = tmpdir("bpe");
  const std::string text = random_text(200000, std::random_device{}());
  CorpusOptions o;
  o.sources = {write_text(dir, text)};
  o.out = dir + "/corpus";
  o.tokenizer = "bpe:400";
  o.threads = 1;
  auto c = build_corpus(o);
  EXPECT_EQ(c.vocab_size, 400);
  EXPECT_TRUE(fs::exists(fs::path(o.out) / "tokenizer.model"));
  // merges make it shorter than bytes
  EXPECT_LT(c.train_tokens, c.train_bytes / 2);
  auto tok = Tokenizer::from_json(c.tokenizer);
  EXPECT_EQ(tok->vocab_size(), 400);
  const std::string probe = random_text(5000, 99) + "  double  spaces\n\nand \xe2\x82\xac unseen \xf0\x9f\x98\x80 chars\n";
  EXPECT_EQ(tok->decode(tok->encode(probe)), probe);
  // the corpus files decode to the split text
  auto val = read_tokens(c, "val");
  EXPECT_EQ(int64_t(tok->decode(val).size()), c.val_bytes);
  try {
    tok->encode("abc\xff");
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("byte 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(tok->decode({400}), std::invalid_argument);
  fs::remove_all(dir);
}

TEST(Corpus, BadOptionsAreErrors) {
  std::string why;
  EXPECT_TRUE(Tokenizer::spec_valid("byte"));
  EXPECT_TRUE(Tokenizer::spec_valid("bpe:8192"));
  EXPECT_FALSE(Tokenizer::spec_valid("bpe:10", &why));
  EXPECT_NE(why.find("300"), std::string::npos);
  EXPECT_FALSE(Tokenizer::spec_valid("wordpiece", &why));
  EXPECT_NE(why.find("accepted"), std::string::npos);
  CorpusOptions o;
  o.out = tmpdir("bad");
  o.sources = {"/no/such/file"};
  EXPECT_THROW(build_corpus(o), std::invalid_argument);
  o.sources = {};
  EXPECT_THROW(build_corpus(o), std::invalid_argument);
  fs::remove_all(o.out);
}

TEST(Corpus, KingJamesBibleSource) {
  if (std::system("command -v bible >/dev/null 2>&1") != 0) GTEST_SKIP() << "Debian's bible-kjv is not installed";
  const std::string t = read_text_sources({"kjv"});
  EXPECT_GT(t.size(), 4000000u);
  EXPECT_EQ(t.rfind("In the beginning God created the heaven and the earth.\n", 0), 0u) << t.substr(0, 80);
  EXPECT_NE(t.find("The grace of our Lord Jesus Christ be with you all. Amen.\n"), std::string::npos);
  EXPECT_EQ(t.find("Ge1:1"), std::string::npos);  // references stripped
  EXPECT_EQ(first_invalid_utf8(t), -1);
}
