//! GGUF's block-quantized weight types, read in place: a load widens `lanes`
//! consecutive weights (an element index that is a multiple of `lanes`) to f32.
//! Layouts are ggml's; each comment gives the element -> bits map it decodes.

const std = @import("std");
const assert = std.debug.assert;

/// Q8_0: 32 weights = d (f16) * q (i8).
pub const BlockQ8_0 = extern struct { d: u16, qs: [32]i8 };
/// Q4_0: 32 weights = d (f16) * (q - 8); element j < 16 is the low nibble of qs[j],
/// element j >= 16 the high nibble of qs[j - 16].
pub const BlockQ4_0 = extern struct { d: u16, qs: [16]u8 };
/// Q4_1: 32 weights = d * q + m (f16 each), q 4 bits in Q4_0's order.
pub const BlockQ4_1 = extern struct { d: u16, m: u16, qs: [16]u8 };
/// Q5_1: 32 weights = d * q + m, q 5 bits: Q4_1's nibbles with bit j of qh on top of element j.
pub const BlockQ5_1 = extern struct { d: u16, m: u16, qh: [4]u8, qs: [16]u8 };
/// Q4_K: 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and min.
/// Element e: group g = e / 64 uses qs[32g ..][0..32]; the first 32 of the group are
/// low nibbles (sub-block 2g), the next 32 high nibbles (sub-block 2g + 1).
/// w = d * scale * q - dmin * min.
pub const BlockQ4_K = extern struct { d: u16, dmin: u16, scales: [12]u8, qs: [128]u8 };
/// Q5_K: Q4_K with a fifth bit: element e of sub-block s = e / 32 takes Q4_K's nibble, with
/// bit s of qh[e % 32] on top; w = d * scale * q - dmin * min, q 0..31.
pub const BlockQ5_K = extern struct { d: u16, dmin: u16, scales: [12]u8, qh: [32]u8, qs: [128]u8 };
/// Q6_K: 256 weights in 16 groups of 16 with an i8 scale each; w = d * scale * (q - 32),
/// q = 4 low bits from ql and 2 high bits from qh (see load6K).
pub const BlockQ6_K = extern struct { ql: [128]u8, qh: [64]u8, scales: [16]i8, d: u16 };

/// Types a file may hold that are rewritten at load, losslessly, into one the products take
/// (see `transcode`). Q5_0: 32 weights = d * (q - 16), q 5 bits: element j < 16 is the low
/// nibble of qs[j], element j >= 16 the high nibble of qs[j - 16], each with bit j of qh on top.
pub const BlockQ5_0 = extern struct { d: u16 align(1), qh: [4]u8, qs: [16]u8 };
/// IQ4_NL: 32 weights = d * kvalues_iq4nl[q], q 4 bits in Q4_0's order.
pub const BlockIQ4_NL = extern struct { d: u16, qs: [16]u8 };
/// Q3_K: 256 weights in 16 groups of 16, w = d * (scale - 32) * (q - 4), q 3 bits: element e
/// (n = e / 128, j = e % 128 / 32, half = e % 32 / 16, l = e % 16) has its low two bits at
/// bits 2j of qs[32n + 16 half + l] and its high bit at bit 4n + j of hmask[16 half + l];
/// its group's 6-bit scale is number 8n + 2j + half of the 12 packed bytes (see scalesK3).
pub const BlockQ3_K = extern struct { hmask: [32]u8, qs: [64]u8, scales: [12]u8, d: u16 align(1) };

pub const kvalues_iq4nl = [16]i8{ -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

comptime {
    assert(@sizeOf(BlockQ5_0) == 22);
    assert(@sizeOf(BlockIQ4_NL) == 18);
    assert(@sizeOf(BlockQ3_K) == 110);
    assert(@sizeOf(BlockQ8_0) == 34);
    assert(@sizeOf(BlockQ4_0) == 18);
    assert(@sizeOf(BlockQ4_1) == 20);
    assert(@sizeOf(BlockQ5_1) == 24);
    assert(@sizeOf(BlockQ4_K) == 144);
    assert(@sizeOf(BlockQ5_K) == 176);
    assert(@sizeOf(BlockQ6_K) == 210);
}

pub fn isBlock(comptime T: type) bool {
    return T == BlockQ8_0 or T == BlockQ4_0 or T == BlockQ4_1 or T == BlockQ5_1 or T == BlockQ4_K or T == BlockQ5_K or T == BlockQ6_K;
}

/// Weights per storage unit: 1 for plain floats, the block size for quantized types.
pub fn unitElems(comptime T: type) usize {
    return switch (T) {
        BlockQ8_0, BlockQ4_0, BlockQ4_1, BlockQ5_1, BlockQ5_0, BlockIQ4_NL => 32,
        BlockQ4_K, BlockQ5_K, BlockQ6_K, BlockQ3_K => 256,
        else => 1,
    };
}

pub inline fn half(bits: u16) f32 {
    return @floatCast(@as(f16, @bitCast(bits)));
}

/// The 6-bit scale and min of sub-block j (0..7) of a Q4_K block.
pub fn scaleMinK4(j: usize, q: *const [12]u8) [2]u8 {
    if (j < 4) return .{ q[j] & 63, q[j + 4] & 63 };
    return .{ (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4) };
}

/// Q3_K's sixteen 6-bit scales (0..63; the weight's factor is scale - 32), unpacked as ggml does.
pub fn scalesK3(packed_scales: *const [12]u8) [16]u8 {
    var out: [16]u8 = undefined;
    for (0..16) |i| {
        const low = if (i < 8) packed_scales[i] & 0xF else packed_scales[i - 8] >> 4;
        const high = (packed_scales[8 + i % 4] >> @intCast(2 * (i / 4))) & 3;
        out[i] = low | high << 4;
    }
    return out;
}

/// Q5_0 and IQ4_NL blocks as Q8_0 ones (the same d; q - 16, or the codebook's value), Q3_K
/// super-blocks as Q6_K ones (the same d and groups of 16; scale - 32 as the i8 scale, and
/// q + 28 as the 6-bit q, so that q6 - 32 = q3 - 4): every weight keeps its exact value.
pub fn transcode(comptime From: type, comptime To: type, src: *align(1) const From, dst: *To) void {
    switch (From) {
        BlockQ5_0 => {
            const qh = std.mem.readInt(u32, &src.qh, .little);
            dst.d = src.d;
            for (0..16) |j| {
                const lo: u8 = (src.qs[j] & 0xF) | @as(u8, @intCast((qh >> @intCast(j)) & 1)) << 4;
                const hi: u8 = (src.qs[j] >> 4) | @as(u8, @intCast((qh >> @intCast(j + 16)) & 1)) << 4;
                dst.qs[j] = @as(i8, @intCast(lo)) - 16;
                dst.qs[j + 16] = @as(i8, @intCast(hi)) - 16;
            }
        },
        BlockIQ4_NL => {
            dst.d = src.d;
            for (0..16) |j| {
                dst.qs[j] = kvalues_iq4nl[src.qs[j] & 0xF];
                dst.qs[j + 16] = kvalues_iq4nl[src.qs[j] >> 4];
            }
        },
        BlockQ3_K => {
            const sc = scalesK3(&src.scales);
            for (&dst.scales, sc) |*d, v| d.* = @as(i8, @intCast(v)) - 32;
            dst.d = src.d;
            @memset(&dst.ql, 0);
            @memset(&dst.qh, 0);
            for (0..256) |e| {
                const n = e / 128;
                const j = e % 128 / 32;
                const l32 = e % 32;
                const low2 = (src.qs[32 * n + l32] >> @intCast(2 * j)) & 3;
                const high = (src.hmask[l32] >> @intCast(4 * n + j)) & 1;
                const q6: u8 = low2 + 4 * high + 28;
                // Q6_K's place for element e (see load6K): the same n (h), j (k) and l.
                dst.ql[64 * n + l32 + 32 * (j % 2)] |= if (j < 2) q6 & 0xF else (q6 & 0xF) << 4;
                dst.qh[32 * n + l32] |= (q6 >> 4) << @intCast(2 * j);
            }
        },
        else => @compileError("not transcoded"),
    }
}

pub inline fn load(comptime lanes: usize, comptime T: type, p: [*]align(1) const T, i: usize) @Vector(lanes, f32) {
    const F = @Vector(lanes, f32);
    const elems = comptime unitElems(T);
    comptime assert(32 % lanes == 0 and lanes <= 16);
    const b = &p[i / elems];
    const e = i % elems;
    switch (T) {
        BlockQ8_0 => {
            const q: @Vector(lanes, i8) = b.qs[e..][0..lanes].*;
            return @as(F, @floatFromInt(q)) * @as(F, @splat(half(b.d)));
        },
        BlockQ4_0 => {
            const bytes: @Vector(lanes, u8) = b.qs[e % 16 ..][0..lanes].*;
            const nib = if (e < 16) bytes & @as(@Vector(lanes, u8), @splat(0xF)) else bytes >> @splat(4);
            const q: F = @floatFromInt(@as(@Vector(lanes, i16), nib) - @as(@Vector(lanes, i16), @splat(8)));
            return q * @as(F, @splat(half(b.d)));
        },
        BlockQ4_1, BlockQ5_1 => {
            const bytes: @Vector(lanes, u8) = b.qs[e % 16 ..][0..lanes].*;
            var nib = if (e < 16) bytes & @as(@Vector(lanes, u8), @splat(0xF)) else bytes >> @splat(4);
            if (T == BlockQ5_1) {
                const qh = std.mem.readInt(u32, &b.qh, .little);
                var fifth: @Vector(lanes, u8) = undefined;
                inline for (0..lanes) |l| fifth[l] = @intCast((qh >> @intCast(e + l)) & 1);
                nib |= fifth << @splat(4);
            }
            return @as(F, @floatFromInt(nib)) * @as(F, @splat(half(b.d))) + @as(F, @splat(half(b.m)));
        },
        BlockQ4_K, BlockQ5_K => {
            const g = e / 64;
            const within = e % 64;
            const sm = scaleMinK4(2 * g + within / 32, &b.scales);
            const bytes: @Vector(lanes, u8) = b.qs[32 * g + within % 32 ..][0..lanes].*;
            var nib = if (within < 32) bytes & @as(@Vector(lanes, u8), @splat(0xF)) else bytes >> @splat(4);
            if (T == BlockQ5_K) {
                const qh: @Vector(lanes, u8) = b.qh[within % 32 ..][0..lanes].*;
                const shift: u3 = @intCast(2 * g + within / 32);
                nib |= ((qh >> @splat(shift)) & @as(@Vector(lanes, u8), @splat(1))) << @splat(4);
            }
            const scale = half(b.d) * @as(f32, @floatFromInt(sm[0]));
            const min = half(b.dmin) * @as(f32, @floatFromInt(sm[1]));
            return @as(F, @floatFromInt(nib)) * @as(F, @splat(scale)) - @as(F, @splat(min));
        },
        BlockQ6_K => return load6K(lanes, b, e),
        else => @compileError("not a block type"),
    }
}

/// Q6_K element e (a multiple of lanes): half h = e / 128 uses ql[64h..], qh[32h..],
/// scales[8h..]; in it, quarter k = (e % 128) / 32 and l = e % 32 take
///   k=0: ql[l] low nibble,      qh[l] bits 0-1, scale[l/16]
///   k=1: ql[l+32] low nibble,   qh[l] bits 2-3, scale[l/16 + 2]
///   k=2: ql[l] high nibble,     qh[l] bits 4-5, scale[l/16 + 4]
///   k=3: ql[l+32] high nibble,  qh[l] bits 6-7, scale[l/16 + 6]
inline fn load6K(comptime lanes: usize, b: *align(1) const BlockQ6_K, e: usize) @Vector(lanes, f32) {
    const F = @Vector(lanes, f32);
    const U = @Vector(lanes, u8);
    const h = e / 128;
    const k = (e % 128) / 32;
    const l = e % 32;
    const low: U = b.ql[64 * h + l + 32 * (k % 2) ..][0..lanes].*;
    const nib = if (k < 2) low & @as(U, @splat(0xF)) else low >> @splat(4);
    const high: U = b.qh[32 * h + l ..][0..lanes].*;
    const shift: u3 = @intCast(2 * k);
    const top = (high >> @splat(shift)) & @as(U, @splat(3));
    const q = @as(@Vector(lanes, i16), nib | (top << @splat(4))) - @as(@Vector(lanes, i16), @splat(32));
    const scale = half(b.d) * @as(f32, @floatFromInt(b.scales[8 * h + l / 16 + 2 * k]));
    return @as(F, @floatFromInt(q)) * @as(F, @splat(scale));
}

/// Activations quantized to 8 bits per 32-weight block, as llama.cpp's Q8 activations:
/// x[i] ~ scale[i / 32] * q[i], and `sum` is each block's scale * sum of q (it meets
/// the weights' offsets: Q4_K's mins, the unsigned bias of the packed integer products).
pub const QuantActs = struct {
    q: []i8, // (tokens, cols)
    scale: []f32, // (tokens, cols / 32)
    sum: []f32, // (tokens, cols / 32)
    sum_lo: []f32, // (tokens, cols / 32) the same over each block's first 16 (Q6_K's sub-blocks)

    /// Tokens [begin, end) of x (tokens, cols).
    pub fn quantize(a: QuantActs, x: []const f32, begin: usize, end: usize, cols: usize) void {
        assert(cols % 32 == 0);
        assert(a.q.len >= end * cols);
        assert(x.len >= end * cols);
        for (begin * cols / 32..end * cols / 32) |bi| {
            const v: @Vector(32, f32) = x[bi * 32 ..][0..32].*;
            const amax = @reduce(.Max, @abs(v));
            const d = amax / 127.0;
            const inv: @Vector(32, f32) = @splat(if (d == 0) 0 else 1.0 / d);
            const q: @Vector(32, i8) = @intFromFloat(@round(v * inv));
            a.q[bi * 32 ..][0..32].* = q;
            // Kept at f16 precision, as llama.cpp's Q8_0 activation blocks store it.
            a.scale[bi] = @floatCast(@as(f16, @floatCast(d)));
            const halves: [2]@Vector(16, i8) = @bitCast(q);
            const lo = @reduce(.Add, @as(@Vector(16, i32), halves[0]));
            const hi = @reduce(.Add, @as(@Vector(16, i32), halves[1]));
            a.sum[bi] = a.scale[bi] * @as(f32, @floatFromInt(lo + hi));
            a.sum_lo[bi] = a.scale[bi] * @as(f32, @floatFromInt(lo));
        }
    }
};

/// One weight, for the slow paths (embedding rows): the same decode, lane by lane.
pub fn scalar(comptime T: type, p: [*]align(1) const T, i: usize) f32 {
    const lanes = 8;
    const v = load(lanes, T, p, i - i % lanes);
    return v[i % lanes];
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

fn f16Bits(x: f32) u16 {
    return @bitCast(@as(f16, @floatCast(x)));
}

test "Q8_0 and Q4_0 decode as ggml lays them out" {
    var q8: BlockQ8_0 = .{ .d = f16Bits(0.5), .qs = undefined };
    for (&q8.qs, 0..) |*q, j| q.* = @intCast(@as(i32, @intCast(j)) - 16);
    var q4: BlockQ4_0 = .{ .d = f16Bits(0.25), .qs = undefined };
    for (&q4.qs, 0..) |*q, j| q.* = @intCast(j | ((15 - j) << 4));
    const p8: [*]align(1) const BlockQ8_0 = @ptrCast(&q8);
    const p4: [*]align(1) const BlockQ4_0 = @ptrCast(&q4);
    for (0..32) |j| {
        try testing.expectEqual(@as(f32, @floatFromInt(@as(i32, @intCast(j)) - 16)) * 0.5, scalar(BlockQ8_0, p8, j));
        const nib: i32 = if (j < 16) @intCast(j) else @intCast(15 - (j - 16));
        try testing.expectEqual(@as(f32, @floatFromInt(nib - 8)) * 0.25, scalar(BlockQ4_0, p4, j));
    }
    // Wide loads agree with the scalar decode.
    const v = load(16, BlockQ4_0, p4, 16);
    for (0..16) |j| try testing.expectEqual(scalar(BlockQ4_0, p4, 16 + j), v[j]);
}

test "Q4_K decodes scales, mins and nibbles per sub-block" {
    var b: BlockQ4_K = .{ .d = f16Bits(0.5), .dmin = f16Bits(0.25), .scales = undefined, .qs = undefined };
    // Sub-block s gets scale s + 1 and min 2s + 3 (6-bit values, packed as ggml packs them).
    var sc: [8]u8 = undefined;
    var mn: [8]u8 = undefined;
    for (0..8) |s| {
        sc[s] = @intCast(s + 1 + 40 * (s / 4)); // exercise the high bits for s >= 4
        mn[s] = @intCast(2 * s + 3 + 30 * (s / 4));
    }
    for (0..4) |j| {
        b.scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        b.scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        b.scales[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    for (&b.qs, 0..) |*q, j| q.* = @intCast((j % 16) | (((j + 5) % 16) << 4));
    const p: [*]align(1) const BlockQ4_K = @ptrCast(&b);
    for (0..256) |e| {
        const g = e / 64;
        const within = e % 64;
        const s = 2 * g + within / 32;
        const byte = b.qs[32 * g + within % 32];
        const q: f32 = @floatFromInt(if (within < 32) byte & 0xF else byte >> 4);
        const want = 0.5 * @as(f32, @floatFromInt(sc[s])) * q - 0.25 * @as(f32, @floatFromInt(mn[s]));
        try testing.expectApproxEqAbs(want, scalar(BlockQ4_K, p, e), 1e-5);
    }
}

test "Q4_1 and Q5_1 decode as ggml's dequantize_row_q4_1 and _q5_1" {
    var prng = std.Random.DefaultPrng.init(6);
    const rng = prng.random();
    var b4: BlockQ4_1 = undefined;
    var b5: BlockQ5_1 = undefined;
    rng.bytes(std.mem.asBytes(&b4));
    rng.bytes(std.mem.asBytes(&b5));
    b4.d = f16Bits(0.5);
    b4.m = f16Bits(-1.25);
    b5.d = f16Bits(0.25);
    b5.m = f16Bits(0.75);
    const p4: [*]align(1) const BlockQ4_1 = @ptrCast(&b4);
    const p5: [*]align(1) const BlockQ5_1 = @ptrCast(&b5);
    const qh = std.mem.readInt(u32, &b5.qh, .little);
    for (0..16) |j| {
        try testing.expectEqual(@as(f32, @floatFromInt(b4.qs[j] & 0xF)) * 0.5 - 1.25, scalar(BlockQ4_1, p4, j));
        try testing.expectEqual(@as(f32, @floatFromInt(b4.qs[j] >> 4)) * 0.5 - 1.25, scalar(BlockQ4_1, p4, j + 16));
        const x0 = (b5.qs[j] & 0xF) | @as(u8, @intCast((qh >> @intCast(j)) & 1)) << 4;
        const x1 = (b5.qs[j] >> 4) | @as(u8, @intCast((qh >> @intCast(j + 16)) & 1)) << 4;
        try testing.expectEqual(@as(f32, @floatFromInt(x0)) * 0.25 + 0.75, scalar(BlockQ5_1, p5, j));
        try testing.expectEqual(@as(f32, @floatFromInt(x1)) * 0.25 + 0.75, scalar(BlockQ5_1, p5, j + 16));
    }
    const v = load(16, BlockQ5_1, p5, 16);
    for (0..16) |l| try testing.expectEqual(scalar(BlockQ5_1, p5, 16 + l), v[l]);
}

test "Q5_K decodes as ggml's dequantize_row_q5_K walks it" {
    var prng = std.Random.DefaultPrng.init(5);
    const rng = prng.random();
    var b: BlockQ5_K = undefined;
    rng.bytes(std.mem.asBytes(&b));
    b.d = f16Bits(0.5);
    b.dmin = f16Bits(0.25);
    const p: [*]align(1) const BlockQ5_K = @ptrCast(&b);
    // ggml's loop: 64 weights at a time, two sub-blocks sharing 32 qs bytes, the qh masks
    // moving up two bits each time.
    var e: usize = 0;
    var mask_lo: u8 = 1;
    var mask_hi: u8 = 2;
    for (0..4) |g| {
        const sm1 = scaleMinK4(2 * g, &b.scales);
        const sm2 = scaleMinK4(2 * g + 1, &b.scales);
        inline for (.{ 0, 1 }) |second| {
            const sm = if (second == 0) sm1 else sm2;
            const mask = if (second == 0) mask_lo else mask_hi;
            for (0..32) |l| {
                const byte = b.qs[32 * g + l];
                const nib: u8 = if (second == 0) byte & 0xF else byte >> 4;
                const q: f32 = @floatFromInt(nib + @as(u8, if (b.qh[l] & mask != 0) 16 else 0));
                const want = 0.5 * @as(f32, @floatFromInt(sm[0])) * q - 0.25 * @as(f32, @floatFromInt(sm[1]));
                try testing.expectApproxEqAbs(want, scalar(BlockQ5_K, p, e), 1e-5);
                e += 1;
            }
        }
        mask_lo <<= 2;
        mask_hi <<= 2;
    }
    // Wide loads agree with the scalar decode.
    const v = load(16, BlockQ5_K, p, 112);
    for (0..16) |l| try testing.expectEqual(scalar(BlockQ5_K, p, 112 + l), v[l]);
}

test "Q6_K decodes low and high bits with the right scale" {
    var b: BlockQ6_K = .{ .ql = undefined, .qh = undefined, .scales = undefined, .d = f16Bits(0.125) };
    for (&b.ql, 0..) |*q, j| q.* = @intCast((j * 7) % 256);
    for (&b.qh, 0..) |*q, j| q.* = @intCast((j * 13 + 1) % 256);
    for (&b.scales, 0..) |*s, j| s.* = @intCast(@as(i32, @intCast(j)) - 5);
    const p: [*]align(1) const BlockQ6_K = @ptrCast(&b);
    // Reference: ggml's loop order, element by element.
    var want: [256]f32 = undefined;
    for (0..2) |h| for (0..32) |l| {
        const ql = b.ql[64 * h ..];
        const qh = b.qh[32 * h ..];
        const scl = b.scales[8 * h ..];
        const is = l / 16;
        const q1: i32 = @as(i32, (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const q2: i32 = @as(i32, (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const q3: i32 = @as(i32, (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const q4: i32 = @as(i32, (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        want[128 * h + l] = 0.125 * @as(f32, @floatFromInt(@as(i32, scl[is]) * q1));
        want[128 * h + l + 32] = 0.125 * @as(f32, @floatFromInt(@as(i32, scl[is + 2]) * q2));
        want[128 * h + l + 64] = 0.125 * @as(f32, @floatFromInt(@as(i32, scl[is + 4]) * q3));
        want[128 * h + l + 96] = 0.125 * @as(f32, @floatFromInt(@as(i32, scl[is + 6]) * q4));
    };
    for (0..256) |e| try testing.expectApproxEqAbs(want[e], scalar(BlockQ6_K, p, e), 1e-5);
}

/// A block of random bytes whose f16 factors are finite.
fn randomBlock(comptime T: type, seed: u64) T {
    var prng = std.Random.DefaultPrng.init(seed);
    var b: T = undefined;
    prng.random().bytes(std.mem.asBytes(&b));
    inline for (std.meta.fields(T)) |f| if (f.type == u16) {
        @field(b, f.name) = f16Bits(prng.random().float(f32) - 0.5);
    };
    return b;
}

test "Q5_0 and IQ4_NL as Q8_0, Q3_K as Q6_K: every weight keeps its value (ggml's decode as the reference)" {
    for (0..8) |seed| {
        const q5 = randomBlock(BlockQ5_0, seed);
        var q8: BlockQ8_0 = undefined;
        transcode(BlockQ5_0, BlockQ8_0, &q5, &q8);
        const qh = std.mem.readInt(u32, &q5.qh, .little);
        for (0..16) |j| {
            const x0: i32 = @as(i32, (q5.qs[j] & 0x0F) | @as(u8, @intCast(((qh >> @intCast(j)) << 4) & 0x10))) - 16;
            const x1: i32 = @as(i32, (q5.qs[j] >> 4) | @as(u8, @intCast((qh >> @intCast(j + 12)) & 0x10))) - 16;
            try testing.expectEqual(half(q5.d) * @as(f32, @floatFromInt(x0)), scalar(BlockQ8_0, @ptrCast(&q8), j));
            try testing.expectEqual(half(q5.d) * @as(f32, @floatFromInt(x1)), scalar(BlockQ8_0, @ptrCast(&q8), j + 16));
        }

        const nl = randomBlock(BlockIQ4_NL, seed);
        transcode(BlockIQ4_NL, BlockQ8_0, &nl, &q8);
        for (0..16) |j| {
            try testing.expectEqual(half(nl.d) * @as(f32, @floatFromInt(kvalues_iq4nl[nl.qs[j] & 0xF])), scalar(BlockQ8_0, @ptrCast(&q8), j));
            try testing.expectEqual(half(nl.d) * @as(f32, @floatFromInt(kvalues_iq4nl[nl.qs[j] >> 4])), scalar(BlockQ8_0, @ptrCast(&q8), j + 16));
        }

        const q3 = randomBlock(BlockQ3_K, seed);
        var q6: BlockQ6_K = undefined;
        transcode(BlockQ3_K, BlockQ6_K, &q3, &q6);
        // ggml's dequantize_row_q3_K, transcribed: the scales through its 32-bit masks.
        var aux: [4]u32 = undefined;
        @memcpy(std.mem.sliceAsBytes(aux[0..3]), &q3.scales);
        const tmp = aux[2];
        const kmask1: u32 = 0x03030303;
        const kmask2: u32 = 0x0f0f0f0f;
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        const scales: [16]i8 = @bitCast(aux);
        var want: [256]f32 = undefined;
        var y: usize = 0;
        var is: usize = 0;
        var m: u8 = 1;
        for (0..2) |n| {
            var shift: u3 = 0;
            for (0..4) |_| {
                inline for (.{ 0, 16 }) |off| {
                    const dl = half(q3.d) * @as(f32, @floatFromInt(@as(i32, scales[is]) - 32));
                    is += 1;
                    for (0..16) |l| {
                        const low: i32 = (q3.qs[32 * n + l + off] >> shift) & 3;
                        const q: i32 = low - @as(i32, if (q3.hmask[l + off] & m != 0) 0 else 4);
                        want[y] = dl * @as(f32, @floatFromInt(q));
                        y += 1;
                    }
                }
                shift +%= 2;
                m <<= 1;
            }
        }
        for (0..256) |e| try testing.expectEqual(want[e], scalar(BlockQ6_K, @ptrCast(&q6), e));
    }
}
