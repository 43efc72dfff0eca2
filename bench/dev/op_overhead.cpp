// The CPU op's forward (tokmix::mix, no grad) against its kernel alone on the same inputs,
// alternating in one process: what the op adds (checks, buffers, relayout) to the kernel.
// SET_THREADS=1 calls tokmix::set_threads(2) first, as the CLI does; without it the process runs
// as a library caller would (perf-notes v20). Needs a build (make test or make demo):
//   g++ -std=c++17 -O3 -march=native -fopenmp -Iinclude -I/usr/include/torch/csrc/api/include \
//     bench/dev/op_overhead.cpp build/libtokmix.a build/libtokmix_core.a build/libtokmix_kernels.a \
//     -ltorch -ltorch_cpu -lc10 -o /tmp/op_overhead
//   OMP_NUM_THREADS=2 /tmp/op_overhead T [REPS]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "paired_common.h"
#include "tokmix/kernels.h"
#include "tokmix/mix.h"
#include "tokmix/pattern.h"

using namespace tokmix;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s T [REPS]\n", argv[0]);
    return 2;
  }
  const int64_t T = std::atoll(argv[1]), H = 8, D = 64;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 21;
  if (std::getenv("SET_THREADS"))
    set_threads(2);
  else
    torch::set_num_threads(2);
  const auto q = torch::randn({1, T, H, D}), k = torch::randn({1, T, H, D}), v = torch::randn({1, T, H, D});
  const Pattern pat = Pattern::parse("pow2");
  const PatternDesc pd = pat.desc();
  const kernels::MixProblem pb = paired::head_major_problem(T, H, D);
  auto qh = torch::empty({1, H, T, D}), kh = torch::empty({1, H, T, D}), vh = torch::empty({1, H, T, D}),
       yh = torch::empty({1, H, T, D}), lse = torch::empty({1, H, T});
  const kernels::Strides src{H * T * D, H * D, D};
  bool bad[3] = {false, false, false};
  const kernels::HeadCopy<float> copies[3] = {{q.data_ptr<float>(), src, qh.data_ptr<float>(), &bad[0]},
                                              {k.data_ptr<float>(), src, kh.data_ptr<float>(), &bad[1]},
                                              {v.data_ptr<float>(), src, vh.data_ptr<float>(), &bad[2]}};
  auto ms = [](auto f) {
    const auto a = Clock::now();
    f();
    return std::chrono::duration<double, std::milli>(Clock::now() - a).count();
  };
  auto op = [&] { auto y = mix(q, k, v, "pow2", MixOptions{}); };
  auto kernel = [&] {
    kernels::mix_forward_cpu<float>(pd, pb, qh.data_ptr<float>(), kh.data_ptr<float>(), vh.data_ptr<float>(), nullptr, nullptr,
                                    yh.data_ptr<float>(), lse.data_ptr<float>(), copies);
  };
  torch::NoGradGuard no_grad;
  std::vector<double> t_op, t_kernel, ratio;
  for (int r = 0; r < reps; ++r) {
    double a, b;
    if (r % 2) {
      a = ms(op);
      b = ms(kernel);
    } else {
      b = ms(kernel);
      a = ms(op);
    }
    t_op.push_back(a);
    t_kernel.push_back(b);
    ratio.push_back(a / b);
  }
  for (auto* x : {&t_op, &t_kernel, &ratio}) std::sort(x->begin(), x->end());
  std::printf("pow2 T=%lld (B 1, H 8, D 64, %s): op forward %.3f ms, kernel with copies %.3f ms, op/kernel %.2f [%.2f..%.2f]\n",
              (long long)T, std::getenv("SET_THREADS") ? "set_threads" : "no set_threads", t_op[reps / 2], t_kernel[reps / 2],
              ratio[reps / 2], ratio.front(), ratio.back());
  return 0;
}
