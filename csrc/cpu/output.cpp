// Output allocation for every op (declared in checks.h). A CPU output of 2 MiB or more is put on
// transparent huge pages where the system offers them (madvise): a fresh output is written once,
// and with 4 KiB pages the page faults that map it cost more than the kernel that fills it
// (a 148 MB unpooled pool1 batch takes ~36k faults). This is what PyTorch itself does for every
// tensor with THP_MEM_ALLOC_ENABLE=1; here it applies to these ops' outputs only. CUDA outputs
// come from the caching allocator as usual.
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"

namespace zfkernels {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

void free_aligned(void* p) { std::free(p); }

class HugePageOutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* p = nullptr;
    // Aligned to the huge page size, so the whole block can be mapped by huge pages.
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHugePage, n) == 0,
                     "zfkernels: cannot allocate an output of ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, n, MADV_HUGEPAGE);  // advice only: without THP the pages are ordinary ones
#endif
    return {p, p, &free_aligned, c10::Device(c10::kCPU)};
  }
  // Blocks come from two allocators (small ones from the default), each DataPtr with its deleter.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageOutputAllocator huge_page_output_allocator;

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu() || options.pinned_memory()) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &huge_page_output_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), options.memory_format_opt());
}

}  // namespace zfkernels
