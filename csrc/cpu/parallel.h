// Work splitting for the CPU loops: at::parallel_for starts a thread team for any range longer
// than its grain, and on small maps (deep layers, unbatched calls) waking the team costs more
// than the work. The grain makes each chunk about at::internal::GRAIN_SIZE element-operations.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

namespace zfkernels {

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

}  // namespace zfkernels
