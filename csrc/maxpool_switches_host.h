// Host-side part of maxpool_switches shared by both backends: checks and output allocation.
#pragma once

#include "checks.h"

namespace zfkernels {

struct MaxpoolPlan {
  PoolGeometry geometry;
  at::Tensor out, switches;
  bool channels_last;
};

inline MaxpoolPlan plan_maxpool_switches(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                         at::IntArrayRef padding, bool ceil_mode) {
  constexpr const char* op = "maxpool_switches";
  check_float4d(op, "input x", x, "(N, C, H, W)");
  const int64_t H = x.size(2), W = x.size(3);
  check_pool_geometry(op, H, W, kernel, stride, padding);
  const int64_t OH = pooled_size(H, kernel[0], stride[0], padding[0], ceil_mode);
  const int64_t OW = pooled_size(W, kernel[1], stride[1], padding[1], ceil_mode);
  TORCH_CHECK_VALUE(OH > 0 && OW > 0, op, ": output size would be ", OH, "x", OW, " for input x of ", H, "x", W);
  const bool channels_last = prefers_channels_last(x);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto out = at::empty({x.size(0), x.size(1), OH, OW}, x.options().memory_format(format));
  auto switches = at::empty({x.size(0), x.size(1), OH, OW}, x.options().dtype(at::kByte).memory_format(format));
  return MaxpoolPlan{make_geometry(H, W, OH, OW, kernel, stride, padding), out, switches, channels_last};
}

}  // namespace zfkernels
