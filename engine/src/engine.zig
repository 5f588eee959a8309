//! The engine: weights, the paged KV cache, the block pool, step buffers, the
//! compute pool and the engine thread. Everything is allocated in `create`;
//! a step allocates nothing.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const kernels = @import("kernels.zig");
const sampler = @import("sampler.zig");
const weights_mod = @import("weights.zig");
const BlockPool = @import("block_pool.zig").BlockPool;
const ThreadPool = @import("thread_pool.zig").ThreadPool;
const forward = @import("forward.zig");

/// The element type of a KV cache dtype.
pub fn KvType(comptime dtype: abi.DType) type {
    return switch (dtype) {
        .f32 => f32,
        .f16 => f16,
        else => @compileError("KV cache dtypes are f32 and f16"),
    };
}

/// How long a step waits for its caller's token masks, and how often it looks.
const masks_wait_max_ns: u64 = 10 * std.time.ns_per_s;
const masks_poll_ns: u64 = 20 * std.time.ns_per_us;

pub const Engine = struct {
    allocator: std.mem.Allocator,
    model: abi.ModelConfig,
    config: abi.EngineConfig,
    weights: weights_mod.Weights,
    pool: BlockPool,
    threads: ThreadPool,

    // Paged KV cache in kv_dtype (f32 or f16), layer after layer, each laid out as kvLayout() says.
    kv_dtype: abi.DType,
    k_cache: []u8,
    v_cache: []u8,
    rope_cos: []f32, // (max_position, head_dim / 2)
    rope_sin: []f32, // (max_position, head_dim / 2)
    rope_local_cos: []f32 = &.{}, // the same for local layers with their own base (Gemma 3), else empty
    rope_local_sin: []f32 = &.{},
    score_shape: kernels.ScoreShape, // how q . k becomes a score: scale and soft cap
    scratch: forward.Scratch,

    batch: abi.Batch,
    batch_arrays: BatchArrays,
    seq_state: SeqState,

    // Engine thread: one step at a time, handed over under `mutex`.
    thread: std.Thread,
    mutex: std.Thread.Mutex = .{},
    cond: std.Thread.Condition = .{},
    step_requested: bool = false,
    busy: bool = false,
    stopping: bool = false,
    callback: ?*const fn (status: i32, user_data: ?*anyopaque) callconv(.C) void = null,
    callback_user_data: ?*anyopaque = null,
    async_error: [1024:0]u8 = [_:0]u8{0} ** 1024,

    const BatchArrays = struct {
        i32s: []i32,
        sampling: []abi.SamplingParams,
        f32s: []f32,
        masks: []u32, // (max_num_seqs, mask_words), all ones until the caller writes a row
    };

    /// Per-sequence sampling state across steps, in max_num_seqs slots: the tokens so far (the
    /// first prompt_len the prompt), which the penalties count. The caller opens a slot with
    /// them; every step that samples a row naming the slot appends the token it drew.
    const SeqState = struct {
        tokens: []i32, // (max_num_seqs, capacity)
        len: []u32, // (max_num_seqs); 0 and closed, or open
        prompt_len: []u32,
        open: []bool,
        capacity: usize, // max_blocks_per_seq * block_size: a whole sequence

        pub fn history(s: SeqState, slot: usize) []const i32 {
            return s.tokens[slot * s.capacity ..][0..s.len[slot]];
        }

        pub fn append(s: SeqState, slot: usize, token: i32) void {
            if (s.len[slot] < s.capacity) {
                s.tokens[slot * s.capacity + s.len[slot]] = token;
                s.len[slot] += 1;
            }
        }
    };

    pub fn kvLayout(e: *const Engine) kernels.KvLayout {
        return .{ .block_size = e.config.block_size, .head_dim = e.model.head_dim, .num_kv_heads = e.model.num_kv_heads };
    }

    /// Layer `layer` of a cache, as elements.
    pub fn kvLayer(e: *const Engine, comptime T: type, cache: []u8, layer: usize) []T {
        const elems = e.kvLayout().layerLen(e.config.num_blocks);
        const all: [*]T = @ptrCast(@alignCast(cache.ptr));
        return all[layer * elems ..][0..elems];
    }

    /// Whether layer l attends over a sliding window (local) rather than the whole context.
    pub fn isLocal(e: *const Engine, l: usize) bool {
        const m = e.model;
        if (m.sliding_window == 0) return false;
        return m.sliding_window_pattern == 0 or (l + 1) % m.sliding_window_pattern != 0;
    }

    pub fn kvCacheBytes(e: *const Engine) u64 {
        return @as(u64, e.k_cache.len + e.v_cache.len);
    }

    pub fn create(
        allocator: std.mem.Allocator,
        model: abi.ModelConfig,
        config: abi.EngineConfig,
        paths: []const [:0]const u8,
        tensors: []const abi.Tensor,
        status: *abi.Status,
    ) (error{ LoadFailed, OutOfMemory } || std.Thread.SpawnError)!*Engine {
        const e = try allocator.create(Engine);
        errdefer allocator.destroy(e);
        e.* = undefined;
        e.allocator = allocator;
        e.model = model;
        e.config = config;
        e.weights = try weights_mod.load(allocator, model, paths, tensors, config.compute_dtype == @intFromEnum(abi.DType.bf16), config.num_threads, status);
        errdefer e.weights.deinit(allocator);
        e.pool = try BlockPool.init(allocator, config.num_blocks);
        errdefer e.pool.deinit(allocator);

        const layer_len = e.kvLayout().layerLen(config.num_blocks);
        e.kv_dtype = @enumFromInt(config.kv_cache_dtype);
        const kv_elem_bytes: usize = if (e.kv_dtype == .f16) 2 else 4;
        // The page allocator maps lazily, so an unused pool costs address space, not memory.
        // Huge pages where the kernel gives them: a new block's first write then faults once
        // per 2 MiB rather than once per 4 KiB (a fault costs microseconds in a VM, and a
        // decode step writes a few pages per layer), and attention's reads miss the TLB less.
        e.k_cache = try weights_mod.allocHugePages(model.num_layers * layer_len * kv_elem_bytes);
        errdefer std.heap.page_allocator.free(e.k_cache);
        e.v_cache = try weights_mod.allocHugePages(model.num_layers * layer_len * kv_elem_bytes);
        errdefer std.heap.page_allocator.free(e.v_cache);

        const half = model.head_dim / 2;
        e.rope_cos = try allocator.alloc(f32, @as(usize, model.max_position) * half);
        errdefer allocator.free(e.rope_cos);
        e.rope_sin = try allocator.alloc(f32, @as(usize, model.max_position) * half);
        errdefer allocator.free(e.rope_sin);
        fillRope(e.rope_cos, e.rope_sin, model);
        e.model.rope_inv_freq = null; // the caller's array is only valid during this call
        e.rope_local_cos = &.{};
        e.rope_local_sin = &.{};
        if (model.rope_local_theta != 0) {
            e.rope_local_cos = try allocator.alloc(f32, @as(usize, model.max_position) * half);
            errdefer allocator.free(e.rope_local_cos);
            e.rope_local_sin = try allocator.alloc(f32, @as(usize, model.max_position) * half);
            var local = model;
            local.rope_theta = model.rope_local_theta;
            local.rope_inv_freq = null;
            local.rope_attn_factor = 0;
            fillRope(e.rope_local_cos, e.rope_local_sin, local);
        }
        errdefer allocator.free(e.rope_local_cos);
        errdefer allocator.free(e.rope_local_sin);
        e.score_shape = .{
            .scale = if (model.attn_scale != 0) model.attn_scale else kernels.ScoreShape.plain(model.head_dim).scale,
            .softcap = model.attn_softcap,
        };

        e.scratch = try forward.Scratch.init(allocator, model, config);
        errdefer e.scratch.deinit(allocator);
        try e.initBatch();
        errdefer e.deinitBatch();

        try e.threads.init(allocator, config.num_threads);
        errdefer e.threads.deinit(allocator);
        e.mutex = .{};
        e.cond = .{};
        e.step_requested = false;
        e.busy = false;
        e.stopping = false;
        e.callback = null;
        e.async_error[0] = 0;
        e.thread = try std.Thread.spawn(.{}, engineThreadMain, .{e});
        return e;
    }

    pub fn destroy(e: *Engine) void {
        {
            e.mutex.lock();
            defer e.mutex.unlock();
            e.stopping = true;
            e.cond.signal();
        }
        e.thread.join();
        const allocator = e.allocator;
        e.threads.deinit(allocator);
        e.deinitBatch();
        e.scratch.deinit(allocator);
        allocator.free(e.rope_cos);
        allocator.free(e.rope_sin);
        allocator.free(e.rope_local_cos);
        allocator.free(e.rope_local_sin);
        std.heap.page_allocator.free(e.k_cache);
        std.heap.page_allocator.free(e.v_cache);
        e.pool.deinit(allocator);
        e.weights.deinit(allocator);
        allocator.destroy(e);
    }

    fn initBatch(e: *Engine) !void {
        const t: usize = e.config.max_num_batched_tokens;
        const s: usize = e.config.max_num_seqs;
        const capacity = @as(usize, e.config.max_blocks_per_seq) * e.config.block_size;
        const bias = s * abi.logit_bias_max;
        const k = s * abi.top_logprobs_max;
        const i32_count = 3 * t + (s + 1) + s + s * e.config.max_blocks_per_seq + s + s + s * capacity + bias + k;
        const i32s = try e.allocator.alloc(i32, i32_count);
        errdefer e.allocator.free(i32s);
        @memset(i32s, 0);
        const mask_words = (@as(usize, e.model.vocab_size) + 31) / 32;
        const masks = try e.allocator.alloc(u32, s * mask_words);
        errdefer e.allocator.free(masks);
        @memset(masks, 0xFFFF_FFFF);
        const sampling = try e.allocator.alloc(abi.SamplingParams, s);
        errdefer e.allocator.free(sampling);
        const f32s = try e.allocator.alloc(f32, s + s * @as(usize, e.model.vocab_size) + bias + k);
        errdefer e.allocator.free(f32s);
        const state_counts = try e.allocator.alloc(u32, 2 * s);
        errdefer e.allocator.free(state_counts);
        @memset(state_counts, 0);
        const state_open = try e.allocator.alloc(bool, s);
        @memset(state_open, false);
        e.batch_arrays = .{ .i32s = i32s, .sampling = sampling, .f32s = f32s, .masks = masks };
        var rest = i32s;
        const take = struct {
            fn f(r: *[]i32, n: usize) [*]i32 {
                const head = r.*[0..n];
                r.* = r.*[n..];
                return head.ptr;
            }
        }.f;
        e.batch = .{
            .num_tokens = 0,
            .num_seqs = 0,
            .num_samples = 0,
            .return_logits = 0,
            .token_ids = take(&rest, t),
            .positions = take(&rest, t),
            .slot_mapping = take(&rest, t),
            .query_start_loc = take(&rest, s + 1),
            .seq_lens = take(&rest, s),
            .block_tables = take(&rest, s * e.config.max_blocks_per_seq),
            .sample_indices = take(&rest, s),
            .out_token_ids = take(&rest, s),
            .sampling = sampling.ptr,
            .out_logprobs = f32s.ptr,
            .logits = f32s.ptr + s,
            .bias_capacity = @intCast(bias),
            .logit_bias_ids = take(&rest, bias),
            .out_top_ids = take(&rest, k),
            .logit_bias_values = f32s.ptr + s + s * @as(usize, e.model.vocab_size),
            .out_top_logprobs = f32s.ptr + s + s * @as(usize, e.model.vocab_size) + bias,
            .mask_words = @intCast(mask_words),
            .allowed_token_mask = masks.ptr,
        };
        e.seq_state = .{
            .tokens = rest[0 .. s * capacity],
            .len = state_counts[0..s],
            .prompt_len = state_counts[s..],
            .open = state_open,
            .capacity = capacity,
        };
        assert(rest.len == s * capacity);
    }

    /// Opens sequence-state slot `slot` with the tokens so far (the first prompt_len the prompt).
    pub fn seqStateOpen(e: *Engine, slot: u32, tokens: []const i32, prompt_len: u32) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        if (e.busy) return errors.fail(.busy, "cannot open a sequence state while a step runs", .{});
        const st = e.seq_state;
        if (slot >= st.open.len) return errors.fail(.invalid_argument, "sequence state slot {d} of {d}", .{ slot, st.open.len });
        if (tokens.len > st.capacity or prompt_len > tokens.len)
            return errors.fail(.invalid_argument, "sequence state of {d} tokens ({d} of the prompt) over {d}", .{ tokens.len, prompt_len, st.capacity });
        for (tokens) |tok| if (tok < 0 or tok >= e.model.vocab_size) return errors.fail(.invalid_argument, "sequence state holds token {d}", .{tok});
        @memcpy(st.tokens[slot * st.capacity ..][0..tokens.len], tokens);
        st.len[slot] = @intCast(tokens.len);
        st.prompt_len[slot] = prompt_len;
        st.open[slot] = true;
        return .ok;
    }

    pub fn seqStateClose(e: *Engine, slot: u32) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        if (e.busy) return errors.fail(.busy, "cannot close a sequence state while a step runs", .{});
        if (slot >= e.seq_state.open.len) return errors.fail(.invalid_argument, "sequence state slot {d} of {d}", .{ slot, e.seq_state.open.len });
        e.seq_state.open[slot] = false;
        e.seq_state.len[slot] = 0;
        return .ok;
    }

    fn deinitBatch(e: *Engine) void {
        e.allocator.free(e.batch_arrays.i32s);
        e.allocator.free(e.batch_arrays.sampling);
        e.allocator.free(e.batch_arrays.f32s);
        e.allocator.free(e.batch_arrays.masks);
        e.allocator.free(e.seq_state.len.ptr[0 .. 2 * e.seq_state.len.len]);
        e.allocator.free(e.seq_state.open);
    }

    /// Checks every index the step will follow, so a bad batch is refused rather than
    /// read out of bounds. The TypeScript side validates too; this is the last line.
    pub fn validateBatch(e: *const Engine) abi.Status {
        const b = e.batch;
        const c = e.config;
        if (b.num_tokens == 0 or b.num_tokens > c.max_num_batched_tokens)
            return errors.fail(.invalid_argument, "num_tokens {d} not in [1, {d}]", .{ b.num_tokens, c.max_num_batched_tokens });
        if (b.num_seqs == 0 or b.num_seqs > c.max_num_seqs)
            return errors.fail(.invalid_argument, "num_seqs {d} not in [1, {d}]", .{ b.num_seqs, c.max_num_seqs });
        if (b.num_samples > c.max_num_seqs)
            return errors.fail(.invalid_argument, "num_samples {d} over {d}", .{ b.num_samples, c.max_num_seqs });
        if (b.query_start_loc[0] != 0 or b.query_start_loc[b.num_seqs] != b.num_tokens)
            return errors.fail(.invalid_argument, "query_start_loc must run from 0 to num_tokens ({d})", .{b.num_tokens});
        const capacity: i64 = @as(i64, c.num_blocks) * c.block_size;
        for (0..b.num_seqs) |s| {
            const begin = b.query_start_loc[s];
            const end = b.query_start_loc[s + 1];
            if (end <= begin) return errors.fail(.invalid_argument, "sequence {d} has no tokens", .{s});
            const seq_len = b.seq_lens[s];
            if (seq_len <= 0 or @as(i64, seq_len) > @as(i64, c.max_blocks_per_seq) * c.block_size or seq_len > e.model.max_position)
                return errors.fail(.invalid_argument, "sequence {d} has seq_len {d}", .{ s, seq_len });
            const table = b.block_tables[s * c.max_blocks_per_seq ..][0..c.max_blocks_per_seq];
            const blocks_used: usize = @intCast(@divFloor(seq_len + @as(i32, @intCast(c.block_size)) - 1, @as(i32, @intCast(c.block_size))));
            for (table[0..blocks_used]) |block| {
                if (block < 0 or block >= c.num_blocks) return errors.fail(.invalid_argument, "sequence {d} block table holds block {d} of {d}", .{ s, block, c.num_blocks });
            }
            for (@as(usize, @intCast(begin))..@as(usize, @intCast(end))) |t| {
                const token = b.token_ids[t];
                const pos = b.positions[t];
                const slot = b.slot_mapping[t];
                if (token < 0 or token >= e.model.vocab_size) return errors.fail(.invalid_argument, "token id {d} is outside the vocabulary (size {d})", .{ token, e.model.vocab_size });
                if (pos < 0 or pos >= seq_len) return errors.fail(.invalid_argument, "token {d} has position {d} outside its sequence length {d}", .{ t, pos, seq_len });
                if (slot < 0 or slot >= capacity) return errors.fail(.invalid_argument, "token {d} has slot {d} of {d}", .{ t, slot, capacity });
                const want_slot = kernels.slotOf(table, c.block_size, @intCast(pos));
                if (want_slot != slot) return errors.fail(.invalid_argument, "token {d}: slot {d} does not match its block table ({d})", .{ t, slot, want_slot });
            }
        }
        for (0..b.num_samples) |i| {
            const idx = b.sample_indices[i];
            if (idx < 0 or idx >= b.num_tokens) return errors.fail(.invalid_argument, "sample index {d} outside the batch", .{idx});
            const p = b.sampling[i];
            if (!(p.temperature >= 0) or !(p.top_p > 0 and p.top_p <= 1) or !(p.min_p >= 0 and p.min_p <= 1) or !(p.repetition_penalty > 0) or
                !std.math.isFinite(p.presence_penalty) or !std.math.isFinite(p.frequency_penalty))
                return errors.fail(.invalid_argument, "sampling parameters of row {d} out of range", .{i});
            if (p.num_top_logprobs < 0 or p.num_top_logprobs > abi.top_logprobs_max)
                return errors.fail(.invalid_argument, "row {d} asks for {d} top logprobs (at most {d})", .{ i, p.num_top_logprobs, abi.top_logprobs_max });
            if (p.state_slot >= 0) {
                if (p.state_slot >= e.seq_state.open.len or !e.seq_state.open[@intCast(p.state_slot)])
                    return errors.fail(.invalid_argument, "row {d} names sequence state {d}, which is not open", .{ i, p.state_slot });
                // Each row appends the token it draws to its state: two rows may not share one.
                for (b.sampling[0..i]) |q| if (q.state_slot == p.state_slot)
                    return errors.fail(.invalid_argument, "rows share sequence state {d}", .{p.state_slot});
            } else if (p.state_slot != -1) return errors.fail(.invalid_argument, "row {d} has state_slot {d}", .{ i, p.state_slot });
            if (p.use_mask != 0 and p.use_mask != 1) return errors.fail(.invalid_argument, "row {d} use_mask is {d} (0 or 1)", .{ i, p.use_mask });
            if (p.bias_offset < 0 or p.bias_count < 0 or p.bias_count > abi.logit_bias_max or
                @as(u64, @intCast(p.bias_offset)) + @as(u64, @intCast(p.bias_count)) > b.bias_capacity)
                return errors.fail(.invalid_argument, "row {d} logit bias out of range", .{i});
            for (b.logit_bias_ids[@intCast(p.bias_offset)..][0..@intCast(p.bias_count)], b.logit_bias_values[@intCast(p.bias_offset)..][0..@intCast(p.bias_count)]) |id, v| {
                if (id < 0 or id >= e.model.vocab_size or std.math.isNan(v)) return errors.fail(.invalid_argument, "row {d} logit bias for token {d} is invalid", .{ i, id });
            }
        }
        return .ok;
    }

    pub fn step(e: *Engine) abi.Status {
        const status = e.validateBatch();
        if (status != .ok) return status;
        return forward.run(e);
    }

    /// Waits until the caller has written this step's masks (bounded), then checks that every
    /// masked row allows some token.
    pub fn awaitMasks(e: *Engine) abi.Status {
        const b = &e.batch;
        var waited_ns: u64 = 0;
        while (@atomicLoad(u32, &b.masks_pending, .acquire) != 0) {
            if (waited_ns >= masks_wait_max_ns) return errors.fail(.internal, "the step's token masks did not come within {d} s", .{masks_wait_max_ns / std.time.ns_per_s});
            std.time.sleep(masks_poll_ns);
            waited_ns += masks_poll_ns;
        }
        for (0..b.num_samples) |i| {
            if (b.sampling[i].use_mask != 1) continue;
            var any: u32 = 0;
            for (b.allowed_token_mask[i * b.mask_words ..][0..b.mask_words]) |w| any |= w;
            if (any == 0) return errors.fail(.invalid_argument, "row {d} allows no token (its mask is empty)", .{i});
        }
        return .ok;
    }

    fn engineThreadMain(e: *Engine) void {
        while (true) {
            e.mutex.lock();
            while (!e.step_requested and !e.stopping) e.cond.wait(&e.mutex);
            if (e.stopping) {
                e.mutex.unlock();
                return;
            }
            e.step_requested = false;
            e.mutex.unlock();

            const status = e.step();
            if (status != .ok) {
                const msg = errors.message();
                const n = @min(msg.len, e.async_error.len);
                @memcpy(e.async_error[0..n], msg[0..n]);
                e.async_error[n] = 0;
            }
            const callback = blk: {
                e.mutex.lock();
                defer e.mutex.unlock();
                e.busy = false;
                break :blk e.callback;
            };
            // The caller may start the next step from inside the callback.
            if (callback) |cb| cb(@intFromEnum(status), e.callback_user_data);
        }
    }

    pub fn stepAsync(e: *Engine) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        if (e.callback == null) return errors.fail(.invalid_argument, "set a step callback before an async step", .{});
        if (e.busy) return errors.fail(.busy, "a step is already running", .{});
        e.busy = true;
        e.step_requested = true;
        e.async_error[0] = 0;
        e.cond.signal();
        return .ok;
    }

    /// For the synchronous path: refuses while an async step is in flight.
    pub fn stepSync(e: *Engine) abi.Status {
        {
            e.mutex.lock();
            defer e.mutex.unlock();
            if (e.busy) return errors.fail(.busy, "a step is already running", .{});
            e.busy = true;
        }
        const status = e.step();
        e.mutex.lock();
        defer e.mutex.unlock();
        e.busy = false;
        return status;
    }
};

/// cos/sin of pos * theta^(-2i / head_dim), for every position and pair.
fn fillRope(cos: []f32, sin: []f32, m: abi.ModelConfig) void {
    const half = m.head_dim / 2;
    const scale: f64 = if (m.rope_attn_factor == 0) 1 else m.rope_attn_factor;
    for (0..half) |i| {
        const exponent = @as(f64, @floatFromInt(2 * i)) / @as(f64, @floatFromInt(m.head_dim));
        const freq = if (m.rope_inv_freq) |f| f[i] else 1.0 / std.math.pow(f64, m.rope_theta, exponent);
        for (0..m.max_position) |pos| {
            const angle = @as(f64, @floatFromInt(pos)) * freq;
            cos[pos * half + i] = @floatCast(@cos(angle) * scale);
            sin[pos * half + i] = @floatCast(@sin(angle) * scale);
        }
    }
}
