// What the CUDA launch wrappers share, on the stable ABI: the device guard, the current stream,
// the launch check, and grid sizing for grid-stride loops over a flat index space.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "../torch_stable.h"

namespace zfkernels {

constexpr int kThreads = 256;

// Makes the tensor's GPU the current device (c10::cuda::CUDAGuard).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const Device& device) : guard_(device.index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// PyTorch's current stream on `device` (at::cuda::getCurrentCUDAStream).
inline cudaStream_t current_stream(const Device& device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// The streaming multiprocessors of the current device, asked once per device.
inline int64_t multiprocessors() {
  static std::atomic<int> cached[64] = {};
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
inline unsigned int blocks_for(int64_t n) {
  const int64_t sms = multiprocessors();
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32)));
}

#define ZF_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()

#define ZF_GRID_STRIDE_LOOP(i, n)                                                              \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

}  // namespace zfkernels
