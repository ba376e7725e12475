#pragma once
// Host side of v7 (decode_v7.cuh): the instantiation table, the split over T and the launch (+ merge).
#include "decode_v7.cuh"

namespace mustafar_cuda {
namespace v7 {

using KernelFn = void (*)(const Params);

// the kernel for (D, K8, V8, KC) with model type TM; nullptr if not instantiated (KC > 0 only for the pairs of
// compiled_k()). Defined in decode_v7_{half,bf16}.cu.
template <typename TM>
KernelFn pick(int D, bool K8, bool V8, int KC);

// k compiled in (template KC = k) for these (D, k) with k_k == k_v and 16-bit values on both sides: the
// paper's 50 % / 70 % at D = 128 and D = 64. Every other k runs the same kernel with k read at run time.
inline bool compiled_k(int D, int k) {
  return (D == 128 && (k == 38 || k == 64)) || (D == 64 && (k == 19 || k == 32));
}

struct Launch {
  KernelFn fn;
  int smem;
  int NS;   // splits over T (grid.x)
  int NP;   // partials per query head
};

// Pick the kernel and the split. tiles_max: the most 32-row tiles a call of this shape can have (from the
// capacities, so a CUDA graph captured once serves every length).
Launch plan(at::ScalarType dtype, int D, bool K8, bool V8, int KC, int64_t B, int64_t Hkv,
            int64_t tiles_max, int device);

// launch the decode kernel and the merge (a programmatic dependent when pdl) into out [B * Hq, D]
void launch(const Launch& L, Params p, at::ScalarType dtype, int D, int64_t B, void* out, cudaStream_t stream,
            bool pdl);

}  // namespace v7
}  // namespace mustafar_cuda
