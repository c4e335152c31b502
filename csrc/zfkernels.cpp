// The zfkernels operator library: schemas only. Backends register their kernels with
// STABLE_TORCH_LIBRARY_IMPL in cpu/<op>.cpp and cuda/<op>.cu; fake kernels live in
// zfkernels/ops/fake.py. Everything is on PyTorch's stable ABI (torch_stable.h).
#include <Python.h>

#include "torch_stable.h"

// An empty module: importing zfkernels._C runs the static registrations below. The one symbol
// the library exports (it is compiled with -fvisibility=hidden).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// Arguments added after the first release (dilation, groups) come last, with defaults, so calls
// written against the earlier schemas keep working.
STABLE_TORCH_LIBRARY(zfkernels, m) {
  m.def("maxpool_switches(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "int[2] dilation=1) -> (Tensor, Tensor)");
  m.def("switches_to_indices(Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation=1) -> Tensor");
  m.def("unpool(Tensor y, Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
        "Tensor? rows, bool rectify, int[2] dilation=1) -> Tensor");
  m.def("project(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] output_padding, Tensor? channels, "
        "int groups=1, int[2] dilation=1) -> Tensor");
}
