// v6 fused sparse decode with K on tensor cores through the V tile, K walked before V (kernel "v6k"), instantiated
// for __half models (decode_v6.cuh)
#include "decode_v6.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V6_KT_LAUNCHER(__half)
}  // namespace mustafar_cuda
