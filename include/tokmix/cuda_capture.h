#pragma once
// CUDA-graph capture helpers shared by the mixing op, the captured training step and
// infer::GraphDecoder. CUDA builds only.
#ifdef TOKMIX_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <cuda_runtime.h>

namespace tokmix {

// Whether work on `stream` is being captured into a CUDA graph. An error from the query counts
// as capturing (callers then skip device reads rather than risk them) and is cleared.
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  const bool err = cudaStreamIsCapturing(stream, &cs) != cudaSuccess;
  if (err) cudaGetLastError();
  return err || cs != cudaStreamCaptureStatusNone;
}

// Ends a capture that failed part-way: through the graph object (the allocator's capture
// bookkeeping ends with it), and only if that fails on the stream directly; clears the error.
inline void abandon_capture(at::cuda::CUDAGraph& g, cudaStream_t stream) {
  try {
    g.capture_end();
  } catch (...) {
    cudaGraph_t dead = nullptr;
    cudaStreamEndCapture(stream, &dead);
    if (dead) cudaGraphDestroy(dead);
  }
  cudaGetLastError();
}

}  // namespace tokmix
#endif
