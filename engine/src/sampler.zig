//! Sampling one token from a row of logits: greedy, or temperature with top-k,
//! top-p and min-p filters. Randomness is a pure function of (seed, draw_index),
//! so a seeded request draws the same tokens whatever else shares its batch.

const std = @import("std");
const assert = std.debug.assert;
const SamplingParams = @import("abi.zig").SamplingParams;

pub const Sample = struct { token_id: u32, logprob: f32 };

/// Per-thread scratch, sized to the vocabulary at start-up.
pub const Scratch = struct {
    probs: []f32, // (vocab)
    order: []u32, // (vocab)
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
    var best: usize = 0;
    for (logits[1..], 1..) |v, i| {
        if (v > logits[best]) best = i;
    }
    return @intCast(best);
}

/// log softmax(logits)[token]: the model's own log-probability, before any filter.
pub fn logprobOf(logits: []const f32, token: u32) f32 {
    var max = logits[0];
    for (logits[1..]) |v| max = @max(max, v);
    var sum: f64 = 0;
    for (logits) |v| sum += @exp(@as(f64, v - max));
    return @floatCast(@as(f64, logits[token] - max) - @log(sum));
}

pub fn sample(logits: []const f32, params: SamplingParams, scratch: Scratch) Sample {
    assert(scratch.probs.len >= logits.len);
    assert(scratch.order.len >= logits.len);
    const token = if (params.temperature <= 0 or params.top_k == 1)
        argmax(logits)
    else
        sampleRandom(logits, params, scratch);
    return .{ .token_id = token, .logprob = logprobOf(logits, token) };
}

fn sampleRandom(logits: []const f32, params: SamplingParams, scratch: Scratch) u32 {
    const n = logits.len;
    const probs = scratch.probs[0..n];
    var max = logits[0];
    for (logits[1..]) |v| max = @max(max, v);
    const inv_t = 1.0 / params.temperature;
    var total: f32 = 0;
    for (probs, logits) |*p, l| {
        p.* = @exp((l - max) * inv_t);
        total += p.*;
    }
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
    return .{ .probs = probs, .order = order };
}

test "greedy takes the lowest id among equal maxima and reports its logprob" {
    var probs: [4]f32 = undefined;
    var order: [4]u32 = undefined;
    const logits = [_]f32{ 1, 3, 3, 0 };
    const s = sample(&logits, .{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 0, .draw_index = 0 }, testScratch(4, &probs, &order));
    try testing.expectEqual(@as(u32, 1), s.token_id);
    const z = @exp(@as(f64, 1)) + 2 * @exp(@as(f64, 3)) + 1;
    try testing.expectApproxEqAbs(@as(f32, @floatCast(3 - @log(z))), s.logprob, 1e-6);
}

test "seeded draws repeat and follow the distribution" {
    var probs: [3]f32 = undefined;
    var order: [3]u32 = undefined;
    const logits = [_]f32{ 0, @log(@as(f32, 2)), @log(@as(f32, 5)) }; // p = 1/8, 2/8, 5/8
    var counts = [_]u32{ 0, 0, 0 };
    const draws = 8000;
    for (0..draws) |i| {
        const params = SamplingParams{ .temperature = 1, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 42, .draw_index = i };
        const a = sample(&logits, params, testScratch(3, &probs, &order)).token_id;
        const b = sample(&logits, params, testScratch(3, &probs, &order)).token_id;
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
        const k = sample(&logits, p, testScratch(4, &probs, &order)).token_id;
        try testing.expect(k == 1 or k == 2);
        p = base;
        p.top_p = 0.5;
        try testing.expectEqual(@as(u32, 1), sample(&logits, p, testScratch(4, &probs, &order)).token_id);
        p = base;
        p.min_p = 0.5;
        const m = sample(&logits, p, testScratch(4, &probs, &order)).token_id;
        try testing.expect(m == 1 or m == 2);
        p = base;
        p.min_p = 0.7;
        try testing.expectEqual(@as(u32, 1), sample(&logits, p, testScratch(4, &probs, &order)).token_id);
    }
}
