#pragma once
// The CTA tile of v4 and v5: 4 warps, 64-row tiles of packed values and bitmap words staged into shared
// memory through a 3-stage cp.async pipeline (Stage64Layout: where a stage's pieces lie).
#include "common.cuh"

namespace mustafar_cuda {

constexpr int kTile = 64;     // rows per pipeline stage
constexpr int kWarps = 4;     // warps per CTA; warp w takes rows [16w, 16w+16) of a tile
constexpr int kStages = 3;    // cp.async pipeline depth

// shared memory layout of one pipeline stage (bytes); kstride / vstride: bytes per staged value row when
// rows are copied as 16-byte chunks (v5's kVmOct), unused otherwise
struct Stage64Layout {
  int off_kval, off_vval, off_kbm, off_vbm, stage_bytes;
  int kstride, vstride;
};

template <typename T>
__device__ __forceinline__ void stage_copy(char* dst, const char* src, int bytes, bool vec16) {
  const int tid = threadIdx.x;
  int done = 0;
  if (vec16) {
    const int n16 = bytes >> 4;
    for (int i = tid; i < n16; i += kWarps * 32) cp_async16(dst + 16 * i, src + 16 * i);
    done = n16 << 4;
  }
  const int rem = (bytes - done) / (int)sizeof(T);
  const T* s = reinterpret_cast<const T*>(src + done);
  T* d = reinterpret_cast<T*>(dst + done);
  for (int i = tid; i < rem; i += kWarps * 32) d[i] = s[i];
}

// stage rows of kc 16-byte chunks each into rows of `stride` bytes (v5's 16-byte value groups)
__device__ __forceinline__ void stage_rows16(char* dst, const char* src, int nc, int kc, int stride) {
  const int tid = threadIdx.x;
  const int rstep = (kWarps * 32) / kc;
  const int r0 = tid / kc, c = tid - r0 * kc;
  if (r0 >= rstep) return;
  for (int r = r0; r < nc; r += rstep) cp_async16(dst + r * stride + 16 * c, src + (int64_t)r * kc * 16 + 16 * c);
}

// Stage compressed tile `tile` (rows [64 tile, min(64 tile + 64, T_c))) into stage buffer `buf`:
// the packed K and V values (as stored, or with kRows16 as rows of p.kstride / p.vstride bytes)
// and the bitmap words (8-byte cp.async); the whole CTA takes part. P: a params struct deriving from
// SDParams and Stage64Layout.
template <int W, bool kRows16, typename T, typename P>
__device__ __forceinline__ void stage_tile64(const SDSlice<T>& sl, char* smem, const P& p, int tile, int buf) {
  const int t0 = tile * kTile;
  const int nc = min(kTile, p.Tc - t0);
  if (nc <= 0) return;
  char* st = smem + buf * p.stage_bytes;
  const char* ks = sl.kval + (int64_t)t0 * p.kk * sizeof(T);
  const char* vs = sl.vval + (int64_t)t0 * p.kv * sizeof(T);
  if constexpr (kRows16) {
    stage_rows16(st + p.off_kval, ks, nc, p.kk / 8, p.kstride);
    stage_rows16(st + p.off_vval, vs, nc, p.kv / 8, p.vstride);
  } else {
    stage_copy<T>(st + p.off_kval, ks, nc * p.kk * (int)sizeof(T), p.vec16);
    stage_copy<T>(st + p.off_vval, vs, nc * p.kv * (int)sizeof(T), p.vec16);
  }
  for (int i8 = threadIdx.x; i8 < 2 * nc * W; i8 += kWarps * 32) {
    const bool isv = i8 >= nc * W;
    const int j = isv ? i8 - nc * W : i8;
    cp_async8(st + (isv ? p.off_vbm : p.off_kbm) + 8 * j, (isv ? sl.vbm : sl.kbm) + (int64_t)t0 * W + j);
  }
}

}  // namespace mustafar_cuda
