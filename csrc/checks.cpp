// The out-of-line parts of checks.h.
#include "checks.h"

namespace zfkernels {

std::pair<int64_t, int64_t> index_range(const Tensor& index) {
  if (index.is_cpu()) {
    const int64_t* p = index.const_data_ptr<int64_t>();
    const int64_t n = index.size(0), stride = index.stride(0);
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, p[i * stride]);
      hi = std::max(hi, p[i * stride]);
    }
    return {lo, hi};
  }
  // aminmax(Tensor self, *, int? dim=None, bool keepdim=False) -> (Tensor min, Tensor max)
  const auto stack = call_op<3>("aten::aminmax", "", index, std::optional<int64_t>(), false);
  int64_t lo = 0, hi = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_item_int64(tensor_of(stack[0]).get(), &lo));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_item_int64(tensor_of(stack[1]).get(), &hi));
  return {lo, hi};
}

}  // namespace zfkernels
