// CPU backend of project. With channels=, each row's single map goes through its own filter
// bank. Two loop orders vectorise (over output channels, or over output columns); both add the
// same taps in the same (ky, kx) order as the shared body project_pixel, which handles every
// other layout, as on CUDA.

#include <vector>

#include "../project_host.h"
#include "parallel.h"

namespace zfkernels {
namespace {

// Rows whose filter has groups > 1: the channels outside the filter's group are zero (the
// loops below fill only the group's planes). Planes are contiguous in NCHW.
template <typename scalar_t>
void zero_other_groups(const ProjectPlan& plan, const Tensor& channels, Tensor& out) {
  if (plan.groups_count == 1) return;
  const int64_t C = out.size(1), plane = plan.geometry.out_h * plan.geometry.out_w, cg = plan.groups.channels;
  const int64_t* ch = channels.const_data_ptr<int64_t>();
  const int64_t ch_stride = channels.stride(0);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  parallel_for(0, out.size(0), grain_for(C * plane), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = plan.groups.first_channel(ch[b * ch_stride]);
      scalar_t* ob = od + b * C * plane;
      std::fill(ob, ob + first * plane, scalar_t(0));
      std::fill(ob + (first + cg) * plane, ob + C * plane, scalar_t(0));
    }
  });
}

// The taps of one axis for every output position o, as for_each_axis_tap lists them: entries
// [begin[o], begin[o + 1]) of (tap, input position). Built once per call, so the pixel loops
// below run without a division.
struct AxisTaps {
  std::vector<int32_t> begin, tap, pos;
};

AxisTaps axis_taps(int64_t out, int64_t p, int64_t k, int64_t s, int64_t d, int64_t step, int64_t in) {
  AxisTaps a;
  a.begin.reserve(out + 1);
  for (int64_t o = 0; o < out; ++o) {
    a.begin.push_back(static_cast<int32_t>(a.tap.size()));
    for_each_axis_tap(static_cast<int32_t>(o + p), static_cast<int32_t>(k), static_cast<int32_t>(s),
                      static_cast<int32_t>(d), static_cast<int32_t>(step), in, [&](int32_t t, int32_t i) {
                        a.tap.push_back(t);
                        a.pos.push_back(i);
                      });
  }
  a.begin.push_back(static_cast<int32_t>(a.tap.size()));
  return a;
}

// Many output channels per group (conv2..conv5, ResNeXt's groups of 16): kBlock output channels
// at a time, for all pixels of the map. Per pixel, the taps of project_pixel in the same (ky, kx)
// order, each adding x * w[channel, block, ky, kx] to the block's kBlock sums (one vector), from a
// copy of the weights laid out (C_out, kH, kW, C_in / groups rounded up to kBlock, zero-padded).
// The sums are kept pixel-major in a small tile, then written plane by plane, contiguously.
constexpr int64_t kBlock = 16;

template <typename acc_t>
ZF_CPU_CLONES_WIDE void project_block(acc_t* __restrict__ tile, const acc_t* __restrict__ w, int64_t w_tap_stride,
                                      const acc_t* __restrict__ xv, int64_t in_w, int64_t k_w, const AxisTaps& ys,
                                      const AxisTaps& xs, int64_t out_h, int64_t out_w) {
  for (int64_t oy = 0; oy < out_h; ++oy) {
    for (int64_t ox = 0; ox < out_w; ++ox) {
      acc_t sum[kBlock] = {};
      for (int32_t a = ys.begin[oy]; a < ys.begin[oy + 1]; ++a) {
        const acc_t* x_row = xv + ys.pos[a] * in_w;
        const acc_t* w_row = w + ys.tap[a] * k_w * w_tap_stride;
        for (int32_t b = xs.begin[ox]; b < xs.begin[ox + 1]; ++b) {
          const acc_t x = x_row[xs.pos[b]];
          const acc_t* wt = w_row + xs.tap[b] * w_tap_stride;
          for (int64_t j = 0; j < kBlock; ++j) sum[j] += x * wt[j];
        }
      }
      acc_t* t = tile + (oy * out_w + ox) * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) t[j] = sum[j];
    }
  }
}

template <typename scalar_t, typename acc_t>
ZF_CPU_CLONES_WIDE void store_block(scalar_t* __restrict__ out, const acc_t* __restrict__ tile, int64_t planes,
                                    int64_t pixels) {
  for (int64_t j = 0; j < planes; ++j)
    for (int64_t i = 0; i < pixels; ++i) out[j * pixels + i] = static_cast<scalar_t>(tile[i * kBlock + j]);
}

template <typename scalar_t>
void project_rows_by_channel(const ProjectPlan& plan, const Tensor& weight, const Tensor& channels,
                             Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  const ProjectGeometry& g = plan.geometry;
  const Tensor& x = plan.x;
  const int64_t C = out.size(1), cg = plan.groups.channels, pixels = g.out_h * g.out_w;
  const int64_t blocks = (cg + kBlock - 1) / kBlock, cg_padded = blocks * kBlock;
  // The weights as (C_out, kH, kW, C_in / groups padded to cg_padded), in the accumulation type.
  const int64_t taps = g.k_h * g.k_w;
  std::vector<acc_t> w_t(weight.size(0) * taps * cg_padded, acc_t(0));
  {
    const scalar_t* wd = weight.const_data_ptr<scalar_t>();
    const Strides4 ws = strides_of(weight);
    parallel_for(0, weight.size(0), grain_for(taps * cg), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t j = 0; j < cg; ++j)
            w_t[(o * taps + t) * cg_padded + j] =
                static_cast<acc_t>(wd[o * ws.n + j * ws.c + (t / g.k_w) * ws.h + (t % g.k_w) * ws.w]);
    });
  }
  const acc_t* wt = w_t.data();
  // The maps, (B, 1, h, w), contiguous in the accumulation type.
  std::vector<acc_t> x_acc(x.size(0) * g.in_h * g.in_w);
  {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Strides4 xs = strides_of(x);
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int64_t iy = 0; iy < g.in_h; ++iy)
        for (int64_t ix = 0; ix < g.in_w; ++ix)
          x_acc[(b * g.in_h + iy) * g.in_w + ix] = static_cast<acc_t>(xp[b * xs.n + iy * xs.h + ix * xs.w]);
  }
  const acc_t* xd = x_acc.data();
  const int64_t* ch = channels.const_data_ptr<int64_t>();
  const int64_t ch_stride = channels.stride(0);
  const AxisTaps ys = axis_taps(g.out_h, g.p_h, g.k_h, g.s_h, g.d_h, g.t_h, g.in_h);
  const AxisTaps xs = axis_taps(g.out_w, g.p_w, g.k_w, g.s_w, g.d_w, g.t_w, g.in_w);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  zero_other_groups<scalar_t>(plan, channels, out);
  // Work items are (row, block of channels).
  parallel_for(0, x.size(0) * blocks, grain_for(pixels * kBlock * g.k_h * g.k_w), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(pixels * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, block = item % blocks;
      const int64_t filter = ch[b * ch_stride];
      project_block<acc_t>(tile.data(), wt + filter * g.k_h * g.k_w * cg_padded + block * kBlock, cg_padded,
                           xd + b * g.in_h * g.in_w, g.in_w, g.k_w, ys, xs, g.out_h, g.out_w);
      scalar_t* ob = od + (b * C + plan.groups.first_channel(filter) + block * kBlock) * pixels;
      store_block<scalar_t, acc_t>(ob, tile.data(), std::min(kBlock, cg - block * kBlock), pixels);
    }
  });
}

template <typename acc_t>
ZF_CPU_CLONES void axpy_row(acc_t* __restrict__ acc, const acc_t* __restrict__ src, acc_t w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i] * w;
}

// Few output channels per group (conv1, depthwise): one output plane at a time from a copy of
// the row's map with the stride's zeros inserted and the padding around it, so every tap adds a
// contiguous row segment (vectorised). Taps that land on inserted zeros add exact zeros, so the
// sum equals project_pixel's when the weights are finite.
template <typename scalar_t>
void project_rows_padded(const ProjectPlan& plan, const Tensor& weight, const Tensor& channels,
                         Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  const ProjectGeometry& g = plan.geometry;
  const Tensor& x = plan.x;
  const int64_t B = x.size(0), C = out.size(1), cg = plan.groups.channels, kh = g.k_h, kw = g.k_w;
  const int64_t span_h = (kh - 1) * g.d_h + 1, span_w = (kw - 1) * g.d_w + 1;
  const int64_t top = span_h - 1 - g.p_h, left = span_w - 1 - g.p_w;
  const int64_t xp_h = imax(g.out_h + span_h - 1, (g.in_h - 1) * g.s_h + top + 1);
  const int64_t xp_w = imax(g.out_w + span_w - 1, (g.in_w - 1) * g.s_w + left + 1);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* wd = weight.const_data_ptr<scalar_t>();
  const int64_t* ch = channels.const_data_ptr<int64_t>();
  const int64_t ch_stride = channels.stride(0);
  const auto xs = strides_of(x), ws = strides_of(weight);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  const int64_t plane = g.out_h * g.out_w;
  zero_other_groups<scalar_t>(plan, channels, out);
  parallel_for(0, B * cg, grain_for(plane * kh * kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xp(xp_h * xp_w), wl(kh * kw), acc(g.out_w);
    int64_t padded_row = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / cg, j = item % cg;
      if (b != padded_row) {  // items run b-major: one padded copy per row of x
        std::fill(xp.begin(), xp.end(), acc_t(0));
        for (int64_t iy = 0; iy < g.in_h; ++iy)
          for (int64_t ix = 0; ix < g.in_w; ++ix)
            xp[(iy * g.s_h + top) * xp_w + ix * g.s_w + left] = static_cast<acc_t>(xd[b * xs.n + iy * xs.h + ix * xs.w]);
        padded_row = b;
      }
      const int64_t filter = ch[b * ch_stride];
      const scalar_t* wb = wd + filter * ws.n + j * ws.c;
      for (int64_t t = 0; t < kh * kw; ++t) wl[t] = static_cast<acc_t>(wb[(t / kw) * ws.h + (t % kw) * ws.w]);
      scalar_t* o = od + (b * C + plan.groups.first_channel(filter) + j) * plane;
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int32_t y_off = static_cast<int32_t>(oy + g.p_h);
        for (int64_t ky = first_tap(y_off, kh, g.s_h, g.d_h, g.t_h); ky < kh; ky += g.t_h) {
          const int64_t row = oy + (kh - 1 - ky) * g.d_h;  // = iy * s + top
          const int64_t iy = (row - top) / g.s_h;
          if (row < top || iy >= g.in_h) continue;  // a row of padding: all zeros
          const acc_t* src_row = xp.data() + row * xp_w;
          for (int64_t kx = 0; kx < kw; ++kx)
            axpy_row<acc_t>(acc.data(), src_row + (kw - 1 - kx) * g.d_w, wl[ky * kw + kx], g.out_w);
        }
        for (int64_t ox = 0; ox < g.out_w; ++ox) o[oy * g.out_w + ox] = static_cast<scalar_t>(acc[ox]);
      }
    }
  });
}

// Any layout: one output element at a time through the shared body, as on CUDA.
template <typename scalar_t>
void project_rows_strided(const ProjectPlan& plan, const Tensor& weight, const Tensor& channels,
                          Tensor& out, bool channels_last) {
  using acc_t = opmath_t<scalar_t>;
  const ProjectGeometry& g = plan.geometry;
  const Tensor& x = plan.x;
  const int64_t C = out.size(1);
  const auto xs = strides_of(x), ws = strides_of(weight), os = strides_of(out);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* wd = weight.const_data_ptr<scalar_t>();
  const int64_t* ch = channels.const_data_ptr<int64_t>();
  const int64_t ch_stride = channels.stride(0);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Coord4 o = coord_of(i, C, g.out_h, g.out_w, channels_last);
      const int64_t filter = ch[o.n * ch_stride];
      const acc_t v = project_selected_pixel<scalar_t, acc_t>(xd + o.n * xs.n, xs.h, xs.w, wd + filter * ws.n, ws,
                                                              plan.groups, filter, g, o.c, o.h, o.w);
      od[o.n * os.n + o.c * os.c + o.h * os.h + o.w * os.w] = static_cast<scalar_t>(v);
    }
  });
}

// Whether every weight is finite (the padded loop order adds exact zeros times the weights).
bool all_finite(const Tensor& weight) {
  bool finite = true;
  ZF_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "project_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const Strides4 ws = strides_of(weight);
    for (int64_t o = 0; o < weight.size(0) && finite; ++o)
      for (int64_t j = 0; j < weight.size(1); ++j)
        for (int64_t ky = 0; ky < weight.size(2); ++ky)
          for (int64_t kx = 0; kx < weight.size(3); ++kx)
            finite = finite && std::isfinite(static_cast<double>(static_cast<opmath_t<scalar_t>>(
                                   w[o * ws.n + j * ws.c + ky * ws.h + kx * ws.w])));
  });
  return finite;
}

Tensor project_cpu(const Tensor& x, const Tensor& weight, IntArrayRef stride,
                   IntArrayRef padding, IntArrayRef output_padding,
                   const std::optional<Tensor>& channels, int64_t groups, IntArrayRef dilation) {
  const ProjectPlan plan = plan_project(x, weight, stride, padding, output_padding, channels, groups, dilation);
  if (!channels.has_value()) return project_dense(plan, weight, stride, padding, output_padding, dilation);
  const ProjectGeometry& g = plan.geometry;
  const auto format = project_output_format(plan.x);
  auto out = empty_output(std::array<int64_t, 4>{plan.x.size(0), plan.out_channels, g.out_h, g.out_w}, x.scalar_type(),
                          x.device(), format);
  if (out.numel() == 0) return plan.result(out);
  const bool nchw = format == MemoryFormat::Contiguous;
  const bool by_channel = nchw && plan.groups.channels >= 16;
  const bool padded = nchw && !by_channel && g.p_h <= (g.k_h - 1) * g.d_h && g.p_w <= (g.k_w - 1) * g.d_w &&
                      all_finite(weight);
  ZF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "project_cpu", [&] {
    if (by_channel) {
      project_rows_by_channel<scalar_t>(plan, weight, *channels, out);
    } else if (padded) {
      project_rows_padded<scalar_t>(plan, weight, *channels, out);
    } else {
      project_rows_strided<scalar_t>(plan, weight, *channels, out, format == MemoryFormat::ChannelsLast);
    }
  });
  return plan.result(out);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("project", TORCH_BOX(&project_cpu));
}

}  // namespace zfkernels
