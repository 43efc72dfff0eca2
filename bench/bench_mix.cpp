// Google Benchmark micro-benchmarks of the mixing op (the CLI's `tokmix bench mix` prints the
// full table with ratios; these are for quick A/B runs of a kernel change).
#include <benchmark/benchmark.h>

#include "tokmix/mix.h"

namespace {

void BM_mix(benchmark::State& st, const char* spec, bool backward) {
  tokmix::set_threads();
  const int64_t T = st.range(0), H = 8, D = 64;
  auto q = torch::randn({1, T, H, D}), k = torch::randn({1, T, H, D}), v = torch::randn({1, T, H, D});
  auto pat = tokmix::pattern_from_spec(spec);
  if (backward) {
    q.requires_grad_();
    k.requires_grad_();
    v.requires_grad_();
  }
  auto dy = torch::randn_like(v);
  for (auto _ : st) {
    if (backward) {
      auto y = tokmix::mix(q, k, v, *pat);
      y.backward(dy);
    } else {
      torch::NoGradGuard ng;
      benchmark::DoNotOptimize(tokmix::mix(q, k, v, *pat));
    }
  }
  st.counters["entries/s"] = benchmark::Counter(double(pat->total_entries(T)) * H * st.iterations(), benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(BM_mix, pow2_fwd, "pow2", false)->Arg(4096)->Arg(16384)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_mix, pow2_fwdbwd, "pow2", true)->Arg(4096)->Arg(16384)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_mix, sq1_lattice_fwd, "sq1-lattice", false)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_mix, attention_fwd, "attention", false)->Arg(1024)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
