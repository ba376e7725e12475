#pragma once
// Host side of the fused sparse decode, in two pieces:
//
//   plan    which kernel serves the problem (DecodeKernel: the op's kernel argument, "auto" resolved by the
//           default rule), its configuration on this device (DecodeConfig: shared-memory layout, warps per
//           CTA, resident CTAs per SM; computed once per device and configuration, then cached) and the
//           split over T (DecodePlan: whole waves of resident CTAs, flash-decoding);
//   launch  the decode kernel of the plan, then the merge (merge.cuh), as a programmatic dependent when pdl.
//
// Per-device state (SM count, cached configurations and so occupancy queries) is kept per device index, so a
// process with GPUs of different sizes plans each with its own numbers.
#include "common.cuh"
#include "decode_v4.cuh"
#include "decode_v5.cuh"
#include "decode_v6.cuh"

#include <string>

namespace mustafar_cuda {

// The decode kernels. kAuto (for the calls sparse_decode.cu does not send to v7): v6 wherever it serves
// (v6_serves: fp16 / bf16 model, G <= 8 query heads per KV head in 1, 4 or 8 query-head slots, D 64 / 128, at most
// 64 stored values per row; 16-bit values or e4m3 on both sides; host or device lengths), as v6k (K on tensor
// cores through the V tile) for 16-bit values in 8 slots (G = 5-8: 1.05-1.44x v6 on all eight G = 7 / 8 shapes of
// results/kernel_v6_tensor_k_h200.json, where v6 pays two 16-byte q loads and 8 FMAs per stored K value), except v5 for MHA at
// D = 64 with at most kV5MaxKD64 stored values per row, 16-bit values and host lengths; v5 for other fp16 / bf16
// GQA (k > 64), v4 otherwise (fp32, or MHA with k > 64). kV6g: v6 with k read at run time everywhere (v6 has
// instantiations with k compiled in for k_k = k_v = 38 and 64 at D = 128). The timings behind the rule:
// results/kernel_h100.json (every G 1 / 3 / 4 / 7 / 8, session 11) and results/kernel_v6_candidates_h100.json
// (v6 for every G and for e4m3 values, session 12); docs/kernel_notes.md. kV6k: v6 with the K dot products on tensor
// cores (decode_v6.cuh, KT: K walked first through the V tile; 16-bit values, k read at run time), where v6 serves;
// "auto" runs it for G = 5-8 (above).
enum class DecodeKernel : int { kAuto = 0, kV4 = 4, kV5 = 5, kV6 = 6, kV6g = 7, kV6k = 9 };

// the v6 family (one kernel template, one configuration path)
inline bool is_v6(DecodeKernel k) {
  return k == DecodeKernel::kV6 || k == DecodeKernel::kV6g || k == DecodeKernel::kV6k;
}

// MHA at D = 64: v5 (a warp per row, per-value work) beat v6 at k = 19 (70 %) by 1.2-1.35x on all four timed
// shapes and lost at k = 32 (50 %) on three of four (results/kernel_h100.json); the switch sits between them.
constexpr int kV5MaxKD64 = 25;

// "auto", "v4", "v5", "v6", "v6g", "v6k"; anything else raises ValueError naming it
DecodeKernel parse_decode_kernel(c10::string_view name, const char* op);
const char* decode_kernel_name(DecodeKernel k);

// what the plan depends on
struct DecodeProblem {
  at::ScalarType dtype;
  int64_t B, Hkv, G, D, Tc, Tw, kk, kv;  // kk, kv: stored values per K / V row
  bool vec16;                            // K and V values bases 16-byte aligned
  bool f8 = false;                       // both sides' values e4m3 (+ fp16 row scales): v6 only
  bool lengths = false;                  // device-side lengths: v6 only ("auto": the caller checked v6_serves)
};

// Whether v6 serves a call: fp16 / bf16 model, at most 8 query heads per KV head, at most kRKMax stored values per
// row, D 64 / 128 (values 16-bit, or e4m3 on both sides)
inline bool v6_serves(at::ScalarType dtype, int64_t G, int64_t D, int64_t kk, int64_t kv) {
  return dtype != at::kFloat && G <= 8 && (D == 64 || D == 128) && kk <= kRKMax && kv <= kRKMax;
}

// one kernel configuration on one device (independent of B, H_kv and T)
struct DecodeConfig {
  DecodeKernel kernel;  // resolved: kV4, kV5, kV6 or kV6g
  int GT;               // v4 / v5: query heads per CTA (G / GT chunks per KV head)
  int VM;               // v5: how value rows are read (kVmAny / kVmPair / kVmOct)
  int nwarps;           // warps per CTA
  int per_sm;           // resident CTAs per SM
  int smem_bytes;       // dynamic shared memory per CTA
  bool f8;              // v6: e4m3 values
  bool kt;              // v6k: K on tensor cores (through the V tile)
  V4Layout v4;          // the chosen kernel's layout (the others are unused)
  V5Layout v5;
  V6Layout v6;
};

struct DecodePlan {
  DecodeConfig cfg;
  int nchunk;               // query-head chunks per KV head
  int64_t nsplit;           // splits over T
  int64_t tiles_per_split;  // v4 / v5: 64-row tiles; v6: 32-row warp tiles
  int NP;                   // partials per query head (v6: nsplit; v4 / v5: nsplit * nwarps)
  dim3 grid;
};

// SM count of a device (queried once per device)
int device_sm_count(int device);

// The kernel that serves `pr` for the op's kernel argument (kAuto resolved; a named kernel that cannot serve
// the dtype / shape raises ValueError naming it).
DecodeKernel resolve_decode_kernel(const DecodeProblem& pr, DecodeKernel requested, const char* op);

// The plan for `pr` (B, H_q and T > 0) on `device` (the current device). Raises ValueError when `requested`
// cannot serve it.
DecodePlan plan_decode(const DecodeProblem& pr, DecodeKernel requested, int device, const char* op);

// Launch the plan's decode kernel on `base` (pointers, shapes, strides, qscale; the split fields are set from
// the plan) and the merge into out ([B * H_q, D] of dtype), on `stream`.
void launch_decode(const DecodePlan& plan, const SDParams& base, at::ScalarType dtype, int64_t D, void* out,
                   int64_t BHq, cudaStream_t stream, bool pdl);

}  // namespace mustafar_cuda
