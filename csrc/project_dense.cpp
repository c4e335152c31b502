// Dense projection (project without channels=) on both backends: the vendor library's
// transposed convolution, called through the dispatcher (project_host.h).
#include "project_host.h"

namespace zfkernels {
namespace {

// conv_transpose2d.input(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride,
// SymInt[2] padding, SymInt[2] output_padding, SymInt groups, SymInt[2] dilation) -> Tensor
Tensor conv_transpose2d(const Tensor& x, const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                        IntArrayRef output_padding, int64_t groups, IntArrayRef dilation) {
  return tensor_of(call_op<8>("aten::conv_transpose2d", "input", x, weight, std::optional<Tensor>(), stride, padding,
                              output_padding, groups, dilation)[0]);
}

// Whether cuDNN is compiled in and enabled (torch.backends.cudnn.enabled): what
// aten::cudnn_is_acceptable answers for a float32 tensor on `device`.
bool cudnn_usable(const Device& device) {
  const Tensor probe = torch::stable::empty(std::array<int64_t, 1>{0}, ScalarType::Float, std::nullopt, device);
  return torch::stable::detail::to<bool>(call_op<1>("aten::cudnn_is_acceptable", "", probe)[0]);
}

}  // namespace

Tensor project_dense(const ProjectPlan& plan, const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                     IntArrayRef output_padding, IntArrayRef dilation) {
  const Tensor& x = plan.x;
  const auto format = project_output_format(x);
  const int64_t groups = plan.groups_count;
  if (x.size(0) == 0) {
    return plan.result(empty_output(
        std::array<int64_t, 4>{0, plan.out_channels, plan.geometry.out_h, plan.geometry.out_w}, x.scalar_type(),
        x.device(), format));
  }
  if (x.is_cuda() && cudnn_usable(x.device())) {
    // _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
    //              benchmark, deterministic, cudnn_enabled, allow_tf32): cuDNN's transposed
    // convolution, deterministic, not benchmarked. TF32 stays allowed, PyTorch's default for cuDNN
    // (the stable ABI cannot read torch.backends.cudnn.allow_tf32).
    const Tensor out = tensor_of(call_op<13>("aten::_convolution", "", x, weight, std::optional<Tensor>(), stride,
                                             padding, dilation, true, output_padding, groups, false, true, true,
                                             true)[0]);
    return plan.result(torch::stable::contiguous(out, format));
  }
  const ScalarType dtype = x.scalar_type();
  if (dtype == ScalarType::Half || dtype == ScalarType::BFloat16) {
    // oneDNN's half-precision transposed convolution does not accumulate in float on every CPU;
    // the op promises float accumulation (as its other paths), so compute in float and round once.
    const Tensor out = conv_transpose2d(torch::stable::to(x, ScalarType::Float),
                                        torch::stable::to(weight, ScalarType::Float), stride, padding,
                                        output_padding, groups, dilation);
    return plan.result(torch::stable::contiguous(torch::stable::to(out, dtype), format));
  }
  const Tensor out = conv_transpose2d(x, weight, stride, padding, output_padding, groups, dilation);
  return plan.result(torch::stable::contiguous(out, format));
}

}  // namespace zfkernels
