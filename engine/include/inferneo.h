/*
 * inferneo.h: the C ABI of the Inferneo engine (libinferneo).
 *
 * Everything that computes or holds KV memory lives behind this header: the
 * weights (mapped from the model files), the paged KV cache and its block pool,
 * the forward pass over a ragged batch, and sampling. The control plane
 * (tokenizing, scheduling, HTTP) calls in through these functions only.
 *
 * Conventions: every symbol is prefixed ifn_, integers are sized, every
 * fallible call returns an int32_t status (IFN_OK == 0), and
 * ifn_status_string()/ifn_last_error() describe failures. Structs are mirrored
 * field for field by `extern struct`s in engine/src/abi.zig, and the library reports
 * every struct's size and field offsets (ifn_struct_layout): callers lay out what
 * they send by that report, not by a table of their own. ABI 5 is completed together with the
 * CUDA backend and may still change until then (sequence states replaced the per-step token
 * history); after that, fields are only ever appended, with 0 meaning "as before", so a newer
 * library reads an older caller.
 *
 * Backends: libinferneo.so runs on the CPU (Zig kernels); libinferneo_cuda.so on an NVIDIA GPU
 * (CUDA kernels, GEMMs through cuBLASLt opened at run time). Both implement this header;
 * ifn_backend_name() says which one is loaded and ifn_device_count() how many devices it can use.
 *
 * Steps: the engine holds IFN_NUM_BATCHES step descriptors (ifn_engine_batch). Steps queued with
 * ifn_engine_step_async run on the engine thread one after another in the order queued, so the
 * caller fills one descriptor while the other runs, and queues it before that one ends: the next
 * step starts the moment the last ends. A token id -(r + 1) in a step's token_ids is a placeholder
 * for the token that sampled row r of the step that ran just before it drew (the caller scheduled
 * the step before it knew that token); the engine writes the token in before the step's checks.
 * A step whose placeholders name a failed step, or a row it did not have, fails.
 *
 * Threads: everything may be called from one thread at a time. While a step is queued or running
 * (ifn_engine_step_async until its callback), its descriptor belongs to the engine: the caller must
 * not write it, but for the mask rows while masks_pending is set. Safe meanwhile: filling and
 * queueing the other descriptor; the block-pool calls (ifn_blocks_*) and the getters
 * (ifn_engine_num_blocks, ifn_engine_kv_cache_bytes, ifn_engine_device_info, ifn_blocks_num_*),
 * which touch only bookkeeping that steps do not; ifn_seq_state_open/_close of a slot that no
 * queued or running step names (else IFN_ERR_BUSY). Not while a step is queued or running:
 * ifn_engine_step, ifn_engine_set_callback, ifn_engine_destroy.
 */
#ifndef INFERNEO_H
#define INFERNEO_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any change to a struct layout or a function signature. */
#define IFN_ABI_VERSION 5

/* Step descriptors an engine holds. */
#define IFN_NUM_BATCHES 2

/* Most alternatives a sampled row reports with its log-probability. */
#define IFN_TOP_LOGPROBS_MAX 20
/* Most logit_bias entries one row may carry. */
#define IFN_LOGIT_BIAS_MAX 1024

enum ifn_status {
    IFN_OK = 0,
    IFN_ERR_INVALID_ARGUMENT = 1, /* a value the caller should not have sent */
    IFN_ERR_OUT_OF_MEMORY = 2,
    IFN_ERR_IO = 3,               /* a model file could not be opened or mapped */
    IFN_ERR_UNSUPPORTED = 4,      /* dtype, shape or feature this build cannot run */
    IFN_ERR_SHAPE = 5,            /* a tensor's shape disagrees with the config */
    IFN_ERR_POOL_EXHAUSTED = 6,   /* not enough free KV blocks */
    IFN_ERR_BUSY = 7,             /* a step is already in flight */
    IFN_ERR_INTERNAL = 8,
};

/* Tensor element types, numbered as GGML numbers them so GGUF types map 1:1. */
enum ifn_dtype {
    IFN_DTYPE_F32 = 0,
    IFN_DTYPE_F16 = 1,
    IFN_DTYPE_Q4_0 = 2,   /* blocks of 32: f16 scale, 16 bytes of 4-bit weights */
    IFN_DTYPE_Q4_1 = 3,   /* blocks of 32: f16 scale and offset, 4-bit weights */
    IFN_DTYPE_Q5_0 = 6,   /* blocks of 32 (22 bytes); rewritten as Q8_0 at load, exactly */
    IFN_DTYPE_Q5_1 = 7,   /* blocks of 32: f16 scale and offset, 5-bit weights */
    IFN_DTYPE_Q8_0 = 8,   /* blocks of 32: f16 scale, 32 int8 weights */
    IFN_DTYPE_Q3_K = 11,  /* super-blocks of 256 (110 bytes); rewritten as Q6_K at load, exactly */
    IFN_DTYPE_Q4_K = 12,  /* super-blocks of 256 */
    IFN_DTYPE_Q5_K = 13,  /* super-blocks of 256 */
    IFN_DTYPE_Q6_K = 14,  /* super-blocks of 256 */
    IFN_DTYPE_IQ4_NL = 20,/* blocks of 32 (18 bytes); rewritten as Q8_0 at load, exactly */
    IFN_DTYPE_BF16 = 30,
};

/* What a tensor is for. `layer` in ifn_tensor qualifies the per-layer roles. */
enum ifn_tensor_role {
    IFN_ROLE_TOKEN_EMBD = 0,  /* (vocab, hidden) */
    IFN_ROLE_ATTN_NORM = 1,   /* (hidden) */
    IFN_ROLE_ATTN_Q = 2,      /* (heads * head_dim, hidden) */
    IFN_ROLE_ATTN_K = 3,      /* (kv_heads * head_dim, hidden) */
    IFN_ROLE_ATTN_V = 4,      /* (kv_heads * head_dim, hidden) */
    IFN_ROLE_ATTN_OUT = 5,    /* (hidden, heads * head_dim) */
    IFN_ROLE_FFN_NORM = 6,    /* (hidden) */
    IFN_ROLE_FFN_GATE = 7,    /* (intermediate, hidden) */
    IFN_ROLE_FFN_UP = 8,      /* (intermediate, hidden) */
    IFN_ROLE_FFN_DOWN = 9,    /* (hidden, intermediate) */
    IFN_ROLE_OUTPUT_NORM = 10,/* (hidden) */
    IFN_ROLE_OUTPUT = 11,     /* (vocab, hidden); absent when embeddings are tied */
    /* Optional per-layer tensors (Qwen 2 biases, Qwen 3 norms): absent means none. */
    IFN_ROLE_ATTN_Q_BIAS = 12, /* (heads * head_dim), added to q before RoPE */
    IFN_ROLE_ATTN_K_BIAS = 13, /* (kv_heads * head_dim) */
    IFN_ROLE_ATTN_V_BIAS = 14, /* (kv_heads * head_dim) */
    IFN_ROLE_ATTN_Q_NORM = 15, /* (head_dim): RMSNorm over each q head, after the bias, before RoPE */
    IFN_ROLE_ATTN_K_NORM = 16, /* (head_dim): the same over each k head */
    IFN_ROLE_ATTN_POST_NORM = 17, /* (hidden): RMSNorm of the attention's output before the residual (Gemma) */
    IFN_ROLE_FFN_POST_NORM = 18,  /* (hidden): the same for the MLP's output */
};

typedef struct ifn_model_config {
    uint32_t vocab_size;
    uint32_t hidden_size;
    uint32_t intermediate_size;
    uint32_t num_layers;
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t max_position;
    float rope_theta;
    float rms_norm_eps;
    /* 0: HF rotate-half pairs (i, i + head_dim/2); 1: interleaved pairs (2i, 2i+1) as GGUF stores q/k */
    uint32_t rope_interleaved;
    uint32_t tie_word_embeddings;
    /* RoPE scaling (linear, llama3, YaRN, ...), worked out by the caller: */
    float rope_attn_factor;        /* multiplies cos and sin (YaRN's attention factor); 0: 1 */
    const double *rope_inv_freq;   /* head_dim / 2 rotation frequencies, read during ifn_engine_create
                                      only; NULL: rope_theta^(-2i / head_dim) */
    /* Gemma's parts; 0 in each means as Llama. */
    float norm_weight_offset;      /* added to every RMSNorm weight (HF Gemma's x * (1 + w)) */
    float embedding_scale;         /* multiplies the embeddings (Gemma: sqrt(hidden)); 0: 1 */
    uint32_t hidden_act;           /* 0: SiLU gate; 1: GELU (tanh approximation) gate */
    float attn_scale;              /* multiplies q . k; 0: 1 / sqrt(head_dim) */
    float attn_softcap;            /* scores s -> c * tanh(s / c); 0: off */
    float final_softcap;           /* the same on the logits */
    uint32_t sliding_window;       /* a local layer attends to this many positions, its own included; 0: none */
    uint32_t sliding_window_pattern; /* 0: every layer local; n: layer l global when (l + 1) % n == 0 */
    float rope_local_theta;        /* local layers' RoPE base, unscaled (Gemma 3); 0: one table for all */
} ifn_model_config;

/* A tensor's file_index meaning no file: random values of its shape and (float) type, made by
 * the CUDA backend (benchmarks of a shape without its weights: --load-format dummy). */
#define IFN_FILE_DUMMY 0xFFFFFFFFu

/* One tensor of the weight manifest: where its bytes are in which file. */
typedef struct ifn_tensor {
    uint32_t role;       /* enum ifn_tensor_role */
    uint32_t layer;      /* 0 for global tensors */
    uint32_t dtype;      /* enum ifn_dtype */
    uint32_t file_index; /* index into the files given to ifn_engine_create, or IFN_FILE_DUMMY */
    uint64_t offset;     /* byte offset of the first element in that file */
    uint64_t size_bytes;
    uint64_t rows;       /* outer dimension (1 for vectors) */
    uint64_t cols;       /* inner, contiguous dimension */
} ifn_tensor;

/* The CPU backend's options. */
typedef struct ifn_cpu_options {
    uint32_t num_threads;            /* compute threads, the engine thread included */
    uint32_t compute_dtype;          /* IFN_DTYPE_F32: float weights in f32 products (exact);
                                        IFN_DTYPE_BF16: bf16 products where four or more tokens
                                        share a float weight (prefill, batched decode) */
} ifn_cpu_options;

/* The CUDA backend's options. */
typedef struct ifn_cuda_options {
    uint32_t device_ordinal;
    uint32_t enforce_eager;          /* 1: every step launched kernel by kernel; 0: decode steps
                                        replay CUDA graphs captured per batch-size bucket at start */
    float memory_utilization;        /* share of the device's memory the engine may hold in all
                                        (weights, workspace, KV pool); 0: 0.9 */
    uint32_t compute_dtype;          /* 0 (IFN_DTYPE_F32): float weights in their own type, f32 kept
                                        in f32; IFN_DTYPE_BF16 or IFN_DTYPE_F16: cast to that */
} ifn_cuda_options;

typedef struct ifn_engine_config {
    uint32_t num_blocks;             /* KV pool size, in blocks; 0: as many as the budget holds, at most
                                        max_num_seqs * max_blocks_per_seq (read back: ifn_engine_num_blocks) */
    uint32_t block_size;             /* tokens per KV block */
    uint32_t max_num_batched_tokens; /* tokens in one step, all sequences together */
    uint32_t max_num_seqs;           /* sequences (and sampled rows) in one step */
    uint32_t max_blocks_per_seq;     /* width of a block-table row */
    uint32_t kv_cache_dtype;         /* IFN_DTYPE_F32 or IFN_DTYPE_F16 */
    uint64_t kv_cache_bytes;         /* the KV pool's byte budget when num_blocks is 0; on CUDA, 0
                                        means what memory_utilization leaves after weights and workspace */
    ifn_cpu_options cpu;
    ifn_cuda_options cuda;
} ifn_engine_config;

/* What the device an engine runs on reports. */
typedef struct ifn_device_info {
    uint64_t memory_total_bytes;     /* 0: not known (the CPU backend) */
    uint64_t memory_used_bytes;      /* by every process on the device */
    uint64_t weights_bytes;          /* this engine's weights as it holds them */
    float utilization;               /* 0..1 over the last sampling period (NVML); -1: not known */
    uint32_t ordinal;
} ifn_device_info;

/*
 * One sampled row. Order of processing, as vLLM applies it: the allowed-token mask
 * (structured output; disallowed tokens get -inf), logit_bias, then penalties
 * (repetition over prompt and output, presence and frequency over the output), then
 * temperature; greedy rows (temperature 0 or top_k 1) take the argmax (lowest id on
 * ties), others keep top-k, then top-p, then min-p, and draw. Reported
 * log-probabilities and alternatives are the model's own (before any of that).
 */
typedef struct ifn_sampling_params {
    float temperature;        /* 0 = greedy (argmax, lowest id on ties) */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    int32_t top_k;            /* 0 or less = off */
    float presence_penalty;   /* 0 = off */
    float frequency_penalty;  /* 0 = off */
    float repetition_penalty; /* 1 = off */
    int32_t num_top_logprobs; /* 0..IFN_TOP_LOGPROBS_MAX alternatives to report */
    uint64_t seed;
    uint64_t draw_index;      /* which draw of this seed's stream: tokens generated so far */
    int32_t state_slot;       /* the sequence state (ifn_seq_state_open) the penalties count, and to which
                                 the drawn token is appended; -1: none. Rows of a step name distinct slots */
    int32_t bias_offset;      /* this row's entries in batch.logit_bias_ids/values */
    int32_t bias_count;       /* <= IFN_LOGIT_BIAS_MAX */
    int32_t use_mask;         /* 1: draw only tokens allowed by this row of batch.allowed_token_mask */
} ifn_sampling_params;

/*
 * The step descriptor. The engine allocates it and every array in it once, sized
 * by ifn_engine_config; the caller fills the counts and the first entries of each
 * array, then calls ifn_engine_step(_async). Pointers stay valid for the engine's life.
 *
 *   tokens:   | seq 0: prefill chunk ...  | seq 1: 1 decode token | seq 2 ... |
 *   query_start_loc: 0                    q1                      q2   ...  num_tokens
 */
typedef struct ifn_batch {
    uint32_t num_tokens;          /* <= max_num_batched_tokens */
    uint32_t num_seqs;            /* <= max_num_seqs */
    uint32_t num_samples;         /* <= max_num_seqs */
    uint32_t return_logits;       /* 1: the caller reads the sampled rows' logits from `logits` after the step
                                     (bias, penalties and the mask may have changed them); 0: the engine
                                     keeps them to itself (a GPU never copies them to the host) */
    int32_t* token_ids;           /* (max_num_batched_tokens); -(r + 1): the draw of row r of the step before */
    int32_t* positions;           /* (max_num_batched_tokens) position of each token in its sequence */
    int32_t* slot_mapping;        /* (max_num_batched_tokens) block * block_size + offset where its K/V go */
    int32_t* query_start_loc;     /* (max_num_seqs + 1) first token of each sequence, then num_tokens */
    int32_t* seq_lens;            /* (max_num_seqs) tokens in the KV cache after this step */
    int32_t* block_tables;        /* (max_num_seqs, max_blocks_per_seq) */
    int32_t* sample_indices;      /* (max_num_seqs) token index whose logits are sampled */
    ifn_sampling_params* sampling;/* (max_num_seqs) */
    int32_t* out_token_ids;       /* (max_num_seqs) */
    float* out_logprobs;          /* (max_num_seqs) log-probability of the sampled token */
    float* logits;                /* (max_num_seqs, vocab_size) filled when return_logits */
    uint32_t bias_capacity;       /* entries in logit_bias_ids/values */
    uint32_t _pad1;
    int32_t* logit_bias_ids;      /* (bias_capacity) */
    float* logit_bias_values;     /* (bias_capacity) */
    int32_t* out_top_ids;         /* (max_num_seqs, IFN_TOP_LOGPROBS_MAX) */
    float* out_top_logprobs;      /* (max_num_seqs, IFN_TOP_LOGPROBS_MAX) */
    uint32_t mask_words;          /* 32-bit words in one mask row: ceil(vocab_size / 32) */
    uint32_t _pad;
    uint32_t* allowed_token_mask; /* (max_num_seqs, mask_words): bit t % 32 of word t / 32 allows token t;
                                     read only for rows with use_mask = 1 (at least one bit set) */
    uint32_t masks_pending;       /* non-zero: the caller is still writing mask rows; the step runs its forward
                                     pass and waits (up to 10 s) for 0, stored atomically, before sampling */
    uint32_t _pad2;
} ifn_batch;

typedef struct ifn_engine ifn_engine;

/* Called on the engine thread when an async step ends: its status, which descriptor it ran, and
 * the user_data given to ifn_engine_set_callback. */
typedef void (*ifn_step_callback)(int32_t status, uint32_t batch_index, void* user_data);

/* Structs ifn_struct_layout describes, in order. */
enum ifn_struct_id {
    IFN_STRUCT_MODEL_CONFIG = 0,
    IFN_STRUCT_TENSOR = 1,
    IFN_STRUCT_ENGINE_CONFIG = 2,
    IFN_STRUCT_SAMPLING_PARAMS = 3,
    IFN_STRUCT_BATCH = 4,
    IFN_STRUCT_CPU_OPTIONS = 5,
    IFN_STRUCT_CUDA_OPTIONS = 6,
    IFN_STRUCT_DEVICE_INFO = 7,
};

int32_t ifn_abi_version(void);
const char* ifn_status_string(int32_t status);
/* Detail of the last failure on the calling thread. */
const char* ifn_last_error(void);
/* out[0] = sizeof the struct, out[1 + i] = offset of its i-th field (declaration order);
 * returns how many numbers were written (0: unknown struct or capacity too small). */
uint32_t ifn_struct_layout(uint32_t which, uint32_t* out, uint32_t capacity);
/* "cpu" or "cuda". */
const char* ifn_backend_name(void);
/* Devices this backend can run on now (the CPU: 1; CUDA: visible GPUs, 0 with the reason in
 * ifn_last_error() when there is no driver or no GPU). */
int32_t ifn_device_count(void);

/* files: n_files NUL-terminated paths laid end to end in one buffer. */
int32_t ifn_engine_create(const ifn_model_config* model, const ifn_engine_config* config,
                          const uint8_t* files, uint32_t n_files,
                          const ifn_tensor* tensors, uint32_t n_tensors, ifn_engine** out);
void ifn_engine_destroy(ifn_engine* engine);
/* Descriptor index (< IFN_NUM_BATCHES); NULL for another index. */
ifn_batch* ifn_engine_batch(ifn_engine* engine, uint32_t index);
uint64_t ifn_engine_kv_cache_bytes(const ifn_engine* engine);
uint32_t ifn_engine_num_blocks(const ifn_engine* engine);
int32_t ifn_engine_device_info(const ifn_engine* engine, ifn_device_info* out);

/* Runs descriptor `index` on the calling thread; IFN_ERR_BUSY while a step is queued. */
int32_t ifn_engine_step(ifn_engine* engine, uint32_t index);
/* Queues descriptor `index` for the engine thread and returns at once; `callback` fires as it ends. */
int32_t ifn_engine_set_callback(ifn_engine* engine, ifn_step_callback callback, void* user_data);
int32_t ifn_engine_step_async(ifn_engine* engine, uint32_t index);
/* Detail of the last failure of an async step on descriptor `index`. */
const char* ifn_engine_last_error(const ifn_engine* engine, uint32_t index);

/* Per-sequence sampling state, kept across steps in one of max_num_seqs slots: the tokens so far,
 * the first prompt_len of them the prompt, which the penalties count. Every step that samples a
 * row naming the slot (ifn_sampling_params.state_slot) appends the token it drew, so the caller
 * sends a sequence's history once, not every step. Refused (IFN_ERR_BUSY) for a slot that a queued
 * or running step names. */
int32_t ifn_seq_state_open(ifn_engine* engine, uint32_t slot, const int32_t* tokens, uint32_t n, uint32_t prompt_len);
int32_t ifn_seq_state_close(ifn_engine* engine, uint32_t slot);

/* Block pool: the paged-KV allocator. All-or-nothing: on failure nothing changes. */
int32_t ifn_blocks_allocate(ifn_engine* engine, uint32_t n, int32_t* out_block_ids);
int32_t ifn_blocks_free(ifn_engine* engine, uint32_t n, const int32_t* block_ids);
int32_t ifn_blocks_ref(ifn_engine* engine, uint32_t n, const int32_t* block_ids);
/* Prefix caching: full blocks are named by a chained hash of their tokens (never 0). */
int32_t ifn_blocks_cache_insert(ifn_engine* engine, uint32_t n, const int32_t* block_ids, const uint64_t* hashes);
/* Takes a reference on the blocks holding the leading hashes; returns how many hit. */
uint32_t ifn_blocks_cache_lookup(ifn_engine* engine, uint32_t n, const uint64_t* hashes, int32_t* out_block_ids);
uint32_t ifn_blocks_num_cached(const ifn_engine* engine);
uint32_t ifn_blocks_num_free(const ifn_engine* engine);
uint32_t ifn_blocks_ref_count(const ifn_engine* engine, int32_t block_id);

#ifdef __cplusplus
}
#endif
#endif
