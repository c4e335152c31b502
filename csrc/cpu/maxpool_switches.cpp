// CPU backend of maxpool_switches: the shared window body, plus two loop orders the compiler
// can vectorise (contiguous NCHW rows with a fixed small window, and channels-last).

#include <vector>

#include "../kernels/maxpool_switches.h"
#include "../maxpool_switches_host.h"
#include "parallel.h"

namespace zfkernels {
namespace {

// Interior windows of one output row, for a compile-time window and column stride: the same
// update rule as maxpool_window with every loop bound known, so the loop over ow vectorises.
// `top` points at the window row origin h0 (fully inside the map) and column 0; tap (ky, kx)
// reads top[ky * row_step + kx * col_step] (row_step and col_step carry the dilation).
template <typename scalar_t, int KH, int KW, int SW>
ZF_CPU_CLONES void pool_row_interior(const scalar_t* __restrict__ top, int64_t row_step, int64_t col_step, int64_t p_w,
                                     int64_t ow_begin, int64_t ow_end, scalar_t* __restrict__ out,
                                     uint8_t* __restrict__ switches) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
    const scalar_t* window = top + ow * SW - p_w;
    acc_t best = static_cast<acc_t>(-INFINITY);
    int32_t arg = 0;
#pragma GCC unroll 16
    for (int ky = 0; ky < KH; ++ky) {
#pragma GCC unroll 16
      for (int kx = 0; kx < KW; ++kx) {
        const acc_t v = static_cast<acc_t>(window[ky * row_step + kx * col_step]);
        const bool takes = pool_takes(v, best);
        best = takes ? v : best;
        arg = takes ? ky * KW + kx : arg;
      }
    }
    out[ow] = static_cast<scalar_t>(best);
    switches[ow] = static_cast<uint8_t>(arg);
  }
}

template <typename scalar_t>
using RowFn = void (*)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, scalar_t*, uint8_t*);

// The windows of ZFNet / AlexNet (3x3 stride 2) and VGG (2x2 stride 2) get a specialised row,
// dilated or not.
template <typename scalar_t>
RowFn<scalar_t> interior_row_for(const PoolGeometry& g) {
  if (g.k_h == 3 && g.k_w == 3 && g.s_w == 2) return pool_row_interior<scalar_t, 3, 3, 2>;
  if (g.k_h == 2 && g.k_w == 2 && g.s_w == 2) return pool_row_interior<scalar_t, 2, 2, 2>;
  if (g.k_h == 3 && g.k_w == 3 && g.s_w == 1) return pool_row_interior<scalar_t, 3, 3, 1>;
  return nullptr;
}

template <typename scalar_t>
void pool_nchw(const MaxpoolPlan& plan) {
  const Tensor& x = plan.x;
  const PoolGeometry g = plan.geometry;
  const int64_t planes = x.size(0) * x.size(1);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  uint8_t* sw = plan.switches.mutable_data_ptr<uint8_t>();
  const RowFn<scalar_t> row_fn = interior_row_for<scalar_t>(g);
  // Columns whose windows lie wholly inside the map: first tap at or after column 0, last one
  // before in_w.
  const int64_t span_h = (g.k_h - 1) * g.d_h + 1, span_w = (g.k_w - 1) * g.d_w + 1;
  const int64_t ow_lo = imin(ceil_div(g.p_w, g.s_w), g.out_w);
  const int64_t ow_hi = imax(imin(floor_div(g.in_w - span_w + g.p_w, g.s_w) + 1, g.out_w), ow_lo);
  parallel_for(0, planes, grain_for(g.out_h * g.out_w * g.k_h * g.k_w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* plane = in + p * g.in_h * g.in_w;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        scalar_t* out_row = out + (p * g.out_h + oh) * g.out_w;
        uint8_t* sw_row = sw + (p * g.out_h + oh) * g.out_w;
        const int64_t h0 = oh * g.s_h - g.p_h;
        const bool rows_inside = h0 >= 0 && h0 + span_h <= g.in_h;
        const int64_t fast_lo = (row_fn && rows_inside) ? ow_lo : g.out_w;
        const int64_t fast_hi = (row_fn && rows_inside) ? ow_hi : g.out_w;
        for (int64_t ow = 0; ow < fast_lo; ++ow)
          maxpool_window<scalar_t, opmath_t<scalar_t>>(plane, g.in_w, 1, g, oh, ow, out_row + ow, sw_row + ow);
        if (fast_hi > fast_lo)
          row_fn(plane + h0 * g.in_w, g.d_h * g.in_w, g.d_w, g.p_w, fast_lo, fast_hi, out_row, sw_row);
        for (int64_t ow = fast_hi; ow < g.out_w; ++ow)
          maxpool_window<scalar_t, opmath_t<scalar_t>>(plane, g.in_w, 1, g, oh, ow, out_row + ow, sw_row + ow);
      }
    }
  });
}

// Channels-last: every window position is a contiguous run of C values, so the update runs
// over channels in the innermost (vectorised) loop.
template <typename scalar_t, typename acc_t>
ZF_CPU_CLONES_WIDE void pool_update_channels(const scalar_t* __restrict__ px, acc_t* __restrict__ best,
                                             int32_t* __restrict__ arg, int32_t offset, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(px[c]);
    const bool takes = pool_takes(v, best[c]);
    best[c] = takes ? v : best[c];
    arg[c] = takes ? offset : arg[c];
  }
}

template <typename scalar_t>
void pool_channels_last(const MaxpoolPlan& plan) {
  using acc_t = opmath_t<scalar_t>;
  const Tensor& x = plan.x;
  const PoolGeometry g = plan.geometry;
  const int64_t C = x.size(1);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  uint8_t* sw = plan.switches.mutable_data_ptr<uint8_t>();
  parallel_for(0, x.size(0) * g.out_h, grain_for(g.out_w * C * g.k_h * g.k_w), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(C);
    std::vector<int32_t> arg(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const scalar_t* image = in + n * g.in_h * g.in_w * C;
      const int64_t h0 = oh * g.s_h - g.p_h;
      int64_t ky_begin, ky_end;
      taps_inside(h0, g.k_h, g.d_h, g.in_h, &ky_begin, &ky_end);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t w0 = ow * g.s_w - g.p_w;
        int64_t kx_begin, kx_end;
        taps_inside(w0, g.k_w, g.d_w, g.in_w, &kx_begin, &kx_end);
        const int32_t first = static_cast<int32_t>(ky_begin * g.k_w + kx_begin);
        acc_t* __restrict__ b = best.data();
        int32_t* __restrict__ a = arg.data();
        for (int64_t c = 0; c < C; ++c) {
          b[c] = static_cast<acc_t>(-INFINITY);
          a[c] = first;
        }
        for (int64_t ky = ky_begin; ky < ky_end; ++ky) {
          for (int64_t kx = kx_begin; kx < kx_end; ++kx) {
            const int64_t ih = h0 + ky * g.d_h, iw = w0 + kx * g.d_w;
            pool_update_channels<scalar_t, acc_t>(image + (ih * g.in_w + iw) * C, b, a,
                                                  static_cast<int32_t>(ky * g.k_w + kx), C);
          }
        }
        scalar_t* __restrict__ o = out + ((n * g.out_h + oh) * g.out_w + ow) * C;
        uint8_t* __restrict__ s = sw + ((n * g.out_h + oh) * g.out_w + ow) * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = static_cast<scalar_t>(b[c]);
          s[c] = static_cast<uint8_t>(a[c]);
        }
      }
    }
  });
}

// Any other strides: one output element at a time through the shared body (the CUDA path).
template <typename scalar_t>
void pool_strided(const MaxpoolPlan& plan) {
  const Tensor& x = plan.x;
  const PoolGeometry g = plan.geometry;
  const Strides4 xs = strides_of(x), os = strides_of(plan.out), ss = strides_of(plan.switches);
  const int64_t C = x.size(1);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  uint8_t* sw = plan.switches.mutable_data_ptr<uint8_t>();
  parallel_for(0, plan.out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Coord4 o = coord_of(i, C, g.out_h, g.out_w, plan.channels_last);
      maxpool_window<scalar_t, opmath_t<scalar_t>>(
          in + o.n * xs.n + o.c * xs.c, xs.h, xs.w, g, o.h, o.w,
          out + o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w,
          sw + o.n * ss.n + o.c * ss.c + o.h * ss.h + o.w * ss.w);
    }
  });
}

std::tuple<Tensor, Tensor> maxpool_switches_cpu(const Tensor& x, IntArrayRef kernel_size,
                                                IntArrayRef stride, IntArrayRef padding,
                                                bool ceil_mode, IntArrayRef dilation) {
  const MaxpoolPlan plan = plan_maxpool_switches(x, kernel_size, stride, padding, dilation, ceil_mode);
  if (plan.out.numel() == 0) return plan.result();
  ZF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "maxpool_switches_cpu", [&] {
    if (!plan.channels_last && plan.x.is_contiguous()) {
      pool_nchw<scalar_t>(plan);
    } else if (plan.channels_last && is_channels_last_contiguous(plan.x)) {
      pool_channels_last<scalar_t>(plan);
    } else {
      pool_strided<scalar_t>(plan);
    }
  });
  return plan.result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("maxpool_switches", TORCH_BOX(&maxpool_switches_cpu));
}

}  // namespace zfkernels
