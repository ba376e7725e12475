#pragma once
// Common pieces of the CUDA side of `mustafar` (csrc/cuda/): includes, launch checks, the debugging aid
// MUSTAFAR_CUDA_POISON, programmatic-dependent-launch device hooks, type conversions and packed loads,
// cp.async, the tensor-core helpers shared by v5 and v6, the parameters every fused decode kernel takes
// (SDParams: pointers, shapes, strides, split) and the (b, h_kv) slice of the cache tensors (SDSlice).
//
// Each decode kernel has its own header and extends SDParams with its own layout fields:
//   decode_v4.cuh (V4Params), decode_v5.cuh (V5Params), decode_v6.cuh (V6Params);
// v4 and v5 share the 64-row CTA tile staging of cta_tile.cuh; all three end with the merge of merge.cuh.
// The host side (plan.h / plan.cu) picks the kernel and its launch shape.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace mustafar_cuda {

#define MF_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Debugging aid: MUSTAFAR_CUDA_POISON=1 fills every output (and the decode workspace) with NaN / -1 before
// the kernels run, so elements that a kernel forgets to write show up in tests. Read once, at the first
// CUDA op of the process (set it before that).
inline bool poison_outputs() {
  static const bool on = [] {
    const char* e = std::getenv("MUSTAFAR_CUDA_POISON");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  return on;
}

// Programmatic dependent launch (Hopper, PTX griddepcontrol): every decode kernel lets the merge kernel
// that follows it in the stream be launched as soon as all of its CTAs are running, and the merge waits
// for the decode grid to finish (and its writes to be visible) before it reads the partials. So the merge's
// launch latency overlaps the decode instead of following it. Both are no-ops on older GPUs and when the
// merge is launched without the attribute (the op's pdl=False).
__device__ __forceinline__ void mf_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void mf_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------------
// type helpers
// ------------------------------------------------------------------------------------------------
template <typename T>
struct TypeOf;
template <>
struct TypeOf<at::Half> { using type = __half; };
template <>
struct TypeOf<at::BFloat16> { using type = __nv_bfloat16; };
template <>
struct TypeOf<float> { using type = float; };

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }

// two packed 16-bit values -> two floats
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  // bf16 -> f32 is a 16-bit shift
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ __half2 as_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// two e4m3 bytes (low 16 bits of b) -> two fp16 (packed; exact: every e4m3 value is an fp16 value)
__device__ __forceinline__ uint32_t e4m3x2_to_h2(uint32_t b) {
  uint32_t r;
  asm("{\n\t.reg .b16 t;\n\tcvt.u16.u32 t, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, t;\n\t}" : "=r"(r) : "r"(b));
  return r;
}

// two floats -> a packed 16-bit pair (low = a)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// the same, each 8x8 matrix transposed (rows given as addresses become the fragment's columns)
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// a bitmap row (NW 32-bit words) is a complete top-k row for the fast walks of v5 / v6: exactly k stored
// values, every 32-bit word nonzero
template <int NW>
__device__ __forceinline__ bool reg_walk_ok(const uint32_t (&wd)[NW], int k) {
  int n = 0;
  bool nz = true;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    n += __popc(wd[i]);
    nz = nz && wd[i] != 0u;
  }
  return nz && n == k;
}

// ------------------------------------------------------------------------------------------------
// cp.async
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}


// ------------------------------------------------------------------------------------------------
// the parameters every fused decode kernel takes (each kernel's header adds its layout fields)
// ------------------------------------------------------------------------------------------------
struct SDParams {
  const void* q;  // [B, Hq, D] contiguous
  const int64_t* kbm;
  const void* kval;
  const int64_t* vbm;
  const void* vval;
  const void* kwin;
  const void* vwin;
  const int* kv_start;  // [B] or null
  const int* lengths;   // v6: device (n_c, n_w) with a ring window, or null (Tc / Tw below); v4 / v5: null
  const __half* kscale;  // v6 with e4m3 values (both sides): fp16 scale per stored row [B, H_kv, T_c]; else null
  const __half* vscale;
  float* ws_o;          // [B, Hq, NP, D]
  float* ws_ml;         // [B, Hq, NP, 2]
  int B, Hkv, G, Tc, Tw, kk, kv;
  int64_t kbm_sb, kbm_sh, kval_sb, kval_sh, vbm_sb, vbm_sh, vval_sb, vval_sh;
  int64_t kwin_sb, kwin_sh, kwin_st, vwin_sb, vwin_sh, vwin_st;
  int64_t ksc_sb, ksc_sh, vsc_sb, vsc_sh;  // scale strides (elements; rows contiguous)
  int nsplit, tiles_per_split, nchunk;
  int vec16;  // values bases are 16-byte aligned (cp.async 16 B), else element copies
  float qscale;
};

// The (b, h_kv) slice of every cache tensor of one fused-decode CTA (every kernel); VSZ: bytes per stored value
// (sizeof(T), or 1 for e4m3 values).
template <typename T, int VSZ = (int)sizeof(T)>
struct SDSlice {
  const char* kval;
  const char* vval;
  const int64_t* kbm;
  const int64_t* vbm;
  const T* kwin;
  const T* vwin;
  __device__ __forceinline__ SDSlice(const SDParams& p, int b, int hk)
      : kval(reinterpret_cast<const char*>(p.kval) + (b * p.kval_sb + hk * p.kval_sh) * VSZ),
        vval(reinterpret_cast<const char*>(p.vval) + (b * p.vval_sb + hk * p.vval_sh) * VSZ),
        kbm(p.kbm + b * p.kbm_sb + hk * p.kbm_sh),
        vbm(p.vbm + b * p.vbm_sb + hk * p.vbm_sh),
        kwin(reinterpret_cast<const T*>(p.kwin) + b * p.kwin_sb + hk * p.kwin_sh),
        vwin(reinterpret_cast<const T*>(p.vwin) + b * p.vwin_sb + hk * p.vwin_sh) {}
};

}  // namespace mustafar_cuda
