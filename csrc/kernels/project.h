// Projection of one selected feature map through its transposed filters (the deconvnet's first
// step): output pixel (oy, ox) of output channel ci for a row whose map is x and whose filter
// bank is w = weight[channel, ci] (k_h x k_w). A gather over the taps that reach (oy, ox).
#pragma once

#include "common.h"

namespace zfkernels {

struct ProjectGeometry {
  int64_t in_h, in_w, out_h, out_w;  // x's map and the projected map
  int64_t k_h, k_w, s_h, s_w, p_h, p_w;
};

// Transposed convolution: x[iy, ix] reaches out[iy * s - p + ky, ix * s - p + kx] with weight
// w[ky, kx]. Calls visit(ky, kx, iy, ix) for every tap that reaches output pixel (oy, ox), in
// (ky, kx) order: the one enumeration behind every projection loop, so all sum in one order.
template <typename Visit>
ZF_INLINE void for_each_tap(const ProjectGeometry& g, int64_t oy, int64_t ox, Visit&& visit) {
  // First tap whose (oy + p - ky) is a multiple of the stride, then every s-th one.
  // 32-bit arithmetic: coordinates fit (see common.h). (oy + p - ky) is an exact multiple of the
  // stride, so truncating division is exact for negative values too.
  const int32_t sh = static_cast<int32_t>(g.s_h), sw = static_cast<int32_t>(g.s_w);
  const int32_t y_off = static_cast<int32_t>(oy + g.p_h), x_off = static_cast<int32_t>(ox + g.p_w);
  for (int32_t ky = y_off % sh; ky < g.k_h; ky += sh) {
    const int32_t iy = (y_off - ky) / sh;
    if (iy < 0 || iy >= g.in_h) continue;
    for (int32_t kx = x_off % sw; kx < g.k_w; kx += sw) {
      const int32_t ix = (x_off - kx) / sw;
      if (ix < 0 || ix >= g.in_w) continue;
      visit(ky, kx, iy, ix);
    }
  }
}

// Output pixel (oy, ox) of one output channel: x is the row's map, w its k_h x k_w filter.
template <typename scalar_t, typename acc_t>
ZF_INLINE acc_t project_pixel(const scalar_t* __restrict__ x, int64_t xh, int64_t xw, const scalar_t* __restrict__ w,
                              int64_t wh, int64_t ww, const ProjectGeometry& g, int64_t oy, int64_t ox) {
  acc_t sum = acc_t(0);
  for_each_tap(g, oy, ox, [&](int64_t ky, int64_t kx, int64_t iy, int64_t ix) {
    sum += static_cast<acc_t>(x[iy * xh + ix * xw]) * static_cast<acc_t>(w[ky * wh + kx * ww]);
  });
  return sum;
}

}  // namespace zfkernels
