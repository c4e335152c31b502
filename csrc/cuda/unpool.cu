// CUDA backend of unpool: one thread per output pixel, the shared gather body (no atomics, a
// fixed summation order: bitwise-deterministic).

#include "../kernels/unpool.h"
#include "../switches_host.h"
#include "launch.cuh"

namespace zfkernels {
namespace {

template <typename scalar_t>
__global__ void unpool_kernel(const scalar_t* __restrict__ y, Strides4 ys, const uint8_t* __restrict__ sw,
                              Strides4 ss, const int64_t* __restrict__ rows, int64_t rows_stride,
                              scalar_t* __restrict__ out, Strides4 os, PoolGeometry g, int64_t C, int64_t total,
                              bool channels_last, bool rectify) {
  using acc_t = opmath_t<scalar_t>;
  ZF_GRID_STRIDE_LOOP(i, total) {
    const Coord4 o = coord_of(i, C, g.in_h, g.in_w, channels_last);
    const int64_t n = rows ? rows[o.n * rows_stride] : o.n;
    const acc_t v = unpool_pixel<scalar_t, acc_t>(y + o.n * ys.n + o.c * ys.c, ys.h, ys.w, sw + n * ss.n + o.c * ss.c,
                                                  ss.h, ss.w, g, o.h, o.w, rectify);
    out[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = static_cast<scalar_t>(v);
  }
}

Tensor unpool_cuda(const Tensor& y_in, const Tensor& switches_in, IntArrayRef input_size,
                   IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                   const std::optional<Tensor>& rows, bool rectify, IntArrayRef dilation) {
  // The plan checks devices before the guard is built.
  const UnpoolPlan plan = plan_unpool(y_in, switches_in, input_size, kernel, stride, padding, dilation, rows);
  const Tensor &y = plan.y, &switches = plan.switches;
  const CudaDeviceGuard guard(y.device());
  const int64_t total = plan.out.numel();
  if (total == 0) return plan.result();
  check_switch_values("unpool", count_invalid_switches_cuda(switches, plan.geometry), plan.geometry);
  const int64_t* rows_ptr = rows.has_value() ? rows->const_data_ptr<int64_t>() : nullptr;
  const int64_t rows_stride = rows.has_value() ? rows->stride(0) : 0;
  const cudaStream_t stream = current_stream(y.device());
  ZF_DISPATCH_FLOATING_TYPES(y.scalar_type(), "unpool_cuda", [&] {
    unpool_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), strides_of(y), switches.const_data_ptr<uint8_t>(), strides_of(switches),
        rows_ptr, rows_stride, plan.out.mutable_data_ptr<scalar_t>(), strides_of(plan.out), plan.geometry, y.size(1),
        total, plan.channels_last, rectify);
    ZF_CUDA_LAUNCH_CHECK();
  });
  return plan.result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("unpool", TORCH_BOX(&unpool_cuda));
}

}  // namespace zfkernels
