//! The engine: a backend (weights, KV cache, forward pass, sampling on the CPU or a GPU),
//! the block pool, the sequence states, two step descriptors and the engine thread that
//! runs queued steps in order. Everything is allocated in `create`; a step allocates nothing.
//!
//! Steps run one after another on the engine thread, in the order they were queued: while
//! one runs, the caller fills the other descriptor and may queue it, so the next step starts
//! the moment this one ends. A token of the next step may be a placeholder for a draw of the
//! one before it (batch.resolvePlaceholders), which the caller has not seen yet.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const batch_mod = @import("batch.zig");
const BlockPool = @import("block_pool.zig").BlockPool;
const SeqState = @import("seq_state.zig").SeqState;
const build_options = @import("build_options");

/// The backend this library is built with (build.zig's -Dbackend).
pub const backend_module = if (std.mem.eql(u8, build_options.backend, "cuda"))
    @import("cuda_backend.zig")
else
    @import("cpu_backend.zig");
pub const Backend = if (std.mem.eql(u8, build_options.backend, "cuda")) backend_module.CudaBackend else backend_module.CpuBackend;

const nb = abi.num_batches;

/// Bytes one KV block takes on either backend: K and V of every layer for block_size tokens.
pub fn kvBytesPerBlock(m: abi.ModelConfig, c: abi.EngineConfig) u64 {
    const elem: u64 = if (c.kv_cache_dtype == @intFromEnum(abi.DType.f16)) 2 else 4;
    return @as(u64, c.block_size) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * elem;
}

pub const Engine = struct {
    allocator: std.mem.Allocator,
    model: abi.ModelConfig,
    config: abi.EngineConfig,
    backend: Backend,
    pool: BlockPool,
    descriptors: [nb]batch_mod.Descriptor,
    seq_state: SeqState,
    last: batch_mod.LastDraws, // the step that ran last: what its rows drew
    held_slots: [nb][]u32, // the sequence-state slots each queued or running step names
    held_count: [nb]usize = .{0} ** nb,

    // Engine thread: queued steps, handed over under `mutex`.
    thread: std.Thread,
    mutex: std.Thread.Mutex = .{},
    cond: std.Thread.Condition = .{},
    queue: [nb]u32 = .{0} ** nb, // descriptor indices, oldest (running) first
    queue_len: usize = 0,
    sync_running: bool = false, // a step runs on a caller's thread (ifn_engine_step)
    stopping: bool = false,
    callback: ?abi.StepCallback = null,
    callback_user_data: ?*anyopaque = null,
    async_error: [nb][1024:0]u8 = .{[_:0]u8{0} ** 1024} ** nb,

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
        e.* = .{
            .allocator = allocator,
            .model = model,
            .config = config,
            .backend = undefined,
            .pool = undefined,
            .descriptors = undefined,
            .seq_state = undefined,
            .last = undefined,
            .held_slots = undefined,
            .thread = undefined,
        };
        try e.backend.init(allocator, model, config, paths, tensors, status);
        errdefer e.backend.deinit();
        e.model.rope_inv_freq = null; // the caller's array is only valid during this call
        e.config.num_blocks = try e.sizePool(status);
        try e.backend.allocKv(e.config.num_blocks);
        e.pool = try BlockPool.init(allocator, e.config.num_blocks);
        errdefer e.pool.deinit(allocator);
        var made: usize = 0;
        errdefer for (e.descriptors[0..made]) |*d| d.deinit(allocator);
        for (&e.descriptors) |*d| {
            d.* = try batch_mod.Descriptor.init(allocator, model, e.config);
            made += 1;
        }
        const capacity = @as(usize, config.max_blocks_per_seq) * config.block_size;
        e.seq_state = try SeqState.init(allocator, config.max_num_seqs, capacity);
        errdefer e.seq_state.deinit(allocator);
        const u32s = try allocator.alloc(u32, nb * config.max_num_seqs);
        errdefer allocator.free(u32s);
        for (&e.held_slots, 0..) |*h, i| h.* = u32s[i * config.max_num_seqs ..][0..config.max_num_seqs];
        e.last = .{ .tokens = try allocator.alloc(i32, config.max_num_seqs) };
        errdefer allocator.free(e.last.tokens);
        e.thread = try std.Thread.spawn(.{}, engineThreadMain, .{e});
        return e;
    }

    /// The pool's size in blocks: as given, or as many as the backend's budget holds, but no
    /// more than max_num_seqs full-length sequences use.
    fn sizePool(e: *Engine, status: *abi.Status) error{LoadFailed}!u32 {
        const c = e.config;
        if (c.num_blocks != 0) return c.num_blocks;
        const per_block = kvBytesPerBlock(e.model, c);
        const budget = e.backend.kvBudgetBytes();
        const by_seqs = @as(u64, c.max_num_seqs) * c.max_blocks_per_seq;
        const blocks: u32 = @intCast(@min(budget / per_block, by_seqs, std.math.maxInt(i32)));
        if (blocks == 0) {
            status.* = errors.fail(.out_of_memory, "a KV budget of {d} bytes holds no KV block of {d} bytes", .{ budget, per_block });
            return error.LoadFailed;
        }
        return blocks;
    }

    pub fn destroy(e: *Engine) void {
        {
            e.mutex.lock();
            defer e.mutex.unlock();
            e.stopping = true;
            e.cond.broadcast();
        }
        e.thread.join();
        const allocator = e.allocator;
        allocator.free(e.last.tokens);
        allocator.free(e.held_slots[0].ptr[0 .. nb * e.config.max_num_seqs]);
        e.seq_state.deinit(allocator);
        for (&e.descriptors) |*d| d.deinit(allocator);
        e.pool.deinit(allocator);
        e.backend.deinit();
        allocator.destroy(e);
    }

    pub fn batch(e: *Engine, index: u32) ?*abi.Batch {
        if (index >= nb) return null;
        return &e.descriptors[index].batch;
    }

    /// Whether descriptor `index` is queued or running.
    fn inFlight(e: *const Engine, index: u32) bool {
        for (e.queue[0..e.queue_len]) |q| if (q == index) return true;
        return false;
    }

    fn idle(e: *const Engine) bool {
        return e.queue_len == 0 and !e.sync_running;
    }

    /// Counts the state slots a step's rows name as held until it ends (under `mutex`).
    fn holdSlots(e: *Engine, index: u32) void {
        const b = &e.descriptors[index].batch;
        var n: usize = 0;
        for (b.sampling[0..@min(b.num_samples, e.config.max_num_seqs)]) |p| {
            if (p.state_slot < 0 or p.state_slot >= e.config.max_num_seqs) continue;
            const slot: u32 = @intCast(p.state_slot);
            e.seq_state.users[slot] +|= 1;
            e.held_slots[index][n] = slot;
            n += 1;
        }
        e.held_count[index] = n;
    }

    fn releaseSlots(e: *Engine, index: u32) void {
        for (e.held_slots[index][0..e.held_count[index]]) |slot| e.seq_state.users[slot] -= 1;
        e.held_count[index] = 0;
    }

    /// Placeholders, then the checks, then the backend's forward pass and sampling.
    fn run(e: *Engine, index: u32) abi.Status {
        const b = &e.descriptors[index].batch;
        var status = batch_mod.resolvePlaceholders(b, e.config, &e.last);
        if (status == .ok) status = batch_mod.validate(b, e.model, e.config, e.seq_state);
        if (status == .ok) status = e.backend.step(b, &e.seq_state);
        e.last.record(b, status);
        return status;
    }

    fn engineThreadMain(e: *Engine) void {
        while (true) {
            e.mutex.lock();
            while (e.queue_len == 0 and !e.stopping) e.cond.wait(&e.mutex);
            if (e.stopping) {
                e.mutex.unlock();
                return;
            }
            const index = e.queue[0];
            e.mutex.unlock();

            const status = e.run(index);
            if (status != .ok) {
                const msg = errors.message();
                const n = @min(msg.len, e.async_error[index].len);
                @memcpy(e.async_error[index][0..n], msg[0..n]);
                e.async_error[index][n] = 0;
            }
            const callback = blk: {
                e.mutex.lock();
                defer e.mutex.unlock();
                e.releaseSlots(index);
                std.mem.copyForwards(u32, e.queue[0 .. e.queue_len - 1], e.queue[1..e.queue_len]);
                e.queue_len -= 1;
                e.cond.broadcast();
                break :blk e.callback;
            };
            // The caller may queue the next step from inside the callback.
            if (callback) |cb| cb(@intFromEnum(status), index, e.callback_user_data);
        }
    }

    /// Queues the step in descriptor `index`; it runs after those queued before it.
    pub fn stepAsync(e: *Engine, index: u32) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        if (index >= nb) return errors.fail(.invalid_argument, "descriptor {d} of {d}", .{ index, nb });
        if (e.callback == null) return errors.fail(.invalid_argument, "set a step callback before an async step", .{});
        if (e.sync_running) return errors.fail(.busy, "a step is running on another thread", .{});
        if (e.inFlight(index)) return errors.fail(.busy, "descriptor {d} is already queued", .{index});
        assert(e.queue_len < nb);
        e.async_error[index][0] = 0;
        e.holdSlots(index);
        e.queue[e.queue_len] = index;
        e.queue_len += 1;
        e.cond.broadcast();
        return .ok;
    }

    /// Runs descriptor `index` on the calling thread; refused while any step is queued.
    pub fn stepSync(e: *Engine, index: u32) abi.Status {
        {
            e.mutex.lock();
            defer e.mutex.unlock();
            if (index >= nb) return errors.fail(.invalid_argument, "descriptor {d} of {d}", .{ index, nb });
            if (!e.idle()) return errors.fail(.busy, "a step is already running", .{});
            e.sync_running = true;
        }
        const status = e.run(index);
        e.mutex.lock();
        defer e.mutex.unlock();
        e.sync_running = false;
        return status;
    }

    pub fn setCallback(e: *Engine, callback: ?abi.StepCallback, user_data: ?*anyopaque) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        if (!e.idle()) return errors.fail(.busy, "cannot change the callback while a step runs", .{});
        e.callback = callback;
        e.callback_user_data = user_data;
        return .ok;
    }

    /// Checks a slot for open/close: in range and named by no queued or running step.
    fn slotFree(e: *const Engine, slot: u32) abi.Status {
        if (slot >= e.seq_state.numSlots()) return errors.fail(.invalid_argument, "sequence state slot {d} of {d}", .{ slot, e.seq_state.numSlots() });
        if (e.seq_state.users[slot] != 0) return errors.fail(.busy, "sequence state slot {d} is named by a step in flight", .{slot});
        return .ok;
    }

    /// Opens sequence-state slot `slot` with the tokens so far (the first prompt_len the prompt).
    pub fn seqStateOpen(e: *Engine, slot: u32, tokens: []const i32, prompt_len: u32) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        const free = e.slotFree(slot);
        if (free != .ok) return free;
        const st = e.seq_state;
        if (tokens.len > st.capacity or prompt_len > tokens.len)
            return errors.fail(.invalid_argument, "sequence state of {d} tokens ({d} of the prompt) over {d}", .{ tokens.len, prompt_len, st.capacity });
        for (tokens) |tok| if (tok < 0 or tok >= e.model.vocab_size) return errors.fail(.invalid_argument, "sequence state holds token {d}", .{tok});
        st.set(slot, tokens, prompt_len);
        return e.backend.seqStateOpened(slot, &e.seq_state);
    }

    pub fn seqStateClose(e: *Engine, slot: u32) abi.Status {
        e.mutex.lock();
        defer e.mutex.unlock();
        const free = e.slotFree(slot);
        if (free != .ok) return free;
        e.seq_state.close(slot);
        return .ok;
    }
};
