// v7 instantiations for fp16 models (decode_v7.cuh), 4-byte row loads.
#include "decode_v7_inst.cuh"
MF_V7_INSTANTIATE(__half, false)
