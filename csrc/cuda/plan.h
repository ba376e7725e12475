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

// The decode kernels. kAuto (for the calls sparse_decode.cu does not send to v7: host lengths, 16-bit values,
// D 64 / 128, an even G or G = 1): v5 for MHA at D = 64 with at most kV5MaxKD64 stored values per row, v6 for
// fp16/bf16 with one or four query heads per KV head (MHA, or GQA with G = 4 as in Llama-3-8B) and at most 64
// stored values per row, v5 for other fp16/bf16 GQA (G = 2, 6, 8), v4 otherwise (fp32, or k > 64). By name, v6
// serves any G <= 8 (G = 2, 3 in four query-head slots, 5-7 in eight; not yet timed, so not yet in "auto");
// results/kernel_h100.json times them side by side. kV6g: v6 with k read at run time everywhere (v6 has
// instantiations with k compiled in for k_k = k_v = 38 and 64 at D = 128).
enum class DecodeKernel : int { kAuto = 0, kV4 = 4, kV5 = 5, kV6 = 6, kV6g = 7 };

// MHA at D = 64: v5 (a warp per row, per-value work) beat v6 at k = 19 (70 %) by 1.2-1.35x on all four timed
// shapes and lost at k = 32 (50 %) on three of four (results/kernel_h100.json); the switch sits between them.
constexpr int kV5MaxKD64 = 25;

// Whether "auto" runs v7 (decode_v7.cuh) for every fp16 / bf16 call. v7 always serves what only it can (fp8
// values, device-side lengths, D = 256, G not in {1, 4} fast); this switch moves the remaining calls to it once
// it has been timed against v6 / v5 on the GPU (docs/kernel_notes.md).
constexpr bool kAutoV7 = false;

// Whether "auto" runs v6 for calls with device-side lengths (the compileable cache) where v6 serves them (fp16 /
// bf16 values, G in {1, 4}, at most 64 stored values per row, D 64 / 128); v7 takes the rest. v6 was 2.6x faster
// than v7 at MHA 70 % and 2.1x at G = 4 without lengths (results/kernel_h100.json); reading the lengths adds a
// few instructions per CTA outside the tiles' walk.
constexpr bool kAutoLengthsV6 = true;

// Whether "auto" runs v6 for every G <= 8 (G = 2, 3 in four query-head slots, 5-7 in eight), with host or device
// lengths, instead of only G in {1, 4}; and whether it runs v6 for e4m3 values on both sides instead of v7. Both are
// the untimed candidates of docs/kernel_notes.md (session 11): off until the kernel grid has timed them.
constexpr bool kAutoV6AnyG = false;
constexpr bool kAutoV6F8 = false;

// "auto", "v4", "v5", "v6", "v6g"; anything else raises ValueError naming it
DecodeKernel parse_decode_kernel(c10::string_view name, const char* op);
const char* decode_kernel_name(DecodeKernel k);

// what the plan depends on
struct DecodeProblem {
  at::ScalarType dtype;
  int64_t B, Hkv, G, D, Tc, Tw, kk, kv;  // kk, kv: stored values per K / V row
  bool vec16;                            // K and V values bases 16-byte aligned
  bool f8 = false;                       // both sides' values e4m3 (+ fp16 row scales): v6 only
  bool lengths = false;                  // device-side lengths: "auto" resolves to v6 (the caller checked v6_serves)
};

// Whether v6 serves a call: fp16 / bf16 model, at most 8 query heads per KV head, at most kRKMax stored values per
// row, D 64 / 128 (values 16-bit, or e4m3 on both sides)
inline bool v6_serves(at::ScalarType dtype, int64_t G, int64_t D, int64_t kk, int64_t kv) {
  return dtype != at::kFloat && G <= 8 && (D == 64 || D == 128) && kk <= kRKMax && kv <= kRKMax;
}

// Whether "auto" runs v6 for G query heads per KV head (the rest of v6_serves holding)
constexpr bool v6_auto_g(int64_t G) { return G == 1 || G == 4 || (kAutoV6AnyG && G <= 8); }

// one kernel configuration on one device (independent of B, H_kv and T)
struct DecodeConfig {
  DecodeKernel kernel;  // resolved: kV4, kV5, kV6 or kV6g
  int GT;               // v4 / v5: query heads per CTA (G / GT chunks per KV head)
  int VM;               // v5: how value rows are read (kVmAny / kVmPair / kVmOct)
  int nwarps;           // warps per CTA
  int per_sm;           // resident CTAs per SM
  int smem_bytes;       // dynamic shared memory per CTA
  bool f8;              // v6: e4m3 values
  V4Layout v4;          // the chosen kernel's layout (the others are unused)
  V5Layout v5;
  V6Layout v6;
};

struct DecodePlan {
  DecodeConfig cfg;
  int nchunk;               // query-head chunks per KV head
  int64_t nsplit;           // splits over T
  int64_t tiles_per_split;  // v4 / v5: 64-row tiles; v6: 32-row warp tiles
  int NP;                   // partials per query head (nsplit * nwarps)
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
