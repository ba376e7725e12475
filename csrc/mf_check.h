#pragma once
// Argument checks of the mustafar ops: MF_CHECK_VALUE(cond, pieces...) throws c10::ValueError (a
// Python ValueError) and MF_CHECK(cond, pieces...) c10::Error (RuntimeError) with the pieces
// concatenated into one std::string.
//
// Why not TORCH_CHECK_VALUE(cond, "x=", x) directly: with more than one message argument c10::str
// formats through a std::ostringstream instantiated in this extension, and on the GPU image (gcc
// 13.3, torch 2.11+cu130) throwing such a message kills the process with SIGSEGV (bisected on
// 2026-11-28 with a probe script, since removed: a literal-only message raises, the same op with an
// int argument crashes; tests/test_gpu.py's subprocess tests of raising ops guard against a relapse). A single std::string argument takes c10::str's no-stream path, so the pieces are
// joined here with std::to_string and libc10's own formatters.
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace mustafar {

inline void mf_append(std::string& s, const char* x) { s += x; }
inline void mf_append(std::string& s, const std::string& x) { s += x; }
inline void mf_append(std::string& s, c10::string_view x) { s.append(x.data(), x.size()); }
inline void mf_append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void mf_append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void mf_append(std::string& s, c10::IntArrayRef a) {
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  s += "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void mf_append(std::string& s, T x) {
  s += std::to_string(x);
}
inline void mf_append(std::string& s, double x) { s += std::to_string(x); }

template <typename... A>
inline std::string mf_msg(const A&... a) {
  std::string s;
  (mf_append(s, a), ...);
  return s;
}

}  // namespace mustafar

#define MF_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::mustafar::mf_msg(__VA_ARGS__))
#define MF_CHECK(cond, ...) TORCH_CHECK(cond, ::mustafar::mf_msg(__VA_ARGS__))
