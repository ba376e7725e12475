// v6 fused sparse decode with e4m3 values, instantiated for __nv_bfloat16 models (decode_v6.cuh)
#include "decode_v6.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V6_F8_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
