//! libinferneo's exported C ABI (engine/include/inferneo.h). Each export checks its
//! arguments, turns Zig errors into status codes and leaves a message behind.

const std = @import("std");
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const engine_mod = @import("engine.zig");
const Engine = engine_mod.Engine;
const backend = engine_mod.backend_module;
const weights = @import("weights.zig");
const kernels = @import("kernels.zig");

const allocator = std.heap.c_allocator;

fn code(status: abi.Status) i32 {
    return @intFromEnum(status);
}

export fn ifn_abi_version() i32 {
    return abi.abi_version;
}

export fn ifn_status_string(status: i32) [*:0]const u8 {
    return switch (status) {
        0 => "ok",
        1 => "invalid argument",
        2 => "out of memory",
        3 => "I/O error",
        4 => "unsupported",
        5 => "shape mismatch",
        6 => "KV block pool exhausted",
        7 => "busy",
        8 => "internal error",
        else => "unknown status",
    };
}

export fn ifn_last_error() [*:0]const u8 {
    return errors.message().ptr;
}

fn checkModelConfig(m: abi.ModelConfig) abi.Status {
    if (m.vocab_size == 0 or m.hidden_size == 0 or m.intermediate_size == 0 or m.num_layers == 0 or m.num_heads == 0 or m.num_kv_heads == 0 or m.head_dim == 0 or m.max_position == 0)
        return errors.fail(.invalid_argument, "model config has a zero dimension", .{});
    if (m.num_layers > weights.layers_max) return errors.fail(.unsupported, "{d} layers is over the limit of {d}", .{ m.num_layers, weights.layers_max });
    if (m.num_heads % m.num_kv_heads != 0) return errors.fail(.unsupported, "num_heads {d} is not a multiple of num_kv_heads {d}", .{ m.num_heads, m.num_kv_heads });
    if (m.head_dim % 2 != 0) return errors.fail(.unsupported, "head_dim {d} is odd; RoPE needs pairs", .{m.head_dim});
    if (m.rope_inv_freq) |f| for (f[0 .. m.head_dim / 2]) |v| {
        if (!(v > 0) or !std.math.isFinite(v)) return errors.fail(.invalid_argument, "rope_inv_freq holds {d}; frequencies must be positive", .{v});
    };
    if (!(m.rope_attn_factor >= 0) or !std.math.isFinite(m.rope_attn_factor)) return errors.fail(.invalid_argument, "rope_attn_factor must be 0 or positive", .{});
    if (!(m.rope_theta > 0) or !(m.rms_norm_eps > 0)) return errors.fail(.invalid_argument, "rope_theta and rms_norm_eps must be positive", .{});
    return .ok;
}

fn checkEngineConfig(c: abi.EngineConfig) abi.Status {
    if (c.block_size == 0 or c.max_num_batched_tokens == 0 or c.max_num_seqs == 0 or c.max_blocks_per_seq == 0)
        return errors.fail(.invalid_argument, "engine config has a zero size", .{});
    if (c.block_size > kernels.tile_chunk) return errors.fail(.unsupported, "block_size {d} is over the limit of {d}", .{ c.block_size, kernels.tile_chunk });
    return backend.checkConfig(c);
}

export fn ifn_engine_create(
    model: ?*const abi.ModelConfig,
    config: ?*const abi.EngineConfig,
    files: ?[*]const u8,
    n_files: u32,
    tensors: ?[*]const abi.Tensor,
    n_tensors: u32,
    out: ?*?*Engine,
) i32 {
    errors.clear();
    const m = model orelse return code(errors.fail(.invalid_argument, "model config is null", .{}));
    const c = config orelse return code(errors.fail(.invalid_argument, "engine config is null", .{}));
    const out_ptr = out orelse return code(errors.fail(.invalid_argument, "out is null", .{}));
    out_ptr.* = null;
    if (files == null or tensors == null) return code(errors.fail(.invalid_argument, "files or tensors is null", .{}));
    var status = checkModelConfig(m.*);
    if (status != .ok) return code(status);
    status = checkEngineConfig(c.*);
    if (status != .ok) return code(status);
    if (n_files > weights.files_max) return code(errors.fail(.invalid_argument, "n_files {d} over {d}", .{ n_files, weights.files_max }));

    var paths: [weights.files_max][:0]const u8 = undefined;
    var cursor = files.?;
    for (paths[0..n_files]) |*p| {
        p.* = std.mem.span(@as([*:0]const u8, @ptrCast(cursor)));
        cursor += p.len + 1;
    }
    var load_status: abi.Status = .internal;
    const engine = Engine.create(allocator, m.*, c.*, paths[0..n_files], tensors.?[0..n_tensors], &load_status) catch |err| {
        return switch (err) {
            error.LoadFailed => code(load_status),
            error.OutOfMemory => code(errors.fail(.out_of_memory, "out of memory while creating the engine", .{})),
            else => code(errors.fail(.internal, "cannot start the engine threads: {s}", .{@errorName(err)})),
        };
    };
    out_ptr.* = engine;
    return 0;
}

export fn ifn_engine_num_blocks(engine: ?*const Engine) u32 {
    const e = engine orelse return 0;
    return e.config.num_blocks;
}

/// Writes a struct's size, then each field's byte offset in declaration order, to `out`;
/// returns how many numbers that is (0 for an unknown struct or too small an `out`).
export fn ifn_struct_layout(which: u32, out: ?[*]u32, capacity: u32) u32 {
    const o = out orelse return 0;
    inline for (abi.layout_structs, 0..) |T, index| {
        if (which == index) {
            const fields = std.meta.fields(T);
            if (capacity < fields.len + 1) return 0;
            o[0] = @sizeOf(T);
            inline for (fields, 1..) |f, i| o[i] = @offsetOf(T, f.name);
            return fields.len + 1;
        }
    }
    return 0;
}

export fn ifn_engine_destroy(engine: ?*Engine) void {
    if (engine) |e| e.destroy();
}

export fn ifn_engine_batch(engine: ?*Engine, index: u32) ?*abi.Batch {
    const e = engine orelse return null;
    return e.batch(index);
}

export fn ifn_engine_kv_cache_bytes(engine: ?*const Engine) u64 {
    const e = engine orelse return 0;
    return e.backend.kvCacheBytes();
}

export fn ifn_engine_device_info(engine: ?*const Engine, out: ?*abi.DeviceInfo) i32 {
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const o = out orelse return code(errors.fail(.invalid_argument, "out is null", .{}));
    o.* = e.backend.deviceInfo();
    return 0;
}

export fn ifn_backend_name() [*:0]const u8 {
    return backend.name;
}

export fn ifn_device_count() i32 {
    return backend.deviceCount();
}

export fn ifn_engine_step(engine: ?*Engine, index: u32) i32 {
    errors.clear();
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    return code(e.stepSync(index));
}

export fn ifn_engine_set_callback(engine: ?*Engine, callback: ?abi.StepCallback, user_data: ?*anyopaque) i32 {
    errors.clear();
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    return code(e.setCallback(callback, user_data));
}

export fn ifn_engine_step_async(engine: ?*Engine, index: u32) i32 {
    errors.clear();
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    return code(e.stepAsync(index));
}

export fn ifn_engine_last_error(engine: ?*const Engine, index: u32) [*:0]const u8 {
    const e = engine orelse return "";
    if (index >= abi.num_batches) return "";
    return &e.async_error[index];
}

export fn ifn_seq_state_open(engine: ?*Engine, slot: u32, tokens: ?[*]const i32, n: u32, prompt_len: u32) i32 {
    errors.clear();
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const t: []const i32 = if (tokens) |p| p[0..n] else if (n == 0) &.{} else return code(errors.fail(.invalid_argument, "tokens is null", .{}));
    return code(e.seqStateOpen(slot, t, prompt_len));
}

export fn ifn_seq_state_close(engine: ?*Engine, slot: u32) i32 {
    errors.clear();
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    return code(e.seqStateClose(slot));
}

fn blockIds(ids: ?[*]const i32, n: u32, e: *const Engine) ?[]const u32 {
    const p = ids orelse return null;
    const slice = p[0..n];
    for (slice) |id| if (id < 0 or id >= e.config.num_blocks) return null;
    return @ptrCast(slice);
}

export fn ifn_blocks_allocate(engine: ?*Engine, n: u32, out_block_ids: ?[*]i32) i32 {
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const out = out_block_ids orelse return code(errors.fail(.invalid_argument, "out_block_ids is null", .{}));
    e.pool.allocate(@ptrCast(out[0..n])) catch return code(errors.fail(.pool_exhausted, "asked for {d} KV blocks, {d} free", .{ n, e.pool.num_free }));
    return 0;
}

export fn ifn_blocks_free(engine: ?*Engine, n: u32, block_ids: ?[*]const i32) i32 {
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const ids = blockIds(block_ids, n, e) orelse return code(errors.fail(.invalid_argument, "block ids null or out of range", .{}));
    e.pool.free(ids) catch |err| return code(errors.fail(.invalid_argument, "free refused: {s}", .{@errorName(err)}));
    return 0;
}

export fn ifn_blocks_ref(engine: ?*Engine, n: u32, block_ids: ?[*]const i32) i32 {
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const ids = blockIds(block_ids, n, e) orelse return code(errors.fail(.invalid_argument, "block ids null or out of range", .{}));
    e.pool.ref(ids) catch |err| return code(errors.fail(.invalid_argument, "ref refused: {s}", .{@errorName(err)}));
    return 0;
}

export fn ifn_blocks_cache_insert(engine: ?*Engine, n: u32, block_ids: ?[*]const i32, hashes: ?[*]const u64) i32 {
    const e = engine orelse return code(errors.fail(.invalid_argument, "engine is null", .{}));
    const ids = blockIds(block_ids, n, e) orelse return code(errors.fail(.invalid_argument, "block ids null or out of range", .{}));
    const h = hashes orelse return code(errors.fail(.invalid_argument, "hashes is null", .{}));
    e.pool.cacheInsert(ids, h[0..n]) catch return code(errors.fail(.invalid_argument, "cache insert refused: a block is free or a hash is zero", .{}));
    return 0;
}

export fn ifn_blocks_cache_lookup(engine: ?*Engine, n: u32, hashes: ?[*]const u64, out_block_ids: ?[*]i32) u32 {
    const e = engine orelse return 0;
    const h = hashes orelse return 0;
    const out = out_block_ids orelse return 0;
    return @intCast(e.pool.cacheLookup(h[0..n], @ptrCast(out[0..n])));
}

export fn ifn_blocks_num_cached(engine: ?*const Engine) u32 {
    const e = engine orelse return 0;
    return e.pool.numCached();
}

export fn ifn_blocks_num_free(engine: ?*const Engine) u32 {
    const e = engine orelse return 0;
    return e.pool.num_free;
}

export fn ifn_blocks_ref_count(engine: ?*const Engine, block_id: i32) u32 {
    const e = engine orelse return 0;
    if (block_id < 0) return 0;
    return e.pool.refCount(@intCast(block_id));
}

test {
    _ = @import("block_pool.zig");
    _ = @import("seq_state.zig");
    _ = @import("cuda_test.zig");
    _ = @import("kernels.zig");
    _ = @import("sampler.zig");
    _ = @import("thread_pool.zig");
    _ = @import("quant.zig");
    _ = @import("qgemm.zig");
    _ = @import("fgemm.zig");
    _ = @import("bgemm.zig");
}
