// Static SASS count of two ways to find the channels of a row's stored values and scatter the values into a
// warp's dense tile (issue #15: instructions per stored value). Not part of the extension (csrc/cuda/*.cu is);
// scripts/position_walk_sass.py compiles this file for sm_90a with nvcc and counts each kernel's SASS
// instructions with cuobjdump, so it needs no GPU. Both kernels: one warp per 32-row tile, lane = row, values
// 16-bit, the tile Vd[channel][token] of v6 (80-byte channel lines, line D a dummy), S statically unrolled
// steps; then each lane sums one column so that the stores are live.
//
//  * bitmap_walk<D, S>: the paper's bitmap, walked as v6 does on "fast" rows (every 32-bit word non-empty):
//    the lowest set bit of the current word, cleared; when the word empties the next one from a queue of
//    D / 32 words (selects);
//  * gap_walk<D, S>: 4-bit gap codes with filler slots: each of the S = k + E slots holds the number of
//    pruned channels (0-15) before it; a gap over 15 is bridged by a filler slot (value 0 at a pruned channel),
//    unused fillers sit in other pruned channels, so every row has exactly S slots and no escapes to decode
//    (mustafar.analysis.position_codes measures how many fillers real K / V rows need). The codes are stored
//    low nibbles first (slots 0-3 of a word in its low nibbles, 4-7 in its high nibbles) so that one IMAD by
//    0x01010101 gives four prefix sums at once;
//  * index_walk<D, S>: one channel byte per value (no fillers: S = k).
#include <cuda_fp16.h>

#include <cstdint>

namespace proto {

constexpr int kLine = 80;

// a 16-bit store to a shared-memory address (32-bit, as v6 keeps its tile addresses)
__device__ __forceinline__ void sts16(uint32_t addr, uint16_t x) {
  asm volatile("st.shared.u16 [%0], %1;" ::"r"(addr), "h"(x) : "memory");
}

// the lane's column summed (fp16 values), then zeroed for the next tile (v6 zeroes its tile the same way)
template <int D>
__device__ __forceinline__ float consume(char* tile, int lane) {
  float s = 0.f;
#pragma unroll 4
  for (int c = 0; c < D; ++c) {
    __half* p = reinterpret_cast<__half*>(tile + c * kLine + 2 * lane);
    s += __half2float(*p);
    *p = __float2half(0.f);
  }
  return s;
}

// the frame the kernels share: per tile, lane = row, the row's NP position words and (S + 1) / 2 value words
// loaded to registers (word-major tiles), walk(pos, vals, tile address of this lane's column) scatters them (volatile stores: never
// removed); tile t reads the rows of tile t % tiles_data; with check != 0 each lane then sums its column and zeroes it (the timed runs leave that out, so that
// they time the walk and the scatter alone)
template <int D, int S, int NP, class Walk>
__device__ __forceinline__ void tiles(const uint32_t* __restrict__ pos, const uint32_t* __restrict__ vals, float* out,
                                      int ntiles, int tiles_data, int check, Walk walk) {
  extern __shared__ __align__(16) char smem[];
  constexpr int NV = (S + 1) / 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  char* tile = smem + warp * (D + 1) * kLine;
  for (int c = 0; c <= D; ++c) *reinterpret_cast<__half*>(tile + c * kLine + 2 * lane) = __float2half(0.f);
  __syncwarp();
  const uint32_t tsh = (uint32_t)__cvta_generic_to_shared(tile) + 2 * lane;
  float acc = 0.f;
  for (int t = blockIdx.x * (blockDim.x >> 5) + warp; t < ntiles; t += gridDim.x * (blockDim.x >> 5)) {
    const int td = t % tiles_data;  // tiles_data < ntiles: the same rows again (L2-resident)
    // word-major tiles (scripts/position_walk_bench.py, word_major): word i of the tile's 32 rows side by side, so
    // each load instruction reads 128 contiguous bytes (row-major rows made every load touch 32 sectors, and the
    // session-15 timing measured those loads, not the walks)
    uint32_t p[NP], v[NV];
#pragma unroll
    for (int i = 0; i < NP; ++i) p[i] = pos[(td * NP + i) * 32 + lane];
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = vals[(td * NV + i) * 32 + lane];
    walk(p, v, tsh);
    __syncwarp();
    if (check) acc += consume<D>(tile, lane);
    __syncwarp();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

template <int D, int S>
__global__ void bitmap_walk(const uint32_t* __restrict__ bm, const uint32_t* __restrict__ vals, float* out, int ntiles,
                            int tiles_data, int check) {
  constexpr int NW = D / 32;
  tiles<D, S, NW>(bm, vals, out, ntiles, tiles_data, check, [](uint32_t (&q)[NW], const uint32_t (&v)[(S + 1) / 2], uint32_t tsh) {
    uint32_t cur = q[0];
    int base = 0;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const int c = base + __ffs(cur) - 1;
      const uint16_t x = (j & 1) ? (uint16_t)(v[j / 2] >> 16) : (uint16_t)v[j / 2];
      sts16(tsh + (uint32_t)(c * kLine), x);
      cur &= cur - 1;
      const bool adv = cur == 0u;  // the queue: next word (fast rows: none is empty)
      cur = adv ? q[1] : cur;
#pragma unroll
      for (int i = 1; i + 1 < NW; ++i) q[i] = adv ? q[i + 1] : q[i];
      base += adv ? 32 : 0;
    }
  });
}

template <int D, int S>
__global__ void gap_walk(const uint32_t* __restrict__ codes, const uint32_t* __restrict__ vals, float* out, int ntiles,
                            int tiles_data, int check) {
  constexpr int NC = (S + 7) / 8;  // code words per row
  tiles<D, S, NC>(codes, vals, out, ntiles, tiles_data, check, [](const uint32_t (&w)[NC], const uint32_t (&v)[(S + 1) / 2], uint32_t base) {
    // slot j's channel = (sum of the codes of slots 0..j) + j: the address of slot j is
    // base + kLine * (prefix_j) + kLine * j, the last term an immediate of the store
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const uint32_t lo = (w[i] & 0x0f0f0f0fu) * 0x01010101u;  // prefix sums of slots 8i .. 8i+3 (bytes)
      // ... of slots 8i+4 .. 8i+7, plus the four before (each byte <= 8 x 15 = 120: no carry)
      const uint32_t hi = ((w[i] >> 4) & 0x0f0f0f0fu) * 0x01010101u + (lo >> 24) * 0x01010101u;
#pragma unroll
      for (int u = 0; u < 8 && 8 * i + u < S; ++u) {
        const int j = 8 * i + u;
        const int pre = (int)__byte_perm(u < 4 ? lo : hi, 0u, 0x4440u + (u & 3));  // one PRMT
        const uint16_t x = (j & 1) ? (uint16_t)(v[j / 2] >> 16) : (uint16_t)v[j / 2];
        sts16(base + (uint32_t)(kLine * pre + kLine * j), x);
      }
      base += (uint32_t)(kLine * (int)(hi >> 24));
    }
  });
}

template <int D, int S>
__global__ void index_walk(const uint32_t* __restrict__ idx, const uint32_t* __restrict__ vals, float* out, int ntiles,
                            int tiles_data, int check) {
  constexpr int NI = (S + 3) / 4;  // index words per row (one channel byte per value)
  tiles<D, S, NI>(idx, vals, out, ntiles, tiles_data, check, [](const uint32_t (&w)[NI], const uint32_t (&v)[(S + 1) / 2], uint32_t base) {
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const int c = (int)__byte_perm(w[j / 4], 0u, 0x4440u + (j & 3));  // one PRMT
      const uint16_t x = (j & 1) ? (uint16_t)(v[j / 2] >> 16) : (uint16_t)v[j / 2];
      sts16(base + (uint32_t)(kLine * c), x);
    }
  });
}

// the instantiations: the SASS count's pairs and the timed configurations (D = 128: k = 38 / 64 at 70 / 50 %,
// gap-code slots k + (D - k) // 16 = 43 / 68; D = 64: k = 19 / 32, slots 21 / 34)
#define PROTO_WALK(K, D, S) template __global__ void K<D, S>(const uint32_t*, const uint32_t*, float*, int, int, int);
PROTO_WALK(bitmap_walk, 128, 38)
PROTO_WALK(bitmap_walk, 128, 40)
PROTO_WALK(bitmap_walk, 128, 64)
PROTO_WALK(bitmap_walk, 64, 19)
PROTO_WALK(bitmap_walk, 64, 32)
PROTO_WALK(gap_walk, 128, 40)
PROTO_WALK(gap_walk, 128, 43)
PROTO_WALK(gap_walk, 128, 64)
PROTO_WALK(gap_walk, 128, 68)
PROTO_WALK(gap_walk, 64, 19)
PROTO_WALK(gap_walk, 64, 21)
PROTO_WALK(gap_walk, 64, 32)
PROTO_WALK(gap_walk, 64, 34)
PROTO_WALK(index_walk, 128, 38)
PROTO_WALK(index_walk, 128, 40)
PROTO_WALK(index_walk, 128, 64)
PROTO_WALK(index_walk, 64, 19)
PROTO_WALK(index_walk, 64, 32)
#undef PROTO_WALK

}  // namespace proto
