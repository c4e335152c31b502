// Work splitting for the CPU loops, on torch::stable::parallel_for (torch's at::parallel_for
// behind the stable ABI). It starts a thread team for any range longer than its grain, and on
// small maps (deep layers, unbatched calls) waking the team costs more than the work. The grain
// makes each chunk about kGrainSize element-operations (at::internal::GRAIN_SIZE, which the
// stable ABI does not export).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../torch_stable.h"

namespace zfkernels {

constexpr int64_t kGrainSize = 32768;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, work_per_item));
}

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  torch::stable::parallel_for(begin, end, grain, f);
}

// The sum of f(begin, end) over the chunks of [begin, end) (at::parallel_reduce with a sum; the
// stable ABI has parallel_for only). Integer sums, so the order chunks finish in does not matter.
template <class F>
inline int64_t parallel_sum(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::atomic<int64_t> total{0};
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { total += f(b, e); });
  return total.load();
}

}  // namespace zfkernels
