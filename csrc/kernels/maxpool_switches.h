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

// Max of window (oh, ow) of one plane and its switch ky * k_w + kx (offset from the window's
// origin, padding included). `plane` points at element (0, 0) of the pooled map; sh, sw are its
// element strides. Windows always hold at least one real pixel (padding <= kernel / 2 and the
// ceil_mode rule guarantee it), whose first one seeds the argmax as in PyTorch.
template <typename scalar_t, typename acc_t>
ZF_INLINE void maxpool_window(const scalar_t* __restrict__ plane, int64_t sh, int64_t sw, const PoolGeometry& g,
                              int64_t oh, int64_t ow, scalar_t* value, uint8_t* switch_out) {
  const int64_t h0 = oh * g.s_h - g.p_h, w0 = ow * g.s_w - g.p_w;
  const int64_t h_begin = imax(h0, 0), h_end = imin(h0 + g.k_h, g.in_h);
  const int64_t w_begin = imax(w0, 0), w_end = imin(w0 + g.k_w, g.in_w);
  acc_t best = static_cast<acc_t>(-INFINITY);
  int64_t arg = (h_begin - h0) * g.k_w + (w_begin - w0);
  for (int64_t ih = h_begin; ih < h_end; ++ih) {
    for (int64_t iw = w_begin; iw < w_end; ++iw) {
      const acc_t v = static_cast<acc_t>(plane[ih * sh + iw * sw]);
      if (pool_takes(v, best)) {
        best = v;
        arg = (ih - h0) * g.k_w + (iw - w0);
      }
    }
  }
  *value = static_cast<scalar_t>(best);  // exact: best is one of the inputs (or -inf)
  *switch_out = static_cast<uint8_t>(arg);
}

}  // namespace zfkernels
