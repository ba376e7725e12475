// v4 fused sparse decode instantiated for __nv_bfloat16 (decode_v4.cuh; one translation unit per kernel and dtype so
// that nvcc compiles them in parallel)
#include "decode_v4.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V4_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
