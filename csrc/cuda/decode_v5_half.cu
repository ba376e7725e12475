// v5 fused sparse decode instantiated for __half (decode_v5.cuh)
#include "decode_v5.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V5_LAUNCHER(__half)
}  // namespace mustafar_cuda
