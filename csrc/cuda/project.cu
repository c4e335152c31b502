// CUDA backend of project: the dense case through cuDNN; with channels=, one thread per output
// element over the shared body project_selected_pixel.

#include "../project_host.h"
#include "launch.cuh"

namespace zfkernels {
namespace {

template <typename scalar_t>
__global__ void project_rows_kernel(const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ w,
                                    Strides4 ws, const int64_t* __restrict__ channels, int64_t ch_stride,
                                    scalar_t* __restrict__ out, Strides4 os, ProjectGeometry g, ProjectGroups groups,
                                    int64_t C, int64_t total, bool channels_last) {
  using acc_t = opmath_t<scalar_t>;
  ZF_GRID_STRIDE_LOOP(i, total) {
    const Coord4 o = coord_of(i, C, g.out_h, g.out_w, channels_last);
    const int64_t filter = channels[o.n * ch_stride];
    const acc_t v = project_selected_pixel<scalar_t, acc_t>(x + o.n * xs.n, xs.h, xs.w, w + filter * ws.n, ws, groups,
                                                            filter, g, o.c, o.h, o.w);
    out[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = static_cast<scalar_t>(v);
  }
}

Tensor project_cuda(const Tensor& x, const Tensor& weight, IntArrayRef stride,
                    IntArrayRef padding, IntArrayRef output_padding,
                    const std::optional<Tensor>& channels, int64_t groups, IntArrayRef dilation) {
  // The plan first: it names the argument on the wrong device (x on the CPU and weight on the GPU
  // dispatch here), where a guard built from a CPU device throws a message that names neither.
  const ProjectPlan plan = plan_project(x, weight, stride, padding, output_padding, channels, groups, dilation);
  const CudaDeviceGuard guard(x.device());
  if (!channels.has_value()) return project_dense(plan, weight, stride, padding, output_padding, dilation);
  const ProjectGeometry& g = plan.geometry;
  const auto format = project_output_format(plan.x);
  auto out = empty_output(std::array<int64_t, 4>{plan.x.size(0), plan.out_channels, g.out_h, g.out_w}, x.scalar_type(),
                          x.device(), format);
  const int64_t total = out.numel();
  if (total == 0) return plan.result(out);
  const cudaStream_t stream = current_stream(x.device());
  ZF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "project_cuda", [&] {
    project_rows_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        plan.x.const_data_ptr<scalar_t>(), strides_of(plan.x), weight.const_data_ptr<scalar_t>(), strides_of(weight),
        channels->const_data_ptr<int64_t>(), channels->stride(0), out.mutable_data_ptr<scalar_t>(), strides_of(out),
        g, plan.groups, plan.out_channels, total, format == MemoryFormat::ChannelsLast);
    ZF_CUDA_LAUNCH_CHECK();
  });
  return plan.result(out);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("project", TORCH_BOX(&project_cuda));
}

}  // namespace zfkernels
