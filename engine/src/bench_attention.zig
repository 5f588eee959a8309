//! Decode attention at depth, alone: one token's attention over every layer's K/V, as a decode
//! step at that depth runs it (each KV head's group of query heads a work item, items shared by
//! the threads), for f32 and f16 caches in turn, against a plain read of the same bytes.
//! `zig build bench-attention [-- threads depth [scattered|ordered|cached]]` (ReleaseFast; default
//! 2 threads, depth 4096, the sequence's blocks scattered over the pool; `ordered`: in order, as
//! a fresh pool hands out a prompt's; `cached`: every position in one block, the arithmetic
//! alone). The 1B GQA shape: 22 layers, 4 KV heads of 8 query heads, head_dim 64. Medians.

const std = @import("std");
const kernels = @import("kernels.zig");
const ThreadPool = @import("thread_pool.zig").ThreadPool;
const weights = @import("weights.zig");

const layers = 22;
const kv_heads = 4;
const group = 8;
const head_dim = 64;
const block_size = 16;
const reps = 15;

fn Case(comptime KV: type) type {
    return struct {
        const Self = @This();
        k: []KV,
        v: []KV,
        q: []const f32,
        out: []f32,
        scores: []f32, // (threads, group * (depth + 16))
        table: []const i32,
        depth: usize,
        layout: kernels.KvLayout,
        layer_len: usize,
        times: [reps]f64 = undefined,
        reads: [reps]f64 = undefined,

        fn init(allocator: std.mem.Allocator, rng: std.Random, threads: usize, depth: usize, q: []const f32, table: []const i32) !Self {
            const layout = kernels.KvLayout{ .block_size = block_size, .head_dim = head_dim, .num_kv_heads = kv_heads, .num_blocks = table.len };
            const layer_len = layout.layerLen();
            // As the engine's pool: huge pages where the kernel gives them.
            const k = std.mem.bytesAsSlice(KV, try weights.allocHugePages(layers * layer_len * @sizeOf(KV)));
            const v = std.mem.bytesAsSlice(KV, try weights.allocHugePages(layers * layer_len * @sizeOf(KV)));
            for (k, v) |*a, *b| {
                a.* = @floatCast(rng.float(f32) * 4 - 2);
                b.* = @floatCast(rng.float(f32) * 4 - 2);
            }
            return .{
                .k = k,
                .v = v,
                .q = q,
                .out = try allocator.alloc(f32, q.len),
                .scores = try allocator.alloc(f32, threads * group * (depth + kernels.vec_len)),
                .table = table,
                .depth = depth,
                .layout = layout,
                .layer_len = layer_len,
            };
        }

        fn run(ctx: *const anyopaque, thread: usize, begin: usize, end: usize) void {
            const w: *const Self = @ptrCast(@alignCast(ctx));
            const per = group * (w.depth + kernels.vec_len);
            for (begin..end) |item| {
                const l = item / kv_heads;
                const h = item % kv_heads;
                const q = w.q[item * group * head_dim ..][0 .. group * head_dim];
                const out = w.out[item * group * head_dim ..][0 .. group * head_dim];
                const k = w.k[l * w.layer_len ..][0..w.layer_len];
                const v = w.v[l * w.layer_len ..][0..w.layer_len];
                const scores = w.scores[thread * per ..][0..per];
                kernels.attendGroup(KV, out, q, group, k, v, w.layout, h, w.table, w.depth, scores, kernels.ScoreShape.plain(head_dim));
            }
        }

        fn time(c: *Self, pool: *ThreadPool, r: usize) !u64 {
            var timer = try std.time.Timer.start();
            pool.run(.{ .func = run, .ctx = c, .n_items = layers * kv_heads, .grain = 1 });
            c.times[r] = @as(f64, @floatFromInt(timer.read())) / 1e6;
            timer.reset();
            const sink = readSum(std.mem.sliceAsBytes(c.k)) +% readSum(std.mem.sliceAsBytes(c.v));
            c.reads[r] = @as(f64, @floatFromInt(timer.read())) / 1e6;
            return sink +% @as(u32, @bitCast(c.out[0]));
        }

        fn report(c: *Self, threads: usize) !void {
            std.mem.sort(f64, &c.times, {}, std.sort.asc(f64));
            std.mem.sort(f64, &c.reads, {}, std.sort.asc(f64));
            const bytes: f64 = @floatFromInt(2 * c.k.len * @sizeOf(KV));
            const t = c.times[reps / 2];
            const rd = c.reads[reps / 2];
            try std.io.getStdOut().writer().print("depth {d}, {s} K/V, {d} thread(s): {d:.2} ms a token ({d:.1} GB/s of K/V); " ++
                "one thread reading the same K/V {d:.2} ms ({d:.1} GB/s)\n", .{
                c.depth, @typeName(KV), threads, t, bytes / t / 1e6, rd, bytes / rd / 1e6,
            });
        }
    };
}

/// A plain read of the bytes (summed as words so that the loads cannot be dropped).
fn readSum(buf: []const u8) u64 {
    const W = @Vector(8, u64);
    var acc: [4]W = .{@as(W, @splat(0))} ** 4;
    const words = std.mem.bytesAsSlice(u64, buf[0 .. buf.len / 256 * 256]);
    var i: usize = 0;
    while (i + 32 <= words.len) : (i += 32) {
        inline for (0..4) |c| acc[c] +%= @as(W, words[i + 8 * c ..][0..8].*);
    }
    return @reduce(.Add, acc[0] +% acc[1] +% acc[2] +% acc[3]);
}

pub fn main() !void {
    const allocator = std.heap.page_allocator;
    var args = try std.process.argsWithAllocator(allocator);
    _ = args.next();
    const threads = if (args.next()) |a| try std.fmt.parseInt(usize, a, 10) else 2;
    const depth = if (args.next()) |a| try std.fmt.parseInt(usize, a, 10) else 4096;
    var prng = std.Random.DefaultPrng.init(1);
    const rng = prng.random();
    const table = try allocator.alloc(i32, (depth + block_size - 1) / block_size);
    for (table, 0..) |*t, i| t.* = @intCast(i);
    const order = args.next() orelse "scattered";
    if (std.mem.eql(u8, order, "scattered")) {
        rng.shuffle(i32, table);
    } else if (std.mem.eql(u8, order, "cached")) {
        @memset(table, 0);
    } else if (!std.mem.eql(u8, order, "ordered")) return error.UnknownBlockOrder;
    const q = try allocator.alloc(f32, layers * kv_heads * group * head_dim);
    for (q) |*x| x.* = rng.floatNorm(f32);
    var pool: ThreadPool = undefined;
    try pool.init(allocator, threads);
    defer pool.deinit(allocator);
    var f32_case = try Case(f32).init(allocator, rng, threads, depth, q, table);
    var f16_case = try Case(f16).init(allocator, rng, threads, depth, q, table);
    var sink: u64 = 0;
    for (0..reps) |r| { // in turn, so that the machine's noise falls on both alike
        sink +%= try f32_case.time(&pool, r);
        sink +%= try f16_case.time(&pool, r);
    }
    std.mem.doNotOptimizeAway(sink);
    try f32_case.report(threads);
    try f16_case.report(threads);
}
