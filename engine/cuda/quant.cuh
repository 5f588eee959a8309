// The weight types a GPU engine reads, as GGUF stores them (llama.cpp's block layouts):
// f32, f16, bf16; Q8_0 and Q4_0 (blocks of 32); Q4_K and Q6_K (super-blocks of 256 in
// eight groups of 32). A row of a quantized matrix is its blocks one after another.
#pragma once
#include "common.cuh"

// Weights per storage block and its bytes; 0 for a type the GPU engine does not read.
__host__ __device__ __forceinline__ uint32_t ifn_block_elems(uint32_t dtype) {
  switch (dtype) {
    case IFN_DTYPE(F32): case IFN_DTYPE(F16): case IFN_DTYPE(BF16): return 1;
    case IFN_DTYPE(Q8_0): case IFN_DTYPE(Q4_0): return 32;
    case IFN_DTYPE(Q4_K): case IFN_DTYPE(Q6_K): return 256;
    default: return 0;
  }
}

__host__ __device__ __forceinline__ uint32_t ifn_block_bytes(uint32_t dtype) {
  switch (dtype) {
    case IFN_DTYPE(F32): return 4;
    case IFN_DTYPE(F16): case IFN_DTYPE(BF16): return 2;
    case IFN_DTYPE(Q8_0): return 34;
    case IFN_DTYPE(Q4_0): return 18;
    case IFN_DTYPE(Q4_K): return 144;
    case IFN_DTYPE(Q6_K): return 210;
    default: return 0;
  }
}

__host__ __device__ __forceinline__ uint64_t ifn_row_bytes(uint32_t dtype, uint32_t cols) {
  return (uint64_t)cols / ifn_block_elems(dtype) * ifn_block_bytes(dtype);
}

__host__ __device__ __forceinline__ bool ifn_is_quantized(uint32_t dtype) { return ifn_block_elems(dtype) > 1; }

__device__ __forceinline__ float ifn_half_at(const uint8_t* p) { return ifn_f16(*reinterpret_cast<const uint16_t*>(p)); }

// Q4_K's 6-bit scale and min of group j (0..7) of a super-block, from its 12 packed bytes.
__device__ __forceinline__ void ifn_q4k_scale_min(const uint8_t* s, int j, float* sc, float* m) {
  if (j < 4) {
    *sc = (float)(s[j] & 63);
    *m = (float)(s[j + 4] & 63);
  } else {
    *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// The 32 weights of group g (elements 32g .. 32g + 31) of a quantized row.
__device__ __forceinline__ void ifn_dequant_group(const uint8_t* row, uint32_t dtype, uint32_t g, float out[32]) {
  if (dtype == IFN_DTYPE(Q8_0)) {
    const uint8_t* b = row + (uint64_t)g * 34;
    const float d = ifn_half_at(b);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int l = 0; l < 32; l++) out[l] = d * (float)q[l];
  } else if (dtype == IFN_DTYPE(Q4_0)) {
    const uint8_t* b = row + (uint64_t)g * 18;
    const float d = ifn_half_at(b);
    for (int l = 0; l < 16; l++) {
      out[l] = d * (float)((b[2 + l] & 0xF) - 8);
      out[l + 16] = d * (float)((b[2 + l] >> 4) - 8);
    }
  } else if (dtype == IFN_DTYPE(Q4_K)) {
    const uint8_t* b = row + (uint64_t)(g / 8) * 144;
    const int j = g % 8;
    float sc, m;
    ifn_q4k_scale_min(b + 4, j, &sc, &m);
    const float d = ifn_half_at(b) * sc, dm = ifn_half_at(b + 2) * m;
    const uint8_t* q = b + 16 + 32 * (j / 2);
    const int shift = (j % 2) * 4;
    for (int l = 0; l < 32; l++) out[l] = d * (float)((q[l] >> shift) & 0xF) - dm;
  } else {  // Q6_K
    const uint8_t* b = row + (uint64_t)(g / 8) * 210;
    const int j = g % 8, h = j / 4, k = j % 4;
    const uint8_t* ql = b + 64 * h + (k & 1) * 32;
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + 2 * k;
    const float d = ifn_half_at(b + 208);
    const int lo_shift = (k >= 2) * 4, hi_shift = 2 * k;
    for (int l = 0; l < 32; l++) {
      const int q = (((ql[l] >> lo_shift) & 0xF) | (((qh[l] >> hi_shift) & 3) << 4)) - 32;
      out[l] = d * (float)sc[l / 16] * (float)q;
    }
  }
}

// Element i of a row of any type this engine reads.
__device__ __forceinline__ float ifn_dequant(const void* row, uint32_t dtype, uint32_t i) {
  if (!ifn_is_quantized(dtype)) return ifn_load_float(row, dtype, i);
  float group[32];
  ifn_dequant_group(static_cast<const uint8_t*>(row), dtype, i / 32, group);
  return group[i % 32];
}
