#pragma once
#include <cstdint>
namespace proto {
struct Params {
  const void* q;                             // [B, Hq, D] fp16 / bf16
  const uint32_t* kbm; const uint32_t* vbm;  // [B, Hkv, Tcap, 2W] (int64 words as u32 pairs)
  const uint8_t* kval; const uint8_t* vval;  // [B, Hkv, Tcap, K] elements (fp16 / bf16 / e4m3)
  const void* ksc; const void* vsc;          // [B, Hkv, Tcap] fp16 scales (fp8 only)
  float* ws;                                 // [B, Hq, NP, D + 2]: m, l, o[D]
  int B, Hq, Hkv, G, T, Tcap, NS, tps;
  float qscale;                              // softmax scale * log2(e)
};
}  // namespace proto
