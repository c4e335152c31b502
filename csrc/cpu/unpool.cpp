// CPU backend of unpool. Contiguous NCHW planes take a scatter in window order, which adds the
// same values in the same order as the shared gather body (so the result is bitwise the one
// of unpool_pixel) while touching each pooled value once; channels-last runs the gather with
// channels innermost; any other layout runs the shared body per pixel, as the CUDA kernel does.

#include <array>
#include <vector>

#include "../kernels/unpool.h"
#include "../switches_host.h"
#include "parallel.h"

namespace zfkernels {
namespace {

// Row b of y reads the switches of image rows[b] (or b).
struct RowMap {
  const int64_t* rows;
  int64_t rows_stride;
  int64_t operator()(int64_t b) const { return rows ? rows[b * rows_stride] : b; }
};

RowMap row_map(const std::optional<Tensor>& rows) {
  return rows.has_value() ? RowMap{rows->const_data_ptr<int64_t>(), rows->stride(0)} : RowMap{nullptr, 0};
}

// The plane's sums, rectified when asked (keeping NaN, as torch.relu), into the output: one
// contiguous pass that vectorises.
template <typename scalar_t, typename acc_t>
ZF_CPU_CLONES void store_plane(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n, bool rectify) {
  if (rectify) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i] < acc_t(0) ? acc_t(0) : acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
  }
}

template <typename scalar_t>
void unpool_nchw(const UnpoolPlan& plan, const RowMap& row_of, bool rectify) {
  const Tensor &y = plan.y, &switches = plan.switches;
  using acc_t = opmath_t<scalar_t>;
  const PoolGeometry g = plan.geometry;
  const int64_t C = y.size(1), pooled = g.out_h * g.out_w, pixels = g.in_h * g.in_w;
  // Switch s of window (oh, ow) lands on pixel origin(oh, ow) + offset[s]: a table instead of a
  // division per window.
  std::array<int64_t, 256> offset{};
  for (int64_t s = 0; s < g.k_h * g.k_w; ++s) offset[s] = (s / g.k_w) * g.d_h * g.in_w + (s % g.k_w) * g.d_w;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const uint8_t* sp = switches.const_data_ptr<uint8_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  parallel_for(0, y.size(0) * C, grain_for(pooled + pixels), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pixels);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / C, c = p % C;
      const scalar_t* yv = yp + p * pooled;
      const uint8_t* sv = sp + (row_of(b) * C + c) * pooled;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t row_origin = (oh * g.s_h - g.p_h) * g.in_w - g.p_w;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          acc[row_origin + ow * g.s_w + offset[sv[oh * g.out_w + ow]]] += static_cast<acc_t>(yv[oh * g.out_w + ow]);
        }
      }
      store_plane<scalar_t, acc_t>(out + p * pixels, acc.data(), pixels, rectify);
    }
  });
}

// One window's contribution to a pixel's C channels: the gather's test, channels innermost.
template <typename scalar_t, typename acc_t>
ZF_CPU_CLONES_WIDE void gather_channels(acc_t* __restrict__ acc, const scalar_t* __restrict__ y,
                                        const uint8_t* __restrict__ sw, uint8_t expected, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += sw[c] == expected ? static_cast<acc_t>(y[c]) : acc_t(0);
}

template <typename scalar_t>
void unpool_channels_last(const UnpoolPlan& plan, const RowMap& row_of, bool rectify) {
  const Tensor &y = plan.y, &switches = plan.switches;
  using acc_t = opmath_t<scalar_t>;
  const PoolGeometry g = plan.geometry;
  const int64_t C = y.size(1);
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const uint8_t* sp = switches.const_data_ptr<uint8_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  parallel_for(0, y.size(0) * g.in_h, grain_for(g.in_w * C * 4), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.in_h, ih = r % g.in_h;
      const scalar_t* yb = yp + b * g.out_h * g.out_w * C;
      const uint8_t* sb = sp + row_of(b) * g.out_h * g.out_w * C;
      int64_t oh_begin, oh_end;
      covering_windows(ih, g.k_h, g.s_h, g.p_h, g.d_h, g.out_h, &oh_begin, &oh_end);
      for (int64_t iw = 0; iw < g.in_w; ++iw) {
        int64_t ow_begin, ow_end;
        covering_windows(iw, g.k_w, g.s_w, g.p_w, g.d_w, g.out_w, &ow_begin, &ow_end);
        acc_t* __restrict__ a = acc.data();
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
          for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
            const int64_t expected = switch_for(ih, iw, oh, ow, g);
            if (expected < 0) continue;  // the pixel falls between this window's dilated taps
            gather_channels<scalar_t, acc_t>(a, yb + (oh * g.out_w + ow) * C, sb + (oh * g.out_w + ow) * C,
                                             static_cast<uint8_t>(expected), C);
          }
        }
        scalar_t* __restrict__ o = out + ((b * g.in_h + ih) * g.in_w + iw) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>((rectify && a[c] < acc_t(0)) ? acc_t(0) : a[c]);
      }
    }
  });
}

template <typename scalar_t>
void unpool_strided(const UnpoolPlan& plan, const RowMap& row_of, bool rectify) {
  const Tensor &y = plan.y, &switches = plan.switches;
  using acc_t = opmath_t<scalar_t>;
  const PoolGeometry g = plan.geometry;
  const Strides4 ys = strides_of(y), ss = strides_of(switches), os = strides_of(plan.out);
  const int64_t C = y.size(1);
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const uint8_t* sp = switches.const_data_ptr<uint8_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  parallel_for(0, plan.out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Coord4 o = coord_of(i, C, g.in_h, g.in_w, plan.channels_last);
      const acc_t v = unpool_pixel<scalar_t, acc_t>(yp + o.n * ys.n + o.c * ys.c, ys.h, ys.w,
                                                    sp + row_of(o.n) * ss.n + o.c * ss.c, ss.h, ss.w, g, o.h, o.w,
                                                    rectify);
      out[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = static_cast<scalar_t>(v);
    }
  });
}

Tensor unpool_cpu(const Tensor& y_in, const Tensor& switches_in, IntArrayRef input_size,
                  IntArrayRef kernel, IntArrayRef stride, IntArrayRef padding,
                  const std::optional<Tensor>& rows, bool rectify, IntArrayRef dilation) {
  const UnpoolPlan plan = plan_unpool(y_in, switches_in, input_size, kernel, stride, padding, dilation, rows);
  if (plan.out.numel() == 0) return plan.result();
  const Tensor &y = plan.y, &switches = plan.switches;
  // Every switch is checked before any kernel reads one: a corrupt switch is an error, never an
  // out-of-bounds write or a silently dropped value.
  check_switch_values("unpool", count_invalid_switches_cpu(switches, plan.geometry), plan.geometry);
  const RowMap row_of = row_map(rows);
  ZF_DISPATCH_FLOATING_TYPES(y.scalar_type(), "unpool_cpu", [&] {
    if (!plan.channels_last && y.is_contiguous() && switches.is_contiguous()) {
      unpool_nchw<scalar_t>(plan, row_of, rectify);
    } else if (plan.channels_last && is_channels_last_contiguous(y) &&
               is_channels_last_contiguous(switches)) {
      unpool_channels_last<scalar_t>(plan, row_of, rectify);
    } else {
      unpool_strided<scalar_t>(plan, row_of, rectify);
    }
  });
  return plan.result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("unpool", TORCH_BOX(&unpool_cpu));
}

}  // namespace zfkernels
