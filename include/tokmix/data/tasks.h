// Synthetic sequence tasks (copy, MQAR, multi-hop recall, selective copying, induction heads)
// and datasets read from JSONL. Definitions: docs/tasks.md.
//
// Every batch is {input [B, T] int64, labels [B, T] int64}; labels[b][t] is the token the model
// must output at position t (already shifted), kIgnore (-100) where nothing is supervised.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

namespace tokmix::data {

constexpr int64_t kIgnore = -100;  // label of an unsupervised position (loss ignore_index)

struct Batch {
  torch::Tensor input;   // [B, T] int64
  torch::Tensor labels;  // [B, T] int64, kIgnore where unsupervised
};

enum class Task { Copy, MQAR, MultiHop, SelectiveCopy, Induction };

// A task and its sizes. Keys a task does not use stay 0. Parse with parse_task_spec().
struct TaskSpec {
  Task task = Task::Copy;
  int64_t T = 0;           // sequence length
  int64_t V = 0;           // vocabulary size (every token is in [0, V))
  int64_t L = 0;           // copy, selective-copy: length of the string to copy
  int64_t N = 0;           // mqar: key-value pairs; multihop: chains (= queries)
  int64_t hops = 0;        // multihop: edges followed from a query to its answer
  double power_a = 0.01;   // mqar, multihop: gap weight ∝ a·i^(a-1) (1 = uniform)

  std::string name() const;  // "copy", "mqar", ...
  std::string str() const;   // canonical spec string, parse_task_spec(str()) == *this
  bool operator==(const TaskSpec& o) const;
};

// "copy:T=64,L=16,V=32", "mqar:T=256,N=16,V=8192", "multihop:T=128,N=8,hops=2",
// "selective-copy:T=64,L=8,V=16", "induction:T=64,V=32". Omitted keys take the documented
// defaults. Throws std::invalid_argument (listing the accepted forms and keys) on a bad string
// or on sizes the task cannot be built with.
TaskSpec parse_task_spec(const std::string& spec);

// Size of the embedding table a model needs for this task (every token and label is below it).
int64_t vocab_size(const TaskSpec& spec);

// Example `index` of the stream `seed`: writes spec.T tokens to input and to labels.
// Deterministic in (spec, seed, index) alone.
void generate_example(const TaskSpec& spec, uint64_t seed, int64_t index, int64_t* input, int64_t* labels);

// Batch `batch_index` of the stream `seed`: rows are examples batch_index*B .. batch_index*B+B-1,
// so a batch never depends on which batches were drawn before it.
Batch make_batch(const TaskSpec& spec, int64_t batch_size, uint64_t seed, int64_t batch_index);

// Sequences of possibly different lengths, e.g. read from a JSONL file.
struct Dataset {
  std::vector<std::vector<int64_t>> input, labels;  // labels[i].size() == input[i].size()

  int64_t size() const { return static_cast<int64_t>(input.size()); }
  int64_t max_length() const;
  int64_t vocab_size() const;  // 1 + the largest token in any input or label (0 if empty)
  // The given rows, right-padded to the longest of them: input with 0, labels with kIgnore.
  Batch batch(const std::vector<int64_t>& rows) const;
  Batch batch(int64_t first, int64_t count) const;  // rows first .. first+count-1
};

// One JSON object per line: {"input": [...], "labels": [...]} of equal, non-zero length; tokens
// are integers >= 0, labels are -100 or integers >= 0; other keys are ignored; blank lines are
// skipped. Throws std::runtime_error "<path>:<line>: <what is wrong>" on the first bad line.
Dataset read_jsonl(const std::string& path);
Dataset read_jsonl(std::istream& in, const std::string& name = "<stream>");

// Writes every row of a batch (or dataset) as one line of that format.
void write_jsonl(const std::string& path, const Batch& batch);
void write_jsonl(std::ostream& out, const Batch& batch);
void write_jsonl(std::ostream& out, const Dataset& data);
Dataset to_dataset(const Batch& batch);

}  // namespace tokmix::data
