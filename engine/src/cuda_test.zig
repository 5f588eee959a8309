//! The CUDA kernels (engine/cuda), run over the host emulator, against naive f64 versions and
//! the CPU engine's decoders: fresh random inputs, outputs poisoned before each launch (the
//! emulator fills new device memory with 0xcd), every element checked.

const std = @import("std");
const testing = std.testing;
const quant = @import("quant.zig");
const sampler = @import("sampler.zig");
const abi = @import("abi.zig");
const cu = @import("cuda_api.zig").cu;

fn ok(status: i32) !void {
    if (status != 0) {
        std.debug.print("CUDA status {d}: {s}\n", .{ status, cu.ifn_cu_error_string(status) });
        return error.CudaFailed;
    }
}

/// Device memory for n values of T, filled from `host` (or left poisoned).
fn Device(comptime T: type) type {
    return struct {
        ptr: [*]T,
        len: usize,

        const Self = @This();
        fn alloc(n: usize) !Self {
            var p: ?*anyopaque = null;
            try ok(cu.ifn_cu_malloc(&p, @max(1, n) * @sizeOf(T)));
            return .{ .ptr = @ptrCast(@alignCast(p.?)), .len = n };
        }
        fn from(host: []const T) !Self {
            const d = try alloc(host.len);
            try ok(cu.ifn_cu_copy(d.ptr, host.ptr, host.len * @sizeOf(T), null));
            return d;
        }
        fn read(d: Self, out: []T) !void {
            try ok(cu.ifn_cu_copy(out.ptr, d.ptr, out.len * @sizeOf(T), null));
        }
        fn free(d: Self) void {
            _ = cu.ifn_cu_free(d.ptr);
        }
    };
}

fn normals(rng: std.Random, out: []f32, scale: f32) void {
    for (out) |*v| v.* = rng.floatNorm(f32) * scale;
}

fn expectClose(want: []const f64, got: []const f32, rel: f64) !void {
    var err: f64 = 0;
    var norm: f64 = 0;
    for (want, got) |w, g| {
        if (std.math.isNan(g)) return error.NaN;
        err += (w - g) * (w - g);
        norm += w * w;
    }
    const r = @sqrt(err / @max(norm, 1e-30));
    if (r > rel) {
        std.debug.print("relative error {e} over {e}\n", .{ r, rel });
        return error.TooFar;
    }
}

fn rmsRef(x: []const f32, w: []const f32, out: []f64, eps: f32) void {
    var ss: f64 = 0;
    for (x) |v| ss += @as(f64, v) * v;
    const inv = 1.0 / @sqrt(ss / @as(f64, @floatFromInt(x.len)) + eps);
    for (out, x, w) |*o, v, g| o.* = v * inv * g;
}

test "cuda rmsnorm and add_rmsnorm, with gathered rows and a post-norm" {
    var prng = std.Random.DefaultPrng.init(11);
    const rng = prng.random();
    const n = 5;
    for ([_]usize{ 8, 64, 300, 1030 }) |dim| {
        const x = try testing.allocator.alloc(f32, n * dim);
        defer testing.allocator.free(x);
        const d = try testing.allocator.alloc(f32, n * dim);
        defer testing.allocator.free(d);
        const w = try testing.allocator.alloc(f32, dim);
        defer testing.allocator.free(w);
        const pw = try testing.allocator.alloc(f32, dim);
        defer testing.allocator.free(pw);
        normals(rng, x, 2);
        normals(rng, d, 1);
        normals(rng, w, 1);
        normals(rng, pw, 1);
        const dx = try Device(f32).from(x);
        defer dx.free();
        const dd = try Device(f32).from(d);
        defer dd.free();
        const dw = try Device(f32).from(w);
        defer dw.free();
        const dpw = try Device(f32).from(pw);
        defer dpw.free();
        // Rows 3, 0, 4 gathered into a packed output.
        const rows = [_]i32{ 3, 0, 4 };
        const drows = try Device(i32).from(&rows);
        defer drows.free();
        const dout = try Device(f32).alloc(n * dim);
        defer dout.free();
        try ok(cu.ifn_cu_rmsnorm(dout.ptr, @intCast(dim), dx.ptr, @intCast(dim), drows.ptr, dw.ptr, rows.len, @intCast(dim), 1e-5, null));
        const got = try testing.allocator.alloc(f32, rows.len * dim);
        defer testing.allocator.free(got);
        try dout.read(got);
        const want = try testing.allocator.alloc(f64, rows.len * dim);
        defer testing.allocator.free(want);
        for (rows, 0..) |r, i| rmsRef(x[@as(usize, @intCast(r)) * dim ..][0..dim], w, want[i * dim ..][0..dim], 1e-5);
        try expectClose(want, got, 1e-6);

        // x += RMSNorm(d) * pw; out = RMSNorm(x) * w.
        try ok(cu.ifn_cu_add_rmsnorm(dx.ptr, dd.ptr, dpw.ptr, dout.ptr, dw.ptr, n, @intCast(dim), 1e-5, null));
        const got_x = try testing.allocator.alloc(f32, n * dim);
        defer testing.allocator.free(got_x);
        const got_out = try testing.allocator.alloc(f32, n * dim);
        defer testing.allocator.free(got_out);
        try dx.read(got_x);
        try dout.read(got_out);
        const want_x = try testing.allocator.alloc(f64, n * dim);
        defer testing.allocator.free(want_x);
        const want_out = try testing.allocator.alloc(f64, n * dim);
        defer testing.allocator.free(want_out);
        const x_new = try testing.allocator.alloc(f32, dim);
        defer testing.allocator.free(x_new);
        for (0..n) |r| {
            rmsRef(d[r * dim ..][0..dim], pw, want_x[r * dim ..][0..dim], 1e-5);
            for (want_x[r * dim ..][0..dim], x[r * dim ..][0..dim], x_new) |*wx, xv, *xn| {
                wx.* += xv;
                xn.* = @floatCast(wx.*);
            }
            rmsRef(x_new, w, want_out[r * dim ..][0..dim], 1e-5);
        }
        try expectClose(want_x, got_x, 1e-6);
        try expectClose(want_out, got_out, 1e-5);
    }
}

test "cuda act_mul: SiLU and GELU (tanh) gates" {
    var prng = std.Random.DefaultPrng.init(12);
    const rng = prng.random();
    const n = 3;
    const ffn = 172;
    var gu: [n * 2 * ffn]f32 = undefined;
    normals(rng, &gu, 3);
    const dgu = try Device(f32).from(&gu);
    defer dgu.free();
    const dout = try Device(f32).alloc(n * ffn);
    defer dout.free();
    for ([_]u32{ 0, 1 }) |act| {
        try ok(cu.ifn_cu_act_mul(dout.ptr, dgu.ptr, n, ffn, act, null));
        var got: [n * ffn]f32 = undefined;
        try dout.read(&got);
        var want: [n * ffn]f64 = undefined;
        for (0..n) |t| for (0..ffn) |j| {
            const g: f64 = gu[t * 2 * ffn + j];
            const u: f64 = gu[t * 2 * ffn + ffn + j];
            const a = if (act == 0) g / (1 + @exp(-g)) else 0.5 * g * (1 + std.math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
            want[t * ffn + j] = a * u;
        };
        try expectClose(&want, &got, 1e-6);
    }
}

/// A random row of `blocks` blocks of type T (scales kept small and finite), as bytes.
fn randomBlocks(comptime T: type, rng: std.Random, out: []T) void {
    const bytes = std.mem.sliceAsBytes(out);
    rng.bytes(bytes);
    for (out) |*blk| {
        inline for (std.meta.fields(T)) |f| {
            if (f.type == u16) @field(blk, f.name) = @bitCast(@as(f16, @floatCast(0.01 + rng.float(f32) * 0.02)));
        }
    }
}

fn quantTypes() [4]struct { dtype: abi.DType, block: type } {
    return .{ .{ .dtype = .q8_0, .block = quant.BlockQ8_0 }, .{ .dtype = .q4_0, .block = quant.BlockQ4_0 }, .{ .dtype = .q4_k, .block = quant.BlockQ4_K }, .{ .dtype = .q6_k, .block = quant.BlockQ6_K } };
}

test "cuda embed and convert read every weight type as the CPU engine decodes it" {
    var prng = std.Random.DefaultPrng.init(13);
    const rng = prng.random();
    const vocab = 7;
    const hidden = 512;
    const ids = [_]i32{ 6, 0, 3, 3 };
    const dids = try Device(i32).from(&ids);
    defer dids.free();
    inline for (comptime quantTypes()) |q| {
        const per_row = hidden / comptime quant.unitElems(q.block);
        var blocks: [vocab * per_row]q.block = undefined;
        randomBlocks(q.block, rng, &blocks);
        const dt = try Device(q.block).from(&blocks);
        defer dt.free();
        const table = cu.ifn_cu_matrix{ .data = dt.ptr, .dtype = @intFromEnum(q.dtype), .rows = vocab, .cols = hidden, ._pad = 0 };
        const dout = try Device(f32).alloc(ids.len * hidden);
        defer dout.free();
        try ok(cu.ifn_cu_embed(dout.ptr, &table, dids.ptr, ids.len, 0.5, null));
        var got: [ids.len * hidden]f32 = undefined;
        try dout.read(&got);
        for (ids, 0..) |id, t| for (0..hidden) |i| {
            const row: [*]align(1) const q.block = @ptrCast(&blocks[@as(usize, @intCast(id)) * per_row]);
            try testing.expectApproxEqAbs(quant.scalar(q.block, row, i) * 0.5, got[t * hidden + i], 1e-6);
        };
        // The whole table to bf16.
        const dconv = try Device(u16).alloc(vocab * hidden);
        defer dconv.free();
        try ok(cu.ifn_cu_convert(dconv.ptr, @intFromEnum(abi.DType.bf16), dt.ptr, @intFromEnum(q.dtype), vocab, hidden, null));
        var conv: [vocab * hidden]u16 = undefined;
        try dconv.read(&conv);
        for (0..vocab) |r| for (0..hidden) |i| {
            const row: [*]align(1) const q.block = @ptrCast(&blocks[r * per_row]);
            const want = quant.scalar(q.block, row, i);
            const got_v: f32 = @bitCast(@as(u32, conv[r * hidden + i]) << 16);
            try testing.expectApproxEqAbs(want, got_v, @abs(want) / 128 + 1e-6);
        };
    }
}

test "cuda rope: biases, q/k head norms and both pair layouts at each token's position" {
    var prng = std.Random.DefaultPrng.init(14);
    const rng = prng.random();
    const heads = 4;
    const kv_heads = 2;
    const hd = 16;
    const half = hd / 2;
    const max_pos = 50;
    const qkv_dim = (heads + 2 * kv_heads) * hd;
    const n = 3;
    const positions = [_]i32{ 0, 17, 49 };
    var cos: [max_pos * half]f32 = undefined;
    var sin: [max_pos * half]f32 = undefined;
    for (0..max_pos) |p| for (0..half) |i| {
        const angle = @as(f64, @floatFromInt(p)) / std.math.pow(f64, 10000, @as(f64, @floatFromInt(2 * i)) / hd);
        cos[p * half + i] = @floatCast(@cos(angle));
        sin[p * half + i] = @floatCast(@sin(angle));
    };
    var bias: [qkv_dim]f32 = undefined;
    var qn: [hd]f32 = undefined;
    var kn: [hd]f32 = undefined;
    normals(rng, &bias, 0.5);
    normals(rng, &qn, 1);
    normals(rng, &kn, 1);
    const dcos = try Device(f32).from(&cos);
    defer dcos.free();
    const dsin = try Device(f32).from(&sin);
    defer dsin.free();
    const dbias = try Device(f32).from(&bias);
    defer dbias.free();
    const dqn = try Device(f32).from(&qn);
    defer dqn.free();
    const dkn = try Device(f32).from(&kn);
    defer dkn.free();
    const dpos = try Device(i32).from(&positions);
    defer dpos.free();
    for ([_]bool{ false, true }) |interleaved| for ([_]bool{ false, true }) |extras| {
        var qkv: [n * qkv_dim]f32 = undefined;
        normals(rng, &qkv, 1);
        const dqkv = try Device(f32).from(&qkv);
        defer dqkv.free();
        const args = cu.ifn_cu_rope_args{
            .num_heads = heads,
            .num_kv_heads = kv_heads,
            .head_dim = hd,
            .interleaved = @intFromBool(interleaved),
            .cos = dcos.ptr,
            .sin = dsin.ptr,
            .bias = if (extras) dbias.ptr else null,
            .q_norm = if (extras) dqn.ptr else null,
            .k_norm = if (extras) dkn.ptr else null,
            .eps = 1e-6,
        };
        try ok(cu.ifn_cu_rope(dqkv.ptr, n, dpos.ptr, &args, null));
        var got: [n * qkv_dim]f32 = undefined;
        try dqkv.read(&got);
        var want: [n * qkv_dim]f64 = undefined;
        for (0..n) |t| for (0..heads + 2 * kv_heads) |h| {
            var v: [hd]f64 = undefined;
            for (0..hd) |i| v[i] = qkv[t * qkv_dim + h * hd + i] + if (extras) bias[h * hd + i] else 0;
            const is_v = h >= heads + kv_heads;
            if (extras and !is_v) {
                const w = if (h < heads) &qn else &kn;
                var ss: f64 = 0;
                for (v) |x| ss += x * x;
                const inv = 1 / @sqrt(ss / hd + 1e-6);
                for (&v, w) |*x, g| x.* *= inv * g;
            }
            if (!is_v) {
                const p: usize = @intCast(positions[t]);
                var r = v;
                for (0..half) |i| {
                    const a = if (interleaved) 2 * i else i;
                    const b = if (interleaved) 2 * i + 1 else i + half;
                    r[a] = v[a] * cos[p * half + i] - v[b] * sin[p * half + i];
                    r[b] = v[a] * sin[p * half + i] + v[b] * cos[p * half + i];
                }
                v = r;
            }
            for (0..hd) |i| want[t * qkv_dim + h * hd + i] = v[i];
        };
        try expectClose(&want, &got, 1e-6);
    };
}

/// Naive attention of one query (heads of q) at `pos` over a sequence's K/V rows (by position).
fn attentionRef(out: []f64, q: []const f32, keys: []const f32, values: []const f32, pos: usize, heads: usize, kv_heads: usize, hd: usize, scale: f32, softcap: f32, window: usize) void {
    const g = heads / kv_heads;
    const start = if (window > 0 and pos + 1 > window) pos + 1 - window else 0;
    const kv_dim = kv_heads * hd;
    for (0..heads) |h| {
        const kvh = h / g;
        var mx: f64 = -std.math.inf(f64);
        var scores: [4096]f64 = undefined;
        for (start..pos + 1) |p| {
            var s: f64 = 0;
            for (0..hd) |d| s += @as(f64, q[h * hd + d]) * keys[p * kv_dim + kvh * hd + d];
            s *= scale;
            if (softcap != 0) s = softcap * std.math.tanh(s / softcap);
            scores[p] = s;
            mx = @max(mx, s);
        }
        var total: f64 = 0;
        for (start..pos + 1) |p| {
            scores[p] = @exp(scores[p] - mx);
            total += scores[p];
        }
        for (0..hd) |d| {
            var acc: f64 = 0;
            for (start..pos + 1) |p| acc += scores[p] * values[p * kv_dim + kvh * hd + d];
            out[h * hd + d] = acc / total;
        }
    }
}

test "cuda kv_write and paged attention: decode over several splits and prefill tiles, windows and soft caps" {
    var prng = std.Random.DefaultPrng.init(15);
    const rng = prng.random();
    const alloc = testing.allocator;
    const heads = 8;
    const kv_heads = 2;
    const hd = 64;
    const bs = 16;
    const lens = [_]usize{ 700, 1300 };
    const max_blocks = 100;
    const num_blocks = 160;
    const kv_dim = kv_heads * hd;
    const q_dim = heads * hd;
    // Each sequence's blocks scattered over the pool.
    var perm: [num_blocks]i32 = undefined;
    for (&perm, 0..) |*p, i| p.* = @intCast(i);
    rng.shuffle(i32, &perm);
    var tables: [2 * max_blocks]i32 = undefined;
    @memset(&tables, 0);
    var used: usize = 0;
    for (lens, 0..) |len, s| for (0..(len + bs - 1) / bs) |b| {
        tables[s * max_blocks + b] = perm[used];
        used += 1;
    };
    const dtables = try Device(i32).from(&tables);
    defer dtables.free();
    for ([_]abi.DType{ .f32, .f16 }) |kv_dtype| {
        const elem: usize = if (kv_dtype == .f32) 4 else 2;
        const dk = try Device(u8).alloc(num_blocks * bs * kv_dim * elem);
        defer dk.free();
        const dv = try Device(u8).alloc(num_blocks * bs * kv_dim * elem);
        defer dv.free();
        // K and V of every position, written through kv_write as qkv rows [q | k | v].
        var keys: [2][]f32 = undefined;
        var values: [2][]f32 = undefined;
        for (lens, 0..) |len, s| {
            keys[s] = try alloc.alloc(f32, len * kv_dim);
            values[s] = try alloc.alloc(f32, len * kv_dim);
            normals(rng, keys[s], 1);
            normals(rng, values[s], 1);
            if (kv_dtype == .f16) for (keys[s]) |*x| {
                x.* = @floatCast(@as(f16, @floatCast(x.*)));
            };
            if (kv_dtype == .f16) for (values[s]) |*x| {
                x.* = @floatCast(@as(f16, @floatCast(x.*)));
            };
            const rows = try alloc.alloc(f32, len * (q_dim + 2 * kv_dim));
            defer alloc.free(rows);
            const slots = try alloc.alloc(i32, len);
            defer alloc.free(slots);
            for (0..len) |p| {
                @memcpy(rows[p * (q_dim + 2 * kv_dim) + q_dim ..][0..kv_dim], keys[s][p * kv_dim ..][0..kv_dim]);
                @memcpy(rows[p * (q_dim + 2 * kv_dim) + q_dim + kv_dim ..][0..kv_dim], values[s][p * kv_dim ..][0..kv_dim]);
                slots[p] = tables[s * max_blocks + p / bs] * bs + @as(i32, @intCast(p % bs));
            }
            const drows = try Device(f32).from(rows);
            defer drows.free();
            const dslots = try Device(i32).from(slots);
            defer dslots.free();
            try ok(cu.ifn_cu_kv_write(dk.ptr, dv.ptr, @intFromEnum(kv_dtype), drows.ptr, q_dim + 2 * kv_dim, q_dim, q_dim + kv_dim, dslots.ptr, @intCast(len), kv_heads, hd, bs, null));
        }
        defer for (0..2) |s| {
            alloc.free(keys[s]);
            alloc.free(values[s]);
        };
        for ([_]struct { window: u32, softcap: f32 }{ .{ .window = 0, .softcap = 0 }, .{ .window = 300, .softcap = 0 }, .{ .window = 0, .softcap = 5 } }) |v| {
            try checkDecode(rng, dk.ptr, dv.ptr, kv_dtype, dtables.ptr, max_blocks, &lens, keys, values, heads, kv_heads, hd, bs, v.window, v.softcap);
            try checkPrefill(rng, dk.ptr, dv.ptr, kv_dtype, dtables.ptr, max_blocks, lens[1], keys[1], values[1], heads, kv_heads, hd, bs, v.window, v.softcap);
        }
    }
}

fn attnArgs(q: [*]f32, out: [*]f32, k: *anyopaque, v: *anyopaque, kv_dtype: abi.DType, tables: [*]i32, max_blocks: u32, seq_of: [*]i32, positions: [*]i32, heads: u32, kv_heads: u32, hd: u32, bs: u32, window: u32, softcap: f32) cu.ifn_cu_attn_args {
    return .{
        .q = q,
        .q_stride = heads * hd,
        .out = out,
        .out_stride = heads * hd,
        .k_cache = k,
        .v_cache = v,
        .kv_dtype = @intFromEnum(kv_dtype),
        .block_tables = tables,
        .max_blocks_per_seq = max_blocks,
        .seq_of_token = seq_of,
        .positions = positions,
        .num_heads = heads,
        .num_kv_heads = kv_heads,
        .head_dim = hd,
        .block_size = bs,
        .scale = 1 / @sqrt(@as(f32, @floatFromInt(hd))),
        .softcap = softcap,
        .window = window,
    };
}

fn checkDecode(rng: std.Random, k: *anyopaque, v: *anyopaque, kv_dtype: abi.DType, tables: [*]i32, max_blocks: u32, lens: []const usize, keys: [2][]f32, values: [2][]f32, heads: u32, kv_heads: u32, hd: u32, bs: u32, window: u32, softcap: f32) !void {
    // Tokens 0 and 2 decode the last position of sequences 0 and 1; token 1 is not a decode.
    const n = 3;
    var q: [n * 512]f32 = undefined;
    normals(rng, q[0 .. n * heads * hd], 1);
    const positions = [_]i32{ @intCast(lens[0] - 1), 5, @intCast(lens[1] - 1) };
    const seq_of = [_]i32{ 0, 0, 1 };
    const tokens = [_]i32{ 0, -1, 2 };
    const split: usize = 512;
    const max_splits = (lens[1] + split - 1) / split;
    const dq = try Device(f32).from(q[0 .. n * heads * hd]);
    defer dq.free();
    const dout = try Device(f32).alloc(n * heads * hd);
    defer dout.free();
    const dpos = try Device(i32).from(&positions);
    defer dpos.free();
    const dseq = try Device(i32).from(&seq_of);
    defer dseq.free();
    const dtok = try Device(i32).from(&tokens);
    defer dtok.free();
    const dws = try Device(f32).alloc(n * heads * max_splits * (hd + 2));
    defer dws.free();
    const args = attnArgs(dq.ptr, dout.ptr, k, v, kv_dtype, tables, max_blocks, dseq.ptr, dpos.ptr, heads, kv_heads, hd, bs, window, softcap);
    try ok(cu.ifn_cu_attention_decode(&args, dtok.ptr, n, @intCast(max_splits), @intCast(split), dws.ptr, null));
    var got: [n * 512]f32 = undefined;
    try dout.read(got[0 .. n * heads * hd]);
    for ([_]usize{ 0, 2 }) |t| {
        var want: [512]f64 = undefined;
        const s: usize = @intCast(seq_of[t]);
        attentionRef(want[0 .. heads * hd], q[t * heads * hd ..][0 .. heads * hd], keys[s], values[s], @intCast(positions[t]), heads, kv_heads, hd, args.scale, softcap, window);
        try expectClose(want[0 .. heads * hd], got[t * heads * hd ..][0 .. heads * hd], 1e-5);
    }
}

fn checkPrefill(rng: std.Random, k: *anyopaque, v: *anyopaque, kv_dtype: abi.DType, tables: [*]i32, max_blocks: u32, len: usize, keys: []f32, values: []f32, heads: u32, kv_heads: u32, hd: u32, bs: u32, window: u32, softcap: f32) !void {
    // The last 37 queries of sequence 1 (it is in row 1 of the block tables), in tiles.
    const n = 37;
    const q = try testing.allocator.alloc(f32, n * heads * hd);
    defer testing.allocator.free(q);
    normals(rng, q, 1);
    var positions: [n]i32 = undefined;
    var seq_of: [n]i32 = undefined;
    for (0..n) |i| {
        positions[i] = @intCast(len - n + i);
        seq_of[i] = 1;
    }
    const per = cu.ifn_cu_prefill_tile_queries(heads, kv_heads);
    var first: [n]i32 = undefined;
    var count: [n]i32 = undefined;
    var tiles: u32 = 0;
    var t: u32 = 0;
    while (t < n) : (t += per) {
        first[tiles] = @intCast(t);
        count[tiles] = @intCast(@min(per, n - t));
        tiles += 1;
    }
    const dq = try Device(f32).from(q);
    defer dq.free();
    const dout = try Device(f32).alloc(n * heads * hd);
    defer dout.free();
    const dpos = try Device(i32).from(&positions);
    defer dpos.free();
    const dseq = try Device(i32).from(&seq_of);
    defer dseq.free();
    const dfirst = try Device(i32).from(first[0..tiles]);
    defer dfirst.free();
    const dcount = try Device(i32).from(count[0..tiles]);
    defer dcount.free();
    const args = attnArgs(dq.ptr, dout.ptr, k, v, kv_dtype, tables, max_blocks, dseq.ptr, dpos.ptr, heads, kv_heads, hd, bs, window, softcap);
    try ok(cu.ifn_cu_attention_prefill(&args, dfirst.ptr, dcount.ptr, tiles, null));
    const got = try testing.allocator.alloc(f32, n * heads * hd);
    defer testing.allocator.free(got);
    try dout.read(got);
    for (0..n) |i| {
        var want: [512]f64 = undefined;
        attentionRef(want[0 .. heads * hd], q[i * heads * hd ..][0 .. heads * hd], keys, values, @intCast(positions[i]), heads, kv_heads, hd, args.scale, softcap, window);
        try expectClose(want[0 .. heads * hd], got[i * heads * hd ..][0 .. heads * hd], 1e-5);
    }
}

test "cuda matmul: float weights by the tiled GEMM, quantized ones by the packed matrix-vector product and expanded" {
    var prng = std.Random.DefaultPrng.init(16);
    const rng = prng.random();
    const alloc = testing.allocator;
    const m = 200;
    const k = 512;
    const ldx = k + 5;
    const ldo = m + 3;
    var gemm: ?*cu.ifn_cu_gemm = null;
    var note: [256]u8 = undefined;
    try ok(cu.ifn_cu_gemm_create(&gemm, 70, k, m, &note, note.len));
    defer cu.ifn_cu_gemm_destroy(gemm);
    const x = try alloc.alloc(f32, 70 * ldx);
    defer alloc.free(x);
    normals(rng, x, 1);
    const dx = try Device(f32).from(x);
    defer dx.free();
    const dout = try Device(f32).alloc(70 * ldo);
    defer dout.free();
    const got = try alloc.alloc(f32, 70 * ldo);
    defer alloc.free(got);
    // Float weights, as decoded; then each quantized type.
    const wf = try alloc.alloc(f32, m * k);
    defer alloc.free(wf);
    inline for (.{ abi.DType.f32, abi.DType.f16, abi.DType.bf16 }) |dtype| {
        normals(rng, wf, 0.1);
        const T = if (dtype == .f32) f32 else u16;
        const stored = try alloc.alloc(T, m * k);
        defer alloc.free(stored);
        for (stored, wf) |*s, *v| {
            if (dtype == .f16) s.* = @bitCast(@as(f16, @floatCast(v.*)));
            if (dtype == .bf16) s.* = @truncate(@as(u32, @bitCast(v.*)) >> 16);
            if (dtype == .f32) s.* = v.*;
            v.* = if (dtype == .f16) @floatCast(@as(f16, @bitCast(s.*))) else if (dtype == .bf16) @bitCast(@as(u32, s.*) << 16) else v.*;
        }
        const dw = try Device(T).from(stored);
        defer dw.free();
        try checkMatmul(gemm.?, dw.ptr, @intFromEnum(dtype), wf, m, k, x, ldx, dx.ptr, dout.ptr, got, ldo);
    }
    inline for (comptime quantTypes()) |q| {
        const per_row = k / comptime quant.unitElems(q.block);
        const blocks = try alloc.alloc(q.block, m * per_row);
        defer alloc.free(blocks);
        randomBlocks(q.block, rng, blocks);
        for (0..m) |r| for (0..k) |i| {
            const row: [*]align(1) const q.block = @ptrCast(&blocks[r * per_row]);
            wf[r * k + i] = quant.scalar(q.block, row, i);
        };
        const dw = try Device(q.block).from(blocks);
        defer dw.free();
        try checkMatmul(gemm.?, dw.ptr, @intFromEnum(q.dtype), wf, m, k, x, ldx, dx.ptr, dout.ptr, got, ldo);
    }
}

fn checkMatmul(g: *cu.ifn_cu_gemm, w: *anyopaque, dtype: u32, wf: []const f32, m: usize, k: usize, x: []const f32, ldx: usize, dx: [*]f32, dout: [*]f32, got: []f32, ldo: usize) !void {
    for ([_]u32{ 1, 3, 8, 9, 70 }) |n| {
        const mat = cu.ifn_cu_matrix{ .data = w, .dtype = dtype, .rows = @intCast(m), .cols = @intCast(k), ._pad = 0 };
        try ok(cu.ifn_cu_matmul(g, dout, @intCast(ldo), dx, @intCast(ldx), n, &mat, null));
        try ok(cu.ifn_cu_copy(got.ptr, dout, n * ldo * 4, null));
        const want = try testing.allocator.alloc(f64, n * m);
        defer testing.allocator.free(want);
        const have = try testing.allocator.alloc(f32, n * m);
        defer testing.allocator.free(have);
        for (0..n) |t| for (0..m) |r| {
            var acc: f64 = 0;
            for (0..k) |i| acc += @as(f64, x[t * ldx + i]) * wf[r * k + i];
            want[t * m + r] = acc;
            have[t * m + r] = got[t * ldo + r];
        };
        try expectClose(want, have, 1e-5);
    }
}

/// One CPU sample of a row (the engine's own sampler), for the device's to match.
fn cpuSample(logits: []const f32, p: abi.SamplingParams, history: []const i32, prompt_len: usize, bias_ids: []const i32, bias_values: []const f32, mask: ?[]const u32) !sampler.Sample {
    const n = logits.len;
    const alloc = testing.allocator;
    const copy = try alloc.dupe(f32, logits);
    defer alloc.free(copy);
    const probs = try alloc.alloc(f32, n);
    defer alloc.free(probs);
    const order = try alloc.alloc(u32, n);
    defer alloc.free(order);
    const counts = try alloc.alloc(u32, n);
    defer alloc.free(counts);
    @memset(counts, 0);
    const raw = try alloc.alloc(f32, n);
    defer alloc.free(raw);
    var ids: [abi.top_logprobs_max]i32 = undefined;
    var lps: [abi.top_logprobs_max]f32 = undefined;
    return sampler.sample(copy, .{ .params = p, .history = history, .prompt_len = prompt_len, .bias_ids = bias_ids, .bias_values = bias_values, .mask = mask }, .{ .probs = probs, .order = order, .counts = counts, .raw = raw }, &ids, &lps);
}

test "cuda sample: greedy rows, masks, bias and penalties as the CPU draws them; seeded draws from the CPU's cut" {
    var prng = std.Random.DefaultPrng.init(17);
    const rng = prng.random();
    const alloc = testing.allocator;
    const vocab = 1000;
    const words = (vocab + 31) / 32;
    const rows = 8;
    const logits = try alloc.alloc(f32, rows * vocab);
    defer alloc.free(logits);
    normals(rng, logits, 2);
    const greedy = abi.SamplingParams{ .temperature = 0, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 0, .draw_index = 0 };
    var params: [rows]abi.SamplingParams = .{greedy} ** rows;
    params[0].num_top_logprobs = 5;
    params[1].use_mask = 1; // row 1: tokens 3, 500 and 999 only
    params[2].bias_offset = 0; // row 2: token 42 pushed up
    params[2].bias_count = 2;
    params[3].state_slot = 1; // row 3: penalties over its state
    params[3].repetition_penalty = 1.8;
    params[3].frequency_penalty = 0.7;
    params[3].presence_penalty = 0.4;
    for (4..8) |r| params[r] = .{ .temperature = 0.9, .top_p = 0.9, .min_p = 0.02, .top_k = 60, .seed = 77, .draw_index = r };
    params[7].top_k = 0; // top-p and min-p alone
    const bias_ids = [_]i32{ 42, 42 };
    const bias_values = [_]f32{ 6, 1.5 };
    var masks = [_]u32{0} ** (rows * words);
    for ([_]u32{ 3, 500, 999 }) |t| masks[words + t / 32] |= @as(u32, 1) << @intCast(t % 32);
    // Sequence state 1: a prompt of 6 tokens, then 5 drawn.
    const history = [_]i32{ 1, 7, 7, 300, 12, 42, 7, 42, 999, 5, 5 };
    const prompt_len = 6;
    const dhist = try Device(i32).from(&history);
    defer dhist.free();
    const dcounts = try Device(u16).alloc(2 * vocab);
    defer dcounts.free();
    const dseen = try Device(u32).alloc(2 * words);
    defer dseen.free();
    try ok(cu.ifn_cu_seq_state_set(dcounts.ptr, dseen.ptr, 1, vocab, dhist.ptr, history.len, prompt_len, null));
    var counts: [2 * vocab]u16 = undefined;
    try dcounts.read(&counts);
    for (0..vocab) |t| {
        var c: u16 = 0;
        for (history[prompt_len..]) |h| c += @intFromBool(h == t);
        try testing.expectEqual(c, counts[vocab + t]);
    }

    const dlogits = try Device(f32).from(logits);
    defer dlogits.free();
    const dwork = try Device(f32).alloc(rows * vocab);
    defer dwork.free();
    const dparams = try Device(abi.SamplingParams).from(&params);
    defer dparams.free();
    const dbias_ids = try Device(i32).from(&bias_ids);
    defer dbias_ids.free();
    const dbias_values = try Device(f32).from(&bias_values);
    defer dbias_values.free();
    const dmasks = try Device(u32).from(&masks);
    defer dmasks.free();
    const dtok = try Device(i32).alloc(rows);
    defer dtok.free();
    const dlp = try Device(f32).alloc(rows);
    defer dlp.free();
    const dtop = try Device(i32).alloc(rows * abi.top_logprobs_max);
    defer dtop.free();
    const dtoplp = try Device(f32).alloc(rows * abi.top_logprobs_max);
    defer dtoplp.free();
    const args = cu.ifn_cu_sample_args{
        .logits = dlogits.ptr,
        .work = dwork.ptr,
        .n = rows,
        .vocab = vocab,
        .final_softcap = 0,
        .mask_words = words,
        .params = dparams.ptr,
        .bias_ids = dbias_ids.ptr,
        .bias_values = dbias_values.ptr,
        .masks = dmasks.ptr,
        .counts = dcounts.ptr,
        .prompt_seen = dseen.ptr,
        .out_tokens = dtok.ptr,
        .out_logprobs = dlp.ptr,
        .out_top_ids = dtop.ptr,
        .out_top_logprobs = dtoplp.ptr,
    };
    try ok(cu.ifn_cu_sample(&args, null));
    var tokens: [rows]i32 = undefined;
    var lps: [rows]f32 = undefined;
    var top: [rows * abi.top_logprobs_max]i32 = undefined;
    var top_lp: [rows * abi.top_logprobs_max]f32 = undefined;
    try dtok.read(&tokens);
    try dlp.read(&lps);
    try dtop.read(&top);
    try dtoplp.read(&top_lp);
    for (0..4) |r| {
        const row = logits[r * vocab ..][0..vocab];
        const s = try cpuSample(row, params[r], if (r == 3) &history else &.{}, prompt_len, if (r == 2) &bias_ids else &.{}, if (r == 2) &bias_values else &.{}, if (r == 1) masks[words..][0..words] else null);
        try testing.expectEqual(@as(i32, @intCast(s.token_id)), tokens[r]);
        try testing.expectApproxEqAbs(s.logprob, lps[r], 1e-4);
    }
    try testing.expectEqual(@as(i32, 42), tokens[2]);
    // The top alternatives: the largest logits in order, as log-probabilities.
    const row0 = logits[0..vocab];
    var sorted: [vocab]u32 = undefined;
    for (&sorted, 0..) |*o, i| o.* = @intCast(i);
    std.sort.pdq(u32, &sorted, @as([]const f32, row0), struct {
        fn lt(l: []const f32, a: u32, b: u32) bool {
            return l[a] > l[b] or (l[a] == l[b] and a < b);
        }
    }.lt);
    for (0..5) |j| try testing.expectEqual(@as(i32, @intCast(sorted[j])), top[j]);
    try testing.expectApproxEqAbs(top_lp[0], lps[0], 1e-6); // greedy drew the top one
    // The state drew row 3's token: its count went up by one.
    try dcounts.read(&counts);
    var c: u16 = 0;
    for (history[prompt_len..]) |h| c += @intFromBool(h == tokens[3]);
    try testing.expectEqual(c + 1, counts[vocab + @as(usize, @intCast(tokens[3]))]);
    // Seeded rows: a token the CPU's cut keeps, and the same token when drawn again.
    for (4..8) |r| {
        const kept = try cpuKept(logits[r * vocab ..][0..vocab], params[r]);
        defer alloc.free(kept);
        try testing.expect(std.mem.indexOfScalar(u32, kept, @intCast(tokens[r])) != null);
    }
    const again = tokens;
    try ok(cu.ifn_cu_sample(&args, null));
    try dtok.read(&tokens);
    try testing.expectEqualSlices(i32, again[4..], tokens[4..]);
}

/// The tokens the CPU's sampler keeps for a random draw (its top-k, min-p and top-p cuts).
fn cpuKept(logits: []const f32, p: abi.SamplingParams) ![]u32 {
    const alloc = testing.allocator;
    const n = logits.len;
    const probs = try alloc.alloc(f32, n);
    defer alloc.free(probs);
    var mx: f32 = -std.math.inf(f32);
    for (logits) |v| mx = @max(mx, v);
    var total: f32 = 0;
    for (probs, logits) |*q, v| {
        q.* = @exp((v - mx) / p.temperature);
        total += q.*;
    }
    const order = try alloc.alloc(u32, n);
    for (order, 0..) |*o, i| o.* = @intCast(i);
    std.sort.pdq(u32, order, probs, struct {
        fn lt(q: []f32, a: u32, b: u32) bool {
            return q[a] > q[b] or (q[a] == q[b] and a < b);
        }
    }.lt);
    var keep: usize = n;
    if (p.top_k > 0) keep = @min(keep, @as(usize, @intCast(p.top_k)));
    if (p.min_p > 0) {
        var k: usize = 1;
        while (k < keep and probs[order[k]] >= p.min_p * probs[order[0]]) k += 1;
        keep = k;
    }
    if (p.top_p < 1) {
        var cum: f32 = 0;
        var k: usize = 0;
        while (k < keep) {
            cum += probs[order[k]];
            k += 1;
            if (cum >= p.top_p * total) break;
        }
        keep = k;
    }
    return alloc.realloc(order, keep);
}

test "cuda sample: seeded draws follow the distribution" {
    const alloc = testing.allocator;
    const vocab = 3;
    const draws = 1000;
    const logits = try alloc.alloc(f32, draws * vocab);
    defer alloc.free(logits);
    const params = try alloc.alloc(abi.SamplingParams, draws);
    defer alloc.free(params);
    for (0..draws) |i| {
        @memcpy(logits[i * vocab ..][0..vocab], &[_]f32{ 0, @log(@as(f32, 2)), @log(@as(f32, 5)) });
        params[i] = .{ .temperature = 1, .top_p = 1, .min_p = 0, .top_k = 0, .seed = 42, .draw_index = i };
    }
    const dlogits = try Device(f32).from(logits);
    defer dlogits.free();
    const dwork = try Device(f32).alloc(draws * vocab);
    defer dwork.free();
    const dparams = try Device(abi.SamplingParams).from(params);
    defer dparams.free();
    const dtok = try Device(i32).alloc(draws);
    defer dtok.free();
    const dlp = try Device(f32).alloc(draws);
    defer dlp.free();
    const args = cu.ifn_cu_sample_args{ .logits = dlogits.ptr, .work = dwork.ptr, .n = draws, .vocab = vocab, .final_softcap = 0, .mask_words = 1, .params = dparams.ptr, .bias_ids = null, .bias_values = null, .masks = null, .counts = null, .prompt_seen = null, .out_tokens = dtok.ptr, .out_logprobs = dlp.ptr, .out_top_ids = null, .out_top_logprobs = null };
    try ok(cu.ifn_cu_sample(&args, null));
    const tokens = try alloc.alloc(i32, draws);
    defer alloc.free(tokens);
    try dtok.read(tokens);
    var counts = [_]usize{ 0, 0, 0 };
    for (tokens) |t| counts[@intCast(t)] += 1;
    for (counts, [_]f64{ 1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0 }) |cnt, want| {
        try testing.expectApproxEqAbs(want, @as(f64, @floatFromInt(cnt)) / draws, 0.05);
    }
}
