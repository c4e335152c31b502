// CUDA backend of maxpool_switches: one thread per pooled element, the shared window body.

#include "../kernels/maxpool_switches.h"
#include "../maxpool_switches_host.h"
#include "launch.cuh"

namespace zfkernels {
namespace {

template <typename scalar_t>
__global__ void maxpool_switches_kernel(const scalar_t* __restrict__ x, Strides4 xs, scalar_t* __restrict__ out,
                                        Strides4 os, uint8_t* __restrict__ sw, Strides4 ss, PoolGeometry g,
                                        int64_t C, int64_t total, bool channels_last) {
  ZF_GRID_STRIDE_LOOP(i, total) {
    const Coord4 o = coord_of(i, C, g.out_h, g.out_w, channels_last);
    maxpool_window<scalar_t, opmath_t<scalar_t>>(x + o.n * xs.n + o.c * xs.c, xs.h, xs.w, g, o.h, o.w,
                                                        out + o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w,
                                                        sw + o.n * ss.n + o.c * ss.c + o.h * ss.h + o.w * ss.w);
  }
}

std::tuple<Tensor, Tensor> maxpool_switches_cuda(const Tensor& input, IntArrayRef kernel_size,
                                                 IntArrayRef stride, IntArrayRef padding,
                                                 bool ceil_mode, IntArrayRef dilation) {
  const MaxpoolPlan plan = plan_maxpool_switches(input, kernel_size, stride, padding, dilation, ceil_mode);  // first
  const Tensor& x = plan.x;
  const CudaDeviceGuard guard(x.device());
  const int64_t total = plan.out.numel();
  if (total == 0) return plan.result();
  const cudaStream_t stream = current_stream(x.device());
  ZF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "maxpool_switches_cuda", [&] {
    maxpool_switches_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), plan.out.mutable_data_ptr<scalar_t>(), strides_of(plan.out),
        plan.switches.mutable_data_ptr<uint8_t>(), strides_of(plan.switches), plan.geometry, x.size(1), total,
        plan.channels_last);
    ZF_CUDA_LAUNCH_CHECK();
  });
  return plan.result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("maxpool_switches", TORCH_BOX(&maxpool_switches_cuda));
}

}  // namespace zfkernels
