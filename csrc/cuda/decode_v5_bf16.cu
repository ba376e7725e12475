// v5 fused sparse decode instantiated for __nv_bfloat16 (decode_v5.cuh)
#include "decode_v5.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V5_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
