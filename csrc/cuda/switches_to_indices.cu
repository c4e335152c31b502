// CUDA backend of switches_to_indices, and the switch validation pass that unpool runs first.

#include "../kernels/switches.h"
#include "../switches_host.h"
#include "launch.cuh"

namespace zfkernels {
namespace {

// Counts invalid switches. The count is an integer, so the atomic adds give the same answer
// whatever their order.
__global__ void count_invalid_switches_kernel(const uint8_t* __restrict__ sw, Strides4 ss, PoolGeometry g, int64_t C,
                                              int64_t total, unsigned long long* invalid) {
  ZF_GRID_STRIDE_LOOP(i, total) {
    const Coord4 o = coord_of(i, C, g.out_h, g.out_w, false);
    int64_t ih, iw;
    if (!switch_target(sw[o.n * ss.n + o.c * ss.c + o.h * ss.h + o.w * ss.w], o.h, o.w, g, &ih, &iw)) {
      atomicAdd(invalid, 1ULL);
    }
  }
}

__global__ void switches_to_indices_kernel(const uint8_t* __restrict__ sw, Strides4 ss, int64_t* __restrict__ idx,
                                           Strides4 os, PoolGeometry g, int64_t C, int64_t total,
                                           bool channels_last) {
  ZF_GRID_STRIDE_LOOP(i, total) {
    const Coord4 o = coord_of(i, C, g.out_h, g.out_w, channels_last);
    int64_t ih, iw;
    switch_target(sw[o.n * ss.n + o.c * ss.c + o.h * ss.h + o.w * ss.w], o.h, o.w, g, &ih, &iw);
    idx[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = ih * g.in_w + iw;
  }
}

Tensor switches_to_indices_cuda(const Tensor& input, IntArrayRef input_size, IntArrayRef kernel,
                                IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  const SwitchesPlan plan = plan_switches_to_indices(input, input_size, kernel, stride, padding, dilation);  // first
  const PoolGeometry g = plan.geometry;
  const Tensor& switches = plan.switches;
  const CudaDeviceGuard guard(switches.device());
  const int64_t total = plan.out.numel();
  if (total == 0) return plan.result();
  check_switch_values("switches_to_indices", count_invalid_switches_cuda(switches, g), g);
  switches_to_indices_kernel<<<blocks_for(total), kThreads, 0, current_stream(switches.device())>>>(
      switches.const_data_ptr<uint8_t>(), strides_of(switches), plan.out.mutable_data_ptr<int64_t>(),
      strides_of(plan.out), g, switches.size(1), total, plan.channels_last);
  ZF_CUDA_LAUNCH_CHECK();
  return plan.result();
}

}  // namespace

// Reads one number back to the host (a synchronisation): the price of refusing corrupt switches.
int64_t count_invalid_switches_cuda(const Tensor& switches, const PoolGeometry& g) {
  const CudaDeviceGuard guard(switches.device());
  const int64_t total = switches.numel();
  if (total == 0) return 0;
  const Tensor invalid = torch::stable::new_zeros(switches, std::array<int64_t, 1>{1}, ScalarType::Long);
  count_invalid_switches_kernel<<<blocks_for(total), kThreads, 0, current_stream(switches.device())>>>(
      switches.const_data_ptr<uint8_t>(), strides_of(switches), g, switches.size(1), total,
      reinterpret_cast<unsigned long long*>(invalid.mutable_data_ptr<int64_t>()));
  ZF_CUDA_LAUNCH_CHECK();
  int64_t count = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_item_int64(invalid.get(), &count));
  return count;
}

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("switches_to_indices", TORCH_BOX(&switches_to_indices_cuda));
}

}  // namespace zfkernels
