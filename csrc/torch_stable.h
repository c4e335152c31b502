// Everything csrc/ takes from PyTorch, all of it from the stable ABI: torch/csrc/stable (the
// library macros, torch::stable::Tensor, parallel_for, the device guard, ATen operators through
// the dispatcher) and torch/headeronly (ScalarType, Half/BFloat16, the dispatch macros). setup.py
// compiles with -DTORCH_STABLE_ONLY, which turns any other torch header into a compile error, and
// -DTORCH_TARGET_VERSION=2.14, so the library loads in torch 2.14 and every later release.
//
// What the stable ABI lacks, and what this file does instead (docs/ops.md, "Stable ABI"):
// - typed exceptions: TORCH_CHECK_VALUE / TORCH_CHECK_TYPE throw c10 errors, outside the stable
//   ABI, and STD_TORCH_CHECK throws std::runtime_error (RuntimeError in Python). ZF_CHECK_VALUE
//   and ZF_CHECK_TYPE throw pybind11's value_error and type_error (errors.cpp), which the
//   pybind11 layer under every torch.ops call from Python raises as ValueError and TypeError, in
//   torch 2.14 and 2.15 alike (a std::invalid_argument is a ValueError in 2.14 but a
//   RuntimeError in 2.15). Messages are formatted here as c10 formats them (dtypes as "Float",
//   sizes as "[2, 3]", devices as "cuda:0"), without STD_TORCH_CHECK's function/file/line prefix.
// - Tensor::is_contiguous(memory_format): computed from sizes and strides as c10 does.
// - at::opmath_type: opmath_t below (float for half and bfloat16).
// - AT_DISPATCH_FLOATING_TYPES_AND2: ZF_DISPATCH_FLOATING_TYPES below.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace zfkernels {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using MemoryFormat = torch::headeronly::MemoryFormat;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// at::opmath_type: the type arithmetic on scalar_t is done in.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// The four floating dtypes every op takes; the body (a lambda) sees scalar_t. A switch written
// out here rather than THO_DISPATCH_V2, which takes the body before the dtypes, so a body with a
// kernel launch's top-level commas (<<<grid, block, 0, stream>>>) cannot pass through it.
#define ZF_DISPATCH_CASE(DTYPE, ...)                                                        \
  case DTYPE: {                                                                             \
    using scalar_t [[maybe_unused]] = torch::headeronly::impl::ScalarTypeToCPPTypeT<DTYPE>; \
    return __VA_ARGS__();                                                                   \
  }
#define ZF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                                    \
  [&] {                                                                                                \
    const torch::headeronly::ScalarType zf_dtype = (TYPE);                                             \
    switch (zf_dtype) {                                                                                \
      ZF_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)                             \
      ZF_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__)                            \
      ZF_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)                              \
      ZF_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__)                          \
      default:                                                                                         \
        throw std::runtime_error(::zfkernels::message(NAME, ": no kernel for dtype ", zf_dtype));       \
    }                                                                                                  \
  }()

// ---- messages, formatted as c10::str formats them -------------------------------------------

// As c10 prints an IntArrayRef: [2, 3].
inline std::ostream& operator<<(std::ostream& out, IntArrayRef v) {
  out << "[";
  for (size_t i = 0; i < v.size(); ++i) out << (i ? ", " : "") << v[i];
  return out << "]";
}

inline std::ostream& operator<<(std::ostream& out, const Device& d) {
  switch (d.type()) {
    case DeviceType::CPU: out << "cpu"; break;
    case DeviceType::CUDA: out << "cuda"; break;
    case DeviceType::Meta: out << "meta"; break;
    default: out << "device type " << static_cast<int>(d.type());
  }
  if (d.has_index()) out << ":" << d.index();
  return out;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// Raised in Python as ValueError and TypeError (errors.cpp).
[[noreturn]] void throw_value_error(const std::string& message);
[[noreturn]] void throw_type_error(const std::string& message);

}  // namespace zfkernels

// Raised in Python as ValueError.
#define ZF_CHECK_VALUE(cond, ...) \
  do {                                                                              \
    if (!(cond)) ::zfkernels::throw_value_error(::zfkernels::message(__VA_ARGS__)); \
  } while (0)
// Raised in Python as TypeError.
#define ZF_CHECK_TYPE(cond, ...) \
  do {                                                                             \
    if (!(cond)) ::zfkernels::throw_type_error(::zfkernels::message(__VA_ARGS__)); \
  } while (0)

namespace zfkernels {

// ---- tensor helpers the stable Tensor lacks -------------------------------------------------

// c10's channels-last contiguity of a 4-D tensor: strides decrease in (C, W, H, N) order, size-1
// dimensions ignored.
inline bool is_channels_last_contiguous(const Tensor& t) {
  if (t.dim() != 4) return false;
  const IntArrayRef sizes = t.sizes(), strides = t.strides();
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] != 1) {
      if (strides[d] != expected) return false;
      expected *= sizes[d];
    }
  }
  return true;
}

// An ATen operator through the dispatcher (torch_call_dispatcher): arguments in schema order,
// returns the stack (outputs first).
template <size_t N, typename... Args>
std::array<StableIValue, N> call_op(const char* name, const char* overload, const Args&... args) {
  static_assert(sizeof...(Args) <= N, "the stack holds the arguments, then the outputs");
  std::array<StableIValue, N> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

inline Tensor tensor_of(StableIValue value) { return torch::stable::detail::to<Tensor>(value); }

}  // namespace zfkernels
