// CPU backend of switches_to_indices, and the switch validation pass that unpool runs first.

#include "../kernels/switches.h"
#include "../switches_host.h"
#include "parallel.h"

namespace zfkernels {

namespace {

// Inside the map a window's every tap reads a pixel, so a switch is valid exactly when it is below
// k_h * k_w: a byte compare that vectorises, where switch_target costs a division per switch.
ZF_CPU_CLONES_WIDE int64_t count_above(const uint8_t* __restrict__ sw, int64_t n, int32_t taps) {
  int64_t invalid = 0;
  for (int64_t i = 0; i < n; ++i) invalid += sw[i] >= taps ? 1 : 0;
  return invalid;
}

// Invalid switches among windows [begin, end) of one row of windows, by switch_target's full test,
// leaving out switches from `counted` up (the byte compare has counted those).
int64_t count_invalid_in(const uint8_t* row, int64_t sw_stride, int64_t oh, int64_t begin, int64_t end, int32_t counted,
                         const PoolGeometry& g) {
  int64_t invalid = 0;
  for (int64_t ow = begin; ow < end; ++ow) {
    const uint8_t s = row[ow * sw_stride];
    int64_t ih, iw;
    invalid += (s < counted && !switch_target(s, oh, ow, g, &ih, &iw)) ? 1 : 0;
  }
  return invalid;
}

}  // namespace

int64_t count_invalid_switches_cpu(const Tensor& switches, const PoolGeometry& g) {
  const Strides4 ss = strides_of(switches);
  const int64_t C = switches.size(1), planes = switches.size(0) * C;
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  const int32_t taps = static_cast<int32_t>(g.k_h * g.k_w);
  // Dense switches (NCHW or channels-last): one byte compare over the whole tensor counts every
  // switch of k_h * k_w or more, wherever it is; then only the windows that cross a border (a few
  // rows and columns) need switch_target's test. Other layouts take that test everywhere.
  const bool dense = switches.is_contiguous() || is_channels_last_contiguous(switches);
  int64_t oh_lo = 0, oh_hi = 0, ow_lo = 0, ow_hi = 0;
  if (dense) {
    windows_inside(g.in_h, g.out_h, g.k_h, g.s_h, g.p_h, g.d_h, &oh_lo, &oh_hi);
    windows_inside(g.in_w, g.out_w, g.k_w, g.s_w, g.p_w, g.d_w, &ow_lo, &ow_hi);
  }
  const int32_t counted = dense ? taps : 256;
  int64_t invalid = !dense ? 0 : parallel_sum(0, switches.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    return count_above(sw + begin, end - begin, taps);
  });
  const int64_t border = g.out_h * g.out_w - (oh_hi - oh_lo) * (ow_hi - ow_lo);
  if (border == 0) return invalid;
  return invalid + parallel_sum(0, planes, grain_for(border), [&](int64_t begin, int64_t end) {
    int64_t sum = 0;
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* plane = sw + (p / C) * ss.n + (p % C) * ss.c;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const uint8_t* row = plane + oh * ss.h;
        if (oh >= oh_lo && oh < oh_hi) {
          sum += count_invalid_in(row, ss.w, oh, 0, ow_lo, counted, g) +
                 count_invalid_in(row, ss.w, oh, ow_hi, g.out_w, counted, g);
        } else {
          sum += count_invalid_in(row, ss.w, oh, 0, g.out_w, counted, g);
        }
      }
    }
    return sum;
  });
}

namespace {

Tensor switches_to_indices_cpu(const Tensor& input, IntArrayRef input_size, IntArrayRef kernel,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  const SwitchesPlan plan = plan_switches_to_indices(input, input_size, kernel, stride, padding, dilation);
  const PoolGeometry g = plan.geometry;
  const Tensor& switches = plan.switches;
  if (plan.out.numel() == 0) return plan.result();
  check_switch_values("switches_to_indices", count_invalid_switches_cpu(switches, g), g);
  const Strides4 ss = strides_of(switches), os = strides_of(plan.out);
  const int64_t C = switches.size(1);
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  int64_t* idx = plan.out.mutable_data_ptr<int64_t>();
  parallel_for(0, plan.out.numel(), 4096, [&](int64_t begin, int64_t end) {
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

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("switches_to_indices", TORCH_BOX(&switches_to_indices_cpu));
}

}  // namespace zfkernels
