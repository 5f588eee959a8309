//! Integer matrix products for quantized weights against 8-bit activations (llama.cpp's
//! Q8 activations, computed with VNNI's vpdpbusd where the CPU has it): every product
//! with Q8_0, Q4_0, Q4_1, Q5_1, Q4_K, Q5_K and Q6_K weights, from one token to a whole prefill.
//!
//! The weights are repacked once, at load, into 16-row groups. In a group each 32-weight
//! block is a run of 64-byte vectors of "quads": quad k holds row r's weights 4k..4k+3 at
//! bytes 4r..4r+3, as unsigned bytes u with a per-row scale s and offset o such that
//! w = s * u + o (Q4 types keep two quads per vector, in the low and high nibbles, Q5 types
//! add a vector of their fifth bits and Q6_K two of their top two, so a packed matrix is as small as the file's,
//! give or take its scales' layout). One vpdpbusd then multiplies 16 rows by four
//! weights of one token (its four activation bytes broadcast), so the 16 outputs of a
//! token land in one vector and nothing needs a horizontal sum. Four groups make a
//! stripe, stored block by block with their scales (see `Stripe`), so that a decode reads
//! each stripe as one run of memory.

const std = @import("std");
const builtin = @import("builtin");
const assert = std.debug.assert;
const quant = @import("quant.zig");

pub fn hasX86(comptime feature: std.Target.x86.Feature) bool {
    return builtin.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(builtin.cpu.features, feature);
}

/// vpdpbusd on 256-bit vectors (AVX512-VNNI with VL, or AVX-VNNI); 512-bit ones also need evex512.
pub const has_vnni = (hasX86(.avx512vnni) and hasX86(.avx512vl)) or hasX86(.avxvnni);
const has_vnni512 = hasX86(.avx512vnni) and hasX86(.evex512);

extern fn @"llvm.x86.avx512.vpdpbusd.512"(@Vector(16, i32), @Vector(16, i32), @Vector(16, i32)) @Vector(16, i32);
extern fn @"llvm.x86.avx512.vpdpbusd.256"(@Vector(8, i32), @Vector(8, i32), @Vector(8, i32)) @Vector(8, i32);

/// acc[i] + sum over j < 4 of u[4i + j] * s[4i + j], u unsigned and s signed bytes (vpdpbusd).
pub inline fn dpbusd(comptime n: usize, acc: @Vector(n, i32), u: @Vector(4 * n, u8), s: @Vector(4 * n, i8)) @Vector(n, i32) {
    const I = @Vector(n, i32);
    const ui: I = @bitCast(u);
    const si: I = @bitCast(s);
    if (n == 16 and has_vnni512) return @"llvm.x86.avx512.vpdpbusd.512"(acc, ui, si);
    if (n == 8 and has_vnni) return @"llvm.x86.avx512.vpdpbusd.256"(acc, ui, si);
    if (n == 16 and has_vnni) {
        const lo = @"llvm.x86.avx512.vpdpbusd.256"(halfOf(acc, 0), halfOf(ui, 0), halfOf(si, 0));
        const hi = @"llvm.x86.avx512.vpdpbusd.256"(halfOf(acc, 1), halfOf(ui, 1), halfOf(si, 1));
        return std.simd.join(lo, hi);
    }
    return dpbusdNaive(n, acc, u, s);
}

inline fn halfOf(v: @Vector(16, i32), comptime h: usize) @Vector(8, i32) {
    return @shuffle(i32, v, undefined, lanes(8, 8 * h, 1));
}

/// Shuffle mask start, start + step, ... (n lanes).
pub fn lanes(comptime n: usize, comptime start: usize, comptime step: usize) [n]i32 {
    @setEvalBranchQuota(100_000);
    var mask: [n]i32 = undefined;
    for (&mask, 0..) |*m, i| m.* = @intCast(start + step * i);
    return mask;
}

/// The same sum without VNNI: widen, multiply, add the four products of each lane.
pub fn dpbusdNaive(comptime n: usize, acc: @Vector(n, i32), u: @Vector(4 * n, u8), s: @Vector(4 * n, i8)) @Vector(n, i32) {
    const products = @as(@Vector(4 * n, i32), u) * @as(@Vector(4 * n, i32), s);
    var sum = acc;
    inline for (0..4) |j| sum += @shuffle(i32, products, undefined, lanes(n, j, 4));
    return sum;
}

pub const group_rows = 16;
const vec_bytes = 64; // one zmm: 16 rows x 4 bytes

/// Whether a quantized type is repacked at load for the integer products.
pub fn packs(comptime T: type) bool {
    return quant.isBlock(T);
}

/// 64-byte vectors of weights per 32-weight block: one per quad (Q8_0), one per two quads
/// of nibbles (Q4 types), or four of nibbles (the low four bits of each weight) and, for
/// Q5_1 and Q5_K, one of fifth bits (bit k of a byte for quad k) or, for Q6_K, two of 2-bit fields
/// (the top two bits of quads 0..3, then of quads 4..7).
fn vectorsPerBlock(comptime T: type) usize {
    return switch (T) {
        quant.BlockQ8_0 => 8,
        quant.BlockQ6_K => 6,
        quant.BlockQ5_K, quant.BlockQ5_1 => 5,
        else => 4,
    };
}

/// Whether a 32-weight block has its own offset (w = d * q + m): Q4_1, Q5_1.
fn hasMin(comptime T: type) bool {
    return T == quant.BlockQ4_1 or T == quant.BlockQ5_1;
}

/// Groups a stripe holds: the rows a decode's tile takes (stream_tile_rows).
pub const stripe_groups = 4;
const stripe_rows = stripe_groups * group_rows;

/// Where a packed stripe keeps its bytes. For each 32-weight block (a "unit"): the four
/// groups' weight vectors, then the four groups' scale records (Q8_0, Q4_0: an f16
/// scale per row; Q4_1, Q5_1: an f16 scale per row, then an f16 offset; Q4_K, Q5_K: a 6-bit scale per row, then a 6-bit min; Q6_K: an i8 scale per
/// row for each 16-weight half). The K types put each super-block's f16 factors (d per row;
/// Q4_K and Q5_K also dmin) in front of its eight units. A decode's tile, the whole stripe, then
/// reads one run of memory front to back, its scales inside it: with four groups' weights
/// and scales as eight streams a thread, a tile's start found three or four of them cold,
/// and the kernel read 0.80-0.84 of a plain read where one stream reads 0.95-1.02 (q4_0-like
/// loop in C, 2 threads, alternating, medians of 41).
fn Stripe(comptime T: type) type {
    return struct {
        /// A group's weight vectors in a block, its scale record, its super-block factors.
        const w_bytes = vectorsPerBlock(T) * vec_bytes;
        const s_bytes = if (hasMin(T)) 64 else 32;
        const d_bytes = switch (T) {
            quant.BlockQ4_K, quant.BlockQ5_K => 64,
            quant.BlockQ6_K => 32,
            else => 0,
        };
        const unit_bytes = stripe_groups * (w_bytes + s_bytes);
        const factor_bytes = stripe_groups * d_bytes;
        const super_bytes = factor_bytes + 8 * unit_bytes;

        /// Where block b's unit lies past that of block 0.
        inline fn blockOffset(b: usize) usize {
            return b / 8 * super_bytes + b % 8 * unit_bytes;
        }
        /// Group pos's weights, scales in block 0's unit; its factors in super-block 0.
        inline fn weights(pos: usize) usize {
            return factor_bytes + pos * w_bytes;
        }
        inline fn scales(pos: usize) usize {
            return factor_bytes + stripe_groups * w_bytes + pos * s_bytes;
        }
        inline fn factors(pos: usize) usize {
            return pos * d_bytes;
        }
        /// Bytes of a stripe of a `cols`-wide matrix (K types: cols a multiple of 256).
        fn bytes(cols: usize) usize {
            const blocks = cols / 32;
            return blocks / 8 * super_bytes + blocks % 8 * unit_bytes;
        }
        comptime {
            assert(unit_bytes % vec_bytes == 0 and factor_bytes % vec_bytes == 0);
        }
    };
}

/// A 16-row group's share of a packed stripe's bytes (a quarter).
pub fn groupBytes(comptime T: type, cols: usize) usize {
    return Stripe(T).bytes(cols) / stripe_groups;
}

/// Bytes of a (rows, cols) matrix packed: whole stripes, the rows past the last zeros.
pub fn packedBytes(comptime T: type, rows: usize, cols: usize) usize {
    return (std.math.divCeil(usize, rows, stripe_rows) catch unreachable) * Stripe(T).bytes(cols);
}

/// Rows [first, first + n) of w (n <= 16) packed as group `pos` of the stripe at dst; rows
/// past n are zeros. The quads of the Q4 types share bytes: vector j of a block holds quad
/// j in its low nibbles and quad j + 4 in its high ones (Q4_0's own byte order).
fn packGroup(comptime T: type, comptime Src: type, dst: []u8, pos: usize, base: [*]align(1) const Src, units: usize, first: usize, n: usize, cols: usize) void {
    const L = Stripe(T);
    const blocks = cols / 32;
    const vecs = vectorsPerBlock(T);
    for (0..blocks) |b| {
        @memset(dst[L.weights(pos) + L.blockOffset(b) ..][0..L.w_bytes], 0);
        @memset(dst[L.scales(pos) + L.blockOffset(b) ..][0..L.s_bytes], 0);
        if (b % 8 == 0) @memset(dst[L.factors(pos) + L.blockOffset(b) ..][0..L.d_bytes], 0);
    }
    // A unit of another type (Q5_0, IQ4_NL, Q3_K) is rewritten as one of T first, once.
    var rewritten: T = undefined;
    for (0..n) |r| {
        const row = base + (first + r) * units;
        for (0..blocks) |b| {
            const w = dst[L.weights(pos) + L.blockOffset(b) ..];
            const scales = dst[L.scales(pos) + L.blockOffset(b) ..];
            const factors = dst[L.factors(pos) + L.blockOffset(b / 8 * 8) ..];
            const unit = if (quant.unitElems(T) == 32) b else b / 8;
            const blk: *align(1) const T = if (Src == T) &row[unit] else blk: {
                if (unit * quant.unitElems(T) == b * 32) quant.transcode(Src, T, &row[unit], &rewritten);
                break :blk &rewritten;
            };
            var u: [32]u8 = undefined;
            switch (T) {
                quant.BlockQ8_0 => {
                    for (&u, blk.qs) |*x, q| x.* = @as(u8, @bitCast(q)) ^ 0x80;
                    std.mem.writeInt(u16, scales[2 * r ..][0..2], blk.d, .little);
                },
                quant.BlockQ4_0, quant.BlockQ4_1, quant.BlockQ5_1 => {
                    for (0..16) |i| {
                        u[i] = blk.qs[i] & 0xF;
                        u[i + 16] = blk.qs[i] >> 4;
                    }
                    if (T == quant.BlockQ5_1) {
                        const qh = std.mem.readInt(u32, &blk.qh, .little);
                        for (&u, 0..) |*x, i| x.* |= @as(u8, @intCast((qh >> @intCast(i)) & 1)) << 4;
                    }
                    std.mem.writeInt(u16, scales[2 * r ..][0..2], blk.d, .little);
                    if (comptime hasMin(T)) std.mem.writeInt(u16, scales[32 + 2 * r ..][0..2], blk.m, .little);
                },
                quant.BlockQ6_K => {
                    const h = b % 8 / 4; // half of the super-block
                    const k = b % 4; // quarter of the half
                    for (0..32) |l| {
                        const low = blk.ql[64 * h + l + 32 * (k % 2)];
                        const nib = if (k < 2) low & 0xF else low >> 4;
                        const top = (blk.qh[32 * h + l] >> @intCast(2 * k)) & 3;
                        u[l] = nib | top << 4;
                    }
                    scales[r] = @bitCast(blk.scales[8 * h + 2 * k]);
                    scales[group_rows + r] = @bitCast(blk.scales[8 * h + 2 * k + 1]);
                    std.mem.writeInt(u16, factors[2 * r ..][0..2], blk.d, .little);
                },
                quant.BlockQ4_K, quant.BlockQ5_K => {
                    const sub = b % 8;
                    for (0..32) |i| {
                        const byte = blk.qs[32 * (sub / 2) + i];
                        u[i] = if (sub % 2 == 0) byte & 0xF else byte >> 4;
                        if (T == quant.BlockQ5_K) u[i] |= ((blk.qh[i] >> @intCast(sub)) & 1) << 4;
                    }
                    const sm = quant.scaleMinK4(sub, &blk.scales);
                    scales[r] = sm[0];
                    scales[group_rows + r] = sm[1];
                    std.mem.writeInt(u16, factors[2 * r ..][0..2], blk.d, .little);
                    std.mem.writeInt(u16, factors[2 * (group_rows + r) ..][0..2], blk.dmin, .little);
                },
                else => @compileError("not packed"),
            }
            for (0..32) |i| {
                const k = i / 4; // quad
                if (vecs == 8) {
                    w[k * vec_bytes + 4 * r + i % 4] = u[i];
                } else {
                    w[k % 4 * vec_bytes + 4 * r + i % 4] |= (u[i] & 0xF) << @as(u3, if (k < 4) 0 else 4);
                    if (vecs == 5) w[4 * vec_bytes + 4 * r + i % 4] |= (u[i] >> 4) << @intCast(k);
                    if (vecs == 6) w[(4 + k / 4) * vec_bytes + 4 * r + i % 4] |= (u[i] >> 4) << @intCast(2 * (k % 4));
                }
            }
        }
    }
}

/// Packs a whole (rows, cols) matrix into dst (packedBytes long).
pub fn pack(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize) void {
    packGroups(T, T, dst, w_data, rows, cols, 0, std.math.divCeil(usize, rows, group_rows) catch unreachable);
}

/// Groups [g_begin, g_end) of pack's output (several threads may each take a range: a
/// group's bytes are its own). The range that ends the matrix zeroes the groups that pad
/// its last stripe.
/// The file's units are of type Src: T itself, or one that `quant.transcode` rewrites as T.
pub fn packGroups(comptime T: type, comptime Src: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize, g_begin: usize, g_end: usize) void {
    const sb = Stripe(T).bytes(cols);
    assert(dst.len >= packedBytes(T, rows, cols));
    comptime assert(Src == T or quant.unitElems(Src) == quant.unitElems(T));
    const base: [*]align(1) const Src = @ptrCast(w_data);
    const units = cols / quant.unitElems(T);
    const groups = std.math.divCeil(usize, rows, group_rows) catch unreachable;
    const end = if (g_end == groups) std.mem.alignForward(usize, groups, stripe_groups) else g_end;
    for (g_begin..end) |g| {
        const n = if (g < groups) @min(group_rows, rows - g * group_rows) else 0;
        packGroup(T, Src, dst[g / stripe_groups * sb ..][0..sb], g % stripe_groups, base, units, g * group_rows, n, cols);
    }
}

/// Per-row scale s and offset o of block b of group pos in a packed stripe (w = s * u + o), 16 rows at once.
inline fn blockScales(comptime T: type, stripe: [*]const u8, pos: usize, b: usize) struct { s: F16, o: F16 } {
    const L = Stripe(T);
    const scales = stripe + L.scales(pos) + L.blockOffset(b);
    switch (T) {
        quant.BlockQ8_0, quant.BlockQ4_0 => {
            const h: @Vector(16, f16) = @bitCast(scales[0..32].*);
            const d: F16 = @floatCast(h);
            return .{ .s = d, .o = d * @as(F16, @splat(if (T == quant.BlockQ8_0) -128 else -8)) };
        },
        quant.BlockQ4_1, quant.BlockQ5_1 => {
            const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(scales[0..32].*)));
            const m: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(scales[32..64].*)));
            return .{ .s = d, .o = m };
        },
        quant.BlockQ4_K, quant.BlockQ5_K => {
            const sc: @Vector(16, u8) = scales[0..16].*;
            const m: @Vector(16, u8) = scales[16..32].*;
            const dd = stripe + L.factors(pos) + L.blockOffset(b / 8 * 8);
            const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
            const dmin: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[32..64].*)));
            // d * sc and dmin * m are exact in f32 (11 + 6 significant bits).
            return .{ .s = d * @as(F16, @floatFromInt(sc)), .o = -(dmin * @as(F16, @floatFromInt(m))) };
        },
        else => @compileError("not packed"),
    }
}

/// Weight (row, col) of a packed matrix: for tests and one-off reads.
pub fn weightAt(comptime T: type, data: [*]const u8, cols: usize, row: usize, col: usize) f32 {
    const L = Stripe(T);
    const stripe = data + row / stripe_rows * L.bytes(cols);
    const pos = row / group_rows % stripe_groups;
    const r = row % group_rows;
    const b = col / 32;
    const u: f32 = @floatFromInt(unpackedByte(T, stripe + L.weights(pos) + L.blockOffset(b), r, col % 32));
    if (T == quant.BlockQ6_K) {
        const sc: i8 = @bitCast((stripe + L.scales(pos) + L.blockOffset(b))[group_rows * (col % 32 / 16) + r]);
        const dd = stripe + L.factors(pos) + L.blockOffset(b / 8 * 8);
        const d: f32 = @floatCast(@as(f16, @bitCast(std.mem.readInt(u16, dd[2 * r ..][0..2], .little))));
        return d * @as(f32, @floatFromInt(sc)) * (u - 32);
    }
    const sc = blockScales(T, stripe, pos, b);
    return sc.s[r] * u + sc.o[r];
}

/// u of weight i of row r in a block whose weight vectors are at w.
inline fn unpackedByte(comptime T: type, w: [*]const u8, r: usize, i: usize) u8 {
    const vecs = vectorsPerBlock(T);
    const k = i / 4; // quad
    if (vecs == 8) return w[k * vec_bytes + 4 * r + i % 4];
    const byte = w[k % 4 * vec_bytes + 4 * r + i % 4];
    const low = if (k < 4) byte & 0xF else byte >> 4;
    if (vecs == 4) return low;
    if (vecs == 5) return low | ((w[4 * vec_bytes + 4 * r + i % 4] >> @intCast(k)) & 1) << 4;
    const top = (w[(4 + k / 4) * vec_bytes + 4 * r + i % 4] >> @intCast(2 * (k % 4))) & 3;
    return low | top << 4;
}

const F16 = @Vector(16, f32);
const I16 = @Vector(16, i32);

/// Bits 2j..2j+1 of each byte of `tops` moved to bits 4..5 (Q6_K: the top bits of quad j).
inline fn topBits(tops: @Vector(64, u8), comptime j: usize) @Vector(64, u8) {
    const moved = if (j < 2) tops << @splat(4 - 2 * j) else tops >> @splat(2 * j - 4);
    return moved & @as(@Vector(64, u8), @splat(0x30));
}

/// Four activation bytes of a token broadcast to every lane.
inline fn broadcast4(p: [*]const i8) @Vector(64, i8) {
    const word: i32 = @bitCast(p[0..4].*);
    return @bitCast(@as(I16, @splat(word)));
}

/// Pulls the next pass's weight rows toward L2 a line at a time while this pass computes,
/// so that they are read from cache, not memory, when their turn comes (a batch of
/// decodes is otherwise memory-bound while it reads a pass, and compute-bound after it).
pub const Prefetcher = struct {
    next: usize,
    end: usize,

    pub inline fn step(p: *Prefetcher) void {
        inline for (0..2) |_| {
            if (p.next < p.end) {
                @prefetch(@as([*]const u8, @ptrFromInt(p.next)), .{ .locality = 2 });
                p.next += 64;
            }
        }
    }
};

/// Packed groups g..g + ng of the matrix at data (stripes of stripe_bytes) against tokens
/// first..first + nt: out[i][t] holds the 16 sums of group g + i for token t. Either one
/// group or a whole stripe (`whole`: a decode's tile). Several groups at once give a
/// decode's token several independent sums.
inline fn tileInt(comptime T: type, comptime ng: usize, comptime nt: usize, data: [*]const u8, stripe_bytes: usize, g: usize, blocks: usize, acts: quant.QuantActs, cols: usize, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
    comptime assert(ng == 1 or ng == stripe_groups);
    const whole = ng == stripe_groups;
    assert(!whole or g % stripe_groups == 0);
    @setEvalBranchQuota(10_000); // the unrolled loops of four groups by three tokens
    const L = Stripe(T);
    const vecs = comptime vectorsPerBlock(T);
    const k_quant = T == quant.BlockQ4_K or T == quant.BlockQ5_K;
    // A streamed Q4 product (a decode's token or few) takes the high nibbles in place, as 16
    // times their value: one AND where a shift would take a second op on the ports vpdpbusd
    // uses, and it is bound by those ports as much as by memory (1B q4_0 decode step, median
    // of 9 alternating rounds: 12.06 -> 11.86 ms). The low sums are scaled to match
    // (|16 * sum| < 2^20: exact). A tile of several tokens computes in L2 and pays more for
    // the combine than it saves (prefill -2%, 16 decodes -5%): it shifts.
    const hi_in_place = vecs == 4 and nt < int_tile_tokens;
    var acc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    // Q4_K: sums over a super-block's eight blocks of sc * (d_x * isum) and of m * (d_x * sum q),
    // scaled by the super-block's d and dmin once at its end.
    var acc_sc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    var acc_m: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    // Group i's weights and scales in block 0's unit, its factors in super-block 0's.
    const stripe0 = data + g / stripe_groups * stripe_bytes;
    var weights: [ng][*]const u8 = undefined;
    var scales: [ng][*]const u8 = undefined;
    var factors: [ng][*]const u8 = undefined;
    inline for (0..ng) |i| {
        const pos = if (whole) i else g % stripe_groups;
        weights[i] = stripe0 + L.weights(pos);
        scales[i] = stripe0 + L.scales(pos);
        factors[i] = stripe0 + L.factors(pos);
    }
    var xq: [nt][*]const i8 = undefined;
    var xblock: [nt]usize = undefined;
    inline for (0..nt) |t| {
        xq[t] = acts.q.ptr + (first + t) * cols;
        xblock[t] = (first + t) * (cols / 32);
    }
    for (0..blocks) |b| {
        prefetcher.step();
        const off = L.blockOffset(b);
        if (nt < int_tile_tokens) {
            // A decode streams the weights: ask for them well ahead of use. A whole stripe
            // is one run: the unit `stream_ahead` bytes on (and, at a super-block's end, the
            // next one's factors); else each group's own lines.
            if (whole) {
                const unit = stripe0 + L.weights(0) + off + stream_ahead;
                inline for (0..L.unit_bytes / vec_bytes) |line| @prefetch(unit + line * vec_bytes, .{ .locality = 3 });
                if (L.factor_bytes > 0 and b % 8 == 7) {
                    inline for (0..L.factor_bytes / vec_bytes) |line| @prefetch(unit + L.unit_bytes + line * vec_bytes, .{ .locality = 3 });
                }
            } else inline for (0..ng) |i| {
                inline for (0..vecs) |line| @prefetch(weights[i] + off + stream_ahead + line * vec_bytes, .{ .locality = 3 });
                @prefetch(scales[i] + off + stream_ahead, .{ .locality = 3 });
                if (L.factor_bytes > 0 and b % 8 == 0) @prefetch(factors[i] + off + stream_ahead, .{ .locality = 3 });
            }
        }
        var xscale: [nt]F16 = undefined;
        // Q8_0, Q4_0: o / s * (d_x * sum q); Q4_K, Q4_1 and the Q5s with offsets: d_x * sum q; Q6_K: -32 d_x * sum q over
        // the block's first 16 weights (xoffset) and its last 16 (xoffset_hi).
        var xoffset: [nt]F16 = undefined;
        var xoffset_hi: [nt]F16 = undefined;
        inline for (0..nt) |t| {
            // isum is 16 times the block's sum with the high nibbles in place (a power of two: exact).
            xscale[t] = @splat(acts.scale[xblock[t] + b] * @as(f32, if (hi_in_place) 1.0 / 16.0 else 1.0));
            const bias: f32 = switch (T) {
                quant.BlockQ8_0 => -128,
                quant.BlockQ4_0 => -8,
                quant.BlockQ6_K => -32,
                else => 1,
            };
            if (T == quant.BlockQ6_K) {
                const lo = acts.sum_lo[xblock[t] + b];
                xoffset[t] = @splat(bias * lo);
                xoffset_hi[t] = @splat(bias * (acts.sum[xblock[t] + b] - lo));
            } else xoffset[t] = @splat(bias * acts.sum[xblock[t] + b]);
        }
        inline for (0..ng) |gi| {
            const wb = weights[gi] + off;
            const sc = scales[gi] + off;
            var isum: [nt]I16 = .{@as(I16, @splat(0))} ** nt;
            // A second chain of sums (Q6_K: the block's last 16 weights; else every other
            // vector), so that two vpdpbusd chains overlap their latency.
            var isum_hi: [nt]I16 = .{@as(I16, @splat(0))} ** nt;
            if (vecs == 8) {
                inline for (0..8) |k| {
                    const w: @Vector(64, u8) = wb[k * vec_bytes ..][0..vec_bytes].*;
                    inline for (0..nt) |t| {
                        const sum = if (k % 2 == 0) &isum[t] else &isum_hi[t];
                        sum.* = dpbusd(16, sum.*, w, broadcast4(xq[t] + 32 * b + 4 * k));
                    }
                }
            } else if (vecs == 5) {
                // Bit j of a fifth-bit byte (quad j) to bit 4 of the low nibbles' byte, bit 4 + j to the high's.
                const fifth: @Vector(64, u8) = wb[4 * vec_bytes ..][0..vec_bytes].*;
                const bit4: @Vector(64, u8) = @splat(0x10);
                inline for (0..4) |j| {
                    const v: @Vector(64, u8) = wb[j * vec_bytes ..][0..vec_bytes].*;
                    const lo = (v & @as(@Vector(64, u8), @splat(0xF))) | ((fifth << @splat(4 - j)) & bit4);
                    const hi = (v >> @splat(4)) | ((fifth >> @splat(j)) & bit4);
                    inline for (0..nt) |t| {
                        isum[t] = dpbusd(16, isum[t], lo, broadcast4(xq[t] + 32 * b + 4 * j));
                        isum_hi[t] = dpbusd(16, isum_hi[t], hi, broadcast4(xq[t] + 32 * b + 16 + 4 * j));
                    }
                }
            } else if (vecs == 6) {
                const tops_lo: @Vector(64, u8) = wb[4 * vec_bytes ..][0..vec_bytes].*;
                const tops_hi: @Vector(64, u8) = wb[5 * vec_bytes ..][0..vec_bytes].*;
                inline for (0..4) |j| {
                    const v: @Vector(64, u8) = wb[j * vec_bytes ..][0..vec_bytes].*;
                    const lo = (v & @as(@Vector(64, u8), @splat(0xF))) | topBits(tops_lo, j);
                    const hi = (v >> @splat(4)) | topBits(tops_hi, j);
                    inline for (0..nt) |t| {
                        isum[t] = dpbusd(16, isum[t], lo, broadcast4(xq[t] + 32 * b + 4 * j));
                        isum_hi[t] = dpbusd(16, isum_hi[t], hi, broadcast4(xq[t] + 32 * b + 16 + 4 * j));
                    }
                }
            } else {
                inline for (0..4) |j| {
                    const v: @Vector(64, u8) = wb[j * vec_bytes ..][0..vec_bytes].*;
                    const lo = v & @as(@Vector(64, u8), @splat(0x0F));
                    const hi = if (hi_in_place) v & @as(@Vector(64, u8), @splat(0xF0)) else v >> @splat(4);
                    inline for (0..nt) |t| {
                        isum[t] = dpbusd(16, isum[t], lo, broadcast4(xq[t] + 32 * b + 4 * j));
                        isum_hi[t] = dpbusd(16, isum_hi[t], hi, broadcast4(xq[t] + 32 * b + 16 + 4 * j));
                    }
                }
            }
            if (vecs != 6) inline for (0..nt) |t| {
                isum[t] = if (hi_in_place) (isum[t] << @splat(4)) + isum_hi[t] else isum[t] + isum_hi[t];
            };
            if (T == quant.BlockQ6_K) {
                // w = d * sc * (u - 32), sc per 16 weights: the super-block's d comes at its end.
                const sc_lo: F16 = @floatFromInt(@as(@Vector(16, i8), @bitCast(sc[0..16].*)));
                const sc_hi: F16 = @floatFromInt(@as(@Vector(16, i8), @bitCast(sc[16..32].*)));
                inline for (0..nt) |t| {
                    const t_lo = @mulAdd(F16, @floatFromInt(isum[t]), xscale[t], xoffset[t]);
                    const t_hi = @mulAdd(F16, @floatFromInt(isum_hi[t]), xscale[t], xoffset_hi[t]);
                    acc_sc[gi][t] = @mulAdd(F16, sc_hi, t_hi, @mulAdd(F16, sc_lo, t_lo, acc_sc[gi][t]));
                }
                if (b % 8 == 7) {
                    const dd = factors[gi] + L.blockOffset(b / 8 * 8);
                    const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
                    inline for (0..nt) |t| {
                        acc[gi][t] = @mulAdd(F16, d, acc_sc[gi][t], acc[gi][t]);
                        acc_sc[gi][t] = @splat(0);
                    }
                }
            } else if (k_quant) {
                const s6: F16 = @floatFromInt(@as(@Vector(16, u8), sc[0..16].*));
                const m: F16 = @floatFromInt(@as(@Vector(16, u8), sc[16..32].*));
                inline for (0..nt) |t| {
                    acc_sc[gi][t] = @mulAdd(F16, @as(F16, @floatFromInt(isum[t])) * xscale[t], s6, acc_sc[gi][t]);
                    acc_m[gi][t] = @mulAdd(F16, xoffset[t], m, acc_m[gi][t]);
                }
                if (b % 8 == 7) {
                    const dd = factors[gi] + L.blockOffset(b / 8 * 8);
                    const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
                    const dmin: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[32..64].*)));
                    inline for (0..nt) |t| {
                        acc[gi][t] = @mulAdd(F16, d, acc_sc[gi][t], acc[gi][t]);
                        acc[gi][t] = @mulAdd(F16, -dmin, acc_m[gi][t], acc[gi][t]);
                        acc_sc[gi][t] = @splat(0);
                        acc_m[gi][t] = @splat(0);
                    }
                }
            } else if (hasMin(T)) {
                // w = d * u + m, so sum_k w x = d * (d_x * sum(u q)) + m * (d_x * sum q).
                const d_row: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(sc[0..32].*)));
                const m_row: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(sc[32..64].*)));
                inline for (0..nt) |t| {
                    const dot = @as(F16, @floatFromInt(isum[t])) * xscale[t];
                    acc[gi][t] = @mulAdd(F16, m_row, xoffset[t], @mulAdd(F16, d_row, dot, acc[gi][t]));
                }
            } else {
                // w = s * (u + bias), so sum_k w x = s * (d_x * sum(u q) + bias * d_x * sum q).
                const s_row: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(sc[0..32].*)));
                inline for (0..nt) |t| {
                    acc[gi][t] = @mulAdd(F16, s_row, @mulAdd(F16, @floatFromInt(isum[t]), xscale[t], xoffset[t]), acc[gi][t]);
                }
            }
        }
    }
    return acc;
}

/// Rows of the tile a one-token product takes in every packed GEMM (here a stripe, one
/// stream; in bgemm and fgemm four groups, four streams). A decode splits its rows in
/// multiples of it: whole stripes, and no chunk with fewer lines in flight.
pub const stream_tile_rows = stripe_rows;

/// Tokens an integer tile takes; fewer are a decode's token or few, streamed.
const int_tile_tokens = 4;
/// How far ahead a streaming pass (a decode's token or few) prefetches its weights.
pub const stream_ahead = 2048;
/// Packed bytes a pass covers while several token tiles run over them (well inside L2).
pub const pass_bytes = 256 * 1024;

/// The loop every packed GEMM (this one, bgemm, fgemm) shares, over the 16-row groups that
/// hold rows [row_begin, row_end): passes of groups that stay in L2, tiles of tokens over
/// each pass, several groups per tile. `K` gives the kernel:
///   tokens_per_tile: the most tokens a tile takes;
///   stream_tokens: below this many tokens there is one pass over every group, streamed;
///   min_groups_per_pass: the fewest groups a pass holds;
///   interleaved_groups: groups stored interleaved (passes but the first begin at a multiple);
///   groupsAtOnce(nt): how many groups a tile of nt tokens takes;
///   tile(k, ng, nt, g, first, prefetcher): the 16 sums of each of groups g..g + ng for
///     tokens first..first + nt.
/// `data` is the packed matrix, group_bytes a group's bytes (groups g.. lie from g *
/// group_bytes on, for g a multiple of interleaved_groups). A range that starts or ends inside a
/// group computes the whole group and stores only its own rows.
pub fn runTiles(comptime K: type, k: K, out: []f32, out_stride: usize, n_tokens: usize, data: [*]const u8, group_bytes: usize, row_begin: usize, row_end: usize) void {
    const gb = group_bytes;
    const g_begin = row_begin / group_rows;
    const g_end = std.math.divCeil(usize, row_end, group_rows) catch unreachable;
    const single_pass = n_tokens < K.stream_tokens;
    const in_l2 = @max(K.min_groups_per_pass, pass_bytes / gb);
    const groups_per_pass = if (single_pass) g_end - g_begin else @max(K.interleaved_groups, in_l2 / K.interleaved_groups * K.interleaved_groups);
    var g0 = g_begin;
    while (g0 < g_end) {
        // Passes after the first begin at whole stripes: the next pass's bytes are one run
        // (groups_per_pass is a multiple of interleaved_groups, so every pass moves on).
        const g1 = if (single_pass) g_end else @min(g_end, std.mem.alignBackward(usize, g0 + groups_per_pass, K.interleaved_groups));
        var prefetcher = Prefetcher{ .next = @intFromPtr(data + g1 * gb), .end = @intFromPtr(data + @min(g_end, g1 + groups_per_pass) * gb) };
        if (single_pass) prefetcher.end = prefetcher.next; // one pass: streamed
        var first: usize = 0;
        while (first < n_tokens) : (first += K.tokens_per_tile) {
            switch (@min(K.tokens_per_tile, n_tokens - first)) {
                inline 1...K.tokens_per_tile => |nt| {
                    const ng = comptime K.groupsAtOnce(nt);
                    var g = g0;
                    // Interleaved groups are taken whole: single ones up to the first
                    // stripe (a tile across two would read both as eight streams).
                    if (ng == K.interleaved_groups) {
                        while (g < g1 and g % ng != 0) : (g += 1) {
                            storeGroup(nt, k.tile(1, nt, g, first, &prefetcher)[0], out, out_stride, first, g, row_begin, row_end);
                        }
                    }
                    while (g + ng <= g1) : (g += ng) {
                        const sums = k.tile(ng, nt, g, first, &prefetcher);
                        inline for (0..ng) |i| storeGroup(nt, sums[i], out, out_stride, first, g + i, row_begin, row_end);
                    }
                    while (g < g1) : (g += 1) {
                        storeGroup(nt, k.tile(1, nt, g, first, &prefetcher)[0], out, out_stride, first, g, row_begin, row_end);
                    }
                },
                else => unreachable,
            }
        }
        g0 = g1;
    }
}

/// out[n, r] = w[r] . x[n] for r in [row_begin, row_end) and every token n < n_tokens,
/// w packed (pack) and x given as 8-bit activations.
pub fn matmulRows(comptime T: type, out: []f32, out_stride: usize, acts: quant.QuantActs, n_tokens: usize, data: [*]const u8, cols: usize, row_begin: usize, row_end: usize) void {
    assert(cols % 32 == 0);
    const Kernel = struct {
        acts: quant.QuantActs,
        cols: usize,
        data: [*]const u8,
        stripe_bytes: usize,

        pub const tokens_per_tile = int_tile_tokens;
        pub const stream_tokens = int_tile_tokens;
        pub const min_groups_per_pass = 1;
        pub const interleaved_groups = stripe_groups;
        /// A streamed tile (a decode's token or few) reads a whole stripe, one run of
        /// memory; a tile of several tokens computes in L2, a group at a time.
        pub fn groupsAtOnce(comptime nt: usize) usize {
            return if (nt < int_tile_tokens) stripe_groups else 1;
        }
        comptime {
            assert(groupsAtOnce(1) * group_rows == stream_tile_rows);
        }
        pub inline fn tile(kernel: @This(), comptime ng: usize, comptime nt: usize, g: usize, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
            return tileInt(T, ng, nt, kernel.data, kernel.stripe_bytes, g, kernel.cols / 32, kernel.acts, kernel.cols, first, prefetcher);
        }
    };
    const sb = Stripe(T).bytes(cols);
    runTiles(Kernel, .{ .acts = acts, .cols = cols, .data = data, .stripe_bytes = sb }, out, out_stride, n_tokens, data, sb / stripe_groups, row_begin, row_end);
}

/// Group g's 16 sums for token t go to out[first + t, 16g ..], rows in [row_begin, row_end) only.
pub inline fn storeGroup(comptime nt: usize, sums: [nt]F16, out: []f32, out_stride: usize, first: usize, g: usize, row_begin: usize, row_end: usize) void {
    const lo = @max(row_begin, g * group_rows);
    const hi = @min(row_end, g * group_rows + group_rows);
    inline for (0..nt) |t| {
        const dst = out[(first + t) * out_stride ..];
        if (hi - lo == group_rows) {
            dst[lo..][0..group_rows].* = sums[t];
        } else {
            const v: [group_rows]f32 = sums[t];
            @memcpy(dst[lo..hi], v[lo - g * group_rows .. hi - g * group_rows]);
        }
    }
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "vpdpbusd equals the widened multiply-add, for every byte sign" {
    var prng = std.Random.DefaultPrng.init(5);
    const rng = prng.random();
    for (0..50) |_| {
        var ub: [64]u8 = undefined;
        var sb: [64]u8 = undefined;
        var ab: [16]i32 = undefined;
        rng.bytes(&ub);
        rng.bytes(&sb);
        for (&ab) |*a| a.* = rng.intRangeAtMost(i32, -1 << 20, 1 << 20);
        const u: @Vector(64, u8) = ub;
        const s: @Vector(64, i8) = @bitCast(sb);
        const acc: I16 = ab;
        var want: [16]i32 = ab;
        for (0..64) |i| want[i / 4] += @as(i32, ub[i]) * @as(i32, @as(i8, @bitCast(sb[i])));
        try testing.expectEqual(want, @as([16]i32, dpbusd(16, acc, u, s)));
        try testing.expectEqual(want, @as([16]i32, dpbusdNaive(16, acc, u, s)));
        const want8: [8]i32 = want[0..8].*;
        const got8 = dpbusd(8, ab[0..8].*, ub[0..32].*, @as(@Vector(32, i8), @bitCast(sb[0..32].*)));
        try testing.expectEqual(want8, @as([8]i32, got8));
    }
}

test "integer GEMM over packed weights equals a plain sum over decoded weights and quantized activations" {
    const Matrix = @import("kernels.zig").Matrix;
    const allocator = testing.allocator;
    var prng = std.Random.DefaultPrng.init(17);
    const rng = prng.random();
    const cols = 512;
    // 61 groups, the last partial: more than one pass of pass_bytes for every type.
    const rows = 16 * 60 + 5;
    const max_tokens = 7; // a full tile of four and a remainder of three
    var x: [max_tokens * cols]f32 = undefined;
    for (&x) |*v| v.* = rng.floatNorm(f32);
    var q: [max_tokens * cols]i8 = undefined;
    var scale: [max_tokens * cols / 32]f32 = undefined;
    var sum: [max_tokens * cols / 32]f32 = undefined;
    var sum_lo: [max_tokens * cols / 32]f32 = undefined;
    const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum, .sum_lo = &sum_lo };
    acts.quantize(&x, 0, max_tokens, cols);
    const storage = try allocator.alignedAlloc(u8, 4, rows * (cols / 32) * 34); // Q8_0, the largest
    defer allocator.free(storage);
    const out = try allocator.alloc(f32, max_tokens * (rows + 3));
    defer allocator.free(out);
    inline for (.{ .{ quant.BlockQ8_0, .q8_0 }, .{ quant.BlockQ4_0, .q4_0 }, .{ quant.BlockQ4_1, .q4_1 }, .{ quant.BlockQ5_1, .q5_1 }, .{ quant.BlockQ4_K, .q4_k }, .{ quant.BlockQ5_K, .q5_k }, .{ quant.BlockQ6_K, .q6_k } }) |case| {
        const T = case[0];
        rng.bytes(storage);
        const blocks: [*]align(1) T = @ptrCast(storage.ptr);
        const units = cols / quant.unitElems(T);
        for (0..rows * units) |bi| {
            blocks[bi].d = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
            if (@hasField(T, "dmin")) blocks[bi].dmin = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
            if (@hasField(T, "m")) blocks[bi].m = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01 - 0.005)));
        }
        // Q6_K's scales are signed bytes: the random ones include negatives.
        const w = Matrix{ .dtype = case[1], .data = storage.ptr, .rows = rows, .cols = cols };
        try testing.expect(packedBytes(T, rows, cols) > pass_bytes);
        const packed_w = try allocator.alloc(u8, packedBytes(T, rows, cols));
        defer allocator.free(packed_w);
        pack(T, packed_w, storage.ptr, rows, cols);
        // Every row unpacks to its decoded weights, exactly.
        for (0..rows) |r| for (0..cols) |k| try testing.expectEqual(w.get(r, k), weightAt(T, packed_w.ptr, cols, r, k));
        // The row range need not start at a group boundary, nor at a stripe's (37: in its
        // third group, so that a decode's tiles take two groups singly before whole stripes).
        for ([_]usize{ 1, 2, 4, 7 }) |n_tokens| for ([_]usize{ 2, 37 }) |row_begin| {
            const stride = rows + 3;
            @memset(out, std.math.nan(f32));
            matmulRows(T, out, stride, acts, n_tokens, packed_w.ptr, cols, row_begin, rows);
            for (0..n_tokens) |n| {
                for (0..rows) |r| {
                    const got = out[n * stride + r];
                    if (r < row_begin) {
                        try testing.expect(std.math.isNan(got));
                        continue;
                    }
                    var want: f64 = 0;
                    var magnitude: f64 = 0;
                    for (0..cols) |k| {
                        const term = @as(f64, w.get(r, k)) * scale[(n * cols + k) / 32] * @as(f64, @floatFromInt(q[n * cols + k]));
                        want += term;
                        magnitude += @abs(term);
                    }
                    try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), got, @as(f32, @floatCast(1e-5 * magnitude + 1e-5)));
                }
                try testing.expect(std.math.isNan(out[n * stride + rows])); // nothing past row_end
            }
        };
    }
}
