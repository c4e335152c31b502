// CPU backend of switches_to_indices, and the switch validation pass that unpool runs first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/switches.h"
#include "../switches_host.h"
#include "parallel.h"

namespace zfkernels {

int64_t count_invalid_switches_cpu(const at::Tensor& switches, const PoolGeometry& g) {
  const Strides4 ss = strides_of(switches);
  const int64_t C = switches.size(1);
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  const int64_t rows = switches.size(0) * C * g.out_h;
  return at::parallel_reduce(
      0, rows, grain_for(g.out_w), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t invalid) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t oh = r % g.out_h, c = (r / g.out_h) % C, n = r / (g.out_h * C);
          const uint8_t* row = sw + n * ss.n + c * ss.c + oh * ss.h;
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            int64_t ih, iw;
            invalid += switch_target(row[ow * ss.w], oh, ow, g, &ih, &iw) ? 0 : 1;
          }
        }
        return invalid;
      },
      std::plus<int64_t>());
}

namespace {

at::Tensor switches_to_indices_cpu(const at::Tensor& input, at::IntArrayRef input_size, at::IntArrayRef kernel,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const SwitchesPlan plan = plan_switches_to_indices(input, input_size, kernel, stride, padding, dilation);
  const PoolGeometry g = plan.geometry;
  const at::Tensor& switches = plan.switches;
  if (plan.out.numel() == 0) return plan.result();
  check_switch_values("switches_to_indices", count_invalid_switches_cpu(switches, g), g);
  const Strides4 ss = strides_of(switches), os = strides_of(plan.out);
  const int64_t C = switches.size(1);
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  int64_t* idx = plan.out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, plan.out.numel(), 4096, [&](int64_t begin, int64_t end) {
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

TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("switches_to_indices", &switches_to_indices_cpu);
}

}  // namespace zfkernels
