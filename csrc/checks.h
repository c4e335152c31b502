// Argument checks shared by the CPU and CUDA backends. Every message starts with the op's
// name and names the offending argument, so a Python user sees what to fix.
#pragma once

#include "kernels/common.h"
#include "torch_stable.h"

namespace zfkernels {

// Coordinates and window geometry are computed in 32 bits (kernels/common.h): every map size,
// kernel, stride, padding and dilated span is bounded by kMaxExtent, so sums such as
// `oy + padding` or `origin + (k - 1) * dilation` stay below 2^31.
constexpr int64_t kMaxExtent = int64_t(1) << 30;

inline void check_extent(const char* op, const char* name, int64_t value) {
  ZF_CHECK_VALUE(value < kMaxExtent, op, ": ", name, " is ", value, ", too large (limit 2^30)");
}

inline void check_float_dtype(const char* op, const char* name, const Tensor& t) {
  const auto dtype = t.scalar_type();
  ZF_CHECK_TYPE(dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16 ||
                    dtype == ScalarType::Double,
                op, ": ", name, " must be float32, float16 or bfloat16 (or float64), got ", dtype);
}

// A map argument: batched (N, C, H, W), or unbatched (C, H, W) as PyTorch's own ops accept it.
// Returns the 4-D view the kernels run on (an unbatched map is a batch of one); unbatch() turns
// the results back.
inline Tensor batched_map(const char* op, const char* name, const Tensor& t, const char* dims) {
  ZF_CHECK_VALUE(t.dim() == 4 || t.dim() == 3, op, ": expected a 4-D ", name, " ", dims,
                 " (or 3-D without the batch), got ", t.dim(), "-D");
  for (int64_t d = t.dim() - 3; d < t.dim(); ++d)
    ZF_CHECK_VALUE(t.size(d) < kMaxExtent, op, ": ", name, " has a dimension of ", t.size(d), " (limit 2^30)");
  check_float_dtype(op, name, t);
  return t.dim() == 3 ? torch::stable::unsqueeze(t, 0) : t;
}

// Every op's outputs: torch.empty's, except that large CPU outputs go on huge pages
// (cpu/output.cpp).
Tensor empty_output(IntArrayRef sizes, ScalarType dtype, const Device& device, MemoryFormat format);

inline Tensor unbatch(const Tensor& out, bool batched) {
  return batched ? out : torch::stable::squeeze(out, 0);
}

inline void check_pair(const char* op, const char* name, IntArrayRef v) {
  ZF_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have two values (H, W), got ", v.size());
  ZF_CHECK_VALUE(v[0] < kMaxExtent && v[1] < kMaxExtent, op, ": ", name, " ", v, " is too large (limit 2^30)");
}

inline void check_positive_pair(const char* op, const char* name, IntArrayRef v) {
  check_pair(op, name, v);
  ZF_CHECK_VALUE(v[0] > 0 && v[1] > 0, op, ": ", name, " must be positive, got ", v);
}

inline void check_same_device(const char* op, const char* name, const Tensor& t, const char* ref_name,
                              const Tensor& ref) {
  ZF_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                 ref.device(), "; move them to one device");
}

// Size of a pooled axis exactly as PyTorch's pooling_output_shape computes it
// (zfkernels.ops.pooled_size is the same formula in Python).
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  int64_t out = floor_div(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;  // the last window must start inside the input
  return out;
}

// The first window along one axis (of `out`) none of whose taps reads a real pixel, or -1.
// Dilation can leave a border window with its taps only in the padding and the gaps between
// them; PyTorch then returns -inf with an index outside the map, which no switch can encode.
// Only windows that cross a border can miss, so only those are visited.
inline int64_t window_without_pixels(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d) {
  int64_t inside_lo, inside_hi;
  windows_inside(in, out, k, s, p, d, &inside_lo, &inside_hi);
  const auto misses = [&](int64_t o) {
    int64_t begin, end;
    taps_inside(o * s - p, k, d, in, &begin, &end);
    return begin >= end;
  };
  for (int64_t o = 0; o < inside_lo; ++o)
    if (misses(o)) return o;
  for (int64_t o = inside_hi; o < out; ++o)
    if (misses(o)) return o;
  return -1;
}

// Checks kernel_size / stride / padding / dilation for a pooling over an in_h x in_w map.
inline void check_pool_args(const char* op, int64_t in_h, int64_t in_w, IntArrayRef kernel,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  check_positive_pair(op, "kernel_size", kernel);
  check_positive_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_positive_pair(op, "dilation", dilation);
  ZF_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel[0] && 2 * padding[1] <= kernel[1],
                 op, ": padding must be between 0 and half of kernel_size, got padding ", padding,
                 " for kernel_size ", kernel);
  ZF_CHECK_VALUE(kernel[0] * kernel[1] <= 256, op, ": kernel_size ", kernel, " has ", kernel[0] * kernel[1],
                 " elements per window; uint8 switches address at most 256");
  ZF_CHECK_VALUE(in_h > 0 && in_w > 0, op, ": the pooled map must be non-empty, got ", in_h, "x", in_w);
  const int64_t span_h = (kernel[0] - 1) * dilation[0] + 1, span_w = (kernel[1] - 1) * dilation[1] + 1;
  ZF_CHECK_VALUE(in_h + 2 * padding[0] >= span_h && in_w + 2 * padding[1] >= span_w, op, ": kernel_size ", kernel,
                 " with dilation ", dilation, " spans ", span_h, "x", span_w, ", larger than the padded input (",
                 in_h + 2 * padding[0], ", ", in_w + 2 * padding[1], ")");
}

inline PoolGeometry make_geometry(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, IntArrayRef kernel,
                                  IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  return PoolGeometry{in_h,      in_w,      out_h,      out_w,      kernel[0],   kernel[1],
                      stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

// Every window must read a pixel: its switch is the offset of one.
inline void check_windows_read_pixels(const char* op, const PoolGeometry& g) {
  const int64_t row = window_without_pixels(g.in_h, g.out_h, g.k_h, g.s_h, g.p_h, g.d_h);
  const int64_t column = window_without_pixels(g.in_w, g.out_w, g.k_w, g.s_w, g.p_w, g.d_w);
  ZF_CHECK_VALUE(row < 0 && column < 0, op, ": with kernel_size [", g.k_h, ", ", g.k_w, "], padding [", g.p_h,
                 ", ", g.p_w, "] and dilation [", g.d_h, ", ", g.d_w, "], the windows of ",
                 (row >= 0 ? "row " : "column "), (row >= 0 ? row : column), " read no pixel of the ", g.in_h,
                 "x", g.in_w, " input (all their taps fall in the padding or between pixels)");
}

// The pooled map size (H, W) and the switch tensor's spatial size must fit one another.
inline PoolGeometry check_unpool_geometry(const char* op, IntArrayRef input_size, int64_t out_h, int64_t out_w,
                                          IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                                          IntArrayRef dilation) {
  check_pair(op, "input_size", input_size);
  ZF_CHECK_VALUE(input_size[0] > 0 && input_size[1] > 0, op, ": input_size must be positive, got ", input_size);
  check_pool_args(op, input_size[0], input_size[1], kernel, stride, padding, dilation);
  int64_t size[2][2];  // [ceil_mode][axis]
  bool fits = false;
  for (int ceil_mode = 0; ceil_mode < 2; ++ceil_mode) {
    for (int axis = 0; axis < 2; ++axis)
      size[ceil_mode][axis] = pooled_size(input_size[axis], kernel[axis], stride[axis], padding[axis], dilation[axis],
                                          ceil_mode == 1);
    fits = fits || (size[ceil_mode][0] == out_h && size[ceil_mode][1] == out_w);
  }
  ZF_CHECK_VALUE(fits, op, ": input_size ", input_size, " cannot have produced a pooled map of ", out_h, "x", out_w,
                 " with kernel_size ", kernel, ", stride ", stride, ", padding ", padding, ", dilation ", dilation,
                 " (it gives ", size[0][0], "x", size[0][1], ", or ", size[1][0], "x", size[1][1],
                 " with ceil_mode)");
  const PoolGeometry g = make_geometry(input_size[0], input_size[1], out_h, out_w, kernel, stride, padding, dilation);
  check_windows_read_pixels(op, g);
  return g;
}

// Switches: (N, C, h, w), or unbatched (C, h, w) beside an unbatched map. Returns the 4-D view.
inline Tensor batched_switches(const char* op, const Tensor& switches) {
  ZF_CHECK_VALUE(switches.dim() == 4 || switches.dim() == 3, op,
                 ": expected 4-D switches (N, C, h, w) (or 3-D without the batch), got ", switches.dim(), "-D");
  ZF_CHECK_TYPE(switches.scalar_type() == ScalarType::Byte, op,
                ": switches must be uint8 (as maxpool_switches returns them), got ", switches.scalar_type());
  return switches.dim() == 3 ? torch::stable::unsqueeze(switches, 0) : switches;
}

// The smallest and largest of a non-empty int64 vector: read in place on the CPU, through
// aten::aminmax elsewhere (two numbers read back from the device).
std::pair<int64_t, int64_t> index_range(const Tensor& index);

// An optional int64 (B,) index vector (`rows` of unpool, `channels` of project) whose values
// must lie in [0, limit). Reads two numbers back from the device: the price of never letting a
// kernel index out of bounds.
inline void check_index_vector(const char* op, const char* name, const Tensor& index, int64_t length, int64_t limit,
                               const char* limit_name, const Tensor& ref, const char* ref_name) {
  ZF_CHECK_TYPE(index.scalar_type() == ScalarType::Long, op, ": ", name, " must be int64, got ", index.scalar_type());
  ZF_CHECK_VALUE(index.dim() == 1 && index.size(0) == length, op, ": ", name, " must be 1-D of length ", length,
                 " (one per row), got shape ", index.sizes());
  check_same_device(op, name, index, ref_name, ref);
  if (length == 0) return;
  const auto [min_value, max_value] = index_range(index);
  ZF_CHECK_VALUE(min_value >= 0 && max_value < limit, op, ": ", name, " holds indices outside [0, ", limit, ") (",
                 limit_name, "): min ", min_value, ", max ", max_value);
}

// Output memory format: channels-last exactly when the input is channels-last contiguous (and not
// also plainly contiguous, as with one channel). zfkernels/_fake.py applies the same rule.
inline bool prefers_channels_last(const Tensor& t) {
  return t.dim() == 4 && is_channels_last_contiguous(t) && !t.is_contiguous();
}

inline Strides4 strides_of(const Tensor& t) {
  const IntArrayRef s = t.strides();
  return Strides4{s[0], s[1], s[2], s[3]};
}

}  // namespace zfkernels
