// Sampling on the device, one block a row, so that only token ids and asked-for logprobs
// cross to the host. The order is the CPU's (engine/src/sampler.zig): the model's
// log-probabilities and top alternatives from the raw logits; then the mask, logit bias,
// penalties (repetition over prompt and output, presence and frequency over the output) and
// temperature; greedy takes the first maximum; otherwise top-k, min-p and top-p (over the
// probabilities sorted descending, ties by id) cut the tail and a uniform of (seed,
// draw_index) picks among the rest. The cuts are the CPU's; the pick walks the kept tokens in
// id order where the CPU walks them by probability, so a seeded row draws from the same
// distribution, reproducibly, but not the CPU's token for token.
#include "common.cuh"

namespace {
constexpr int kThreads = 512;

struct Scratch {
  float f[32];
  int32_t i[32];
  uint32_t u[32];
};

// The block's largest (value, id): larger value, then lower id. Every thread gets it.
__device__ void block_argmax(float* v, int32_t* id, Scratch* s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float bv = *v;
  int32_t bi = *id;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    s->f[warp] = bv;
    s->i[warp] = bi;
  }
  __syncthreads();
  bv = lane < warps ? s->f[lane] : -INFINITY;
  bi = lane < warps ? s->i[lane] : 0x7fffffff;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __syncthreads();
  *v = bv;
  *id = bi;
}

__device__ uint32_t block_count(uint32_t c, Scratch* s) {
  return (uint32_t)(ifn_block_sum((float)c, s->f) + 0.5f);
}

// Exclusive prefix of a per-thread value over the threads in order; every thread gets its own.
__device__ float block_exclusive_scan(float v, Scratch* s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += up;
  }
  __syncthreads();
  if (lane == 31) s->f[warp] = inc;
  __syncthreads();
  float base = 0;
  for (int w = 0; w < warp && w < warps; w++) base += s->f[w];
  __syncthreads();
  return base + inc - v;
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ double uniform(uint64_t seed, uint64_t draw) {
  const uint64_t bits = splitmix64(seed ^ splitmix64(draw));
  return (double)(bits >> 11) * (1.0 / 9007199254740992.0);
}

// A thread's ids: one contiguous run of the vocabulary (scans walk it in order).
struct Span {
  uint32_t begin, end;
};
__device__ __forceinline__ Span my_span(uint32_t vocab) {
  const uint32_t per = (vocab + blockDim.x - 1) / blockDim.x;
  const uint32_t b = threadIdx.x * per < vocab ? threadIdx.x * per : vocab;
  return {b, b + per < vocab ? b + per : vocab};
}

// Zeroes the values equal to `tie` past the first `keep` of them (in id order).
__device__ void drop_ties(float* p, Span sp, float tie, uint32_t keep, Scratch* s) {
  uint32_t mine = 0;
  for (uint32_t v = sp.begin; v < sp.end; v++) mine += p[v] == tie;
  uint32_t rank = (uint32_t)(block_exclusive_scan((float)mine, s) + 0.5f);
  for (uint32_t v = sp.begin; v < sp.end; v++) {
    if (p[v] != tie) continue;
    if (rank >= keep) p[v] = 0;
    rank++;
  }
  __syncthreads();
}

// The largest positive value x with f(x) >= want, f(x) = how much of p is at least x (a count
// or a sum): a binary search over the bits of positive floats, which order as the floats do.
template <bool kSum>
__device__ float threshold(const float* p, Span sp, float want, Scratch* s) {
  uint32_t lo = 1, hi = 0x3f800001u;  // (0, 1]: probabilities relative to the largest
  while (lo + 1 < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const float x = __uint_as_float(mid);
    float mine = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++)
      if (p[v] >= x) mine += kSum ? p[v] : 1.0f;
    if (ifn_block_sum(mine, s->f) >= want) lo = mid;
    else hi = mid;
  }
  return __uint_as_float(lo);
}

// p over the kept tokens (zeroes elsewhere): top-k, min-p, then top-p of `total`.
__device__ void cut_tail(float* p, Span sp, const ifn_sampling_params& prm, float total, uint32_t vocab, Scratch* s) {
  if (prm.top_k > 0 && (uint32_t)prm.top_k < vocab) {
    const float tk = threshold<false>(p, sp, (float)prm.top_k, s);
    uint32_t above = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++) {
      if (p[v] < tk) p[v] = 0;
      else above += p[v] > tk;
    }
    drop_ties(p, sp, tk, (uint32_t)prm.top_k - block_count(above, s), s);
  }
  if (prm.min_p > 0) {  // relative to the top probability, exp(0) = 1
    for (uint32_t v = sp.begin; v < sp.end; v++)
      if (p[v] < prm.min_p) p[v] = 0;
    __syncthreads();
  }
  if (prm.top_p < 1) {
    const float want = prm.top_p * total;
    float kept = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++) kept += p[v];
    if (ifn_block_sum(kept, s->f) < want) return;  // the kept tokens hold less than top_p: all stay
    const float tp = threshold<true>(p, sp, want, s);
    float above = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++) {
      if (p[v] < tp) p[v] = 0;
      else if (p[v] > tp) above += p[v];
    }
    const float sum_above = ifn_block_sum(above, s->f);
    const uint32_t ties = (uint32_t)ceilf((want - sum_above) / tp);
    drop_ties(p, sp, tp, ties < 1 ? 1 : ties, s);
  }
}

// The first id whose running sum of p (in id order) passes target; the last nonzero if none.
__device__ int32_t walk(const float* p, Span sp, float target, Scratch* s) {
  float mine = 0;
  int32_t last = -1;
  for (uint32_t v = sp.begin; v < sp.end; v++) {
    mine += p[v];
    if (p[v] > 0) last = (int32_t)v;
  }
  float before = block_exclusive_scan(mine, s);
  int32_t pick = 0x7fffffff;
  if (before <= target && target < before + mine) {
    float acc = before;
    for (uint32_t v = sp.begin; v < sp.end; v++) {
      acc += p[v];
      if (p[v] > 0 && acc > target) {
        pick = (int32_t)v;
        break;
      }
    }
  }
  float none = -INFINITY;
  int32_t first = pick;
  block_argmax(&none, &first, s);  // all -inf: the lowest pick wins
  if (first != 0x7fffffff) return first;
  float lv = last >= 0 ? (float)last : -1.0f;
  int32_t li = last;
  block_argmax(&lv, &li, s);
  return li < 0 ? 0 : li;
}

__global__ void sample_kernel(ifn_cu_sample_args a) {
  __shared__ Scratch s;
  const uint32_t row = blockIdx.x, vocab = a.vocab;
  const ifn_sampling_params prm = static_cast<const ifn_sampling_params*>(a.params)[row];
  float* raw = const_cast<float*>(a.logits) + (uint64_t)row * vocab;
  float* w = a.work + (uint64_t)row * vocab;
  const Span sp = my_span(vocab);
  if (a.final_softcap != 0)
    for (uint32_t v = sp.begin; v < sp.end; v++) raw[v] = a.final_softcap * tanhf(raw[v] / a.final_softcap);
  // The model's own distribution: log Z, and the top alternatives (larger, then lower id).
  float mx = -INFINITY;
  for (uint32_t v = sp.begin; v < sp.end; v++) mx = fmaxf(mx, raw[v]);
  mx = ifn_block_max(mx, s.f);
  float z = 0;
  for (uint32_t v = sp.begin; v < sp.end; v++) z += __expf(raw[v] - mx);
  const float log_z = mx + logf(ifn_block_sum(z, s.f));
  float prev_v = INFINITY;
  int32_t prev_i = -1;
  for (int k = 0; k < prm.num_top_logprobs; k++) {
    float bv = -INFINITY;
    int32_t bi = 0x7fffffff;
    for (uint32_t v = sp.begin; v < sp.end; v++) {
      const float x = raw[v];
      const bool after = x < prev_v || (x == prev_v && (int32_t)v > prev_i);
      if (after && (x > bv || (x == bv && (int32_t)v < bi))) {
        bv = x;
        bi = (int32_t)v;
      }
    }
    block_argmax(&bv, &bi, &s);
    if (threadIdx.x == 0) {
      a.out_top_ids[row * IFN_TOP_LOGPROBS_MAX + k] = bi;
      a.out_top_logprobs[row * IFN_TOP_LOGPROBS_MAX + k] = bv - log_z;
    }
    prev_v = bv;
    prev_i = bi;
  }
  // What is drawn from: mask, bias, penalties.
  const uint32_t* mask = prm.use_mask ? a.masks + (uint64_t)row * a.mask_words : nullptr;
  const int32_t slot = prm.state_slot;
  const uint16_t* counts = slot >= 0 ? a.counts + (uint64_t)slot * vocab : nullptr;
  const uint32_t* seen = slot >= 0 ? a.prompt_seen + (uint64_t)slot * a.mask_words : nullptr;
  for (uint32_t v = sp.begin; v < sp.end; v++) {
    float x = raw[v];
    if (mask && !(mask[v / 32] >> (v % 32) & 1u)) x = -INFINITY;
    if (counts) {
      const uint32_t c = counts[v];
      if (prm.repetition_penalty != 1 && (c > 0 || (seen[v / 32] >> (v % 32) & 1u)))
        x = x > 0 ? x / prm.repetition_penalty : x * prm.repetition_penalty;
      if (c > 0) x -= prm.frequency_penalty * (float)c + prm.presence_penalty;
    }
    w[v] = x;
  }
  __syncthreads();
  for (int32_t j = threadIdx.x; j < prm.bias_count; j += blockDim.x)
    atomicAdd(&w[a.bias_ids[prm.bias_offset + j]], a.bias_values[prm.bias_offset + j]);
  __syncthreads();
  int32_t token;
  if (prm.temperature <= 0 || prm.top_k == 1) {
    float bv = -INFINITY;
    int32_t bi = 0x7fffffff;
    for (uint32_t v = sp.begin; v < sp.end; v++)
      if (w[v] > bv) {
        bv = w[v];
        bi = (int32_t)v;
      }
    block_argmax(&bv, &bi, &s);
    token = bi == 0x7fffffff ? 0 : bi;
  } else {
    float wm = -INFINITY;
    for (uint32_t v = sp.begin; v < sp.end; v++) wm = fmaxf(wm, w[v]);
    wm = ifn_block_max(wm, s.f);
    const float inv_t = 1.0f / prm.temperature;
    float total = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++) {
      w[v] = __expf((w[v] - wm) * inv_t);
      total += w[v];
    }
    total = ifn_block_sum(total, s.f);
    if (prm.top_k > 0 || prm.top_p < 1) {
      cut_tail(w, sp, prm, total, vocab, &s);
    } else if (prm.min_p > 0) {
      for (uint32_t v = sp.begin; v < sp.end; v++)
        if (w[v] < prm.min_p) w[v] = 0;
    }
    float kept = 0;
    for (uint32_t v = sp.begin; v < sp.end; v++) kept += w[v];
    kept = ifn_block_sum(kept, s.f);
    token = walk(w, sp, (float)(uniform(prm.seed, prm.draw_index) * kept), &s);
  }
  if (threadIdx.x == 0) {
    a.out_tokens[row] = token;
    a.out_logprobs[row] = raw[token] - log_z;
    if (counts && a.counts[(uint64_t)slot * vocab + token] < 0xffff) a.counts[(uint64_t)slot * vocab + token]++;
  }
}

__global__ void seq_state_kernel(uint16_t* counts, uint32_t* seen, uint32_t vocab, uint32_t words,
                                 const int32_t* tokens, uint32_t n, uint32_t prompt_len) {
  for (uint32_t v = threadIdx.x; v < vocab; v += blockDim.x) counts[v] = 0;
  for (uint32_t v = threadIdx.x; v < words; v += blockDim.x) seen[v] = 0;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (uint32_t i = 0; i < n; i++) {
    const uint32_t t = (uint32_t)tokens[i];
    if (i < prompt_len) seen[t / 32] |= 1u << (t % 32);
    else if (counts[t] < 0xffff) counts[t]++;
  }
}
}  // namespace

extern "C" int32_t ifn_cu_sample(const ifn_cu_sample_args* a, ifn_cu_stream s) {
  if (a->n == 0) return 0;
  IFN_LAUNCH(sample_kernel, a->n, kThreads, 0, s)(*a);
  return ifn_launched();
}

extern "C" int32_t ifn_cu_seq_state_set(uint16_t* counts, uint32_t* prompt_seen, uint32_t slot, uint32_t vocab,
                                        const int32_t* tokens, uint32_t n, uint32_t prompt_len, ifn_cu_stream s) {
  const uint32_t words = (vocab + 31) / 32;
  IFN_LAUNCH(seq_state_kernel, 1, 256, 0, s)(counts + (uint64_t)slot * vocab, prompt_seen + (uint64_t)slot * words,
                                             vocab, words, tokens, n, prompt_len);
  return ifn_launched();
}
