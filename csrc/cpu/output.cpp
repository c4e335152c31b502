// Output allocation for every op (declared in checks.h). A CPU output of 2 MiB or more is put on
// transparent huge pages where the system offers them (madvise): a fresh output is written once,
// and with 4 KiB pages the page faults that map it cost more than the kernel that fills it
// (a 148 MB unpooled pool1 batch takes ~36k faults). This is what PyTorch itself does for every
// tensor with THP_MEM_ALLOC_ENABLE=1; here it applies to these ops' outputs only.
//
// The stable ABI has no allocator interface, so the output comes from torch.empty (an ordinary,
// resizable tensor) and the advice is given for the 2 MiB-aligned part of its fresh, not yet
// touched block: all of it but at most 2 MiB at either end. CUDA outputs come from the caching
// allocator as usual.
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"

namespace zfkernels {
namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

}  // namespace

Tensor empty_output(IntArrayRef sizes, ScalarType dtype, const Device& device, MemoryFormat format) {
  Tensor out = torch::stable::empty(sizes, dtype, std::nullopt, device, std::nullopt, format);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (device.is_cpu()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(out.numel()) * out.element_size();
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
    // advice only: without THP the pages are ordinary ones
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace zfkernels
