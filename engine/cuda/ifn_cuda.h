/*
 * ifn_cuda.h: what the CUDA backend's host side (engine/src/cuda_backend.zig) calls in
 * engine/cuda: the device runtime (memory, streams, graphs), the GEMM dispatcher, and one
 * launcher per op. Every call returns an int32_t CUDA status (0: accepted; kernels run on the
 * stream given). Device pointers are typed where the element type is fixed. Matrices are
 * row-major; a quantized row is its blocks one after another (GGUF's layout).
 */
#ifndef IFN_CUDA_H
#define IFN_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void* ifn_cu_stream;

/* ---- device runtime (runtime.cu) ---- */
const char* ifn_cu_error_string(int32_t status);
int32_t ifn_cu_device_count(int32_t* count);
int32_t ifn_cu_set_device(int32_t ordinal);
/* SMs, compute capability, and the opt-in shared memory a block may have. */
int32_t ifn_cu_device_props(int32_t ordinal, int32_t* sms, int32_t* major, int32_t* minor, int32_t* smem_optin);
int32_t ifn_cu_mem_info(uint64_t* free_bytes, uint64_t* total_bytes);
int32_t ifn_cu_malloc(void** out, uint64_t bytes);
int32_t ifn_cu_free(void* p);
int32_t ifn_cu_host_alloc(void** out, uint64_t bytes); /* pinned host memory */
int32_t ifn_cu_host_free(void* p);
int32_t ifn_cu_stream_create(ifn_cu_stream* out);
int32_t ifn_cu_stream_destroy(ifn_cu_stream s);
int32_t ifn_cu_stream_sync(ifn_cu_stream s);
int32_t ifn_cu_copy(void* dst, const void* src, uint64_t bytes, ifn_cu_stream s); /* any direction */
int32_t ifn_cu_memset(void* p, int32_t value, uint64_t bytes, ifn_cu_stream s);
/* Records what is launched on `s` between begin and end into a graph, instantiated. */
int32_t ifn_cu_graph_begin(ifn_cu_stream s);
int32_t ifn_cu_graph_end(ifn_cu_stream s, void** exec);
int32_t ifn_cu_graph_launch(void* exec, ifn_cu_stream s);
int32_t ifn_cu_graph_destroy(void* exec);
/* NVML (opened at run time): utilization 0..1 (-1 when NVML is absent) and memory in use. */
int32_t ifn_cu_device_usage(int32_t ordinal, float* utilization, uint64_t* used_bytes, uint64_t* total_bytes);

/* ---- GEMMs (gemm.cu): cuBLASLt where it is there and suits the shape, else our kernels ---- */
typedef struct ifn_cu_matrix {
    const void* data;    /* device */
    uint32_t dtype;      /* enum ifn_dtype: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K */
    uint32_t rows;
    uint32_t cols;       /* a multiple of the type's block */
    uint32_t _pad;
} ifn_cu_matrix;

typedef struct ifn_cu_gemm ifn_cu_gemm;
/* Workspace for products of up to max_tokens rows of up to max_cols (activations converted to
 * bf16/f16, quantized weights expanded for prefill). cuBLASLt is opened here: `note` says which
 * library was found or why none was (a missing one leaves our kernels). */
int32_t ifn_cu_gemm_create(ifn_cu_gemm** out, uint32_t max_tokens, uint32_t max_cols, uint32_t max_rows,
                           char* note, uint32_t note_capacity);
void ifn_cu_gemm_destroy(ifn_cu_gemm* g);
uint64_t ifn_cu_gemm_workspace_bytes(const ifn_cu_gemm* g);
/* 0: choose; 1: our kernels only (tests, and shapes cuBLASLt refuses) */
void ifn_cu_gemm_force_fallback(ifn_cu_gemm* g, int32_t on);
/* out[t * out_stride + r] = x[t * x_stride ..] . w[r] for t < n, r < w.rows; f32 in and out. */
int32_t ifn_cu_matmul(ifn_cu_gemm* g, float* out, uint32_t out_stride, const float* x, uint32_t x_stride,
                      uint32_t n, const ifn_cu_matrix* w, ifn_cu_stream s);

/* ---- element-wise and row ops ---- */
/* out[t] = table[token_ids[t]] * scale (0: 1), in f32. */
int32_t ifn_cu_embed(float* out, const ifn_cu_matrix* table, const int32_t* token_ids, uint32_t n, float scale,
                     ifn_cu_stream s);
/* out[i * out_stride] = RMSNorm(x[row_i * x_stride]) * w, row_i = rows ? rows[i] : i (i < n). */
int32_t ifn_cu_rmsnorm(float* out, uint32_t out_stride, const float* x, uint32_t x_stride, const int32_t* rows,
                       const float* w, uint32_t n, uint32_t dim, float eps, ifn_cu_stream s);
/* For each of n rows: d = post_w ? RMSNorm(d) * post_w : d; x += d; then, with norm_w,
 * out = RMSNorm(x) * norm_w. */
int32_t ifn_cu_add_rmsnorm(float* x, float* d, const float* post_w, float* out, const float* norm_w, uint32_t n,
                           uint32_t dim, float eps, ifn_cu_stream s);
/* out[t] = act(gate) * up with gate_up[t] = [gate | up] (2 * ffn); act 0: SiLU, 1: GELU (tanh). */
int32_t ifn_cu_act_mul(float* out, const float* gate_up, uint32_t n, uint32_t ffn, uint32_t act, ifn_cu_stream s);

typedef struct ifn_cu_rope_args {
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t interleaved;   /* 1: pairs (2i, 2i+1); 0: (i, i + head_dim / 2) */
    const float* cos;       /* (max_position, head_dim / 2) */
    const float* sin;
    const float* bias;      /* (q_dim + 2 * kv_dim) or NULL */
    const float* q_norm;    /* (head_dim) or NULL: RMSNorm over each q head before RoPE */
    const float* k_norm;
    float eps;
} ifn_cu_rope_args;
/* In place over qkv rows (n, q_dim + 2 * kv_dim): bias, q/k head norms, RoPE of q and k at positions. */
int32_t ifn_cu_rope(float* qkv, uint32_t n, const int32_t* positions, const ifn_cu_rope_args* a, ifn_cu_stream s);
/* K and V of each token (qkv rows at k_offset and v_offset) into the paged caches, laid out
 * (block, kv_head, block_size, head_dim), at slot_mapping[t] (negative: skipped). */
int32_t ifn_cu_kv_write(void* k_cache, void* v_cache, uint32_t kv_dtype, const float* qkv, uint32_t qkv_stride,
                        uint32_t k_offset, uint32_t v_offset, const int32_t* slot_mapping, uint32_t n,
                        uint32_t num_kv_heads, uint32_t head_dim, uint32_t block_size, ifn_cu_stream s);

/* ---- attention over the paged cache (attention.cu) ---- */
typedef struct ifn_cu_attn_args {
    const float* q;           /* token t's heads at q + t * q_stride */
    uint32_t q_stride;
    float* out;               /* token t's heads at out + t * out_stride */
    uint32_t out_stride;
    const void* k_cache;      /* this layer's, (num_blocks, num_kv_heads, block_size, head_dim) */
    const void* v_cache;
    uint32_t kv_dtype;
    const int32_t* block_tables;   /* (num_seqs, max_blocks_per_seq) */
    uint32_t max_blocks_per_seq;
    const int32_t* seq_of_token;   /* which sequence each token belongs to */
    const int32_t* positions;
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t block_size;
    float scale;
    float softcap;            /* 0: off */
    uint32_t window;          /* positions a query sees, its own included; 0: all before it */
} ifn_cu_attn_args;
/* One query token each (tokens[i] < 0: none), its context cut into splits of split_len
 * positions (a multiple of 128) merged at the end: at most max_splits of them, so split_len *
 * max_splits must cover the longest context; workspace: n * num_heads * max_splits *
 * (head_dim + 2) floats. */
int32_t ifn_cu_attention_decode(const ifn_cu_attn_args* a, const int32_t* tokens, uint32_t n, uint32_t max_splits,
                                uint32_t split_len, float* workspace, ifn_cu_stream s);
/* Most queries of one sequence a prefill tile takes. */
#define IFN_CU_TILE_QUERIES 16
/* Queries a prefill tile takes for this model: its rows (queries x the heads of a KV head) fit
 * the kernel's tile. At most IFN_CU_TILE_QUERIES; num_heads / num_kv_heads must be <= 32. */
uint32_t ifn_cu_prefill_tile_queries(uint32_t num_heads, uint32_t num_kv_heads);
/* Tiles of up to that many consecutive tokens of one sequence: tile i is tokens
 * first[i] .. first[i] + count[i] - 1, causal (and windowed). */
int32_t ifn_cu_attention_prefill(const ifn_cu_attn_args* a, const int32_t* first, const int32_t* count,
                                 uint32_t n_tiles, ifn_cu_stream s);

/* ---- sampling (sample.cu) ---- */
typedef struct ifn_cu_sample_args {
    const float* logits;            /* (n, vocab): the model's, changed in place by the soft cap */
    float* work;                    /* (n, vocab) scratch */
    uint32_t n;
    uint32_t vocab;
    float final_softcap;            /* 0: off */
    uint32_t mask_words;
    const void* params;             /* (n) ifn_sampling_params, as the batch holds them */
    const int32_t* bias_ids;        /* the batch's logit bias entries */
    const float* bias_values;
    const uint32_t* masks;          /* (n, mask_words) */
    uint16_t* counts;               /* (slots, vocab): output tokens drawn so far, per sequence state */
    uint32_t* prompt_seen;          /* (slots, mask_words): prompt tokens, per sequence state */
    int32_t* out_tokens;
    float* out_logprobs;
    int32_t* out_top_ids;           /* (n, IFN_TOP_LOGPROBS_MAX) */
    float* out_top_logprobs;
} ifn_cu_sample_args;
/* Draws each row's token as the CPU's sampler does (mask, bias, penalties, temperature, top-k,
 * min-p, top-p, the draw of (seed, draw_index)); appends it to the row's sequence state. */
int32_t ifn_cu_sample(const ifn_cu_sample_args* a, ifn_cu_stream s);
/* Sequence state `slot` set from tokens (device, n of them, the first prompt_len the prompt). */
int32_t ifn_cu_seq_state_set(uint16_t* counts, uint32_t* prompt_seen, uint32_t slot, uint32_t vocab,
                             const int32_t* tokens, uint32_t n, uint32_t prompt_len, ifn_cu_stream s);

/* ---- weights ---- */
/* rows x cols of `in` (any type above) into `out` as F32, F16 or BF16. */
int32_t ifn_cu_convert(void* out, uint32_t out_dtype, const void* in, uint32_t in_dtype, uint64_t rows,
                       uint32_t cols, ifn_cu_stream s);
/* n values of a float type: mean + std * a normal draw from (seed, index) (std 0: all mean). */
int32_t ifn_cu_random_fill(void* out, uint32_t dtype, uint64_t n, uint64_t seed, float mean, float std,
                           ifn_cu_stream s);

#ifdef __cplusplus
}
#endif
#endif
