// A C interface over sentencepiece, built as its own shared object and loaded with dlopen
// (RTLD_LOCAL | RTLD_DEEPBIND). Debian's libsentencepiece carries a private copy of protobuf-lite
// whose symbols would otherwise interpose on the libprotobuf that LibTorch loads, crashing the
// process at start-up; isolated like this, each library keeps its own.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {
char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(p, s.data(), s.size());
  p[s.size()] = 0;
  return p;
}
}  // namespace

extern "C" {

void tokmix_spm_free(void* p) { std::free(p); }

// args: "key=value" lines. On success *model holds the serialized model (free with tokmix_spm_free).
int tokmix_spm_train(const char* args, char** model, size_t* model_len, char** err) {
  std::unordered_map<std::string, std::string> kw;
  std::istringstream in(args);
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) kw[line.substr(0, eq)] = line.substr(eq + 1);
  }
  std::string out;
  auto st = sentencepiece::SentencePieceTrainer::Train(kw, nullptr, &out);
  if (!st.ok()) {
    *err = dup(st.ToString());
    return 1;
  }
  *model = static_cast<char*>(std::malloc(out.size()));
  std::memcpy(*model, out.data(), out.size());
  *model_len = out.size();
  return 0;
}

void* tokmix_spm_load(const char* model, size_t len, char** err) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  auto st = sp->LoadFromSerializedProto(std::string(model, len));
  if (!st.ok()) {
    *err = dup(st.ToString());
    delete sp;
    return nullptr;
  }
  return sp;
}

void tokmix_spm_unload(void* h) { delete static_cast<sentencepiece::SentencePieceProcessor*>(h); }

int tokmix_spm_vocab(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->GetPieceSize(); }

int tokmix_spm_encode(void* h, const char* text, size_t len, int** ids, size_t* n, char** err) {
  std::vector<int> v;
  auto st = static_cast<sentencepiece::SentencePieceProcessor*>(h)->Encode(std::string(text, len), &v);
  if (!st.ok()) {
    *err = dup(st.ToString());
    return 1;
  }
  *ids = static_cast<int*>(std::malloc(sizeof(int) * (v.size() + 1)));
  std::memcpy(*ids, v.data(), sizeof(int) * v.size());
  *n = v.size();
  return 0;
}

int tokmix_spm_decode(void* h, const int* ids, size_t n, char** text, size_t* len, char** err) {
  std::vector<int> v(ids, ids + n);
  std::string s;
  auto st = static_cast<sentencepiece::SentencePieceProcessor*>(h)->Decode(v, &s);
  if (!st.ok()) {
    *err = dup(st.ToString());
    return 1;
  }
  *text = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(*text, s.data(), s.size());
  *len = s.size();
  return 0;
}

}  // extern "C"
