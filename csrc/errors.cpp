// ValueError and TypeError. The stable ABI has no c10::ValueError or c10::TypeError, and
// STD_TORCH_CHECK's std::runtime_error is a RuntimeError in Python. pybind11's value_error and
// type_error are header-only (nothing of torch's C++ API is used) and are raised as ValueError and
// TypeError by the pybind11 layer every torch.ops call from Python runs under, in torch 2.14 and
// 2.15 (tests/test_op_registration.py). Called from C++, with no Python above, they are
// std::runtime_errors with the same message.
#include <pybind11/detail/common.h>

#include <string>

#include "torch_stable.h"

namespace zfkernels {

[[noreturn]] void throw_value_error(const std::string& message) { throw pybind11::value_error(message); }

[[noreturn]] void throw_type_error(const std::string& message) { throw pybind11::type_error(message); }

}  // namespace zfkernels
