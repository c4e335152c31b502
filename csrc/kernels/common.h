// Shared by the CPU (.cpp) and CUDA (.cu) backends: geometry and small helpers that both
// compile, so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ZF_HOST_DEVICE __host__ __device__
#else
#define ZF_HOST_DEVICE
#endif
#define ZF_INLINE ZF_HOST_DEVICE inline

namespace zfkernels {

// Floor and ceiling division for a possibly negative numerator and a positive divisor.
// Coordinates and window geometry always fit in 32 bits (checks.h refuses maps and windows of
// 2^30 or more), and 32-bit division is several times cheaper on a GPU than 64-bit: the
// arithmetic on coordinates is done in int32, the addressing (offsets, flat indices) in int64.
ZF_INLINE int64_t floor_div(int64_t a, int64_t b) {
  const int32_t a32 = static_cast<int32_t>(a), b32 = static_cast<int32_t>(b);
  const int32_t q = a32 / b32;
  return (a32 % b32 != 0 && a32 < 0) ? q - 1 : q;
}
ZF_INLINE int64_t ceil_div(int64_t a, int64_t b) {
  return -floor_div(-a, b);
}
ZF_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
ZF_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// One max-pooling geometry: the pooled map is in_h x in_w, the pooled result out_h x out_w.
// Window (oh, ow) has its origin at (oh * s_h - p_h, ow * s_w - p_w) and k_h x k_w taps; tap
// (ky, kx) reads pixel (origin_h + ky * d_h, origin_w + kx * d_w).
struct PoolGeometry {
  int64_t in_h, in_w, out_h, out_w;
  int64_t k_h, k_w, s_h, s_w, p_h, p_w, d_h, d_w;
};

// Element strides of a 4-D tensor (n, c, h, w), so every kernel accepts any layout.
struct Strides4 {
  int64_t n, c, h, w;
};

// Logical coordinates of the i-th element of a (d0, d1, d2, d3) tensor stored in `order`:
// channels_last walks (n, h, w, c), otherwise (n, c, h, w). Launches enumerate outputs in
// their memory order so consecutive threads write consecutive addresses.
struct Coord4 {
  int64_t n, c, h, w;
};

template <typename index_t>
ZF_INLINE Coord4 decompose(index_t i, index_t C, index_t H, index_t W, bool channels_last) {
  Coord4 r;
  if (channels_last) {
    r.c = i % C; i /= C;
    r.w = i % W; i /= W;
    r.h = i % H; r.n = i / H;
  } else {
    r.w = i % W; i /= W;
    r.h = i % H; i /= H;
    r.c = i % C; r.n = i / C;
  }
  return r;
}

ZF_INLINE Coord4 coord_of(int64_t i, int64_t C, int64_t H, int64_t W, bool channels_last) {
  if (i <= 0x7fffffff) {  // the common case: a 32-bit linear index, 32-bit divisions
    return decompose<uint32_t>(static_cast<uint32_t>(i), static_cast<uint32_t>(C), static_cast<uint32_t>(H),
                               static_cast<uint32_t>(W), channels_last);
  }
  return decompose<int64_t>(i, C, H, W, channels_last);
}

// Windows [lo, hi) along one axis whose span reaches input position i (stride s, padding p,
// k taps dilated by d, `out` windows in all). With d > 1 a window may reach i between two of
// its taps: tap_at says which. Used by the unpooling gather.
ZF_INLINE void covering_windows(int64_t i, int64_t k, int64_t s, int64_t p, int64_t d, int64_t out,
                                int64_t* lo, int64_t* hi) {
  *lo = imax(ceil_div(i + p - (k - 1) * d, s), 0);
  *hi = imin(floor_div(i + p, s) + 1, out);
}

// Windows [lo, hi) along one axis (of `out`) whose taps all read real pixels: no padding, no
// border crossed. Switch checks and loops take these without per-tap bounds.
ZF_INLINE void windows_inside(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d, int64_t* lo,
                              int64_t* hi) {
  *lo = imin(ceil_div(p, s), out);
  *hi = imax(imin(floor_div(in - 1 - (k - 1) * d + p, s) + 1, out), *lo);
}

// The tap of a window that sits `rel` positions after its origin (rel >= 0), or -1 when rel falls
// between taps. Undilated windows (the usual case) skip the division.
ZF_INLINE int64_t tap_at(int64_t rel, int64_t d) {
  if (d == 1) return rel;
  const int32_t r32 = static_cast<int32_t>(rel), d32 = static_cast<int32_t>(d);  // 32 bits: see floor_div
  return r32 % d32 == 0 ? r32 / d32 : -1;
}

// Taps [begin, end) of a window along one axis that read real pixels: origin + t * d inside
// [0, size). Undilated windows skip the divisions.
ZF_INLINE void taps_inside(int64_t origin, int64_t k, int64_t d, int64_t size, int64_t* begin, int64_t* end) {
  if (d == 1) {
    *begin = imax(-origin, 0);
    *end = imin(k, size - origin);
  } else {
    *begin = origin < 0 ? ceil_div(-origin, d) : 0;
    *end = imin(k, ceil_div(size - origin, d));
  }
}

}  // namespace zfkernels

// CPU hot loops get clones for wider vector units next to the baseline one, picked at load time
// by the CPU the library runs on (GCC function multi-versioning). No FMA anywhere, so every clone
// rounds identically. Loops over contiguous channel vectors profit from AVX-512
// (ZF_CPU_CLONES_WIDE); strided row loops measured slower with it and stop at AVX2.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ZF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define ZF_CPU_CLONES_WIDE __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ZF_CPU_CLONES
#define ZF_CPU_CLONES_WIDE
#endif
