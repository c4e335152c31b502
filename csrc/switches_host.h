// Host-side checks shared by switches_to_indices and unpool on both backends.
#pragma once

#include "checks.h"

namespace zfkernels {

// Counts switches that do not address a real pixel of their window. One implementation per
// backend (cpu/switches_to_indices.cpp, cuda/switches_to_indices.cu) over the same body.
int64_t count_invalid_switches_cpu(const Tensor& switches, const PoolGeometry& g);
int64_t count_invalid_switches_cuda(const Tensor& switches, const PoolGeometry& g);

inline void check_switch_values(const char* op, int64_t invalid, const PoolGeometry& g) {
  ZF_CHECK_VALUE(invalid == 0, op, ": switches hold ", invalid, " value(s) that do not address a pixel of their ",
                 g.k_h, "x", g.k_w, " window inside the ", g.in_h, "x", g.in_w,
                 " input (corrupt switches, or switches of another geometry)");
}

struct SwitchesPlan {
  PoolGeometry geometry;
  Tensor switches;  // 4-D (unbatched switches are a batch of one)
  Tensor out;       // int64 indices
  bool channels_last, batched;

  Tensor result() const { return unbatch(out, batched); }
};

inline SwitchesPlan plan_switches_to_indices(const Tensor& input, IntArrayRef input_size,
                                             IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                                             IntArrayRef dilation) {
  constexpr const char* op = "switches_to_indices";
  const Tensor switches = batched_switches(op, input);
  const PoolGeometry g =
      check_unpool_geometry(op, input_size, switches.size(2), switches.size(3), kernel, stride, padding, dilation);
  const bool channels_last = prefers_channels_last(switches);
  auto out = empty_output(switches.sizes(), ScalarType::Long, switches.device(),
                          channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous);
  return SwitchesPlan{g, switches, out, channels_last, input.dim() == 4};
}

struct UnpoolPlan {
  PoolGeometry geometry;
  Tensor y, switches;  // 4-D (an unbatched pair is a batch of one)
  Tensor out;
  bool channels_last, batched;

  Tensor result() const { return unbatch(out, batched); }
};

inline UnpoolPlan plan_unpool(const Tensor& y_in, const Tensor& switches_in, IntArrayRef input_size,
                              IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                              IntArrayRef dilation, const std::optional<Tensor>& rows) {
  constexpr const char* op = "unpool";
  const Tensor y = batched_map(op, "y", y_in, "(B, C, h, w)");
  const Tensor switches = batched_switches(op, switches_in);
  check_same_device(op, "switches", switches, "y", y);
  const bool batched = y_in.dim() == 4;
  if (rows.has_value()) {
    ZF_CHECK_VALUE(batched, op, ": rows= needs a batched y (B, C, h, w), got a 3-D y");
    ZF_CHECK_VALUE(switches_in.dim() == 4 && switches.sizes().slice(1) == y.sizes().slice(1), op,
                   ": switches shape ", switches_in.sizes(), " does not match y's (C, h, w) ", y.sizes().slice(1));
    check_index_vector(op, "rows", *rows, y.size(0), switches.size(0), "the switches' batch", y, "y");
  } else {
    ZF_CHECK_VALUE(switches_in.sizes() == y_in.sizes(), op, ": switches shape ", switches_in.sizes(),
                   " does not match y's shape ", y_in.sizes(), " (pass rows= to share switches between rows)");
  }
  const PoolGeometry g = check_unpool_geometry(op, input_size, y.size(2), y.size(3), kernel, stride, padding, dilation);
  const bool channels_last = prefers_channels_last(y);
  const auto format = channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous;
  auto out =
      empty_output(std::array<int64_t, 4>{y.size(0), y.size(1), g.in_h, g.in_w}, y.scalar_type(), y.device(), format);
  return UnpoolPlan{g, y, switches, out, channels_last, batched};
}

}  // namespace zfkernels
