// v6 fused sparse decode instantiated for __half (decode_v6.cuh)
#include "decode_v6.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_V6_LAUNCHER(__half)
}  // namespace mustafar_cuda
