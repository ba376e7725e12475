// Prototype decode kernels for issue 15 (not wired into the op; built by scripts/kernel_proto.py).
// Layout read: the paper's bitmap format (per token vector W = D/64 int64 words, then exactly K values in
// ascending channel order, fixed stride), values fp16 / bf16 / e4m3 (+ one fp16 scale per token vector),
// store capacity Tcap a multiple of 32 rows (so every 32-row tile of a (b, h) starts 16-byte aligned), and
// at least 16 bytes of slack after the value buffer (a lane's aligned loads may overrun its row by <= 3 B).
//
// One warp owns a 32-token tile at a time, one lane per token; warps are independent (no __syncthreads
// after the prologue). Each lane loads its K and V rows (bitmap + values) from global memory straight
// into registers, walks the bitmaps with a fixed number of steps (K, compile-time) and
//   MODE 0 ("gq"): K side: gathers q[channel] (fp32, GQ heads per channel, shared memory) -> scores in
//                  registers (lane = token, no reductions); V side: scatters the values into a per-warp
//                  dense tile, O^T += V^T P^T on tensor cores (mma.m16n8k16, the N = 8 columns = heads).
//   MODE 1 ("tc"): both sides scattered into dense tiles; S^T = K Q^T and O^T += V^T P^T on tensor cores
//                  (any G <= 8 with one code path).
// Tiles with an empty 32-bit bitmap word take a per-lane generic walk (values re-read from global).
// FP8: values converted to fp16 on the scatter; the K scale multiplies the score, the V scale the
// probability (P^T), so the dense tiles hold raw e4m3 values.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <type_traits>
#include "proto_params.h"

namespace proto {

constexpr int kNW = 4;  // warps per CTA



template <int VT> struct VTraits;
template <> struct VTraits<0> { using T16 = __half; static constexpr int ES = 2; };
template <> struct VTraits<1> { using T16 = __nv_bfloat16; static constexpr int ES = 2; };
template <> struct VTraits<2> { using T16 = __half; static constexpr int ES = 1; };

__device__ __forceinline__ uint32_t bfind(uint32_t x) { uint32_t r; asm("bfind.u32 %0, %1;" : "=r"(r) : "r"(x)); return r; }
__device__ __forceinline__ void sts_u16(uint32_t a, uint32_t v) { asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((unsigned short)v) : "memory"); }
__device__ __forceinline__ void sts_u32(uint32_t a, uint32_t v) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v) : "memory"); }
__device__ __forceinline__ void sts_zero128(uint32_t a) { asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" ::"r"(a), "r"(0u) : "memory"); }
__device__ __forceinline__ uint32_t lds_u32(uint32_t a) { uint32_t v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory"); return v; }
__device__ __forceinline__ float lds_f32(uint32_t a) { float v; asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory"); return v; }
__device__ __forceinline__ void lds_f32x4(uint32_t a, float& x, float& y, float& z, float& w) {
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(x), "=f"(y), "=f"(z), "=f"(w) : "r"(a) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
template <typename T16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (sizeof(T16) == 2 && std::is_same<T16, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
__device__ __forceinline__ uint32_t e4m3x2_to_h2(uint32_t b16) {
  uint32_t r; asm("{\n\t.reg .b16 t;\n\tcvt.u16.u32 t, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, t;\n\t}" : "=r"(r) : "r"(b16)); return r;
}
template <typename T16> __device__ __forceinline__ float u16_to_f(uint32_t u) {
  if constexpr (std::is_same<T16, __half>::value) return __half2float(__ushort_as_half((unsigned short)u));
  else return __uint_as_float(u << 16);
}
template <typename T16> __device__ __forceinline__ uint32_t f2_to_u32(float lo, float hi) {
  if constexpr (std::is_same<T16, __half>::value) { __half2 h = __floats2half2_rn(lo, hi); return *reinterpret_cast<uint32_t*>(&h); }
  else { __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi); return *reinterpret_cast<uint32_t*>(&h); }
}

// Fixed-step walk over the set bits of NW32 words (ascending); returns adj + bitpos * S per step. The queue
// shift (3 selects at NW32 = 4) is the price of a statically indexed walk; empty words are not allowed.
template <int NW32>
struct Walk {
  uint32_t w, n[NW32 > 1 ? NW32 - 1 : 1], adj;
  template <int S>
  __device__ __forceinline__ uint32_t next() {
    const uint32_t wn = w & (w - 1u);
    const uint32_t a = adj + bfind(w ^ wn) * (uint32_t)S;
    const bool p = wn != 0u;
    w = p ? wn : n[0];
#pragma unroll
    for (int i = 0; i + 1 < NW32 - 1; ++i) n[i] = p ? n[i] : n[i + 1];
    adj = p ? adj : adj + 32u * S;
    return a;
  }
};

template <int D, int K, int VT, int MODE, int GQ>
struct Cfg {
  using T16 = typename VTraits<VT>::T16;
  static constexpr int ES = VTraits<VT>::ES;
  static constexpr int W = D / 64, NW32 = 2 * W;
  static constexpr int RB = K * ES;                 // value bytes per row
  static constexpr int AL = (RB % 16 == 0) ? 16 : (RB % 8 == 0) ? 8 : (RB % 4 == 0) ? 4 : 1;  // row alignment (>=4: direct)
  static constexpr int NWV = (RB + 3) / 4;          // value words per row
  static constexpr int NLD = AL >= 4 ? RB / 4 : NWV + 1;  // 32-bit words loaded
  static constexpr int TRS = (D + 8) * 2;           // dense tile row stride (bytes): conflict-free ldmatrix
  static constexpr int TILE = 32 * TRS;
  static constexpr int PTS = 68;                    // P^T table: [8 heads][34 halves]
  static constexpr int WBYTES = TILE * (MODE == 1 ? 2 : 1) + 8 * PTS;
  static constexpr int QBYTES = MODE == 0 ? D * GQ * 4 : 0;
  static constexpr int SMEM = QBYTES + kNW * WBYTES;
};

template <int NLD, int AL>
__device__ __forceinline__ void load_row_words(const uint8_t* base, size_t off, uint32_t (&r)[NLD]) {
  if constexpr (AL == 16) {
    const uint4* p = reinterpret_cast<const uint4*>(base + off);
#pragma unroll
    for (int i = 0; i < NLD / 4; ++i) { uint4 v = __ldg(p + i); r[4 * i] = v.x; r[4 * i + 1] = v.y; r[4 * i + 2] = v.z; r[4 * i + 3] = v.w; }
  } else if constexpr (AL == 8) {
    const uint2* p = reinterpret_cast<const uint2*>(base + off);
#pragma unroll
    for (int i = 0; i < NLD / 2; ++i) { uint2 v = __ldg(p + i); r[2 * i] = v.x; r[2 * i + 1] = v.y; }
  } else {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(base + (off & ~(size_t)3));
#pragma unroll
    for (int i = 0; i < NLD; ++i) r[i] = __ldg(p + i);
  }
}
// the row's values as NWV words starting at the row's first byte
template <int NWV, int NLD, int AL>
__device__ __forceinline__ void align_row(const uint32_t (&r)[NLD], uint32_t sh, uint32_t (&v)[NWV]) {
  if constexpr (AL >= 4) {
#pragma unroll
    for (int i = 0; i < NWV; ++i) v[i] = r[i];
  } else {
#pragma unroll
    for (int i = 0; i < NWV; ++i) v[i] = __funnelshift_r(r[i], r[i + 1], sh * 8u);
  }
}
// value j of a row as a 16-bit element of T16 (fp8: converted pairs in c[])
template <int VT, int NWV>
__device__ __forceinline__ uint32_t val16(const uint32_t (&v)[NWV], int j) {
  if constexpr (VT == 2) return (v[j >> 1] >> (16 * (j & 1))) & 0xffffu;  // v holds converted halves here
  else return (v[j >> 1] >> (16 * (j & 1))) & 0xffffu;
}

template <int D, int K, int VT, int MODE, int GQ>
__global__ void __launch_bounds__(kNW * 32) proto_decode_kernel(const Params p) {
  using C = Cfg<D, K, VT, MODE, GQ>;
  using T16 = typename C::T16;
  constexpr int NW32 = C::NW32;
  constexpr int NCV = VT == 2 ? (K + 1) / 2 : C::NWV;  // words holding the row as 16-bit elements
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const size_t bh = (size_t)b * p.Hkv + hk;
  const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t wbase = sbase + C::QBYTES + warp * C::WBYTES;
  const uint32_t vtile = wbase, ktile = wbase + C::TILE;                 // ktile: MODE 1 only
  const uint32_t ptab = wbase + C::TILE * (MODE == 1 ? 2 : 1);
  const T16* q = reinterpret_cast<const T16*>(p.q) + ((size_t)b * p.Hq + (size_t)hk * p.G) * D;

  // q: MODE 0 as fp32 [D][GQ] in shared memory (scaled); MODE 1 as the mma's B fragments (Q^T, 8 heads)
  uint32_t qb[MODE == 1 ? D / 16 : 1][2];
  if constexpr (MODE == 0) {
    for (int i = threadIdx.x; i < D * GQ; i += kNW * 32) {
      const int ch = i / GQ, h = i % GQ;
      const float x = h < p.G ? u16_to_f<T16>(reinterpret_cast<const unsigned short*>(q)[h * D + ch]) * p.qscale : 0.f;
      reinterpret_cast<float*>(smem)[i] = x;
    }
    __syncthreads();
  } else {
    const int h = lane >> 2;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      const int c0 = kb * 16 + 2 * (lane & 3);
      float x0 = 0, x1 = 0, x2 = 0, x3 = 0;
      if (h < p.G) {
        const unsigned short* qq = reinterpret_cast<const unsigned short*>(q) + h * D;
        x0 = u16_to_f<T16>(qq[c0]) * p.qscale; x1 = u16_to_f<T16>(qq[c0 + 1]) * p.qscale;
        x2 = u16_to_f<T16>(qq[c0 + 8]) * p.qscale; x3 = u16_to_f<T16>(qq[c0 + 9]) * p.qscale;
      }
      qb[kb][0] = f2_to_u32<T16>(x0, x1); qb[kb][1] = f2_to_u32<T16>(x2, x3);
    }
  }
  // zero the P^T table (rows of heads >= G stay 0)
  for (int i = lane; i < 8 * C::PTS / 4; i += 32) sts_u32(ptab + 4 * i, 0u);
  __syncwarp();

  // running state
  constexpr int NH = MODE == 0 ? GQ : 2;  // heads per lane: MODE 0: all GQ (warp-uniform m); MODE 1: heads 2(lane%4)+{0,1}
  float m_run[NH], l_run[NH];
#pragma unroll
  for (int h = 0; h < NH; ++h) { m_run[h] = -INFINITY; l_run[h] = 0.f; }
  float o[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  const int NT = p.Tcap / 32;
  const int t_beg = split * p.tps, t_end = min(NT, t_beg + p.tps);
  for (int ti = t_beg + warp; ti < t_end && ti * 32 < p.T; ti += kNW) {
    const int r = ti * 32 + lane;
    const bool valid = r < p.T;
    const size_t row = bh * p.Tcap + r;
    // ---- loads (bitmaps, values, scales) ----
    uint32_t kw[NW32], vw[NW32];
    if constexpr (NW32 == 4) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(p.kbm + row * 4)); kw[0] = a.x; kw[1] = a.y; kw[2] = a.z; kw[3] = a.w;
      const uint4 c = __ldg(reinterpret_cast<const uint4*>(p.vbm + row * 4)); vw[0] = c.x; vw[1] = c.y; vw[2] = c.z; vw[3] = c.w;
    } else {
      const uint2 a = __ldg(reinterpret_cast<const uint2*>(p.kbm + row * 2)); kw[0] = a.x; kw[1] = a.y;
      const uint2 c = __ldg(reinterpret_cast<const uint2*>(p.vbm + row * 2)); vw[0] = c.x; vw[1] = c.y;
    }
    uint32_t kr[C::NLD], vr[C::NLD];
    const size_t voff = row * C::RB;
    load_row_words<C::NLD, C::AL>(p.kval, voff, kr);
    load_row_words<C::NLD, C::AL>(p.vval, voff, vr);
    float ks = 1.f, vs = 1.f;
    if constexpr (VT == 2) { ks = __half2float(reinterpret_cast<const __half*>(p.ksc)[row]); vs = __half2float(reinterpret_cast<const __half*>(p.vsc)[row]); }
    // ---- zero own dense rows ----
#pragma unroll
    for (int c = 0; c < D * 2 / 16; ++c) {
      sts_zero128(vtile + lane * C::TRS + 16 * c);
      if constexpr (MODE == 1) sts_zero128(ktile + lane * C::TRS + 16 * c);
    }
    bool nonempty = true;
#pragma unroll
    for (int i = 0; i < NW32; ++i) nonempty = nonempty && kw[i] != 0u && vw[i] != 0u;
    if (!valid) {  // synthetic complete row: real addresses, zero values, masked score
#pragma unroll
      for (int i = 0; i < NW32; ++i) { const int n = K / NW32 + (i < K % NW32 ? 1 : 0); kw[i] = vw[i] = n >= 32 ? 0xffffffffu : ((1u << n) - 1u); }
#pragma unroll
      for (int i = 0; i < C::NLD; ++i) kr[i] = vr[i] = 0u;
    }
    const uint32_t sh = (uint32_t)(voff & 3);
    uint32_t kv[C::NWV], vv[C::NWV];
    align_row<C::NWV, C::NLD, C::AL>(kr, sh, kv);
    align_row<C::NWV, C::NLD, C::AL>(vr, sh, vv);
    uint32_t kc[NCV], vc[NCV];  // rows as 16-bit elements
    if constexpr (VT == 2) {
#pragma unroll
      for (int i = 0; i < NCV; ++i) { kc[i] = e4m3x2_to_h2((kv[i >> 1] >> (16 * (i & 1))) & 0xffffu); vc[i] = e4m3x2_to_h2((vv[i >> 1] >> (16 * (i & 1))) & 0xffffu); }
    } else {
#pragma unroll
      for (int i = 0; i < NCV; ++i) { kc[i] = kv[i]; vc[i] = vv[i]; }
    }
    float sacc[MODE == 0 ? GQ : 1];
#pragma unroll
    for (int h = 0; h < (MODE == 0 ? GQ : 1); ++h) sacc[h] = 0.f;
    const uint32_t vrow = vtile + lane * C::TRS, krow = ktile + lane * C::TRS;
    auto kuse = [&](uint32_t ch_addr_or_ch, uint32_t u, bool is_addr) {
      // MODE 0: gather q (address into q smem); MODE 1: scatter into K tile
      if constexpr (MODE == 0) {
        const uint32_t a = is_addr ? ch_addr_or_ch : sbase + ch_addr_or_ch * GQ * 4;
        const float x = u16_to_f<T16>(u);
        if constexpr (GQ == 1) { sacc[0] += lds_f32(a) * x; }
        else {
#pragma unroll
          for (int h4 = 0; h4 < GQ; h4 += 4) {
            float q0, q1, q2, q3; lds_f32x4(a + 4 * h4, q0, q1, q2, q3);
            sacc[h4] += q0 * x; sacc[h4 + 1] += q1 * x; sacc[h4 + 2] += q2 * x; sacc[h4 + 3] += q3 * x;
          }
        }
      } else {
        sts_u16(is_addr ? ch_addr_or_ch : krow + 2 * ch_addr_or_ch, u);
      }
    };
    if (__all_sync(0xffffffffu, !valid || nonempty)) {
      // fast path: fixed-step walks, values from registers
      Walk<NW32> wk, wv;
      wk.w = kw[0]; wv.w = vw[0];
#pragma unroll
      for (int i = 0; i < NW32 - 1; ++i) { wk.n[i] = kw[i + 1]; wv.n[i] = vw[i + 1]; }
      wk.adj = MODE == 0 ? sbase : krow; wv.adj = vrow;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const uint32_t ak = wk.template next<MODE == 0 ? GQ * 4 : 2>();
        kuse(ak, val16<VT, NCV>(kc, j), true);
        const uint32_t av = wv.template next<2>();
        sts_u16(av, val16<VT, NCV>(vc, j));
      }
    } else if (valid) {
      // generic walk: any empty words; values re-read from global (rare)
      const uint8_t* kg = p.kval + voff; const uint8_t* vg = p.vval + voff;
      auto get = [&](const uint8_t* g, int s) -> uint32_t {
        if constexpr (VT == 2) return e4m3x2_to_h2(g[s]) & 0xffffu;
        else return (uint32_t)reinterpret_cast<const unsigned short*>(g)[s];
      };
      int s = 0;
      for (int i = 0; i < NW32; ++i) { uint32_t w = kw[i]; while (w) { const uint32_t wn = w & (w - 1u); kuse(32u * i + bfind(w ^ wn), get(kg, s++), false); w = wn; } }
      s = 0;
      for (int i = 0; i < NW32; ++i) { uint32_t w = vw[i]; while (w) { const uint32_t wn = w & (w - 1u); sts_u16(vrow + 2 * (32u * i + bfind(w ^ wn)), get(vg, s++)); w = wn; } }
    }
    __syncwarp();
    // ---- scores and online softmax ----
    if constexpr (MODE == 0) {
      float alpha[GQ];
#pragma unroll
      for (int h = 0; h < GQ; ++h) {
        const float s = valid ? sacc[h] * ks : -INFINITY;
        float mx = s;
#pragma unroll
        for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float mn = fmaxf(m_run[h], mx);
        alpha[h] = exp2f(m_run[h] - mn);
        const float pr = exp2f(s - mn);
        l_run[h] = l_run[h] * alpha[h] + pr;
        m_run[h] = mn;
        // P^T table [head][token]
        const float pv = pr * vs;
        if constexpr (std::is_same<T16, __half>::value) { __half hv = __float2half_rn(pv); sts_u16(ptab + h * C::PTS + 2 * lane, __half_as_ushort(hv)); }
        else { __nv_bfloat16 hv = __float2bfloat16_rn(pv); sts_u16(ptab + h * C::PTS + 2 * lane, __bfloat16_as_ushort(hv)); }
      }
      // rescale O^T: this lane holds heads 2(lane%4) + {0,1}
      float a0 = 1.f, a1 = 1.f;
#pragma unroll
      for (int h = 0; h < GQ; ++h) { if (h == 2 * (lane & 3)) a0 = alpha[h]; if (h == 2 * (lane & 3) + 1) a1 = alpha[h]; }
#pragma unroll
      for (int i = 0; i < D / 16; ++i) { o[i][0] *= a0; o[i][1] *= a1; o[i][2] *= a0; o[i][3] *= a1; }
    } else {
      float st[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        st[mt][0] = st[mt][1] = st[mt][2] = st[mt][3] = 0.f;
#pragma unroll
        for (int kb = 0; kb < D / 16; ++kb) {
          uint32_t a[4];
          const int tok = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ch = kb * 16 + (lane >> 4) * 8;
          ldsm_x4(ktile + tok * C::TRS + ch * 2, a);
          mma16816<T16>(st[mt], a, qb[kb][0], qb[kb][1]);
        }
      }
      // c0,c1: token mt*16 + lane/4, heads 2(lane%4)+{0,1}; c2,c3: token + 8
      float tsc[4], tvs[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = (lane >> 2) + 8 * i;
        float a = 1.f, c = 1.f;
        if constexpr (VT == 2) { a = __shfl_sync(0xffffffffu, ks, tok); c = __shfl_sync(0xffffffffu, vs, tok); }
        tsc[i] = (ti * 32 + tok < p.T) ? a : 0.f;  // 0: masked token
        tvs[i] = c;
      }
      float s[2][4];  // [head e][token i]
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = st[i >> 1][(i & 1) * 2 + e];
          s[e][i] = tsc[i] != 0.f ? x * tsc[i] : -INFINITY;
        }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float mx = fmaxf(fmaxf(s[e][0], s[e][1]), fmaxf(s[e][2], s[e][3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mn = fmaxf(m_run[e], mx);
        const float al = exp2f(m_run[e] - mn);
        float ls = 0.f;
        const int h = 2 * (lane & 3) + e;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pr = exp2f(s[e][i] - mn);
          ls += pr;
          const int tok = (lane >> 2) + 8 * i;
          const float pv = pr * tvs[i];
          if constexpr (std::is_same<T16, __half>::value) sts_u16(ptab + h * C::PTS + 2 * tok, __half_as_ushort(__float2half_rn(pv)));
          else sts_u16(ptab + h * C::PTS + 2 * tok, __bfloat16_as_ushort(__float2bfloat16_rn(pv)));
        }
        l_run[e] = l_run[e] * al + ls;
        m_run[e] = mn;
#pragma unroll
        for (int i2 = 0; i2 < D / 16; ++i2) { o[i2][e] *= al; o[i2][2 + e] *= al; }
      }
    }
    __syncwarp();
    // ---- O^T += V^T P^T ----
    uint32_t pb[2][2];
#pragma unroll
    for (int ks2 = 0; ks2 < 2; ++ks2) {
      const uint32_t a = ptab + (lane >> 2) * C::PTS + 2 * (ks2 * 16 + 2 * (lane & 3));
      pb[ks2][0] = lds_u32(a); pb[ks2][1] = lds_u32(a + 16);
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int ks2 = 0; ks2 < 2; ++ks2) {
        uint32_t a[4];
        // matrices: (tok 0-7, ch 0-7), (tok 0-7, ch 8-15), (tok 8-15, ch 0-7), (tok 8-15, ch 8-15) -> transposed
        const int tok = ks2 * 16 + ((lane >> 4) & 1) * 8 + (lane & 7), ch = mt * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4_t(vtile + tok * C::TRS + ch * 2, a);
        mma16816<T16>(o[mt], a, pb[ks2][0], pb[ks2][1]);
      }
    __syncwarp();
  }
  // ---- partials: O^T[ch = mt*16 + lane/4 (+8)][head = 2(lane%4) + {0,1}] ----
  const int NP = p.NS * kNW, part = split * kNW + warp;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * (lane & 3) + e;
    float mm, ll;
    if constexpr (MODE == 0) {
      mm = -INFINITY; ll = 0.f;
#pragma unroll
      for (int hh = 0; hh < GQ; ++hh) {
        float t = l_run[hh];
#pragma unroll
        for (int off = 16; off; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (hh == h) { mm = m_run[hh]; ll = t; }
      }
    } else {
      mm = m_run[e]; ll = l_run[e];
      ll += __shfl_xor_sync(0xffffffffu, ll, 4); ll += __shfl_xor_sync(0xffffffffu, ll, 8); ll += __shfl_xor_sync(0xffffffffu, ll, 16);
    }
    if (h < p.G) {
      float* w = p.ws + (((size_t)b * p.Hq + (size_t)hk * p.G + h) * NP + part) * (D + 2);
      if (lane < 4) { w[0] = mm; w[1] = ll; }
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) { w[2 + mt * 16 + (lane >> 2)] = o[mt][e]; w[2 + mt * 16 + 8 + (lane >> 2)] = o[mt][2 + e]; }
    }
  }
}

template <typename T16>
__global__ void proto_merge_kernel(const float* ws, T16* out, int NP, int D) {
  const size_t bq = blockIdx.x;
  const float* w = ws + bq * NP * (D + 2);
  float M = -INFINITY;
  for (int i = 0; i < NP; ++i) M = fmaxf(M, w[i * (D + 2)]);
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (M != -INFINITY)
      for (int i = 0; i < NP; ++i) {
        const float m = w[i * (D + 2)];
        const float s = m == -INFINITY ? 0.f : exp2f(m - M);
        den += s * w[i * (D + 2) + 1];
        num += s * w[i * (D + 2) + 2 + c];
      }
    const float r = den > 0.f ? num / den : 0.f;
    if constexpr (std::is_same<T16, __half>::value) out[bq * D + c] = __float2half_rn(r);
    else out[bq * D + c] = __float2bfloat16_rn(r);
  }
}

}  // namespace proto
