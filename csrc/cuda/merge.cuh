#pragma once
// The merge kernel shared by every fused decode kernel (v4, v5, v6, v7): the per-warp partials (m, l, o) of
// one (b, query head) combined into the output; launched as a programmatic dependent of the decode kernel
// (pdl) or after it.
#include "common.cuh"

namespace mustafar_cuda {

// Merge of the decode partials (m, l, o[D]) of one (b, query head) per CTA: 8 warps, warp w takes the
// partials w, w + 8, ... with its own running maximum (online softmax), so all of a warp's loads are
// independent of each other and of the maximum: one L2 round trip for the NP of a decode call (the old
// one-thread-per-channel loop over NP took NP / 4 of them, twice); lane = D / 32 consecutive channels (one
// 16- or 8-byte load per partial); then the warps' results rescaled to the CTA's maximum and summed.
constexpr int kMergeWarps = 8;
template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) sparse_decode_merge(const float* __restrict__ ws_o,
                                                                        const float* __restrict__ ws_ml, int NP,
                                                                        T* __restrict__ out) {
  constexpr int CPL = D / 32;  // channels per lane
  static_assert(CPL == 2 || CPL == 4 || CPL == 8, "D = 64, 128 or 256");
  __shared__ float s_o[kMergeWarps][D];
  __shared__ float s_l[kMergeWarps], s_m[kMergeWarps];
  mf_pdl_wait();
  const int64_t bh = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float* ml = ws_ml + bh * NP * 2;
  float acc[CPL] = {};
  float mw = -INFINITY, L = 0.f;  // the same in every lane of the warp
#pragma unroll 4
  for (int i = warp; i < NP; i += kMergeWarps) {
    const float2 x = *reinterpret_cast<const float2*>(ml + 2 * i);
    const float* op = ws_o + (bh * NP + i) * D + CPL * lane;
    float v[CPL];
    if constexpr (CPL >= 4) {
#pragma unroll
      for (int j = 0; j < CPL / 4; ++j) {
        const float4 y = *reinterpret_cast<const float4*>(op + 4 * j);
        v[4 * j] = y.x, v[4 * j + 1] = y.y, v[4 * j + 2] = y.z, v[4 * j + 3] = y.w;
      }
    } else {
      const float2 y = *reinterpret_cast<const float2*>(op);
      v[0] = y.x, v[1] = y.y;
    }
    if (x.x == -INFINITY) continue;  // an empty partial (l = 0, o = 0)
    if (x.x > mw) {
      const float r = exp2f(mw - x.x);  // 0 while mw = -inf
      L *= r;
#pragma unroll
      for (int j = 0; j < CPL; ++j) acc[j] *= r;
      mw = x.x;
    }
    const float w = exp2f(x.x - mw);
    L += w * x.y;
#pragma unroll
    for (int j = 0; j < CPL; ++j) acc[j] += w * v[j];
  }
#pragma unroll
  for (int j = 0; j < CPL; ++j) s_o[warp][CPL * lane + j] = acc[j];
  if (lane == 0) {
    s_l[warp] = L;
    s_m[warp] = mw;
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) M = fmaxf(M, s_m[w]);
  for (int c = tid; c < D; c += kMergeWarps * 32) {
    float a = 0.f, l = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kMergeWarps; ++w) {
        const float r = s_m[w] == -INFINITY ? 0.f : exp2f(s_m[w] - M);
        a += r * s_o[w][c];
        l += r * s_l[w];
      }
    }
    out[bh * D + c] = from_f<T>(l > 0.f ? a / l : 0.f);
  }
}

// the merge after any of the decode kernels (v4, v5, v6): B * H_q CTAs, launched as a programmatic
// dependent of the decode kernel just launched on `stream` when pdl, else after it
template <typename T>
void launch_merge(int D, const float* ws_o, const float* ws_ml, int NP, T* out, int64_t BHq, cudaStream_t stream,
                  bool pdl) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)BHq);
  cfg.blockDim = dim3(kMergeWarps * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  if (D == 64) C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, sparse_decode_merge<T, 64>, ws_o, ws_ml, NP, out));
  else if (D == 128) C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, sparse_decode_merge<T, 128>, ws_o, ws_ml, NP, out));
  else C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, sparse_decode_merge<T, 256>, ws_o, ws_ml, NP, out));
}


}  // namespace mustafar_cuda
