#pragma once
// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): scalar conversion, FP8 (e4m3) values, the magnitude
// sort key and the input checks. Everything is inline, in namespace mustafar::cpu.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include "../mf_check.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

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

// ------------------------------------------------------------------------------ FP8 values
// Stored FP8 values are float8_e4m3fn with a float16 scale per token vector: value = float(q8) * float(s).
constexpr float kFp8Max = 448.f;

struct Fp8Table {  // float8_e4m3fn bit pattern -> float
  float v[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i)
      v[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
};
inline const Fp8Table kFp8;

// The quantization rule of mustafar.format.quantize_fp8 for one row of k values: amax = max|v| (NaN
// propagates), s = half(amax / 448) (1 where that is 0), q8 = e4m3(clamp(v / float(s), -448, 448)) with
// round to nearest even. Returns s.
inline c10::Half quantize_row_fp8(const float* v, int64_t k, c10::Float8_e4m3fn* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    const float a = std::fabs(v[i]);
    amax = (std::isnan(a) || std::isnan(amax)) ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, a);
  }
  c10::Half s(amax / kFp8Max);
  float sf = static_cast<float>(s);
  if (sf == 0.f) {
    s = c10::Half(1.f);
    sf = 1.f;
  }
  for (int64_t i = 0; i < k; ++i) {
    float x = v[i] / sf;
    x = x < -kFp8Max ? -kFp8Max : (x > kFp8Max ? kFp8Max : x);  // NaN stays NaN
    out[i] = c10::Float8_e4m3fn(x);
  }
  return s;
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

// Checks a side's values (dense dtype or FP8) and its scale (required iff FP8); returns the scale view.
inline std::optional<at::Tensor> check_side(const char* op, const at::Tensor& values, const char* vname,
                                            const std::optional<at::Tensor>& scale, const char* sname,
                                            at::ScalarType dense, c10::IntArrayRef shape3) {
  const bool fp8 = values.scalar_type() == at::kFloat8_e4m3fn;
  MF_CHECK_VALUE(fp8 || values.scalar_type() == dense, op, vname, ".dtype=", values.scalar_type(),
                 ": expected ", dense, " (the dense dtype) or Float8_e4m3fn");
  const bool has = scale.has_value() && scale->defined();
  MF_CHECK_VALUE(!has || fp8, op, sname, " given but ", vname, " is not Float8_e4m3fn");
  MF_CHECK_VALUE(has || !fp8, op, vname, " is Float8_e4m3fn but ", sname, " is None");
  if (!has) return std::nullopt;
  check_cpu(*scale, sname);
  MF_CHECK_VALUE(scale->scalar_type() == at::kHalf, op, sname, ".dtype=", scale->scalar_type(),
                 " (expected float16)");
  MF_CHECK_VALUE(scale->sizes() == shape3, op, sname, " shape ", scale->sizes(), " != ", shape3);
  return *scale;
}

// Reads lengths = (n_c, n_w) (int32 [2], CPU) and checks 0 <= n_c <= max_c, 0 <= n_w <= max_w.
inline std::pair<int64_t, int64_t> read_lengths(const char* op, const at::Tensor& lengths, int64_t max_c,
                                                const char* cname, int64_t max_w, const char* wname) {
  check_cpu(lengths, "lengths");
  MF_CHECK_VALUE(lengths.scalar_type() == at::kInt && lengths.dim() == 1 && lengths.size(0) == 2, op,
                 "lengths must be int32 [2] = (n_c, n_w), got ", lengths.scalar_type(), " ", lengths.sizes());
  auto a = lengths.accessor<int32_t, 1>();
  const int64_t nc = a[0], nw = a[1];
  MF_CHECK_VALUE(nc >= 0 && nc <= max_c, op, "lengths n_c=", nc, " out of range [0, ", max_c, "] (", cname, ")");
  MF_CHECK_VALUE(nw >= 0 && nw <= max_w, op, "lengths n_w=", nw, " out of range [0, ", max_w, "] (", wname, ")");
  return {nc, nw};
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
