// v6 fused sparse decode with K on tensor cores through its own dense tile (kernel "v6m"), instantiated for __half
// models (decode_v6.cuh)
#include "decode_v6.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V6_M_LAUNCHER(__half, 1)
}  // namespace mustafar_cuda
