// Argument checks shared by the CPU and CUDA backends. Every message starts with the op's
// name and names the offending argument, so a Python user sees what to fix.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "kernels/common.h"

namespace zfkernels {

// Coordinates and window geometry are computed in 32 bits (kernels/common.h).
constexpr int64_t kMaxExtent = int64_t(1) << 30;

inline void check_float4d(const char* op, const char* name, const at::Tensor& t, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": expected a 4-D ", name, " ", dims, ", got ", t.dim(), "-D");
  for (int64_t d = 1; d < 4; ++d)
    TORCH_CHECK_VALUE(t.size(d) < kMaxExtent, op, ": ", name, " has a dimension of ", t.size(d), " (limit 2^30)");
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   op, ": ", name, " must be float32, float16 or bfloat16 (or float64), got ", dtype);
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have two values (H, W), got ", v.size());
  TORCH_CHECK_VALUE(v[0] < kMaxExtent && v[1] < kMaxExtent, op, ": ", name, " ", v, " is too large (limit 2^30)");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; move them to one device");
}

// Size of a pooled axis exactly as PyTorch's pooling_output_shape computes it.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  int64_t out = floor_div(in + 2 * p - (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;  // the last window must start inside the input
  return out;
}

// Checks kernel_size / stride / padding for a pooling over an in_h x in_w map.
inline void check_pool_geometry(const char* op, int64_t in_h, int64_t in_w, at::IntArrayRef kernel,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(op, "kernel_size", kernel);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  TORCH_CHECK_VALUE(kernel[0] > 0 && kernel[1] > 0, op, ": kernel_size must be positive, got ", kernel);
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel[0] && 2 * padding[1] <= kernel[1],
                    op, ": padding must be between 0 and half of kernel_size, got padding ", padding,
                    " for kernel_size ", kernel);
  TORCH_CHECK_VALUE(kernel[0] * kernel[1] <= 256, op, ": kernel_size ", kernel, " has ", kernel[0] * kernel[1],
                    " elements per window; uint8 switches address at most 256");
  TORCH_CHECK_VALUE(in_h > 0 && in_w > 0, op, ": the pooled map must be non-empty, got ", in_h, "x", in_w);
  TORCH_CHECK_VALUE(in_h + 2 * padding[0] >= kernel[0] && in_w + 2 * padding[1] >= kernel[1], op, ": kernel_size ",
                    kernel, " is larger than the padded input (", in_h + 2 * padding[0], ", ",
                    in_w + 2 * padding[1], ")");
}

inline PoolGeometry make_geometry(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, at::IntArrayRef kernel,
                                  at::IntArrayRef stride, at::IntArrayRef padding) {
  return PoolGeometry{in_h, in_w, out_h, out_w, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]};
}

// The pooled map size (H, W) and the switch tensor's spatial size must fit one another.
inline PoolGeometry check_unpool_geometry(const char* op, at::IntArrayRef input_size, int64_t out_h, int64_t out_w,
                                          at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(op, "input_size", input_size);
  TORCH_CHECK_VALUE(input_size[0] > 0 && input_size[1] > 0, op, ": input_size must be positive, got ", input_size);
  check_pool_geometry(op, input_size[0], input_size[1], kernel, stride, padding);
  bool fits = false;
  for (bool ceil_mode : {false, true}) {
    fits = fits || (pooled_size(input_size[0], kernel[0], stride[0], padding[0], ceil_mode) == out_h &&
                    pooled_size(input_size[1], kernel[1], stride[1], padding[1], ceil_mode) == out_w);
  }
  TORCH_CHECK_VALUE(fits, op, ": input_size ", input_size, " cannot have produced a pooled map of ", out_h, "x", out_w,
                    " with kernel_size ", kernel, ", stride ", stride, ", padding ", padding, " (it gives ",
                    pooled_size(input_size[0], kernel[0], stride[0], padding[0], false), "x",
                    pooled_size(input_size[1], kernel[1], stride[1], padding[1], false), ", or ",
                    pooled_size(input_size[0], kernel[0], stride[0], padding[0], true), "x",
                    pooled_size(input_size[1], kernel[1], stride[1], padding[1], true), " with ceil_mode)");
  return make_geometry(input_size[0], input_size[1], out_h, out_w, kernel, stride, padding);
}

inline void check_switches_tensor(const char* op, const at::Tensor& switches) {
  TORCH_CHECK_VALUE(switches.dim() == 4, op, ": expected 4-D switches (N, C, h, w), got ", switches.dim(), "-D");
  TORCH_CHECK_TYPE(switches.scalar_type() == at::kByte, op, ": switches must be uint8 (as maxpool_switches returns them), got ",
                   switches.scalar_type());
}

// An optional int64 (B,) index vector (`rows` of unpool, `channels` of project) whose values
// must lie in [0, limit). Reads two numbers back from the device: the price of never letting a
// kernel index out of bounds.
inline void check_index_vector(const char* op, const char* name, const at::Tensor& index, int64_t length, int64_t limit,
                               const char* limit_name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == length, op, ": ", name, " must be 1-D of length ", length,
                    " (one per row), got shape ", index.sizes());
  check_same_device(op, name, index, ref_name, ref);
  if (length == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const int64_t min_value = lo.item<int64_t>(), max_value = hi.item<int64_t>();
  TORCH_CHECK_VALUE(min_value >= 0 && max_value < limit, op, ": ", name, " holds indices outside [0, ", limit, ") (",
                    limit_name, "): min ", min_value, ", max ", max_value);
}

// Output memory format: channels-last exactly when the input is channels-last contiguous (and not
// also plainly contiguous, as with one channel). zfkernels/_fake.py applies the same rule.
inline bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace zfkernels
