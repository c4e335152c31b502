// Max pooling with uint8 argmax switches: the per-window body, shared by both backends.
#pragma once

#include "common.h"

namespace zfkernels {

// PyTorch's update rule, so values and argmaxes match F.max_pool2d exactly: a strictly larger
// value wins (ties keep the first maximum in row-major order) and a NaN always wins (the last
// NaN of the window is its argmax, the value is NaN).
template <typename acc_t>
ZF_INLINE bool pool_takes(acc_t value, acc_t best) {
  return value > best || value != value;
}

// Max of window (oh, ow) of one plane and its switch ky * k_w + kx (the tap's offset inside the
// window, counted in taps, so padding and dilation gaps included). `plane` points at element
// (0, 0) of the pooled map; sh, sw are its element strides. Taps run in row-major order, which
// is PyTorch's pixel order, so ties resolve alike. Every window holds at least one real pixel
// (checks.h refuses geometries where one would not), whose first one seeds the argmax as in
// PyTorch.
template <typename scalar_t, typename acc_t>
ZF_INLINE void maxpool_window(const scalar_t* __restrict__ plane, int64_t sh, int64_t sw, const PoolGeometry& g,
                              int64_t oh, int64_t ow, scalar_t* value, uint8_t* switch_out) {
  const int64_t h0 = oh * g.s_h - g.p_h, w0 = ow * g.s_w - g.p_w;
  int64_t ky_begin, ky_end, kx_begin, kx_end;
  taps_inside(h0, g.k_h, g.d_h, g.in_h, &ky_begin, &ky_end);
  taps_inside(w0, g.k_w, g.d_w, g.in_w, &kx_begin, &kx_end);
  acc_t best = static_cast<acc_t>(-INFINITY);
  int64_t arg = ky_begin * g.k_w + kx_begin;
  for (int64_t ky = ky_begin; ky < ky_end; ++ky) {
    const int64_t row = (h0 + ky * g.d_h) * sh;
    for (int64_t kx = kx_begin; kx < kx_end; ++kx) {
      const acc_t v = static_cast<acc_t>(plane[row + (w0 + kx * g.d_w) * sw]);
      if (pool_takes(v, best)) {
        best = v;
        arg = ky * g.k_w + kx;
      }
    }
  }
  *value = static_cast<scalar_t>(best);  // exact: best is one of the inputs
  *switch_out = static_cast<uint8_t>(arg);
}

}  // namespace zfkernels
