//! Sampling one token from a row of logits: greedy, or temperature with top-k,
//! top-p and min-p filters. Randomness is a pure function of (seed, draw_index),
//! so a seeded request draws the same tokens whatever else shares its batch.

const std = @import("std");
const assert = std.debug.assert;
const SamplingParams = @import("abi.zig").SamplingParams;
const kernels = @import("kernels.zig");

pub const Sample = struct { token_id: u32, logprob: f32 };

/// Per-thread scratch, sized to the vocabulary at start-up. `counts` is all zero
/// between calls: whoever marks entries clears them before returning.
pub const Scratch = struct {
    probs: []f32, // (vocab)
    order: []u32, // (vocab)
    counts: []u32, // (vocab)
    raw: []f32, // (vocab) the model's logits, kept while bias and penalties change them
};

/// What one row brings besides its logits: its token history for penalties and its logit bias.
pub const Row = struct {
    params: SamplingParams,
    history: []const i32 = &.{}, // prompt tokens, then output tokens
    prompt_len: usize = 0, // how many of history are the prompt's
    bias_ids: []const i32 = &.{},
    bias_values: []const f32 = &.{},
    /// Allowed tokens (structured output): bit t % 32 of word t / 32; null when any token may be drawn.
    mask: ?[]const u32 = null,
};

fn splitmix64(x: u64) u64 {
    var z = x +% 0x9E3779B97F4A7C15;
    z = (z ^ (z >> 30)) *% 0xBF58476D1CE4E5B9;
    z = (z ^ (z >> 27)) *% 0x94D049BB133111EB;
    return z ^ (z >> 31);
}

/// A uniform draw in [0, 1) for this (seed, draw_index).
pub fn uniform(seed: u64, draw_index: u64) f64 {
    const bits = splitmix64(seed ^ splitmix64(draw_index));
    return @as(f64, @floatFromInt(bits >> 11)) * (1.0 / @as(f64, 1 << 53));
}

pub fn argmax(logits: []const f32) u32 {
    assert(logits.len > 0);
    // The first index that holds the largest value: found in vectors, then looked up.
    const m = kernels.maxOf(logits);
    const V = @Vector(kernels.vec_len, f32);
    var i: usize = 0;
    while (i + kernels.vec_len <= logits.len) : (i += kernels.vec_len) {
        if (@reduce(.Or, @as(V, logits[i..][0..kernels.vec_len].*) == @as(V, @splat(m)))) break;
    }
    for (logits[i..], i..) |v, j| if (v == m) return @intCast(j);
    return 0; // every value NaN
}

/// log softmax(logits)[token]: the model's own log-probability, before any filter.
pub fn logprobOf(logits: []const f32, token: u32) f32 {
    return @floatCast(@as(f64, logits[token]) - logSumExp(logits));
}

/// Samples one token from `logits`, which it may change (bias, penalties). Writes the
/// row's top `params.num_top_logprobs` alternatives (from the model's own logits) to
/// top_ids/top_logprobs.
pub fn sample(logits: []f32, row: Row, scratch: Scratch, top_ids: []i32, top_logprobs: []f32) Sample {
    const n = logits.len;
    assert(scratch.probs.len >= n);
    assert(scratch.order.len >= n);
    const params = row.params;
    const log_z = logSumExp(logits);
    const n_top: usize = @intCast(@max(0, params.num_top_logprobs));
    assert(n_top <= top_ids.len);
    if (n_top > 0) topK(logits, top_ids[0..n_top], top_logprobs[0..n_top], log_z);

    const modified = row.mask != null or row.bias_ids.len > 0 or (params.hasPenalties() and row.history.len > 0);
    if (modified) {
        @memcpy(scratch.raw[0..n], logits);
        if (row.mask) |mask| applyMask(logits, mask);
        for (row.bias_ids, row.bias_values) |id, v| logits[@intCast(id)] += v;
        if (params.hasPenalties()) applyPenalties(logits, row, scratch.counts);
    }
    const token = if (params.temperature <= 0 or params.top_k == 1)
        argmax(logits)
    else
        sampleRandom(logits, params, scratch);
    const raw_logit = if (modified) scratch.raw[token] else logits[token];
    return .{ .token_id = token, .logprob = @floatCast(@as(f64, raw_logit) - log_z) };
}

/// Tokens the mask leaves out can never be drawn: their logits become -inf, before bias,
/// penalties and temperature, as vLLM applies a grammar's bitmask.
fn applyMask(logits: []f32, mask: []const u32) void {
    assert(mask.len * 32 >= logits.len);
    for (mask, 0..) |word, w| {
        if (word == 0xFFFF_FFFF) continue;
        const base = w * 32;
        const end = @min(base + 32, logits.len);
        for (base..end) |t| {
            if (word & (@as(u32, 1) << @intCast(t - base)) == 0) logits[t] = -std.math.inf(f32);
        }
    }
}

/// log sum exp(logits): exps in f32 vectors (kernels.expVec), summed in f64.
fn logSumExp(logits: []const f32) f64 {
    const V = @Vector(kernels.vec_len, f32);
    const max = kernels.maxOf(logits);
    var acc: @Vector(kernels.vec_len, f64) = @splat(0);
    var i: usize = 0;
    while (i + kernels.vec_len <= logits.len) : (i += kernels.vec_len) {
        acc += @floatCast(kernels.expVec(@as(V, logits[i..][0..kernels.vec_len].*) - @as(V, @splat(max))));
    }
    var sum = @reduce(.Add, acc);
    for (logits[i..]) |v| sum += kernels.expScalar(v - max);
    return @as(f64, max) + @log(sum);
}

/// The k largest logits, descending (ties by id), as log-probabilities.
fn topK(logits: []const f32, ids: []i32, logprobs: []f32, log_z: f64) void {
    const k = ids.len;
    var filled: usize = 0;
    for (logits, 0..) |v, i| {
        if (filled == k and v <= logprobs[k - 1]) continue;
        var j = if (filled < k) filled else k - 1;
        if (filled < k) filled += 1;
        while (j > 0 and logprobs[j - 1] < v) : (j -= 1) {
            logprobs[j] = logprobs[j - 1];
            ids[j] = ids[j - 1];
        }
        logprobs[j] = v;
        ids[j] = @intCast(i);
    }
    for (logprobs[0..filled]) |*lp| lp.* = @floatCast(@as(f64, lp.*) - log_z);
}

const seen_bit: u32 = 1 << 31;

/// vLLM's penalties: repetition (divide positive, multiply negative logits) for every
/// token of the prompt and output; frequency (times count) and presence (once) for
/// output tokens. `counts` comes back all zero.
fn applyPenalties(logits: []f32, row: Row, counts: []u32) void {
    const p = row.params;
    const output = row.history[row.prompt_len..];
    for (output) |t| counts[@intCast(t)] += 1;
    if (p.repetition_penalty != 1) {
        for (row.history) |t| {
            const c = &counts[@intCast(t)];
            if (c.* & seen_bit != 0) continue;
            c.* |= seen_bit;
            const l = &logits[@intCast(t)];
            l.* = if (l.* > 0) l.* / p.repetition_penalty else l.* * p.repetition_penalty;
        }
    }
    for (output) |t| {
        const c = &counts[@intCast(t)];
        const count = c.* & ~seen_bit;
        if (count == 0) continue;
        logits[@intCast(t)] -= p.frequency_penalty * @as(f32, @floatFromInt(count)) + p.presence_penalty;
        c.* &= seen_bit; // applied once per distinct token
    }
    for (row.history) |t| counts[@intCast(t)] = 0;
}

fn sampleRandom(logits: []const f32, params: SamplingParams, scratch: Scratch) u32 {
    const n = logits.len;
    const probs = scratch.probs[0..n];
    const max = kernels.maxOf(logits);
    const inv_t = 1.0 / params.temperature;
    var total = kernels.expScaled(probs, logits, max, inv_t);
    const filtered = params.top_k > 0 or params.top_p < 1;
    if (!filtered) {
        // min-p is relative to the top probability, which is exp(0) = 1 here.
        if (params.min_p > 0) {
            total = 0;
            for (probs) |*p| {
                if (p.* < params.min_p) p.* = 0;
                total += p.*;
            }
        }
        return drawLinear(probs, total, uniform(params.seed, params.draw_index));
    }
    // Sort ids by probability, descending (ties by id), and cut the tail.
    const order = scratch.order[0..n];
    for (order, 0..) |*o, i| o.* = @intCast(i);
    std.sort.pdq(u32, order, probs, struct {
        fn lessThan(p: []f32, a: u32, b: u32) bool {
            return p[a] > p[b] or (p[a] == p[b] and a < b);
        }
    }.lessThan);
    var keep: usize = n;
    if (params.top_k > 0) keep = @min(keep, @as(usize, @intCast(params.top_k)));
    if (params.min_p > 0) {
        const floor = params.min_p * probs[order[0]];
        var k: usize = 1;
        while (k < keep and probs[order[k]] >= floor) k += 1;
        keep = k;
    }
    if (params.top_p < 1) {
        var cum: f32 = 0;
        var k: usize = 0;
        while (k < keep) {
            cum += probs[order[k]];
            k += 1;
            if (cum >= params.top_p * total) break;
        }
        keep = k;
    }
    assert(keep >= 1);
    var kept_total: f32 = 0;
    for (order[0..keep]) |id| kept_total += probs[id];
    var target: f32 = @floatCast(uniform(params.seed, params.draw_index) * kept_total);
    for (order[0..keep]) |id| {
        target -= probs[id];
        if (target < 0) return id;
    }
    return order[keep - 1];
}

fn drawLinear(probs: []const f32, total: f32, u: f64) u32 {
    var target: f32 = @floatCast(u * total);
    var last_nonzero: u32 = 0;
    for (probs, 0..) |p, i| {
        if (p == 0) continue;
        last_nonzero = @intCast(i);
        target -= p;
        if (target < 0) return last_nonzero;
    }
    return last_nonzero; // rounding left a sliver: the last candidate takes it
}

const testing = std.testing;

fn testScratch(comptime n: usize, probs: *[n]f32, order: *[n]u32) Scratch {
    const S = struct {
        var counts: [64]u32 = [_]u32{0} ** 64;
        var raw: [64]f32 = undefined;
    };
    return .{ .probs = probs, .order = order, .counts = S.counts[0..n], .raw = S.raw[0..n] };
}

fn testSample(logits: []const f32, params: SamplingParams, scratch: Scratch) Sample {
    var copy: [64]f32 = undefined;
    @memcpy(copy[0..logits.len], logits);
    var ids: [4]i32 = undefined;
    var lps: [4]f32 = undefined;
    return sample(copy[0..logits.len], .{ .params = params }, scratch, &ids, &lps);
}
test "greedy takes the lowest id among equal maxima and reports its logprob" {
    var probs: [4]f32 = undefined;
    var order: [4]u32 = undefined;
    const logits = [_]f32{ 1, 3, 3, 0 };
    const s = testSample(&logits, .{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 0, .draw_index = 0 }, testScratch(4, &probs, &order));
    try testing.expectEqual(@as(u32, 1), s.token_id);
    const z = @exp(@as(f64, 1)) + 2 * @exp(@as(f64, 3)) + 1;
    try testing.expectApproxEqAbs(@as(f32, @floatCast(3 - @log(z))), s.logprob, 1e-6);

    // Vocabulary-sized rows (the vector paths and their tails): the first of tied maxima.
    var prng = std.Random.DefaultPrng.init(9);
    const rng = prng.random();
    var row: [32000 + 7]f32 = undefined;
    for (0..50) |round| {
        for (&row) |*v| v.* = if (rng.uintLessThan(u32, 10) == 0) -std.math.inf(f32) else rng.floatNorm(f32);
        const top = 8 + rng.float(f32); // above every normal draw here
        const a = rng.uintLessThan(usize, row.len);
        const b = if (round % 2 == 0) rng.uintLessThan(usize, row.len) else row.len - 1 - round % 7; // some in the tail
        row[a] = top;
        row[b] = top;
        try testing.expectEqual(@as(u32, @intCast(@min(a, b))), argmax(&row));
    }
}

test "seeded draws repeat and follow the distribution" {
    var probs: [3]f32 = undefined;
    var order: [3]u32 = undefined;
    const logits = [_]f32{ 0, @log(@as(f32, 2)), @log(@as(f32, 5)) }; // p = 1/8, 2/8, 5/8
    var counts = [_]u32{ 0, 0, 0 };
    const draws = 8000;
    for (0..draws) |i| {
        const params = SamplingParams{ .temperature = 1, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 42, .draw_index = i };
        const a = testSample(&logits, params, testScratch(3, &probs, &order)).token_id;
        const b = testSample(&logits, params, testScratch(3, &probs, &order)).token_id;
        try testing.expectEqual(a, b);
        counts[a] += 1;
    }
    const want = [_]f64{ 1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0 };
    for (counts, want) |c, w| {
        try testing.expectApproxEqAbs(w, @as(f64, @floatFromInt(c)) / draws, 0.02);
    }
}

test "top-k, top-p and min-p cut the tail" {
    var probs: [4]f32 = undefined;
    var order: [4]u32 = undefined;
    const logits = [_]f32{ @log(@as(f32, 0.1)), @log(@as(f32, 0.5)), @log(@as(f32, 0.3)), @log(@as(f32, 0.1)) };
    for (0..500) |i| {
        const base = SamplingParams{ .temperature = 1, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 9, .draw_index = i };
        var p = base;
        p.top_k = 2;
        const k = testSample(&logits, p, testScratch(4, &probs, &order)).token_id;
        try testing.expect(k == 1 or k == 2);
        p = base;
        p.top_p = 0.5;
        try testing.expectEqual(@as(u32, 1), testSample(&logits, p, testScratch(4, &probs, &order)).token_id);
        p = base;
        p.min_p = 0.5;
        const m = testSample(&logits, p, testScratch(4, &probs, &order)).token_id;
        try testing.expect(m == 1 or m == 2);
        p = base;
        p.min_p = 0.7;
        try testing.expectEqual(@as(u32, 1), testSample(&logits, p, testScratch(4, &probs, &order)).token_id);
    }
}

test "top logprobs are the largest, in order, as log-probabilities" {
    var probs: [5]f32 = undefined;
    var order: [5]u32 = undefined;
    var logits = [_]f32{ 0.5, 3, -1, 3, 2 };
    var ids: [3]i32 = undefined;
    var lps: [3]f32 = undefined;
    const params = SamplingParams{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .num_top_logprobs = 3, .seed = 0, .draw_index = 0 };
    const s = sample(&logits, .{ .params = params }, testScratch(5, &probs, &order), &ids, &lps);
    try testing.expectEqual(@as(u32, 1), s.token_id);
    try testing.expectEqualSlices(i32, &.{ 1, 3, 4 }, &ids);
    const z = @log(@exp(@as(f64, 0.5)) + 2 * @exp(@as(f64, 3)) + @exp(@as(f64, -1)) + @exp(@as(f64, 2)));
    try testing.expectApproxEqAbs(@as(f32, @floatCast(3 - z)), lps[0], 1e-6);
    try testing.expectApproxEqAbs(@as(f32, @floatCast(2 - z)), lps[2], 1e-6);
    try testing.expectApproxEqAbs(lps[0], s.logprob, 1e-6);
}

test "logit bias and penalties steer greedy choice; the reported logprob stays the model's" {
    var probs: [4]f32 = undefined;
    var order: [4]u32 = undefined;
    const base = SamplingParams{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 0, .draw_index = 0 };
    var ids: [1]i32 = undefined;
    var lps: [1]f32 = undefined;
    {
        var logits = [_]f32{ 1, 4, 3, 0 };
        const s = sample(&logits, .{ .params = base, .bias_ids = &.{1}, .bias_values = &.{-100} }, testScratch(4, &probs, &order), &ids, &lps);
        try testing.expectEqual(@as(u32, 2), s.token_id);
        const z = @log(@exp(@as(f64, 1)) + @exp(@as(f64, 4)) + @exp(@as(f64, 3)) + 1);
        try testing.expectApproxEqAbs(@as(f32, @floatCast(3 - z)), s.logprob, 1e-6);
    }
    {
        // Token 1 appeared twice in the output: frequency 0.6 * 2 + presence 0.5 = 1.7 off its 4.
        var p = base;
        p.frequency_penalty = 0.6;
        p.presence_penalty = 0.5;
        var logits = [_]f32{ 1, 4, 3, 0 };
        const s = sample(&logits, .{ .params = p, .history = &.{ 3, 1, 1 }, .prompt_len = 1 }, testScratch(4, &probs, &order), &ids, &lps);
        try testing.expectEqual(@as(u32, 2), s.token_id);
        try testing.expectApproxEqAbs(@as(f32, 2.3), logits[1], 1e-6);
        try testing.expectEqual(@as(f32, 0), logits[3]); // prompt tokens take no frequency penalty
    }
    {
        // Repetition 2 over prompt and output: 4 -> 2, and -1 -> -2, once per distinct token.
        var p = base;
        p.repetition_penalty = 2;
        var logits = [_]f32{ -1, 4, 3, 0 };
        const s = sample(&logits, .{ .params = p, .history = &.{ 0, 1, 1, 0 }, .prompt_len = 2 }, testScratch(4, &probs, &order), &ids, &lps);
        try testing.expectEqual(@as(u32, 2), s.token_id);
        try testing.expectEqual(@as(f32, 2), logits[1]);
        try testing.expectEqual(@as(f32, -2), logits[0]);
    }
    for (testScratch(4, &probs, &order).counts) |c| try testing.expectEqual(@as(u32, 0), c);
}

test "a mask leaves only its tokens drawable, greedy and random, and logprobs stay the model's own" {
    var logits = [_]f32{ 5, 1, 4, 3, 2, 0, -1, 6 } ** 5; // 40 tokens: the largest is token 7
    const n = logits.len;
    var probs: [n]f32 = undefined;
    var order: [n]u32 = undefined;
    var counts = [_]u32{0} ** n;
    var raw: [n]f32 = undefined;
    const scratch = Scratch{ .probs = &probs, .order = &order, .counts = &counts, .raw = &raw };
    const mask = [_]u32{ (1 << 2) | (1 << 3), 1 << (33 - 32) }; // tokens 2, 3 and 33
    var top_ids: [4]i32 = undefined;
    var top_lp: [4]f32 = undefined;
    const unmasked_lp = logprobOf(&logits, 2);
    var copy = logits;
    const greedy = sample(&copy, .{ .params = .{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 1, .draw_index = 0, .num_top_logprobs = 2 }, .mask = &mask }, scratch, &top_ids, &top_lp);
    try std.testing.expectEqual(@as(u32, 2), greedy.token_id); // 4 beats 3; token 7's 6 is masked out
    try std.testing.expectApproxEqAbs(unmasked_lp, greedy.logprob, 1e-6);
    try std.testing.expectEqual(@as(i32, 7), top_ids[0]); // alternatives are the model's own
    for (0..200) |draw| {
        copy = logits;
        const r = sample(&copy, .{ .params = .{ .temperature = 1, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 9, .draw_index = draw }, .mask = &mask }, scratch, &top_ids, &top_lp);
        try std.testing.expect(r.token_id == 2 or r.token_id == 3 or r.token_id == 33);
    }
}
