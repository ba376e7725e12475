#pragma once
// Prototype fused decode over 4-bit gap codes (issue #15; mustafar/gapcode.py is its layout and reference;
// docs/kernel_design.md "Session 15" its predictions). Not part of the mustafar extension: built on demand by
// scripts/gap_decode_bench.py (csrc/proto/gap_decode_ext.cu) and timed beside v6 / v6k in one device call, so that
// the layout is measured as a whole decode kernel before the cache and the op are moved to it.
//
// v6k's skeleton (decode_v6.cuh with KT: one warp per 32-token tile, lane = token, both sides' values scattered into
// the warp's channel-major dense tile, S = K q^T and O^T += V^T P^T on tensor cores, one partial per CTA), with the
// bitmap walk replaced by the gap code:
//   * every row has exactly S slots (S = k + (D - k) // 16 rounded up to 4: mustafar.gapcode.slots(D, k, 4)), so
//     there is no per-tile fast / general decision, no synthetic rows (padding rows: code 0, value 0) and every loop
//     has a compile-time trip count;
//   * slot j's channel is (sum of the codes of slots 0..j) + j: per code word (8 slots) two IMADs give eight prefix
//     sums as bytes, then per slot one PRMT picks its byte and the store's address is base + 80 * prefix with
//     80 * j folded into the instruction's immediate (csrc/proto/position_walk.cu counts ~4.2 SASS per slot);
//   * the layout is tile-major (mustafar.gapcode.tile_major): a tile's code words are loaded straight to registers
//     (word i of the 32 rows side by side: coalesced), a tile's values are one contiguous block of 64 S bytes staged
//     with cp.async (double-buffered per warp) and read back four slots per 8-byte shared load, conflict-free.
// F8 (fp16 models only): the values are e4m3 bytes (4 slots per 4-byte shared load, converted to fp16 as they are
// scattered: every e4m3 value is exact in fp16) with a float16 scale per token and side ([B, Hkv, ntile, 32]); the
// dense tiles hold the unscaled values, the K scale multiplies the token's scores and the V scale its P column
// (the softmax sums l take the unscaled P).
// The online softmax, the P.V mma and the CTA's combine of its warps' partials are copies of v6's (decode_v6.cuh),
// kept inline so that the prototype changes nothing in the extension; promoting it would share them.
#include "../cuda/common.cuh"

namespace gap_proto {

using namespace mustafar_cuda;

constexpr int kRows = 32;  // tokens per tile (one per lane)
constexpr int kLine = 80;  // bytes per channel line of the dense tile: 32 tokens + 16 B pad (ldmatrix conflict-free)

struct GapParams {
  const void* q;           // [B, Hq, D], T
  const uint32_t* kcode;   // [B, Hkv, ntile, NC, 32]
  const void* kval;        // [B, Hkv, ntile, S / 4, 32, 4], T
  const uint32_t* vcode;
  const void* vval;
  const __half* kscale;    // F8: [B, Hkv, ntile, 32] float16 scale per token (else null)
  const __half* vscale;
  const int* kv_start;     // [B] or null: tokens before kv_start[b] masked (left padding)
  float* ws_o;             // [B, Hq, nsplit, D]
  float* ws_ml;            // [B, Hq, nsplit, 2]
  int B, Hkv, G, Tc, ntile, nsplit, tiles_per_split;
  int wbytes, off_pt, off_st;  // bytes per warp region; its P table and stage buffers
  float qscale;                // softmax scale * log2(e)
};

__device__ __forceinline__ void sts_u16(uint32_t a, uint32_t v) {
  asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((unsigned short)v) : "memory");
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t a) {
  uint32_t x;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(a) : "memory");
  return x;
}
__device__ __forceinline__ uint2 lds_u64(uint32_t a) {
  uint2 x;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(x.x), "=r"(x.y) : "r"(a) : "memory");
  return x;
}
__device__ __forceinline__ void cp16(uint32_t dst, const char* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1, bool bf16) {
  if (!bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Scatter one side of the lane's row (S slots, codes w, values staged at st) into its column col of the dense tile;
// F8: e4m3 values (four per 4-byte load) converted to fp16.
template <int S, bool F8>
__device__ __forceinline__ void gap_scatter(const uint32_t (&w)[(S + 7) / 8], uint32_t st, uint32_t col, int lane) {
  uint32_t base = col;
#pragma unroll
  for (int i = 0; i < (S + 7) / 8; ++i) {
    const uint32_t lo = (w[i] & 0x0f0f0f0fu) * 0x01010101u;  // prefix sums of slots 8i .. 8i+3 (bytes)
    // ... of slots 8i+4 .. 8i+7, plus the four before (each byte <= 8 x 15 = 120: no carry)
    const uint32_t hi = ((w[i] >> 4) & 0x0f0f0f0fu) * 0x01010101u + (lo >> 24) * 0x01010101u;
    uint2 x0, x1 = make_uint2(0u, 0u);
    if constexpr (F8) {
      const uint32_t y0 = lds_u32(st + (uint32_t)((2 * i * kRows + lane) * 4));
      x0 = make_uint2(e4m3x2_to_h2(y0), e4m3x2_to_h2(y0 >> 16));
      if (8 * i + 4 < S) {
        const uint32_t y1 = lds_u32(st + (uint32_t)(((2 * i + 1) * kRows + lane) * 4));
        x1 = make_uint2(e4m3x2_to_h2(y1), e4m3x2_to_h2(y1 >> 16));
      }
    } else {
      x0 = lds_u64(st + (uint32_t)((2 * i * kRows + lane) * 8));
      if (8 * i + 4 < S) x1 = lds_u64(st + (uint32_t)(((2 * i + 1) * kRows + lane) * 8));
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int j = 8 * i + u;
      if (j < S) {
        const uint32_t pre = __byte_perm(u < 4 ? lo : hi, 0u, 0x4440u + (u & 3));
        const uint32_t word = u < 2 ? x0.x : u < 4 ? x0.y : u < 6 ? x1.x : x1.y;
        sts_u16(base + pre * (uint32_t)kLine + (uint32_t)(kLine * j), (u & 1) ? (word >> 16) : word);
      }
    }
    base += (uint32_t)kLine * (hi >> 24);
  }
}

// GQ: query-head slots (1, 4 or 8; p.G <= GQ real ones), the columns of the mma's B operands; F8: e4m3 values.
template <typename T, int D, int S, int GQ, bool F8>
__global__ void __launch_bounds__(D == 64 ? 512 : 320, 1) gap_decode_kernel(const GapParams p) {
  static_assert(S % 4 == 0 && S <= D, "S: a multiple of 4, at most D");
  static_assert(GQ == 1 || GQ == 4 || GQ == 8, "GQ: 1, 4 or 8");
  static_assert(!F8 || std::is_same<T, __half>::value, "e4m3 values: fp16 models (the tiles are fp16)");
  constexpr int NC = (S + 7) / 8;            // code words per row
  constexpr int NMT = D / 16;                // mma m-tiles (16 channels) of O^T
  constexpr int TB = kRows * S * (F8 ? 1 : 2);  // bytes of one side of a tile
  constexpr int N16 = TB / 16;               // its 16-byte chunks
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  extern __shared__ __align__(16) char smem[];

  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int nwarps = (int)(blockDim.x >> 5);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  mf_pdl_launch_dependents();
  const int ks = p.kv_start ? max(0, p.kv_start[b]) : 0;
  const int wt0 = split * p.tiles_per_split;
  const int wt1 = min(p.ntile, wt0 + p.tiles_per_split);
  const int64_t slice = (int64_t)b * p.Hkv + hk;
  const uint32_t* kc = p.kcode + slice * p.ntile * NC * kRows + lane;
  const uint32_t* vc = p.vcode + slice * p.ntile * NC * kRows + lane;
  const char* kvb = reinterpret_cast<const char*>(p.kval) + slice * p.ntile * TB;
  const char* vvb = reinterpret_cast<const char*>(p.vval) + slice * p.ntile * TB;

  const uint32_t smem_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t wreg = smem_s + (uint32_t)(warp * p.wbytes);  // dense tile (D lines), P table, 2 x (K, V) stages
  const uint32_t st0 = wreg + (uint32_t)p.off_st;
  for (int i = lane; i < p.wbytes / 16; i += 32)
    *reinterpret_cast<uint4*>(smem + warp * p.wbytes + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
  __syncwarp();

  auto stage = [&](int wt, int buf) {
    const char* sk = kvb + (int64_t)wt * TB + 16 * lane;
    const char* sv = vvb + (int64_t)wt * TB + 16 * lane;
    const uint32_t dk = st0 + (uint32_t)(buf * 2 * TB + 16 * lane), dv = dk + (uint32_t)TB;
#pragma unroll
    for (int i = 0; i < (N16 + 31) / 32; ++i)
      if (32 * (i + 1) <= N16 || lane + 32 * i < N16) {
        cp16(dk + 512u * i, sk + 512 * i);
        cp16(dv + 512u * i, sv + 512 * i);
      }
  };
  const int64_t sc0 = slice * p.ntile * kRows + lane;  // F8: the lane's token's scales, tile by tile
  auto load_codes = [&](int wt, uint32_t (&ck)[NC], uint32_t (&cv)[NC], float& ksc, float& vsc) {
    const bool has = wt < wt1;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      ck[i] = has ? kc[((int64_t)wt * NC + i) * kRows] : 0u;
      cv[i] = has ? vc[((int64_t)wt * NC + i) * kRows] : 0u;
    }
    if constexpr (F8) {
      ksc = has ? __half2float(p.kscale[sc0 + (int64_t)wt * kRows]) : 0.f;
      vsc = has ? __half2float(p.vscale[sc0 + (int64_t)wt * kRows]) : 0.f;
    }
  };

  float m[GQ], l[GQ];
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  float o[NMT][4];
#pragma unroll
  for (int n = 0; n < NMT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const uint32_t ldm = wreg + (uint32_t)((((lane >> 3) & 1) * 8 + (lane & 7)) * kLine + (lane >> 4) * 16);
  const uint32_t kld = wreg + (uint32_t)(((lane & 7) + ((lane >> 4) & 1) * 8) * kLine + ((lane >> 3) & 1) * 16);
  const uint32_t col = wreg + (uint32_t)(2 * lane);
  auto zero_tile = [&]() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint4*>(smem + warp * p.wbytes + (8 * i + (lane & 7)) * kLine + ((lane >> 3) & 3) * 16) =
          make_uint4(0u, 0u, 0u, 0u);
  };

  // q as the B operand of S = Kd^T q^T: head lane / 4 (0 past G), channels 16 j + 2 (lane % 4) + {0, 1}, + 8
  const int G = p.G;
  const T* qp = reinterpret_cast<const T*>(p.q) + slice * G * D;
  uint32_t qf[D / 16][2];
  {
    const int h = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (h < G) {
        const T* qh = qp + h * D + 16 * j + c0;
        x[0] = to_f(qh[0]);
        x[1] = to_f(qh[1]);
        x[2] = to_f(qh[8]);
        x[3] = to_f(qh[9]);
      }
      qf[j][0] = pack2<T>(x[0], x[1]);
      qf[j][1] = pack2<T>(x[2], x[3]);
    }
  }

  uint32_t ckn[NC], cvn[NC];
  float kscn = 1.f, vscn = 1.f;
  int wt = wt0 + warp, buf = 0;
  if (wt < wt1) stage(wt, 0);
  cp_async_commit();
  load_codes(wt, ckn, cvn, kscn, vscn);

#pragma unroll 1
  for (; wt < wt1; wt += nwarps) {
    const int nxt = wt + nwarps;
    uint32_t ck[NC], cv[NC];
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      ck[i] = ckn[i];
      cv[i] = cvn[i];
    }
    const float ksc = kscn, vsc = vscn;
    load_codes(nxt, ckn, cvn, kscn, vscn);  // prefetch
    if (nxt < wt1) stage(nxt, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const uint32_t stk = st0 + (uint32_t)(buf * 2 * TB), stv = stk + (uint32_t)TB;

    // ---- K: scatter, then S (32 tokens x 8 columns) = Kd^T q^T on tensor cores, back to lane = token via a table
    gap_scatter<S, F8>(ck, stk, col, lane);
    __syncwarp();
    float c[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0.f;
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        uint32_t a0, a1, a2, a3;
        ldmatrix_x4_trans(kld + (uint32_t)(j * 16 * kLine + mt * 32), a0, a1, a2, a3);
        mma16816(c[mt], a0, a1, a2, a3, qf[j][0], qf[j][1], kBf16);
      }
    }
    __syncwarp();
    float* tab = reinterpret_cast<float*>(smem + warp * p.wbytes);  // the tile's first 1 KB: [token][8 columns]
    {
      const int r0 = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        *reinterpret_cast<float2*>(tab + (16 * mt + r0) * 8 + c0) = make_float2(c[mt][0], c[mt][1]);
        *reinterpret_cast<float2*>(tab + (16 * mt + r0 + 8) * 8 + c0) = make_float2(c[mt][2], c[mt][3]);
      }
    }
    __syncwarp();
    const int t = wt * kRows + lane;
    const bool valid = t < p.Tc && t >= ks;
    float s[GQ];
    const float sscale = F8 ? p.qscale * ksc : p.qscale;
#pragma unroll
    for (int g = 0; g < GQ; ++g) s[g] = valid ? tab[lane * 8 + g] * sscale : -INFINITY;
    __syncwarp();
    zero_tile();
    __syncwarp();

    // ---- V: scatter, online softmax (log2 domain), O^T += V^T P^T
    gap_scatter<S, F8>(cv, stv, col, lane);
    float mn[GQ];
    bool grow = false;
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      float mt = s[g];
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      mn[g] = fmaxf(m[g], mt);
      grow = grow || mn[g] > m[g];
    }
    __syncwarp();
    if (mn[0] != -INFINITY) {
      if (grow) {
        float alpha[GQ];
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          alpha[g] = exp2f(m[g] - mn[g]);
          l[g] *= alpha[g];
          m[g] = mn[g];
        }
        float a0 = alpha[0], a1 = alpha[GQ > 1 ? 1 : 0];
#pragma unroll
        for (int h = 1; h < GQ / 2; ++h)
          if ((lane & 3) == h) {
            a0 = alpha[2 * h];
            a1 = alpha[2 * h + 1];
          }
#pragma unroll
        for (int n = 0; n < NMT; ++n) {
          o[n][0] *= a0;
          o[n][1] *= a1;
          o[n][2] *= a0;
          o[n][3] *= a1;
        }
      }
      float pv[GQ];  // the P operand: with e4m3 values times the token's V scale (l sums the unscaled P)
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        const float e = exp2f(s[g] - m[g]);
        l[g] += e;
        pv[g] = F8 ? e * vsc : e;
      }
      uint32_t bq[2][2];
      if constexpr (GQ == 1) {
        const int src = 2 * (lane & 3);
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          const float x0 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src);
          const float x1 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 1);
          const float y0 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 8);
          const float y1 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 9);
          bq[kx][0] = pack2<T>(x0, x1);
          bq[kx][1] = pack2<T>(y0, y1);
        }
      } else {  // the warp's P table [head][token], rows GQ..7 zero
        const uint32_t pt = wreg + (uint32_t)p.off_pt;
#pragma unroll
        for (int g = 0; g < GQ; ++g) sts_u16(pt + (uint32_t)(2 * (32 * g + lane)), pack2<T>(pv[g], 0.f));
        __syncwarp();
        const uint32_t rd = pt + (uint32_t)(2 * (32 * (lane >> 2) + 2 * (lane & 3)));
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          asm volatile("ld.shared.b32 %0, [%1];" : "=r"(bq[kx][0]) : "r"(rd + 32u * kx) : "memory");
          asm volatile("ld.shared.b32 %0, [%1];" : "=r"(bq[kx][1]) : "r"(rd + 32u * kx + 16u) : "memory");
        }
      }
#pragma unroll
      for (int n = 0; n < NMT; ++n) {
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          uint32_t a0, a1, a2, a3;
          ldmatrix_x4(ldm + (uint32_t)(n * 16 * kLine + kx * 32), a0, a1, a2, a3);
          mma16816(o[n], a0, a1, a2, a3, bq[kx][0], bq[kx][1], kBf16);
        }
      }
    }
    __syncwarp();
    zero_tile();
    __syncwarp();
    buf ^= 1;
  }
  cp_async_wait<0>();

  // ---- one partial per CTA and real query head: the warps' (O, m, l) through shared memory (row stride D + 4
  // floats), combined with the CTA's maximum; the merge kernel (csrc/cuda/merge.cuh) combines the splits
  constexpr int DS = D + 4;
  static_assert(GQ * DS * 4 + 2 * GQ * 4 <= D * kLine, "a warp's partial fits its dense tile");
  float lt[GQ];
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
    lt[g] = l[g];
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) lt[g] += __shfl_xor_sync(0xffffffffu, lt[g], off);
  }
  __syncwarp();
  {
    float* po = reinterpret_cast<float*>(smem + warp * p.wbytes);
    const int j0 = 2 * (lane & 3), i0 = lane >> 2;
#pragma unroll
    for (int n = 0; n < NMT; ++n) {
      if (j0 < G) {
        po[j0 * DS + 16 * n + i0] = o[n][0];
        po[j0 * DS + 16 * n + i0 + 8] = o[n][2];
      }
      if (GQ > 1 && j0 + 1 < G) {
        po[(j0 + 1) * DS + 16 * n + i0] = o[n][1];
        po[(j0 + 1) * DS + 16 * n + i0 + 8] = o[n][3];
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        po[GQ * DS + 2 * g] = m[g];
        po[GQ * DS + 2 * g + 1] = lt[g];
      }
    }
  }
  __syncthreads();
  const int NP = p.nsplit;
  const int64_t hq0 = slice * G;
  for (int e = tid; e < G * D; e += (int)blockDim.x) {
    const int g = e / D, cc = e - g * D;
    float M = -INFINITY;
    for (int w = 0; w < nwarps; ++w)
      M = fmaxf(M, *reinterpret_cast<const float*>(smem + w * p.wbytes + 4 * (GQ * DS + 2 * g)));
    float a = 0.f, L = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < nwarps; ++w) {
        const float* pw = reinterpret_cast<const float*>(smem + w * p.wbytes);
        const float mw = pw[GQ * DS + 2 * g];
        const float r = mw == -INFINITY ? 0.f : exp2f(mw - M);
        a += r * pw[g * DS + cc];
        L += r * pw[GQ * DS + 2 * g + 1];
      }
    }
    p.ws_o[((hq0 + g) * NP + split) * D + cc] = a;
    if (cc == 0) {
      p.ws_ml[((hq0 + g) * NP + split) * 2] = M;
      p.ws_ml[((hq0 + g) * NP + split) * 2 + 1] = L;
    }
  }
}

}  // namespace gap_proto
