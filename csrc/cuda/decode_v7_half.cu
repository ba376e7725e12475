// v7 instantiations for fp16 models (decode_v7.cuh).
#include "decode_v7_inst.cuh"
MF_V7_INSTANTIATE(__half)
