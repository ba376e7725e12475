#pragma once
// The instantiation table of v7 for one model type (included by decode_v7_half.cu / decode_v7_bf16.cu).
#include "decode_v7_launch.cuh"

namespace mustafar_cuda {
namespace v7 {

template <typename TM, int D, bool K8, bool V8, bool W>
KernelFn pick_kc(int KC) {
  if constexpr (!K8 && !V8) {
    if constexpr (D == 128) {
      if (KC == 38) return decode_kernel<D, TM, false, false, 38, W>;
      if (KC == 64) return decode_kernel<D, TM, false, false, 64, W>;
    } else if constexpr (D == 64) {
      if (KC == 19) return decode_kernel<D, TM, false, false, 19, W>;
      if (KC == 32) return decode_kernel<D, TM, false, false, 32, W>;
    }
  }
  return KC == 0 ? decode_kernel<D, TM, K8, V8, 0, W> : nullptr;
}

template <typename TM, int D, bool W>
KernelFn pick_d(bool K8, bool V8, int KC) {
  if (K8) return V8 ? pick_kc<TM, D, true, true, W>(KC) : pick_kc<TM, D, true, false, W>(KC);
  return V8 ? pick_kc<TM, D, false, true, W>(KC) : pick_kc<TM, D, false, false, W>(KC);
}

}  // namespace v7
}  // namespace mustafar_cuda

// one translation unit per (model type, load width), so that ninja builds them in parallel
#define MF_V7_INSTANTIATE(TM, W)                                                 \
  namespace mustafar_cuda {                                                      \
  namespace v7 {                                                                 \
  template <>                                                                    \
  KernelFn pick<TM, W>(int D, bool K8, bool V8, int KC) {                        \
    if (D == 64) return pick_d<TM, 64, W>(K8, V8, KC);                           \
    if (D == 128) return pick_d<TM, 128, W>(K8, V8, KC);                         \
    if (D == 256) return pick_d<TM, 256, W>(K8, V8, KC);                         \
    return nullptr;                                                              \
  }                                                                              \
  }                                                                              \
  }
