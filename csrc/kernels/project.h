// Projection of one selected feature map through its transposed filters (the deconvnet's first
// step): output pixel (oy, ox) of output channel ci for a row whose map is x and whose filter
// bank is w = weight[channel, ci] (k_h x k_w). A gather over the taps that reach (oy, ox).
#pragma once

#include "common.h"

namespace zfkernels {

struct ProjectGeometry {
  int64_t in_h, in_w, out_h, out_w;  // x's map and the projected map
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
  int64_t t_h, t_w;  // tap steps s / gcd(s, d): taps that reach one output row (column) lie this far apart
};

// Groups of a channels= projection: forward output channel `filter` belongs to group
// filter / filters, and its filter reaches only that group's `channels` input channels, so a
// row's projection is zero outside [first_channel(filter), first_channel(filter) + channels).
struct ProjectGroups {
  int64_t filters;   // C_out / groups
  int64_t channels;  // C_in / groups
  ZF_INLINE int64_t first_channel(int64_t filter) const {
    // 32-bit division: channel counts are bounded by 2^30 (checks.h)
    return static_cast<int64_t>(static_cast<int32_t>(filter) / static_cast<int32_t>(filters)) * channels;
  }
};

// The first tap t >= 0 of an axis (k taps dilated by d, stride s, tap step `step`) whose
// (off - t * d) is a multiple of s, or k when no tap below k is; the next ones follow every
// `step` taps. Undilated, that is off % s; dilated, one of the first `step` taps.
ZF_INLINE int32_t first_tap(int32_t off, int32_t k, int32_t s, int32_t d, int32_t step) {
  if (d == 1) return off % s;
  for (int32_t t = 0; t < step && t < k; ++t)
    if ((off - t * d) % s == 0) return t;
  return k;
}

// One axis of a transposed convolution: input position i reaches output position i * s - p + t * d
// with tap t. Calls visit(t, i) for every tap t that reaches the output position whose offset is
// off = o + p, in ascending t. 32-bit arithmetic: output sizes, padding and dilated spans are below
// 2^30 (checks.h), so off and t * d stay below 2^31; (off - t * d) is an exact multiple of the
// stride, so truncating division is exact for negative values too.
template <typename Visit>
ZF_INLINE void for_each_axis_tap(int32_t off, int32_t k, int32_t s, int32_t d, int32_t step, int64_t in,
                                 Visit&& visit) {
  for (int32_t t = first_tap(off, k, s, d, step); t < k; t += step) {
    const int32_t i = (off - t * d) / s;
    if (i >= 0 && i < in) visit(t, i);
  }
}

// Transposed convolution: x[iy, ix] reaches out[iy * s - p + ky * d, ix * s - p + kx * d] with
// weight w[ky, kx]. Calls visit(ky, kx, iy, ix) for every tap that reaches output pixel (oy, ox),
// in (ky, kx) order: the one enumeration behind every projection loop (the CPU's tap tables are
// for_each_axis_tap's lists), so all sum in one order.
template <typename Visit>
ZF_INLINE void for_each_tap(const ProjectGeometry& g, int64_t oy, int64_t ox, Visit&& visit) {
  const int32_t y_off = static_cast<int32_t>(oy + g.p_h), x_off = static_cast<int32_t>(ox + g.p_w);
  for_each_axis_tap(y_off, static_cast<int32_t>(g.k_h), static_cast<int32_t>(g.s_h), static_cast<int32_t>(g.d_h),
                    static_cast<int32_t>(g.t_h), g.in_h, [&](int32_t ky, int32_t iy) {
                      for_each_axis_tap(x_off, static_cast<int32_t>(g.k_w), static_cast<int32_t>(g.s_w),
                                        static_cast<int32_t>(g.d_w), static_cast<int32_t>(g.t_w), g.in_w,
                                        [&](int32_t kx, int32_t ix) { visit(ky, kx, iy, ix); });
                    });
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

// Output element (c, oy, ox) of a channels= row whose map is x and whose forward channel is
// `filter`: zero outside the filter's group, else project_pixel through weight[filter, c - first].
// `w` points at weight[filter]; ws are the weight's element strides.
template <typename scalar_t, typename acc_t>
ZF_INLINE acc_t project_selected_pixel(const scalar_t* __restrict__ x, int64_t xh, int64_t xw,
                                       const scalar_t* __restrict__ w, const Strides4& ws, const ProjectGroups& groups,
                                       int64_t filter, const ProjectGeometry& g, int64_t c, int64_t oy, int64_t ox) {
  const int64_t j = c - groups.first_channel(filter);
  if (j < 0 || j >= groups.channels) return acc_t(0);
  return project_pixel<scalar_t, acc_t>(x, xh, xw, w + j * ws.c, ws.h, ws.w, g, oy, ox);
}

}  // namespace zfkernels
