// Attention over the paged KV cache, (block, kv_head, block_size, head_dim) per layer.
//
// Decode: one block per (query token, KV head, split of split_len positions); the
// query heads that share the KV head (GQA) read each K and V row once. 128 positions at a
// time: a thread a position for the scores, then the weighted V with threads over the
// outputs; an online softmax across chunks; splits are merged by decode_reduce.
//
// Prefill: one block per (tile of consecutive queries of a sequence, KV head), at most
// kTileRows rows of (query, head); K and V go through shared memory a chunk at a time with
// an online softmax, causal and, with a window, over the last `window` positions of each query.
#include "common.cuh"

namespace {
constexpr int kThreads = 128;
constexpr int kChunk = 128;      // decode: positions a chunk
constexpr int kTileRows = 32;    // prefill: rows (query x head of the group) a tile
constexpr int kHeadsMax = 32;    // decode: query heads a KV head may serve

template <class KV>
__device__ __forceinline__ float kv_at(const KV* p, uint64_t i);
template <>
__device__ __forceinline__ float kv_at<float>(const float* p, uint64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float kv_at<uint16_t>(const uint16_t* p, uint64_t i) {
  return ifn_f16(p[i]);
}

__device__ __forceinline__ uint32_t window_start(uint32_t pos, uint32_t window) {
  return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}

// Where position p of a sequence's KV head h starts, in elements.
__device__ __forceinline__ uint64_t kv_row(const int32_t* table, uint32_t p, uint32_t h, const ifn_cu_attn_args& a) {
  const uint64_t block = (uint64_t)table[p / a.block_size];
  return ((block * a.num_kv_heads + h) * a.block_size + p % a.block_size) * a.head_dim;
}

__device__ __forceinline__ float shape_score(float s, float softcap) {
  return softcap != 0 ? softcap * tanhf(s / softcap) : s;
}

template <class KV>
__global__ void decode_kernel(ifn_cu_attn_args a, const int32_t* tokens, uint32_t max_splits, uint32_t split_len,
                              float* workspace) {
  const int32_t t = tokens[blockIdx.x];
  if (t < 0) return;
  const uint32_t kvh = blockIdx.y, split = blockIdx.z;
  const uint32_t g = a.num_heads / a.num_kv_heads, hd = a.head_dim;
  const uint32_t pos = (uint32_t)a.positions[t];
  const uint32_t start = window_start(pos, a.window), end = pos + 1;
  const uint32_t begin = start + split * split_len;
  if (begin >= end) return;
  const uint32_t stop = begin + split_len < end ? begin + split_len : end;
  const int32_t* table = a.block_tables + (uint64_t)a.seq_of_token[t] * a.max_blocks_per_seq;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);

  IFN_DYNAMIC_SHARED(float, smem);
  float* q = smem;                 // (g, hd), scaled
  float* acc = q + g * hd;         // (g, hd)
  float* sc = acc + g * hd;        // (g, kChunk)
  float* m = sc + g * kChunk;      // (g)
  float* l = m + g;                // (g)
  float* corr = l + g;             // (g)
  const float* qt = a.q + (uint64_t)t * a.q_stride + (uint64_t)kvh * g * hd;
  for (uint32_t i = threadIdx.x; i < g * hd; i += blockDim.x) {
    q[i] = qt[i] * a.scale;
    acc[i] = 0;
  }
  for (uint32_t h = threadIdx.x; h < g; h += blockDim.x) {
    m[h] = -INFINITY;
    l[h] = 0;
  }
  __syncthreads();
  for (uint32_t c0 = begin; c0 < stop; c0 += kChunk) {
    const uint32_t n = stop - c0 < (uint32_t)kChunk ? stop - c0 : kChunk;
    if (threadIdx.x < n) {  // scores: a thread a position, every head of the group
      const uint64_t row = kv_row(table, c0 + threadIdx.x, kvh, a);
      for (uint32_t h = 0; h < g; h++) {
        float s = 0;
        for (uint32_t d = 0; d < hd; d++) s += q[h * hd + d] * kv_at<KV>(kc, row + d);
        sc[h * kChunk + threadIdx.x] = shape_score(s, a.softcap);
      }
    }
    __syncthreads();
    for (uint32_t h = threadIdx.x; h < g; h += blockDim.x) {  // online softmax, a thread a head
      float mx = m[h];
      for (uint32_t j = 0; j < n; j++) mx = fmaxf(mx, sc[h * kChunk + j]);
      float sum = 0;
      for (uint32_t j = 0; j < n; j++) {
        const float p = __expf(sc[h * kChunk + j] - mx);
        sc[h * kChunk + j] = p;
        sum += p;
      }
      corr[h] = __expf(m[h] - mx);  // 0 for the first chunk (m = -inf)
      l[h] = l[h] * corr[h] + sum;
      m[h] = mx;
    }
    __syncthreads();
    for (uint32_t o = threadIdx.x; o < g * hd; o += blockDim.x) {  // weighted V, threads over outputs
      const uint32_t h = o / hd, d = o % hd;
      float v = acc[o] * corr[h];
      for (uint32_t j = 0; j < n; j++) v += sc[h * kChunk + j] * kv_at<KV>(vc, kv_row(table, c0 + j, kvh, a) + d);
      acc[o] = v;
    }
    __syncthreads();
  }
  for (uint32_t o = threadIdx.x; o < g * hd; o += blockDim.x) {
    const uint32_t h = o / hd, d = o % hd;
    const uint32_t head = kvh * g + h;
    if (max_splits == 1) {
      a.out[(uint64_t)t * a.out_stride + head * hd + d] = acc[o] / l[h];
    } else {
      float* w = workspace + (((uint64_t)blockIdx.x * a.num_heads + head) * max_splits + split) * (hd + 2);
      w[d] = acc[o];
      if (d == 0) {
        w[hd] = m[h];
        w[hd + 1] = l[h];
      }
    }
  }
}

// Merges a decode's splits: each split's sums rescaled to the largest maximum.
__global__ void decode_reduce_kernel(ifn_cu_attn_args a, const int32_t* tokens, uint32_t max_splits,
                                     uint32_t split_len, const float* workspace) {
  const int32_t t = tokens[blockIdx.x];
  if (t < 0) return;
  const uint32_t head = blockIdx.y, hd = a.head_dim;
  const uint32_t pos = (uint32_t)a.positions[t];
  const uint32_t len = pos + 1 - window_start(pos, a.window);
  const uint32_t splits = (len + split_len - 1) / split_len;
  const float* w = workspace + ((uint64_t)blockIdx.x * a.num_heads + head) * max_splits * (hd + 2);
  float mx = -INFINITY;
  for (uint32_t s = 0; s < splits; s++) mx = fmaxf(mx, w[s * (hd + 2) + hd]);
  float total = 0;
  for (uint32_t s = 0; s < splits; s++) total += w[s * (hd + 2) + hd + 1] * __expf(w[s * (hd + 2) + hd] - mx);
  for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0;
    for (uint32_t s = 0; s < splits; s++) v += w[s * (hd + 2) + d] * __expf(w[s * (hd + 2) + hd] - mx);
    a.out[(uint64_t)t * a.out_stride + head * hd + d] = v / total;
  }
}

// K/V positions a prefill chunk takes: 4,096 values of each through shared memory.
__host__ __device__ __forceinline__ uint32_t prefill_chunk(uint32_t head_dim) {
  const uint32_t c = 4096 / head_dim;
  return c < 1 ? 1 : c > 64 ? 64 : c;
}

template <class KV>
__global__ void prefill_kernel(ifn_cu_attn_args a, const int32_t* first, const int32_t* count) {
  const uint32_t tile = blockIdx.x, kvh = blockIdx.y;
  const uint32_t g = a.num_heads / a.num_kv_heads, hd = a.head_dim;
  const uint32_t t0 = (uint32_t)first[tile], nq = (uint32_t)count[tile];
  const uint32_t rows = nq * g;  // row r: query r / g, head kvh * g + r % g
  const uint32_t pos0 = (uint32_t)a.positions[t0], last = pos0 + nq - 1;
  const uint32_t chunk = prefill_chunk(hd);
  const int32_t* table = a.block_tables + (uint64_t)a.seq_of_token[t0] * a.max_blocks_per_seq;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);

  IFN_DYNAMIC_SHARED(float, smem);
  float* q = smem;                     // (rows, hd), scaled
  float* ks = q + kTileRows * hd;      // (chunk, hd)
  float* vs = ks + chunk * hd;         // (chunk, hd)
  float* sc = vs + chunk * hd;         // (rows, chunk)
  float* m = sc + kTileRows * chunk;   // (rows)
  float* l = m + kTileRows;
  float* corr = l + kTileRows;
  for (uint32_t i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const uint32_t r = i / hd, d = i % hd;
    q[i] = a.q[(uint64_t)(t0 + r / g) * a.q_stride + (kvh * g + r % g) * hd + d] * a.scale;
  }
  for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0;
  }
  // A thread's share of the outputs: row threadIdx.x % rows, dims strided by the threads per row.
  const uint32_t per_row = blockDim.x / rows > 0 ? blockDim.x / rows : 1;
  const uint32_t my_row = threadIdx.x % rows, my_part = threadIdx.x / rows;
  const bool owner = threadIdx.x < per_row * rows;
  // At most 32 rows share 128 threads: 4 or more a row, so hd / 4 <= 64 dims a thread.
  float acc[64];
  const uint32_t my_dims = owner ? (hd - my_part + per_row - 1) / per_row : 0;
  for (uint32_t i = 0; i < my_dims; i++) acc[i] = 0;
  const uint32_t lo = window_start(pos0, a.window) / chunk * chunk;
  __syncthreads();
  for (uint32_t c0 = lo; c0 <= last; c0 += chunk) {
    const uint32_t n = last + 1 - c0 < chunk ? last + 1 - c0 : chunk;
    for (uint32_t i = threadIdx.x; i < n * hd; i += blockDim.x) {
      const uint64_t row = kv_row(table, c0 + i / hd, kvh, a);
      ks[i] = kv_at<KV>(kc, row + i % hd);
      vs[i] = kv_at<KV>(vc, row + i % hd);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < rows * n; i += blockDim.x) {
      const uint32_t r = i / n, j = i % n;
      const uint32_t qpos = pos0 + r / g, kpos = c0 + j;
      float s = -INFINITY;
      if (kpos <= qpos && kpos >= window_start(qpos, a.window)) {
        s = 0;
        for (uint32_t d = 0; d < hd; d++) s += q[r * hd + d] * ks[j * hd + d];
        s = shape_score(s, a.softcap);
      }
      sc[r * chunk + j] = s;
    }
    __syncthreads();
    for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) {
      float mx = m[r];
      for (uint32_t j = 0; j < n; j++) mx = fmaxf(mx, sc[r * chunk + j]);
      if (mx == -INFINITY) {  // nothing this row sees in the chunk
        corr[r] = 1;
        for (uint32_t j = 0; j < n; j++) sc[r * chunk + j] = 0;
        continue;
      }
      float sum = 0;
      for (uint32_t j = 0; j < n; j++) {
        const float p = __expf(sc[r * chunk + j] - mx);
        sc[r * chunk + j] = p;
        sum += p;
      }
      corr[r] = __expf(m[r] - mx);
      l[r] = l[r] * corr[r] + sum;
      m[r] = mx;
    }
    __syncthreads();
    if (owner) {
      for (uint32_t i = 0; i < my_dims; i++) {
        const uint32_t d = my_part + i * per_row;
        float v = acc[i] * corr[my_row];
        for (uint32_t j = 0; j < n; j++) v += sc[my_row * chunk + j] * vs[j * hd + d];
        acc[i] = v;
      }
    }
    __syncthreads();
  }
  if (!owner) return;
  float* o = a.out + (uint64_t)(t0 + my_row / g) * a.out_stride + (kvh * g + my_row % g) * hd;
  for (uint32_t i = 0; i < my_dims; i++) o[my_part + i * per_row] = acc[i] / l[my_row];
}

size_t decode_smem(uint32_t g, uint32_t hd) { return ((size_t)2 * g * hd + (size_t)g * kChunk + 3 * g) * sizeof(float); }
size_t prefill_smem(uint32_t hd) {
  const uint32_t c = prefill_chunk(hd);
  return ((size_t)kTileRows * hd + 2 * (size_t)c * hd + (size_t)kTileRows * c + 3 * kTileRows) * sizeof(float);
}
}  // namespace

extern "C" uint32_t ifn_cu_prefill_tile_queries(uint32_t num_heads, uint32_t num_kv_heads) {
  const uint32_t g = num_heads / num_kv_heads;
  const uint32_t q = kTileRows / g;
  return q < 1 ? 1 : q > IFN_CU_TILE_QUERIES ? IFN_CU_TILE_QUERIES : q;
}

extern "C" int32_t ifn_cu_attention_decode(const ifn_cu_attn_args* a, const int32_t* tokens, uint32_t n,
                                           uint32_t max_splits, uint32_t split_len, float* workspace,
                                           ifn_cu_stream s) {
  if (n == 0) return 0;
  const uint32_t g = a->num_heads / a->num_kv_heads;
  if (g > (uint32_t)kHeadsMax || max_splits == 0 || split_len == 0 || split_len % kChunk != 0)
    return (int32_t)cudaErrorInvalidValue;
  const size_t smem = decode_smem(g, a->head_dim);
  const dim3 grid(n, a->num_kv_heads, max_splits);
  if (a->kv_dtype == IFN_DTYPE(F32)) {
    cudaFuncSetAttribute(decode_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    IFN_LAUNCH(decode_kernel<float>, grid, kThreads, smem, s)(*a, tokens, max_splits, split_len, workspace);
  } else {
    cudaFuncSetAttribute(decode_kernel<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    IFN_LAUNCH(decode_kernel<uint16_t>, grid, kThreads, smem, s)(*a, tokens, max_splits, split_len, workspace);
  }
  int32_t e = ifn_launched();
  if (e != 0 || max_splits == 1) return e;
  IFN_LAUNCH(decode_reduce_kernel, dim3(n, a->num_heads), kThreads, 0, s)(*a, tokens, max_splits, split_len, workspace);
  return ifn_launched();
}

extern "C" int32_t ifn_cu_attention_prefill(const ifn_cu_attn_args* a, const int32_t* first, const int32_t* count,
                                            uint32_t n_tiles, ifn_cu_stream s) {
  if (n_tiles == 0) return 0;
  if (a->head_dim > 256 || a->num_heads / a->num_kv_heads > (uint32_t)kTileRows) return (int32_t)cudaErrorInvalidValue;
  const size_t smem = prefill_smem(a->head_dim);
  const dim3 grid(n_tiles, a->num_kv_heads);
  if (a->kv_dtype == IFN_DTYPE(F32)) {
    cudaFuncSetAttribute(prefill_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    IFN_LAUNCH(prefill_kernel<float>, grid, kThreads, smem, s)(*a, first, count);
  } else {
    cudaFuncSetAttribute(prefill_kernel<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    IFN_LAUNCH(prefill_kernel<uint16_t>, grid, kThreads, smem, s)(*a, first, count);
  }
  return ifn_launched();
}
