// q, k and v of each token, in place in its qkv row: biases (Qwen 2), RMSNorm over each q and
// k head (Qwen 3, Gemma 3), then RoPE of q and k at the token's position. One warp a head.
#include "common.cuh"

namespace {
constexpr int kWarps = 8;

__global__ void rope_kernel(float* qkv, const int32_t* positions, ifn_cu_rope_args a) {
  const uint32_t t = blockIdx.x;
  const uint32_t hd = a.head_dim, half = hd / 2;
  const uint32_t q_dim = a.num_heads * hd, kv_dim = a.num_kv_heads * hd;
  float* row = qkv + (uint64_t)t * (q_dim + 2 * kv_dim);
  const int lane = threadIdx.x % 32;
  const float* cos = a.cos + (uint64_t)positions[t] * half;
  const float* sin = a.sin + (uint64_t)positions[t] * half;
  const uint32_t heads = a.num_heads + 2 * a.num_kv_heads;
  for (uint32_t h = threadIdx.x / 32; h < heads; h += kWarps) {
    const uint32_t at = h * hd;  // q heads, then k heads, then v heads
    float* x = row + at;
    const float* bias = a.bias ? a.bias + at : nullptr;
    if (h >= a.num_heads + a.num_kv_heads) {  // v: its bias only
      if (bias)
        for (uint32_t i = lane; i < hd; i += 32) x[i] += bias[i];
      continue;
    }
    const float* norm = h < a.num_heads ? a.q_norm : a.k_norm;
    float inv = 1.0f;
    if (norm) {
      float ss = 0;
      for (uint32_t i = lane; i < hd; i += 32) {
        const float v = x[i] + (bias ? bias[i] : 0.0f);
        ss += v * v;
      }
      inv = rsqrtf(ifn_warp_sum(ss) / (float)hd + a.eps);
    }
    __syncwarp();
    for (uint32_t p = lane; p < half; p += 32) {
      const uint32_t i0 = a.interleaved ? 2 * p : p, i1 = a.interleaved ? 2 * p + 1 : p + half;
      float x0 = x[i0] + (bias ? bias[i0] : 0.0f), x1 = x[i1] + (bias ? bias[i1] : 0.0f);
      if (norm) {
        x0 *= inv * norm[i0];
        x1 *= inv * norm[i1];
      }
      x[i0] = x0 * cos[p] - x1 * sin[p];
      x[i1] = x0 * sin[p] + x1 * cos[p];
    }
    __syncwarp();
  }
}

template <class KV>
__device__ __forceinline__ void store(KV* cache, uint64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(float* cache, uint64_t i, float v) {
  cache[i] = v;
}
template <>
__device__ __forceinline__ void store<uint16_t>(uint16_t* cache, uint64_t i, float v) {
  cache[i] = ifn_to_f16(v);
}

template <class KV>
__global__ void kv_write_kernel(KV* k_cache, KV* v_cache, const float* qkv, uint32_t qkv_stride, uint32_t k_offset,
                                uint32_t v_offset, const int32_t* slots, uint32_t num_kv_heads, uint32_t head_dim,
                                uint32_t block_size) {
  const uint32_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const uint64_t block = (uint64_t)slot / block_size, offset = (uint64_t)slot % block_size;
  const float* row = qkv + (uint64_t)t * qkv_stride;
  const uint32_t kv_dim = num_kv_heads * head_dim;
  for (uint32_t i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    const uint32_t h = i / head_dim, d = i % head_dim;
    const uint64_t at = ((block * num_kv_heads + h) * block_size + offset) * head_dim + d;
    store<KV>(k_cache, at, row[k_offset + i]);
    store<KV>(v_cache, at, row[v_offset + i]);
  }
}
}  // namespace

extern "C" int32_t ifn_cu_rope(float* qkv, uint32_t n, const int32_t* positions, const ifn_cu_rope_args* a,
                               ifn_cu_stream s) {
  if (n == 0) return 0;
  IFN_LAUNCH(rope_kernel, n, kWarps * 32, 0, s)(qkv, positions, *a);
  return ifn_launched();
}

extern "C" int32_t ifn_cu_kv_write(void* k_cache, void* v_cache, uint32_t kv_dtype, const float* qkv,
                                   uint32_t qkv_stride, uint32_t k_offset, uint32_t v_offset,
                                   const int32_t* slot_mapping, uint32_t n, uint32_t num_kv_heads, uint32_t head_dim,
                                   uint32_t block_size, ifn_cu_stream s) {
  if (n == 0) return 0;
  if (kv_dtype == IFN_DTYPE(F32))
    IFN_LAUNCH(kv_write_kernel<float>, n, 128, 0, s)(static_cast<float*>(k_cache), static_cast<float*>(v_cache),
                                                     qkv, qkv_stride, k_offset, v_offset, slot_mapping,
                                                     num_kv_heads, head_dim, block_size);
  else if (kv_dtype == IFN_DTYPE(F16))
    IFN_LAUNCH(kv_write_kernel<uint16_t>, n, 128, 0, s)(static_cast<uint16_t*>(k_cache),
                                                        static_cast<uint16_t*>(v_cache), qkv, qkv_stride, k_offset,
                                                        v_offset, slot_mapping, num_kv_heads, head_dim, block_size);
  else
    return (int32_t)cudaErrorInvalidValue;
  return ifn_launched();
}
