#pragma once
#include "proto_decode.cuh"
#include <cuda_runtime.h>
namespace proto {
template <int D, int K, int VT, int MODE, int GQ>
bool launch_one(const Params& p, cudaStream_t st) {
  using C = Cfg<D, K, VT, MODE, GQ>;
  auto kern = proto_decode_kernel<D, K, VT, MODE, GQ>;
  static bool init = false;
  if (!init) { cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM); init = true; }
  dim3 grid(p.NS, p.Hkv, p.B);
  kern<<<grid, kNW * 32, C::SMEM, st>>>(p);
  return true;
}
// dispatch over the compiled k for one D
template <int D, int VT, int MODE, int GQ>
bool launch_k(const Params& p, int K, cudaStream_t st) {
  if constexpr (D == 128) {
    switch (K) { case 64: return launch_one<D, 64, VT, MODE, GQ>(p, st); case 38: return launch_one<D, 38, VT, MODE, GQ>(p, st);
                 case 26: return launch_one<D, 26, VT, MODE, GQ>(p, st); default: return false; }
  } else {
    switch (K) { case 32: return launch_one<D, 32, VT, MODE, GQ>(p, st); case 19: return launch_one<D, 19, VT, MODE, GQ>(p, st);
                 case 13: return launch_one<D, 13, VT, MODE, GQ>(p, st); default: return false; }
  }
}
}  // namespace proto
#define PROTO_DEFINE(NAME, VT, MODE)                                                               \
  bool NAME(const proto::Params& p, int D, int K, int GQ, cudaStream_t st) {                      \
    if constexpr (MODE == 1) { return D == 128 ? proto::launch_k<128, VT, MODE, 8>(p, K, st) : proto::launch_k<64, VT, MODE, 8>(p, K, st); } else { \
    if (GQ == 1) return D == 128 ? proto::launch_k<128, VT, MODE, 1>(p, K, st) : proto::launch_k<64, VT, MODE, 1>(p, K, st); \
    if (GQ == 4) return D == 128 ? proto::launch_k<128, VT, MODE, 4>(p, K, st) : proto::launch_k<64, VT, MODE, 4>(p, K, st); \
    return D == 128 ? proto::launch_k<128, VT, MODE, 8>(p, K, st) : proto::launch_k<64, VT, MODE, 8>(p, K, st); } \
  }
