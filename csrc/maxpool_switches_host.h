// Host-side part of maxpool_switches shared by both backends: checks and output allocation.
#pragma once

#include "checks.h"

namespace zfkernels {

struct MaxpoolPlan {
  PoolGeometry geometry;
  Tensor x;  // the input as 4-D (an unbatched map is a batch of one)
  Tensor out, switches;
  bool channels_last, batched;

  std::tuple<Tensor, Tensor> result() const { return {unbatch(out, batched), unbatch(switches, batched)}; }
};

inline MaxpoolPlan plan_maxpool_switches(const Tensor& input, IntArrayRef kernel, IntArrayRef stride,
                                         IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "maxpool_switches";
  const Tensor x = batched_map(op, "input x", input, "(N, C, H, W)");
  const int64_t H = x.size(2), W = x.size(3);
  check_pool_args(op, H, W, kernel, stride, padding, dilation);
  const int64_t OH = pooled_size(H, kernel[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t OW = pooled_size(W, kernel[1], stride[1], padding[1], dilation[1], ceil_mode);
  ZF_CHECK_VALUE(OH > 0 && OW > 0, op, ": output size would be ", OH, "x", OW, " for input x of ", H, "x", W);
  const PoolGeometry g = make_geometry(H, W, OH, OW, kernel, stride, padding, dilation);
  check_windows_read_pixels(op, g);
  const bool channels_last = prefers_channels_last(x);
  const auto format = channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous;
  const std::array<int64_t, 4> sizes{x.size(0), x.size(1), OH, OW};
  auto out = empty_output(sizes, x.scalar_type(), x.device(), format);
  auto switches = empty_output(sizes, ScalarType::Byte, x.device(), format);
  return MaxpoolPlan{g, x, out, switches, channels_last, input.dim() == 4};
}

}  // namespace zfkernels
