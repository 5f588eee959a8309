//! Mirrors of the `extern struct`s and enums in engine/include/inferneo.h.
//! Field order and types must match the header exactly.

pub const abi_version: i32 = 5;
pub const top_logprobs_max = 20;
pub const logit_bias_max = 1024;
/// A tensor's file_index meaning no file: random values (IFN_FILE_DUMMY).
pub const file_dummy: u32 = 0xFFFF_FFFF;

pub const Status = enum(i32) {
    ok = 0,
    invalid_argument = 1,
    out_of_memory = 2,
    io = 3,
    unsupported = 4,
    shape = 5,
    pool_exhausted = 6,
    busy = 7,
    internal = 8,
};

pub const DType = enum(u32) {
    f32 = 0,
    f16 = 1,
    q4_0 = 2,
    q4_1 = 3,
    q5_0 = 6,
    q5_1 = 7,
    q8_0 = 8,
    q3_k = 11,
    q4_k = 12,
    q5_k = 13,
    q6_k = 14,
    iq4_nl = 20,
    bf16 = 30,
    _,

    pub fn isFloat(dtype: DType) bool {
        return dtype == .f32 or dtype == .f16 or dtype == .bf16;
    }

    /// The type a file's type is rewritten into at load (losslessly), or null if none.
    pub fn transcodedTo(dtype: DType) ?DType {
        return switch (dtype) {
            .q5_0, .iq4_nl => .q8_0,
            .q3_k => .q6_k,
            else => null,
        };
    }

    /// Weights per storage block (1 for plain floats), or null for types this engine lacks.
    pub fn blockElems(dtype: DType) ?u64 {
        return switch (dtype) {
            .f32, .f16, .bf16 => 1,
            .q4_0, .q4_1, .q5_1, .q8_0, .q5_0, .iq4_nl => 32,
            .q4_k, .q5_k, .q6_k, .q3_k => 256,
            _ => null,
        };
    }

    pub fn blockBytes(dtype: DType) ?u64 {
        return switch (dtype) {
            .f32 => 4,
            .f16, .bf16 => 2,
            .q4_0, .iq4_nl => 18,
            .q5_0 => 22,
            .q4_1 => 20,
            .q5_1 => 24,
            .q3_k => 110,
            .q8_0 => 34,
            .q4_k => 144,
            .q5_k => 176,
            .q6_k => 210,
            _ => null,
        };
    }
};

pub const Role = enum(u32) {
    token_embd = 0,
    attn_norm = 1,
    attn_q = 2,
    attn_k = 3,
    attn_v = 4,
    attn_out = 5,
    ffn_norm = 6,
    ffn_gate = 7,
    ffn_up = 8,
    ffn_down = 9,
    output_norm = 10,
    output = 11,
    attn_q_bias = 12,
    attn_k_bias = 13,
    attn_v_bias = 14,
    attn_q_norm = 15,
    attn_k_norm = 16,
    attn_post_norm = 17,
    ffn_post_norm = 18,
    _,
};

pub const ModelConfig = extern struct {
    vocab_size: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_layers: u32,
    num_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
    max_position: u32,
    rope_theta: f32,
    rms_norm_eps: f32,
    rope_interleaved: u32,
    tie_word_embeddings: u32,
    rope_attn_factor: f32 = 0, // multiplies RoPE's cos and sin (YaRN's attention factor); 0: 1
    rope_inv_freq: ?[*]const f64 = null, // head_dim / 2 frequencies (RoPE scaling), read at create; null: theta^(-2i/d)
    // Gemma's parts; 0 in each means as Llama.
    norm_weight_offset: f32 = 0, // added to every RMSNorm weight (Gemma's x * (1 + w) in HF files)
    embedding_scale: f32 = 0, // multiplies the embeddings (Gemma: sqrt(hidden)); 0: 1
    hidden_act: u32 = 0, // 0: SiLU gate; 1: GELU (tanh) gate
    attn_scale: f32 = 0, // multiplies q . k; 0: 1 / sqrt(head_dim)
    attn_softcap: f32 = 0, // scores s -> c * tanh(s / c); 0: off
    final_softcap: f32 = 0, // the same on the logits
    sliding_window: u32 = 0, // a local layer attends to this many positions (its own included); 0: none
    sliding_window_pattern: u32 = 0, // 0: every layer local; n: layer l global when (l + 1) % n == 0
    rope_local_theta: f32 = 0, // local layers' RoPE base, unscaled (Gemma 3); 0: the global table
};

pub const Tensor = extern struct {
    role: u32,
    layer: u32,
    dtype: u32,
    file_index: u32,
    offset: u64,
    size_bytes: u64,
    rows: u64,
    cols: u64,
};

/// The CPU backend's part of the engine config.
pub const CpuOptions = extern struct {
    num_threads: u32, // compute threads, the engine thread included
    compute_dtype: u32, // DType.f32 or DType.bf16 (float weights repacked to bf16 at load, every product in bf16)
};

/// The CUDA backend's part of the engine config.
pub const CudaOptions = extern struct {
    device_ordinal: u32,
    enforce_eager: u32, // 1: every step launched kernel by kernel (no CUDA graphs)
    memory_utilization: f32, // share of the device's memory the engine may hold in all; 0: 0.9
    compute_dtype: u32, // 0 or DType.f32: float weights in their own type (f32 stays f32); DType.bf16 / .f16: cast
};

pub const EngineConfig = extern struct {
    num_blocks: u32, // 0: as many as the budget holds, capped at max_num_seqs full sequences
    block_size: u32,
    max_num_batched_tokens: u32,
    max_num_seqs: u32,
    max_blocks_per_seq: u32,
    kv_cache_dtype: u32, // DType.f32 or DType.f16
    kv_cache_bytes: u64, // the KV pool's budget when num_blocks is 0 (CUDA: 0 means from memory_utilization)
    cpu: CpuOptions,
    cuda: CudaOptions,
};

pub const SamplingParams = extern struct {
    temperature: f32,
    top_p: f32,
    min_p: f32,
    top_k: i32,
    presence_penalty: f32 = 0,
    frequency_penalty: f32 = 0,
    repetition_penalty: f32 = 1,
    num_top_logprobs: i32 = 0,
    seed: u64,
    draw_index: u64,
    state_slot: i32 = -1, // the sequence state (ifn_seq_state_open) whose tokens the penalties count; -1: none
    bias_offset: i32 = 0,
    bias_count: i32 = 0,
    use_mask: i32 = 0, // 1: only tokens whose bit is set in this row of batch.allowed_token_mask may be drawn

    pub fn hasPenalties(p: SamplingParams) bool {
        return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1;
    }
};

pub const Batch = extern struct {
    num_tokens: u32,
    num_seqs: u32,
    num_samples: u32,
    return_logits: u32,
    token_ids: [*]i32,
    positions: [*]i32,
    slot_mapping: [*]i32,
    query_start_loc: [*]i32,
    seq_lens: [*]i32,
    block_tables: [*]i32,
    sample_indices: [*]i32,
    sampling: [*]SamplingParams,
    out_token_ids: [*]i32,
    out_logprobs: [*]f32,
    logits: [*]f32,
    bias_capacity: u32,
    _pad1: u32 = 0,
    logit_bias_ids: [*]i32,
    logit_bias_values: [*]f32,
    out_top_ids: [*]i32,
    out_top_logprobs: [*]f32,
    mask_words: u32, // 32-bit words a mask row holds: ceil(vocab_size / 32)
    _pad: u32 = 0,
    allowed_token_mask: [*]u32, // (max_num_seqs, mask_words): bit t % 32 of word t / 32 allows token t
    // Non-zero: the caller is still writing masks; the engine runs the forward pass and waits
    // (bounded) for 0 before sampling. Written atomically by the caller, read with acquire.
    masks_pending: u32 = 0,
    _pad2: u32 = 0,
};

/// The structs whose layout the library reports (ifn_struct_layout), by number.
pub const layout_structs = [_]type{ ModelConfig, Tensor, EngineConfig, SamplingParams, Batch, CpuOptions, CudaOptions, DeviceInfo };

/// Step descriptors an engine holds: the caller fills one while the other runs.
pub const num_batches = 2;

/// What the device an engine runs on reports (ifn_engine_device_info).
pub const DeviceInfo = extern struct {
    memory_total_bytes: u64, // 0: not known (the CPU backend)
    memory_used_bytes: u64, // by every process on the device
    weights_bytes: u64, // this engine's weights as it holds them
    utilization: f32, // 0..1 over the last sampling period; -1: not known
    ordinal: u32,
};

comptime {
    const std = @import("std");
    std.debug.assert(@sizeOf(ModelConfig) == 104);
    std.debug.assert(@sizeOf(Tensor) == 48);
    std.debug.assert(@sizeOf(EngineConfig) == 56);
    std.debug.assert(@sizeOf(DeviceInfo) == 32);
    std.debug.assert(@sizeOf(SamplingParams) == 64);
    std.debug.assert(@sizeOf(Batch) == 16 + 11 * 8 + 8 + 4 * 8 + 8 + 8 + 8);
}

/// Called on the engine thread when an async step ends: its status, which descriptor it ran, user_data.
pub const StepCallback = *const fn (status: i32, batch_index: u32, user_data: ?*anyopaque) callconv(.C) void;
