// Reading switches back: the pixel a switch points at, and whether it is a valid switch.
// Shared by switches_to_indices, the switch validation pass and the unpooling gather.
#pragma once

#include "common.h"

namespace zfkernels {

// Pixel (ih, iw) of the pooled map that switch s of window (oh, ow) points at (tap (ky, kx) =
// (s / k_w, s % k_w), dilated). A switch is valid when it addresses its window (s < k_h * k_w)
// and a real pixel, not the padding.
ZF_INLINE bool switch_target(uint8_t s, int64_t oh, int64_t ow, const PoolGeometry& g, int64_t* ih, int64_t* iw) {
  const int32_t k_w = static_cast<int32_t>(g.k_w);  // 32-bit division: see common.h
  const int64_t ky = s / k_w, kx = s % k_w;
  *ih = oh * g.s_h - g.p_h + ky * g.d_h;
  *iw = ow * g.s_w - g.p_w + kx * g.d_w;
  return ky < g.k_h && *ih >= 0 && *ih < g.in_h && *iw >= 0 && *iw < g.in_w;
}

// The switch that window (oh, ow) holds when its argmax is pixel (ih, iw), for a window whose
// span reaches the pixel (covering_windows); -1, which no uint8 equals, when the pixel falls
// between the window's dilated taps. Undilated, it needs no division, which keeps the unpooling
// gather cheap.
ZF_INLINE int64_t switch_for(int64_t ih, int64_t iw, int64_t oh, int64_t ow, const PoolGeometry& g) {
  const int64_t ky = tap_at(ih - (oh * g.s_h - g.p_h), g.d_h), kx = tap_at(iw - (ow * g.s_w - g.p_w), g.d_w);
  return (ky < 0 || kx < 0) ? -1 : ky * g.k_w + kx;
}

}  // namespace zfkernels
