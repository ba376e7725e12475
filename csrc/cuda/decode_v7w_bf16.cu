// v7w: v7 with 16-byte row loads (decode_v7.cuh load_group16), bf16 models; kernel="v7w", not yet the default.
#include "decode_v7_inst.cuh"
MF_V7_INSTANTIATE(__nv_bfloat16, true)
