//! The step descriptor (ifn_batch): its arrays, allocated once; the checks every step
//! passes before it runs; the tokens it takes from the step before (placeholders); and
//! the wait for the caller's token masks.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const kernels = @import("kernels.zig");
const SeqState = @import("seq_state.zig").SeqState;

/// How long a step waits for its caller's token masks, and how often it looks.
const masks_wait_max_ns: u64 = 10 * std.time.ns_per_s;
const masks_poll_ns: u64 = 20 * std.time.ns_per_us;

/// One descriptor and the memory behind its arrays.
pub const Descriptor = struct {
    batch: abi.Batch,
    i32s: []i32,
    sampling: []abi.SamplingParams,
    f32s: []f32,
    masks: []u32, // (max_num_seqs, mask_words), all ones until the caller writes a row

    pub fn init(allocator: std.mem.Allocator, m: abi.ModelConfig, c: abi.EngineConfig) !Descriptor {
        const t: usize = c.max_num_batched_tokens;
        const s: usize = c.max_num_seqs;
        const vocab: usize = m.vocab_size;
        const bias = s * abi.logit_bias_max;
        const k = s * abi.top_logprobs_max;
        const i32s = try allocator.alloc(i32, 3 * t + (s + 1) + s + s * c.max_blocks_per_seq + s + s + bias + k);
        errdefer allocator.free(i32s);
        @memset(i32s, 0);
        const mask_words = (vocab + 31) / 32;
        const masks = try allocator.alloc(u32, s * mask_words);
        errdefer allocator.free(masks);
        @memset(masks, 0xFFFF_FFFF);
        const sampling = try allocator.alloc(abi.SamplingParams, s);
        errdefer allocator.free(sampling);
        const f32s = try allocator.alloc(f32, s + s * vocab + bias + k);
        var rest = i32s;
        const take = struct {
            fn f(r: *[]i32, n: usize) [*]i32 {
                const head = r.*[0..n];
                r.* = r.*[n..];
                return head.ptr;
            }
        }.f;
        const batch = abi.Batch{
            .num_tokens = 0,
            .num_seqs = 0,
            .num_samples = 0,
            .return_logits = 0,
            .token_ids = take(&rest, t),
            .positions = take(&rest, t),
            .slot_mapping = take(&rest, t),
            .query_start_loc = take(&rest, s + 1),
            .seq_lens = take(&rest, s),
            .block_tables = take(&rest, s * c.max_blocks_per_seq),
            .sample_indices = take(&rest, s),
            .out_token_ids = take(&rest, s),
            .sampling = sampling.ptr,
            .out_logprobs = f32s.ptr,
            .logits = f32s.ptr + s,
            .bias_capacity = @intCast(bias),
            .logit_bias_ids = take(&rest, bias),
            .out_top_ids = take(&rest, k),
            .logit_bias_values = f32s.ptr + s + s * vocab,
            .out_top_logprobs = f32s.ptr + s + s * vocab + bias,
            .mask_words = @intCast(mask_words),
            .allowed_token_mask = masks.ptr,
        };
        assert(rest.len == 0);
        return .{ .batch = batch, .i32s = i32s, .sampling = sampling, .f32s = f32s, .masks = masks };
    }

    pub fn deinit(d: *Descriptor, allocator: std.mem.Allocator) void {
        allocator.free(d.i32s);
        allocator.free(d.sampling);
        allocator.free(d.f32s);
        allocator.free(d.masks);
        d.* = undefined;
    }
};

/// What the step before left for the next one's placeholders: the tokens its rows drew.
pub const LastDraws = struct {
    tokens: []i32, // (max_num_seqs)
    count: usize = 0,
    ran: bool = false, // whether any step has run
    status: abi.Status = .ok,

    /// Called as a step ends, before its caller may write its descriptor again.
    pub fn record(l: *LastDraws, b: *const abi.Batch, status: abi.Status) void {
        l.ran = true;
        l.status = status;
        l.count = if (status == .ok) @min(b.num_samples, l.tokens.len) else 0;
        @memcpy(l.tokens[0..l.count], b.out_token_ids[0..l.count]);
    }
};

/// Replaces each placeholder token id -(r + 1) by the token that row r of the step before
/// this one drew (the caller scheduled this step before it knew that token).
pub fn resolvePlaceholders(b: *abi.Batch, c: abi.EngineConfig, last: *const LastDraws) abi.Status {
    const n = @min(b.num_tokens, c.max_num_batched_tokens);
    for (b.token_ids[0..n], 0..) |*token, t| {
        if (token.* >= 0) continue;
        const row: usize = @intCast(-(token.* + 1));
        if (!last.ran) return errors.fail(.invalid_argument, "token {d} is the draw of a step before, and no step ran", .{t});
        if (last.status != .ok) return errors.fail(.invalid_argument, "token {d} is the draw of row {d} of a step that failed", .{ t, row });
        if (row >= last.count) return errors.fail(.invalid_argument, "token {d} is the draw of row {d}; the step before drew {d}", .{ t, row, last.count });
        token.* = last.tokens[row];
    }
    return .ok;
}

/// Checks every index the step will follow, so a bad batch is refused rather than read out of
/// bounds. The TypeScript side validates too; this is the last line.
pub fn validate(b: *const abi.Batch, m: abi.ModelConfig, c: abi.EngineConfig, seq: SeqState) abi.Status {
    if (b.num_tokens == 0 or b.num_tokens > c.max_num_batched_tokens)
        return errors.fail(.invalid_argument, "num_tokens {d} not in [1, {d}]", .{ b.num_tokens, c.max_num_batched_tokens });
    if (b.num_seqs == 0 or b.num_seqs > c.max_num_seqs)
        return errors.fail(.invalid_argument, "num_seqs {d} not in [1, {d}]", .{ b.num_seqs, c.max_num_seqs });
    if (b.num_samples > c.max_num_seqs)
        return errors.fail(.invalid_argument, "num_samples {d} over {d}", .{ b.num_samples, c.max_num_seqs });
    if (b.query_start_loc[0] != 0 or b.query_start_loc[b.num_seqs] != b.num_tokens)
        return errors.fail(.invalid_argument, "query_start_loc must run from 0 to num_tokens ({d})", .{b.num_tokens});
    for (0..b.num_seqs) |s| {
        const status = validateSeq(b, m, c, s);
        if (status != .ok) return status;
    }
    for (0..b.num_samples) |i| {
        const status = validateRow(b, m, seq, i);
        if (status != .ok) return status;
    }
    return .ok;
}

fn validateSeq(b: *const abi.Batch, m: abi.ModelConfig, c: abi.EngineConfig, s: usize) abi.Status {
    const capacity: i64 = @as(i64, c.num_blocks) * c.block_size;
    const begin = b.query_start_loc[s];
    const end = b.query_start_loc[s + 1];
    if (end <= begin) return errors.fail(.invalid_argument, "sequence {d} has no tokens", .{s});
    const seq_len = b.seq_lens[s];
    if (seq_len <= 0 or @as(i64, seq_len) > @as(i64, c.max_blocks_per_seq) * c.block_size or seq_len > m.max_position)
        return errors.fail(.invalid_argument, "sequence {d} has seq_len {d}", .{ s, seq_len });
    const table = b.block_tables[s * c.max_blocks_per_seq ..][0..c.max_blocks_per_seq];
    const bs: i32 = @intCast(c.block_size);
    const blocks_used: usize = @intCast(@divFloor(seq_len + bs - 1, bs));
    for (table[0..blocks_used]) |block| {
        if (block < 0 or block >= c.num_blocks) return errors.fail(.invalid_argument, "sequence {d} block table holds block {d} of {d}", .{ s, block, c.num_blocks });
    }
    for (@as(usize, @intCast(begin))..@as(usize, @intCast(end))) |t| {
        const token = b.token_ids[t];
        const pos = b.positions[t];
        const slot = b.slot_mapping[t];
        if (token < 0 or token >= m.vocab_size) return errors.fail(.invalid_argument, "token id {d} is outside the vocabulary (size {d})", .{ token, m.vocab_size });
        if (pos < 0 or pos >= seq_len) return errors.fail(.invalid_argument, "token {d} has position {d} outside its sequence length {d}", .{ t, pos, seq_len });
        if (slot < 0 or slot >= capacity) return errors.fail(.invalid_argument, "token {d} has slot {d} of {d}", .{ t, slot, capacity });
        const want_slot = kernels.slotOf(table, c.block_size, @intCast(pos));
        if (want_slot != slot) return errors.fail(.invalid_argument, "token {d}: slot {d} does not match its block table ({d})", .{ t, slot, want_slot });
    }
    return .ok;
}

fn validateRow(b: *const abi.Batch, m: abi.ModelConfig, seq: SeqState, i: usize) abi.Status {
    const idx = b.sample_indices[i];
    if (idx < 0 or idx >= b.num_tokens) return errors.fail(.invalid_argument, "sample index {d} outside the batch", .{idx});
    const p = b.sampling[i];
    if (!(p.temperature >= 0) or !(p.top_p > 0 and p.top_p <= 1) or !(p.min_p >= 0 and p.min_p <= 1) or !(p.repetition_penalty > 0) or
        !std.math.isFinite(p.presence_penalty) or !std.math.isFinite(p.frequency_penalty))
        return errors.fail(.invalid_argument, "sampling parameters of row {d} out of range", .{i});
    if (p.num_top_logprobs < 0 or p.num_top_logprobs > abi.top_logprobs_max)
        return errors.fail(.invalid_argument, "row {d} asks for {d} top logprobs (at most {d})", .{ i, p.num_top_logprobs, abi.top_logprobs_max });
    if (p.state_slot >= 0) {
        if (p.state_slot >= seq.numSlots() or !seq.open[@intCast(p.state_slot)])
            return errors.fail(.invalid_argument, "row {d} names sequence state {d}, which is not open", .{ i, p.state_slot });
        // Each row appends the token it draws to its state: two rows may not share one.
        for (b.sampling[0..i]) |q| if (q.state_slot == p.state_slot)
            return errors.fail(.invalid_argument, "rows share sequence state {d}", .{p.state_slot});
    } else if (p.state_slot != -1) return errors.fail(.invalid_argument, "row {d} has state_slot {d}", .{ i, p.state_slot });
    if (p.use_mask != 0 and p.use_mask != 1) return errors.fail(.invalid_argument, "row {d} use_mask is {d} (0 or 1)", .{ i, p.use_mask });
    if (p.bias_offset < 0 or p.bias_count < 0 or p.bias_count > abi.logit_bias_max or
        @as(u64, @intCast(p.bias_offset)) + @as(u64, @intCast(p.bias_count)) > b.bias_capacity)
        return errors.fail(.invalid_argument, "row {d} logit bias out of range", .{i});
    const offset: usize = @intCast(p.bias_offset);
    const count: usize = @intCast(p.bias_count);
    for (b.logit_bias_ids[offset..][0..count], b.logit_bias_values[offset..][0..count]) |id, v| {
        if (id < 0 or id >= m.vocab_size or std.math.isNan(v)) return errors.fail(.invalid_argument, "row {d} logit bias for token {d} is invalid", .{ i, id });
    }
    return .ok;
}

/// Waits until the caller has written this step's masks (bounded), then checks that every
/// masked row allows some token.
pub fn awaitMasks(b: *abi.Batch) abi.Status {
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
