// Host-side part of project shared by both backends: checks, geometry, the dense path.
#pragma once

#include <numeric>

#include "checks.h"
#include "kernels/project.h"

namespace zfkernels {

struct ProjectPlan {
  ProjectGeometry geometry;
  ProjectGroups groups;
  int64_t groups_count;
  int64_t out_channels;  // C_in of the forward convolution: the projection's channels
  Tensor x;          // 4-D (an unbatched x is a batch of one)
  bool batched;

  Tensor result(const Tensor& out) const { return unbatch(out, batched); }
};

// The size of one projected axis, as F.conv_transpose2d computes it.
inline int64_t projected_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, int64_t output_padding) {
  return (in - 1) * s - 2 * p + d * (k - 1) + 1 + output_padding;
}

inline ProjectPlan plan_project(const Tensor& input, const Tensor& weight, IntArrayRef stride,
                                IntArrayRef padding, IntArrayRef output_padding,
                                const std::optional<Tensor>& channels, int64_t groups, IntArrayRef dilation) {
  constexpr const char* op = "project";
  ZF_CHECK_VALUE(!channels.has_value() || input.dim() == 4, op,
                 ": with channels=, x must be 4-D (B, 1, h, w) -- one selected feature map per row -- got ",
                 input.dim(), "-D");
  const Tensor x = batched_map(op, "x", input, "(B, C_out, h, w)");
  ZF_CHECK_VALUE(weight.dim() == 4, op, ": weight must be a 4-D (C_out, C_in / groups, kH, kW) tensor, got ",
                 weight.dim(), "-D");
  ZF_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
                " but x has ", x.scalar_type());
  check_same_device(op, "weight", weight, "x", x);
  for (int64_t d = 0; d < 4; ++d) check_extent(op, "a dimension of weight", weight.size(d));
  ZF_CHECK_VALUE(weight.numel() > 0, op, ": weight of shape ", weight.sizes(),
                 " is empty (C_out, C_in / groups, kH and kW must all be positive)");
  check_positive_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "output_padding", output_padding);
  check_positive_pair(op, "dilation", dilation);
  ZF_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  for (int axis = 0; axis < 2; ++axis) {
    ZF_CHECK_VALUE(output_padding[axis] >= 0 &&
                       (output_padding[axis] < stride[axis] || output_padding[axis] < dilation[axis]),
                   op, ": output_padding must be non-negative and smaller than stride or dilation, got ",
                   output_padding, " for stride ", stride, " and dilation ", dilation);
    check_extent(op, "the dilated kernel's span", (weight.size(2 + axis) - 1) * dilation[axis] + 1);
  }
  const int64_t c_out = weight.size(0);
  ZF_CHECK_VALUE(groups > 0, op, ": groups must be positive, got ", groups);
  ZF_CHECK_VALUE(c_out % groups == 0, op, ": groups = ", groups, " does not divide weight's C_out = ", c_out,
                 " (weight is the forward convolution's (C_out, C_in / groups, kH, kW))");
  if (channels.has_value()) {
    ZF_CHECK_VALUE(x.size(1) == 1, op, ": with channels=, x must be (B, 1, h, w) -- one selected feature map per row",
                   " -- got ", x.size(1), " channels");
    check_index_vector(op, "channels", *channels, x.size(0), c_out, "weight's C_out", x, "x");
  } else {
    ZF_CHECK_VALUE(x.size(1) == c_out, op, ": x has ", x.size(1), " channels but weight expects C_out = ", c_out,
                   " (weight is the forward convolution's (C_out, C_in / groups, kH, kW))");
  }
  int64_t out_size[2];
  for (int axis = 0; axis < 2; ++axis) {
    out_size[axis] = projected_size(x.size(2 + axis), weight.size(2 + axis), stride[axis], padding[axis],
                                    dilation[axis], output_padding[axis]);
  }
  ZF_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0 && out_size[0] > 0 && out_size[1] > 0, op, ": output size would be ",
                 out_size[0], "x", out_size[1], " for x of ", x.size(2), "x", x.size(3), " (padding ", padding,
                 " too large?)");
  // Output coordinates are 32-bit in the kernels (kernels/project.h).
  ZF_CHECK_VALUE(out_size[0] < kMaxExtent && out_size[1] < kMaxExtent, op, ": output size would be ", out_size[0],
                 "x", out_size[1], " for x of ", x.size(2), "x", x.size(3), " (limit 2^30)");
  const ProjectGeometry g{x.size(2),  x.size(3),   out_size[0], out_size[1], weight.size(2),
                          weight.size(3), stride[0], stride[1],  padding[0],  padding[1],
                          dilation[0], dilation[1], stride[0] / std::gcd(stride[0], dilation[0]),
                          stride[1] / std::gcd(stride[1], dilation[1])};
  const int64_t out_channels = weight.size(1) * groups;
  check_extent(op, "the projection's channel count C_in", out_channels);
  return ProjectPlan{g, ProjectGroups{c_out / groups, weight.size(1)}, groups, out_channels, x, input.dim() == 4};
}

inline MemoryFormat project_output_format(const Tensor& x) {
  return prefers_channels_last(x) ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous;
}

// Dense projection through the vendor library (oneDNN on CPU, cuDNN on CUDA), called through the
// dispatcher: at these shapes it is a plain (grouped, dilated) transposed convolution that the
// library already does well. On CUDA, cuDNN is asked for deterministic algorithms and no
// benchmarking (aten::_convolution, as at::cudnn_convolution_transpose was): through
// aten::conv_transpose2d it may pick nondeterministic ones, and the same inputs must give the
// same bits. Defined in project_dense.cpp.
Tensor project_dense(const ProjectPlan& plan, const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                     IntArrayRef output_padding, IntArrayRef dilation);

}  // namespace zfkernels
