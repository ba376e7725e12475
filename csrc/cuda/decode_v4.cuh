#pragma once
// v4 fused sparse decode (fp32, and fp16 / bf16 where v5 / v6 do not apply): flash-decoding over
// [compressed T_c ; dense window T_w], split over T (grid = splits x kv-head chunks x batch), 4 warps per
// CTA, cp.async 3-stage pipeline staging 64-row tiles of packed values and bitmaps in shared memory
// (cta_tile.cuh), each lane owning D/32 consecutive channels and expanding them from the packed row with a
// byte permute (no per-element branches), fp32 scores and online softmax; each warp writes one partial
// (m, l, o) and sparse_decode_merge (merge.cuh) combines them. Design and numbers: docs/kernel_notes.md.
#include "common.cuh"
#include "cta_tile.cuh"

namespace mustafar_cuda {

constexpr int kBatch = 8;     // rows per warp step (scores reduced with a reduce-scatter)

// v4's shared memory: the pipeline stages, then the (word, prefix) table of the current tile
struct V4Layout : Stage64Layout {
  int off_tab;
};
struct V4Params : SDParams, V4Layout {};

// Nibble lookup table (16 entries, in shared memory): for the lane's 4 channels with stored-bit
// pattern n (bit j = channel j stored) and the compact values c0..c3 starting at the lane's rank,
//   channels 0,1 = prmt(c01, 0, x & 0xffff)           (selector bytes 4..7 read the zero register)
//   channels 2,3 = prmt(c01, c23, x >> 16) & y         (c_{s2}, c_{s3}; y zeroes unstored channels)
// with s2 = b0 + b1, s3 = s2 + b2. One LDS.64 replaces ~12 integer instructions of selector and mask
// arithmetic per nibble (v4; see docs/kernel_notes.md).
__host__ __device__ constexpr uint32_t nib_sel_lo(uint32_t n) {
  return ((n & 1u) ? 0x10u : 0x44u) | (((n & 2u) ? ((n & 1u) ? 0x32u : 0x10u) : 0x44u) << 8);
}
__host__ __device__ constexpr uint32_t nib_sel_hi(uint32_t n) {
  return (0x10u + 0x22u * ((n & 1u) + ((n >> 1) & 1u))) |
         ((0x10u + 0x22u * ((n & 1u) + ((n >> 1) & 1u) + ((n >> 2) & 1u))) << 8);
}
__host__ __device__ constexpr uint32_t nib_mask_hi(uint32_t n) {
  return ((n & 4u) ? 0x0000ffffu : 0u) | ((n & 8u) ? 0xffff0000u : 0u);
}
__device__ __forceinline__ void init_nib_lut(uint2* lut) {
  if (threadIdx.x < 16) {
    const uint32_t n = threadIdx.x;
    lut[n] = make_uint2(nib_sel_lo(n) | (nib_sel_hi(n) << 16), nib_mask_hi(n));
  }
}

// 16-bit types: the lane's CPL channels of one packed row as CPL/2 packed pairs (unstored channels
// are +0). vbase: the stage's value tile; a: absolute half index of the lane's first stored value
// (row * k + rank); nib: the lane's stored bits.
template <int CPL>
__device__ __forceinline__ void expand_raw16(const void* vbase, uint32_t a, uint32_t nib, const uint2* lut,
                                             uint32_t (&h)[CPL / 2]) {
  const uint32_t* vw = reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(vbase) + ((a * 2u) & ~3u));
  const uint32_t sh = a << 4;  // the funnel shift takes the amount mod 32: (a & 1) * 16
  const uint32_t w0 = vw[0], w1 = vw[1];
  const uint32_t c01 = __funnelshift_r(w0, w1, sh);
  const uint2 e = lut[nib];
  h[0] = prmt(c01, 0u, e.x);
  if constexpr (CPL == 4) {
    const uint32_t w2 = vw[2];
    const uint32_t c23 = __funnelshift_r(w1, w2, sh);
    h[1] = prmt(c01, c23, e.x >> 16) & e.y;
  }
}

// Expand the lane's CPL channels of one packed row into floats (16-bit types through expand_raw16).
template <typename T, int CPL>
__device__ __forceinline__ void expand_row(const void* vbase, uint32_t a, uint32_t nib, const uint2* lut,
                                           float (&f)[CPL]) {
  if constexpr (sizeof(T) == 2) {
    uint32_t h[CPL / 2];
    expand_raw16<CPL>(vbase, a, nib, lut, h);
#pragma unroll
    for (int j = 0; j < CPL / 2; ++j) {
      const float2 f2 = unpack2<T>(h[j]);
      f[2 * j] = f2.x;
      f[2 * j + 1] = f2.y;
    }
  } else {
    const float* vf = reinterpret_cast<const float*>(vbase);
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const uint32_t s = __popc(nib & ((1u << j) - 1u));
      f[j] = ((nib >> j) & 1u) ? vf[a + s] : 0.f;
    }
  }
}

template <typename T, int CPL>
__device__ __forceinline__ void load_dense(const T* p, float (&f)[CPL]) {
#pragma unroll
  for (int j = 0; j < CPL; ++j) f[j] = to_f(p[j]);
}

template <typename T, int D, int GT>
__global__ void __launch_bounds__(kWarps * 32, 4) sparse_decode_kernel(const V4Params p) {
  constexpr int CPL = D / 32;         // channels per lane
  constexpr int NW32 = D / 32;        // 32-bit bitmap words per row
  constexpr int LPW = 32 / CPL;       // lanes per 32-bit word
  constexpr int W = D / 64;
  extern __shared__ __align__(16) char smem[];
  __shared__ uint2 lut[16];
  init_nib_lut(lut);  // first read after the __syncthreads at the top of the tile loop
  mf_pdl_launch_dependents();  // the merge kernel may launch now (it waits for this grid)

  const int split = blockIdx.x;
  const int hk = blockIdx.y / p.nchunk;
  const int chunk = blockIdx.y % p.nchunk;
  const int b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hq0 = hk * p.G + chunk * GT;
  const int Tall = p.Tc + p.Tw;
  const int ks = p.kv_start ? max(0, p.kv_start[b]) : 0;
  const int ntiles = (Tall + kTile - 1) / kTile;
  const int tile0 = split * p.tiles_per_split;
  const int tile1 = min(ntiles, tile0 + p.tiles_per_split);
  const int nt = max(0, tile1 - tile0);

  // q for the GT heads, the lane's channels, scaled by scale*log2(e)
  float qf[GT][CPL];
  {
    const T* qp = reinterpret_cast<const T*>(p.q);
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int j = 0; j < CPL; ++j)
        qf[g][j] = to_f(qp[((int64_t)b * p.Hkv * p.G + hq0 + g) * D + lane * CPL + j]) * p.qscale;
  }
  // fp16: K products and the per-batch V sums in half2 (fp32 softmax and output accumulation)
  constexpr bool kHalfMath = std::is_same<T, __half>::value;
  __half2 qh[GT][CPL / 2];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int j = 0; j < CPL / 2; ++j) qh[g][j] = __floats2half2_rn(qf[g][2 * j], qf[g][2 * j + 1]);
  float m[GT], l[GT], o[GT][CPL];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) o[g][j] = 0.f;
  }

  const SDSlice<T> sl(p, b, hk);

  auto issue = [&](int i) { stage_tile64<W, false>(sl, smem, p, tile0 + i, i % kStages); };

#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nt) issue(i);
    cp_async_commit();
  }
  uint2* tab = reinterpret_cast<uint2*>(smem + p.off_tab);  // [2][kTile][NW32] (word, row*k + prefix)
  const int word_of_lane = lane / LPW;
  const int shift_of_lane = (lane % LPW) * CPL;
  const uint32_t lowmask = (1u << shift_of_lane) - 1u;

#pragma unroll 1
  for (int it = 0; it < nt; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < nt) issue(it + kStages - 1);
    cp_async_commit();
    const int t0 = (tile0 + it) * kTile;
    const int nc = min(kTile, p.Tc - t0);
    const char* st = smem + (it % kStages) * p.stage_bytes;
    // (word, prefix popcount) per 32-bit bitmap word: one thread per row of K (tid < 64) or V
    {
      const int r = threadIdx.x & (kTile - 1);
      const bool isv = threadIdx.x >= kTile;
      if (r < nc) {
        const uint32_t* bw = reinterpret_cast<const uint32_t*>(st + (isv ? p.off_vbm : p.off_kbm)) + r * NW32;
        uint2* tr = tab + ((isv ? kTile : 0) + r) * NW32;
        uint32_t pre = (uint32_t)(r * (isv ? p.kv : p.kk));  // row base folded into the prefix
#pragma unroll
        for (int w = 0; w < NW32; ++w) {
          const uint32_t x = bw[w];
          tr[w] = make_uint2(x, pre);
          pre += __popc(x);
        }
      }
    }
    __syncthreads();
    const void* kv_s = st + p.off_kval;
    const void* vv_s = st + p.off_vval;

#pragma unroll 1
    for (int bb = 0; bb < 16 / kBatch; ++bb) {
      const int r0 = warp * 16 + bb * kBatch;  // row within tile
      const int tb = t0 + r0;                  // first absolute row of the batch
      if (tb >= Tall || tb + kBatch <= ks) continue;
      // ---- scores for kBatch rows
      float part[GT][kBatch];
      const bool all_comp = tb + kBatch <= p.Tc;  // fast path: 8 packed rows, no per-row branches
      if (all_comp) {
        uint2 e[kBatch];
#pragma unroll
        for (int r = 0; r < kBatch; ++r) e[r] = tab[(r0 + r) * NW32 + word_of_lane];
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          const uint32_t nib = (e[r].x >> shift_of_lane) & ((1u << CPL) - 1u);
          const uint32_t a = e[r].y + __popc(e[r].x & lowmask);
          if constexpr (kHalfMath) {
            // fp16 products of the lane's CPL channels (one half2 FMA per pair), summed in fp32
            uint32_t h[CPL / 2];
            expand_raw16<CPL>(kv_s, a, nib, lut, h);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
              __half2 acc = __hmul2(as_h2(h[0]), qh[g][0]);
#pragma unroll
              for (int j = 1; j < CPL / 2; ++j) acc = __hfma2(as_h2(h[j]), qh[g][j], acc);
              const float2 f2 = __half22float2(acc);
              part[g][r] = f2.x + f2.y;
            }
          } else {
            float f[CPL];
            expand_row<T, CPL>(kv_s, a, nib, lut, f);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
              float s = 0.f;
#pragma unroll
              for (int j = 0; j < CPL; ++j) s = fmaf(f[j], qf[g][j], s);
              part[g][r] = s;
            }
          }
        }
      } else {
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          const int t = tb + r;
          float f[CPL];
          if (t < p.Tc) {
            const uint2 e = tab[(r0 + r) * NW32 + word_of_lane];
            const uint32_t nib = (e.x >> shift_of_lane) & ((1u << CPL) - 1u);
            const uint32_t a = e.y + __popc(e.x & lowmask);
            expand_row<T, CPL>(kv_s, a, nib, lut, f);
          } else if (t < Tall) {
            load_dense<T, CPL>(sl.kwin + (int64_t)(t - p.Tc) * p.kwin_st + lane * CPL, f);
          } else {
#pragma unroll
            for (int j = 0; j < CPL; ++j) f[j] = 0.f;
          }
#pragma unroll
          for (int g = 0; g < GT; ++g) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < CPL; ++j) s = fmaf(f[j], qf[g][j], s);
            part[g][r] = s;
          }
        }
      }
      // ---- reduce-scatter: lane ends with the full score of row rho = (lane >> 2) & 7
      const int rho = (lane >> 2) & 7;
      const bool valid = (tb + rho < Tall) && (tb + rho >= ks);
      float pr[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float u[4], w2[2];
        const bool h16 = lane & 16, h8 = lane & 8, h4 = lane & 4;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float send = h16 ? part[g][i] : part[g][i + 4];
          const float keep = h16 ? part[g][i + 4] : part[g][i];
          u[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float send = h8 ? u[i] : u[i + 2];
          const float keep = h8 ? u[i + 2] : u[i];
          w2[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
        }
        float x;
        {
          const float send = h4 ? w2[0] : w2[1];
          const float keep = h4 ? w2[1] : w2[0];
          x = keep + __shfl_xor_sync(0xffffffffu, send, 4);
        }
        x += __shfl_xor_sync(0xffffffffu, x, 2);
        x += __shfl_xor_sync(0xffffffffu, x, 1);
        const float s = valid ? x : -INFINITY;
        float bm = s;
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 4));
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 8));
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 16));
        const float mn = fmaxf(m[g], bm);
        const float mu = (mn == -INFINITY) ? 0.f : mn;
        const float alpha = exp2f(m[g] - mu);
        pr[g] = exp2f(s - mu);
        l[g] = l[g] * alpha + pr[g];
        m[g] = mn;
#pragma unroll
        for (int j = 0; j < CPL; ++j) o[g][j] *= alpha;
      }
      // ---- values
      if (all_comp) {
        uint2 e[kBatch];
#pragma unroll
        for (int r = 0; r < kBatch; ++r) e[r] = tab[(kTile + r0 + r) * NW32 + word_of_lane];
if constexpr (kHalfMath) {
          // p * v for the batch's 8 rows accumulated in half2, added to the fp32 output once
          __half2 acc[GT][CPL / 2];
#pragma unroll
          for (int g = 0; g < GT; ++g)
#pragma unroll
            for (int j = 0; j < CPL / 2; ++j) acc[g][j] = __float2half2_rn(0.f);
#pragma unroll
          for (int r = 0; r < kBatch; ++r) {
            const uint32_t nib = (e[r].x >> shift_of_lane) & ((1u << CPL) - 1u);
            const uint32_t a = e[r].y + __popc(e[r].x & lowmask);
            uint32_t h[CPL / 2];
            expand_raw16<CPL>(vv_s, a, nib, lut, h);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
              const __half2 pg = __float2half2_rn(__shfl_sync(0xffffffffu, pr[g], r * 4));
#pragma unroll
              for (int j = 0; j < CPL / 2; ++j) acc[g][j] = __hfma2(pg, as_h2(h[j]), acc[g][j]);
            }
          }
#pragma unroll
          for (int g = 0; g < GT; ++g)
#pragma unroll
            for (int j = 0; j < CPL / 2; ++j) {
              const float2 f2 = __half22float2(acc[g][j]);
              o[g][2 * j] += f2.x;
              o[g][2 * j + 1] += f2.y;
            }
        } else {
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          float f[CPL];
          const uint32_t nib = (e[r].x >> shift_of_lane) & ((1u << CPL) - 1u);
          const uint32_t a = e[r].y + __popc(e[r].x & lowmask);
          expand_row<T, CPL>(vv_s, a, nib, lut, f);
#pragma unroll
          for (int g = 0; g < GT; ++g) {
            const float pg = __shfl_sync(0xffffffffu, pr[g], r * 4);
#pragma unroll
            for (int j = 0; j < CPL; ++j) o[g][j] = fmaf(pg, f[j], o[g][j]);
          }
        }
        }
      } else {
#pragma unroll
        for (int r = 0; r < kBatch; ++r) {
          const int t = tb + r;
          if (t >= Tall) break;
          float f[CPL];
          if (t < p.Tc) {
            const uint2 e = tab[(kTile + r0 + r) * NW32 + word_of_lane];
            const uint32_t nib = (e.x >> shift_of_lane) & ((1u << CPL) - 1u);
            const uint32_t a = e.y + __popc(e.x & lowmask);
            expand_row<T, CPL>(vv_s, a, nib, lut, f);
          } else {
            load_dense<T, CPL>(sl.vwin + (int64_t)(t - p.Tc) * p.vwin_st + lane * CPL, f);
          }
#pragma unroll
          for (int g = 0; g < GT; ++g) {
            const float pg = __shfl_sync(0xffffffffu, pr[g], r * 4);
#pragma unroll
            for (int j = 0; j < CPL; ++j) o[g][j] = fmaf(pg, f[j], o[g][j]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- this warp's partial: l summed over the 8 distinct rows (lanes differing in bits 2..4)
  const int NP = p.nsplit * kWarps;
  const int pidx = split * kWarps + warp;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    float lt = l[g];
    lt += __shfl_xor_sync(0xffffffffu, lt, 4);
    lt += __shfl_xor_sync(0xffffffffu, lt, 8);
    lt += __shfl_xor_sync(0xffffffffu, lt, 16);
    const int64_t base = ((int64_t)b * p.Hkv * p.G + hq0 + g) * NP + pidx;
    float* op = p.ws_o + base * D + lane * CPL;
#pragma unroll
    for (int j = 0; j < CPL; ++j) op[j] = o[g][j];
    if (lane == 0) {
      p.ws_ml[base * 2] = m[g];
      p.ws_ml[base * 2 + 1] = lt;
    }
  }
}


// host launcher of the fused decode (one translation unit per dtype, so they compile in parallel)
template <typename T>
void launch_v4(const V4Params& p, int D, int GT, int smem_bytes, dim3 grid, cudaStream_t stream);

// resident CTAs per SM of the fused kernel (for choosing the number of splits)
template <typename T>
int v4_blocks_per_sm(int D, int GT, int smem_bytes);

template <typename T, int D, int GT>
int sd_occ_one(int smem_bytes) {
  auto kern = sparse_decode_kernel<T, D, GT>;
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kWarps * 32, smem_bytes));
  return n > 0 ? n : 1;
}

template <typename T, int D, int GT>
void launch_sd_one(const V4Params& p, int smem_bytes, dim3 grid, cudaStream_t stream) {
  auto kern = sparse_decode_kernel<T, D, GT>;
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  kern<<<grid, kWarps * 32, smem_bytes, stream>>>(p);
  MF_CHECK_LAUNCH();
}

#define MUSTAFAR_DEFINE_V4_LAUNCHER(TYPE)                                                                     \
  template <>                                                                                               \
  int v4_blocks_per_sm<TYPE>(int D, int GT, int smem_bytes) {                                    \
    if (D == 64) return GT == 4 ? sd_occ_one<TYPE, 64, 4>(smem_bytes)                                       \
                      : GT == 2 ? sd_occ_one<TYPE, 64, 2>(smem_bytes) : sd_occ_one<TYPE, 64, 1>(smem_bytes);  \
    return GT == 4 ? sd_occ_one<TYPE, 128, 4>(smem_bytes)                                                   \
         : GT == 2 ? sd_occ_one<TYPE, 128, 2>(smem_bytes) : sd_occ_one<TYPE, 128, 1>(smem_bytes);           \
  }                                                                                                         \
  template <>                                                                                               \
  void launch_v4<TYPE>(const V4Params& p,       int D, int GT, int smem_bytes, dim3 grid,              \
                                  cudaStream_t stream) {                                                    \
    if (D == 64) {                                                                                          \
      if (GT == 4) launch_sd_one<TYPE, 64, 4>(p, smem_bytes, grid, stream);                                 \
      else if (GT == 2) launch_sd_one<TYPE, 64, 2>(p, smem_bytes, grid, stream);                            \
      else launch_sd_one<TYPE, 64, 1>(p, smem_bytes, grid, stream);                                         \
    } else {                                                                                                \
      if (GT == 4) launch_sd_one<TYPE, 128, 4>(p, smem_bytes, grid, stream);                                \
      else if (GT == 2) launch_sd_one<TYPE, 128, 2>(p, smem_bytes, grid, stream);                           \
      else launch_sd_one<TYPE, 128, 1>(p, smem_bytes, grid, stream);                                        \
    }                                                                                                       \
    MF_CHECK_LAUNCH();                                                                                      \
  }

}  // namespace mustafar_cuda
