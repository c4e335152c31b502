// Host-side checks shared by switches_to_indices and unpool on both backends.
#pragma once

#include "checks.h"

namespace zfkernels {

// Counts switches that do not address a real pixel of their window. One implementation per
// backend (cpu/switches_to_indices.cpp, cuda/switches_to_indices.cu) over the same body.
int64_t count_invalid_switches_cpu(const at::Tensor& switches, const PoolGeometry& g);
int64_t count_invalid_switches_cuda(const at::Tensor& switches, const PoolGeometry& g);

inline void check_switch_values(const char* op, int64_t invalid, const PoolGeometry& g) {
  TORCH_CHECK_VALUE(invalid == 0, op, ": switches hold ", invalid, " value(s) that do not address a pixel of their ",
                    g.k_h, "x", g.k_w, " window inside the ", g.in_h, "x", g.in_w,
                    " input (corrupt switches, or switches of another geometry)");
}

inline PoolGeometry check_switches_to_indices_args(const at::Tensor& switches, at::IntArrayRef input_size,
                                                   at::IntArrayRef kernel, at::IntArrayRef stride,
                                                   at::IntArrayRef padding) {
  constexpr const char* op = "switches_to_indices";
  check_switches_tensor(op, switches);
  return check_unpool_geometry(op, input_size, switches.size(2), switches.size(3), kernel, stride, padding);
}

struct UnpoolPlan {
  PoolGeometry geometry;
  at::Tensor out;
  bool channels_last;
};

inline UnpoolPlan plan_unpool(const at::Tensor& y, const at::Tensor& switches, at::IntArrayRef input_size,
                              at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                              const std::optional<at::Tensor>& rows) {
  constexpr const char* op = "unpool";
  check_float4d(op, "y", y, "(B, C, h, w)");
  check_switches_tensor(op, switches);
  check_same_device(op, "switches", switches, "y", y);
  if (rows.has_value()) {
    TORCH_CHECK_VALUE(switches.sizes().slice(1) == y.sizes().slice(1), op, ": switches shape ", switches.sizes(),
                      " does not match y's (C, h, w) ", y.sizes().slice(1));
    check_index_vector(op, "rows", *rows, y.size(0), switches.size(0), "the switches' batch", y, "y");
  } else {
    TORCH_CHECK_VALUE(switches.sizes() == y.sizes(), op, ": switches shape ", switches.sizes(),
                      " does not match y's shape ", y.sizes(), " (pass rows= to share switches between rows)");
  }
  const PoolGeometry g = check_unpool_geometry(op, input_size, y.size(2), y.size(3), kernel, stride, padding);
  const bool channels_last = prefers_channels_last(y);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto out = at::empty({y.size(0), y.size(1), g.in_h, g.in_w}, y.options().memory_format(format));
  return UnpoolPlan{g, out, channels_last};
}

}  // namespace zfkernels
