// Switch-guided unpooling, the exact adjoint of max pooling, as a deterministic gather: each
// pixel sums, in a fixed order, the pooled values whose window's switch points at it.
#pragma once

#include "switches.h"

namespace zfkernels {

// Pixel (ih, iw) of one plane: windows in row-major order (oh, then ow), so the sum's order --
// and hence its rounding -- is the same on every backend and every call. `y` and `sw` point at
// element (0, 0) of the plane's pooled values and switches, with element strides (yh, yw) and
// (sh, swd). Rectification (the deconvnet's ReLU of the reconstruction) keeps NaN, as torch.relu.
template <typename scalar_t, typename acc_t>
ZF_INLINE acc_t unpool_pixel(const scalar_t* __restrict__ y, int64_t yh, int64_t yw, const uint8_t* __restrict__ sw,
                             int64_t sh, int64_t swd, const PoolGeometry& g, int64_t ih, int64_t iw, bool rectify) {
  int64_t oh_begin, oh_end, ow_begin, ow_end;
  covering_windows(ih, g.k_h, g.s_h, g.p_h, g.d_h, g.out_h, &oh_begin, &oh_end);
  covering_windows(iw, g.k_w, g.s_w, g.p_w, g.d_w, g.out_w, &ow_begin, &ow_end);
  acc_t sum = acc_t(0);
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
      if (static_cast<int64_t>(sw[oh * sh + ow * swd]) == switch_for(ih, iw, oh, ow, g)) {
        sum += static_cast<acc_t>(y[oh * yh + ow * yw]);
      }
    }
  }
  return (rectify && sum < acc_t(0)) ? acc_t(0) : sum;
}

}  // namespace zfkernels
