// CPU backend of switches_to_indices, and the switch validation pass that unpool runs first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/switches.h"
#include "../switches_host.h"
#include "parallel.h"

namespace zfkernels {

namespace {

// Invalid switches among windows [begin, end) of one row of windows: switch_target's full test.
int64_t count_invalid_in(const uint8_t* row, int64_t sw_stride, int64_t oh, int64_t begin, int64_t end,
                         const PoolGeometry& g) {
  int64_t invalid = 0;
  for (int64_t ow = begin; ow < end; ++ow) {
    int64_t ih, iw;
    invalid += switch_target(row[ow * sw_stride], oh, ow, g, &ih, &iw) ? 0 : 1;
  }
  return invalid;
}

// Inside the map a window's every tap reads a pixel, so a switch is valid exactly when it is below
// k_h * k_w: a byte compare that vectorises, where switch_target costs a division per switch.
ZF_CPU_CLONES_WIDE int64_t count_above(const uint8_t* __restrict__ row, int64_t n, int32_t taps) {
  int32_t invalid = 0;  // n < 2^30 (checks.h)
  for (int64_t i = 0; i < n; ++i) invalid += row[i] >= taps ? 1 : 0;
  return invalid;
}

}  // namespace

int64_t count_invalid_switches_cpu(const at::Tensor& switches, const PoolGeometry& g) {
  const Strides4 ss = strides_of(switches);
  const int64_t C = switches.size(1);
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  int64_t oh_lo, oh_hi, ow_lo, ow_hi;
  windows_inside(g.in_h, g.out_h, g.k_h, g.s_h, g.p_h, g.d_h, &oh_lo, &oh_hi);
  windows_inside(g.in_w, g.out_w, g.k_w, g.s_w, g.p_w, g.d_w, &ow_lo, &ow_hi);
  const int32_t taps = static_cast<int32_t>(g.k_h * g.k_w);
  // A row of windows (n, oh) holds `lanes` channels c0, c0 + 1, ... whose switches of window ow
  // start at row + c * ss.c + ow * ss.w; when its inside windows' switches are one contiguous run
  // (NCHW rows, or channels-last with all channels), that run takes the byte compare.
  const auto row_invalid = [&](const uint8_t* row, int64_t oh, int64_t lanes) {
    const bool inside_row = oh >= oh_lo && oh < oh_hi;
    const bool contiguous = (lanes == 1 && ss.w == 1) || (lanes == C && ss.c == 1 && ss.w == C);
    const int64_t lo = (inside_row && contiguous) ? ow_lo : g.out_w, hi = (inside_row && contiguous) ? ow_hi : g.out_w;
    int64_t invalid = lo < hi ? count_above(row + lo * ss.w, (hi - lo) * lanes, taps) : 0;
    for (int64_t c = 0; c < lanes; ++c)
      invalid += count_invalid_in(row + c * ss.c, ss.w, oh, 0, lo, g) + count_invalid_in(row + c * ss.c, ss.w, oh, hi, g.out_w, g);
    return invalid;
  };
  const bool channels_last = C > 1 && ss.c == 1 && ss.w == C;
  const int64_t lanes = channels_last ? C : 1;
  const int64_t rows = switches.size(0) * (channels_last ? 1 : C) * g.out_h;
  return at::parallel_reduce(
      0, rows, grain_for(g.out_w * lanes), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t invalid) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t oh = r % g.out_h, rest = r / g.out_h;
          const int64_t n = channels_last ? rest : rest / C, c = channels_last ? 0 : rest % C;
          invalid += row_invalid(sw + n * ss.n + c * ss.c + oh * ss.h, oh, lanes);
        }
        return invalid;
      },
      std::plus<int64_t>());
}

namespace {

at::Tensor switches_to_indices_cpu(const at::Tensor& input, at::IntArrayRef input_size, at::IntArrayRef kernel,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const SwitchesPlan plan = plan_switches_to_indices(input, input_size, kernel, stride, padding, dilation);
  const PoolGeometry g = plan.geometry;
  const at::Tensor& switches = plan.switches;
  if (plan.out.numel() == 0) return plan.result();
  check_switch_values("switches_to_indices", count_invalid_switches_cpu(switches, g), g);
  const Strides4 ss = strides_of(switches), os = strides_of(plan.out);
  const int64_t C = switches.size(1);
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  int64_t* idx = plan.out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, plan.out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Coord4 o = coord_of(i, C, g.out_h, g.out_w, plan.channels_last);
      int64_t ih, iw;
      switch_target(sw[o.n * ss.n + o.c * ss.c + o.h * ss.h + o.w * ss.w], o.h, o.w, g, &ih, &iw);
      idx[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = ih * g.in_w + iw;
    }
  });
  return plan.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("switches_to_indices", &switches_to_indices_cpu);
}

}  // namespace zfkernels
