#include "proto_decode.cuh"
#include <cuda_runtime.h>
void proto_merge(const float* ws, void* out, int BHq, int NP, int D, bool bf16, cudaStream_t st) {
  if (bf16) proto::proto_merge_kernel<__nv_bfloat16><<<BHq, D, 0, st>>>(ws, (__nv_bfloat16*)out, NP, D);
  else proto::proto_merge_kernel<__half><<<BHq, D, 0, st>>>(ws, (__half*)out, NP, D);
}
