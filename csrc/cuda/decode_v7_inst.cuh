#pragma once
// The instantiation table of v7 for one model type (included by decode_v7_half.cu / decode_v7_bf16.cu).
#include "decode_v7_launch.cuh"

namespace mustafar_cuda {
namespace v7 {

template <typename TM, int D, bool K8, bool V8>
KernelFn pick_kc(int KC) {
  if constexpr (!K8 && !V8) {
    if constexpr (D == 128) {
      if (KC == 38) return decode_kernel<D, TM, false, false, 38>;
      if (KC == 64) return decode_kernel<D, TM, false, false, 64>;
    } else if constexpr (D == 64) {
      if (KC == 19) return decode_kernel<D, TM, false, false, 19>;
      if (KC == 32) return decode_kernel<D, TM, false, false, 32>;
    }
  }
  return KC == 0 ? decode_kernel<D, TM, K8, V8, 0> : nullptr;
}

template <typename TM, int D>
KernelFn pick_d(bool K8, bool V8, int KC) {
  if (K8) return V8 ? pick_kc<TM, D, true, true>(KC) : pick_kc<TM, D, true, false>(KC);
  return V8 ? pick_kc<TM, D, false, true>(KC) : pick_kc<TM, D, false, false>(KC);
}

}  // namespace v7
}  // namespace mustafar_cuda

// one translation unit per model type, so that ninja builds them in parallel
#define MF_V7_INSTANTIATE(TM)                             \
  namespace mustafar_cuda {                               \
  namespace v7 {                                          \
  template <>                                             \
  KernelFn pick<TM>(int D, bool K8, bool V8, int KC) {    \
    if (D == 64) return pick_d<TM, 64>(K8, V8, KC);       \
    if (D == 128) return pick_d<TM, 128>(K8, V8, KC);     \
    if (D == 256) return pick_d<TM, 256>(K8, V8, KC);     \
    return nullptr;                                       \
  }                                                       \
  }                                                       \
  }
