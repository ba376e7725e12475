// v6 fused sparse decode instantiated for __nv_bfloat16 (decode_v6.cuh)
#include "decode_v6.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V6_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
