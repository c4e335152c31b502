// Host-side part of project shared by both backends: checks, geometry, the dense path.
#pragma once

#include <ATen/detail/CUDAHooksInterface.h>

#include "checks.h"
#include "kernels/project.h"

namespace zfkernels {

struct ProjectPlan {
  ProjectGeometry geometry;
  int64_t out_channels;  // C_in of the forward convolution: the projection's channels
};

inline ProjectPlan plan_project(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                const std::optional<at::Tensor>& channels) {
  constexpr const char* op = "project";
  check_float4d(op, "x", x, "(B, C_out, h, w)");
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be a 4-D (C_out, C_in, kH, kW) tensor, got ", weight.dim(),
                    "-D");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
                   " but x has ", x.scalar_type());
  check_same_device(op, "weight", weight, "x", x);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "output_padding", output_padding);
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(output_padding[0] >= 0 && output_padding[1] >= 0 && output_padding[0] < stride[0] &&
                        output_padding[1] < stride[1],
                    op, ": output_padding must be non-negative and smaller than stride, got ", output_padding,
                    " for stride ", stride);
  TORCH_CHECK_VALUE(weight.size(2) > 0 && weight.size(3) > 0 && weight.size(2) < kMaxExtent && weight.size(3) < kMaxExtent,
                    op, ": weight has a kernel of ", weight.size(2), "x", weight.size(3));
  if (channels.has_value()) {
    TORCH_CHECK_VALUE(x.size(1) == 1, op, ": with channels=, x must be (B, 1, h, w) -- one selected feature map per row",
                      " -- got ", x.size(1), " channels");
    check_index_vector(op, "channels", *channels, x.size(0), weight.size(0), "weight's C_out", x, "x");
  } else {
    TORCH_CHECK_VALUE(x.size(1) == weight.size(0), op, ": x has ", x.size(1), " channels but weight expects C_out = ",
                      weight.size(0), " (weight is the forward convolution's (C_out, C_in, kH, kW))");
  }
  const int64_t out_h = (x.size(2) - 1) * stride[0] - 2 * padding[0] + weight.size(2) + output_padding[0];
  const int64_t out_w = (x.size(3) - 1) * stride[1] - 2 * padding[1] + weight.size(3) + output_padding[1];
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0 && out_h > 0 && out_w > 0, op, ": output size would be ", out_h,
                    "x", out_w, " for x of ", x.size(2), "x", x.size(3), " (padding ", padding, " too large?)");
  return ProjectPlan{
      ProjectGeometry{x.size(2), x.size(3), out_h, out_w, weight.size(2), weight.size(3), stride[0], stride[1],
                      padding[0], padding[1]},
      weight.size(1)};
}

inline at::MemoryFormat project_output_format(const at::Tensor& x) {
  return prefers_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Dense projection through the vendor library (oneDNN on CPU, cuDNN on CUDA): at these shapes
// it is a plain transposed convolution that the library already does well. On CUDA, cuDNN is
// called directly with deterministic algorithms and no benchmarking: through at::conv_transpose2d
// it may pick nondeterministic ones, and the same inputs must give the same bits.
inline at::Tensor project_dense(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef output_padding) {
  if (x.size(0) == 0) {
    const int64_t out_h = (x.size(2) - 1) * stride[0] - 2 * padding[0] + weight.size(2) + output_padding[0];
    const int64_t out_w = (x.size(3) - 1) * stride[1] - 2 * padding[1] + weight.size(3) + output_padding[1];
    return at::empty({0, weight.size(1), out_h, out_w}, x.options().memory_format(project_output_format(x)));
  }
  if (x.is_cuda() && at::globalContext().userEnabledCuDNN() && at::detail::getCUDAHooks().compiledWithCuDNN()) {
    return at::cudnn_convolution_transpose(x, weight, padding, output_padding, stride, {1, 1}, 1, /*benchmark=*/false,
                                           /*deterministic=*/true, at::globalContext().allowTF32CuDNN())
        .contiguous(project_output_format(x));
  }
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    // oneDNN's half-precision transposed convolution does not accumulate in float on every CPU;
    // the op promises float accumulation (as its other paths), so compute in float and round once.
    return at::conv_transpose2d(x.to(at::kFloat), weight.to(at::kFloat), {}, stride, padding, output_padding, 1, {1, 1})
        .to(x.scalar_type())
        .contiguous(project_output_format(x));
  }
  return at::conv_transpose2d(x, weight, {}, stride, padding, output_padding, 1, {1, 1})
      .contiguous(project_output_format(x));
}

}  // namespace zfkernels
