#pragma once
// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): scalar conversion, the magnitude sort key and the
// input checks. Everything is inline, in namespace mustafar::cpu.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../mf_check.h"

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace mustafar {
namespace cpu {

constexpr int64_t kBits = 64;

// ------------------------------------------------------------------------- scalar conversion
template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}
template <>
inline float to_f<at::BFloat16>(at::BFloat16 v) {
  uint32_t b = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
template <>
inline float to_f<at::Half>(at::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

// Sort key of |x| as the contract orders magnitudes: non-negative float bit patterns compare like
// unsigned ints; NaN (any payload) is canonicalised above +inf, so it is the largest magnitude.
inline uint32_t mag_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  b &= 0x7fffffffu;
  return b > 0x7f800000u ? 0x7fc00000u : b;
}

// ---------------------------------------------------------------------------- input checks
inline void check_cpu(const at::Tensor& t, const char* name) {
  MF_CHECK_VALUE(t.device().is_cpu(), "mustafar CPU kernel: ", name, " must be a CPU tensor, got ",
                    t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  MF_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "mustafar: ", name,
                    ".dtype=", st, " not supported (expected float16, bfloat16 or float32)");
}

inline int64_t check_head_dim(int64_t d) {
  MF_CHECK_VALUE(d > 0 && d % kBits == 0, "mustafar: head_dim D=", d,
                    " must be a positive multiple of 64");
  return d / kBits;
}

// Rows of a [..., T, C] tensor whose last dim is contiguous and whose T stride is C; leading dims
// may have any strides. Returns a tensor satisfying that (the input itself when it does).
inline at::Tensor rows_ok(const at::Tensor& t) {
  const int64_t n = t.dim();
  const bool last_ok = t.size(n - 1) <= 1 || t.stride(n - 1) == 1;
  const bool t_ok = t.size(n - 2) <= 1 || t.stride(n - 2) == t.size(n - 1);
  return (last_ok && t_ok) ? t : t.contiguous();
}

}  // namespace cpu
}  // namespace mustafar
