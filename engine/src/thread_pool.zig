//! A fixed pool of compute threads for data-parallel loops.
//!
//! One dispatcher thread (the engine thread) calls `run`; it works alongside
//! the pool's workers and returns when every item is done. Workers spin briefly
//! between jobs (a step is many back-to-back jobs) and then sleep on a futex,
//! so an idle engine costs no CPU. A futex is woken only when someone sleeps on it:
//! a step is ~100 jobs, and a wake system call per job costs microseconds in a VM.
//! No thread is created after `init`. A job's items are handed out from one shared
//! cursor or as one contiguous share a thread (`Split`).

const std = @import("std");
const assert = std.debug.assert;
const Futex = std.Thread.Futex;
const AtomicU32 = std.atomic.Value(u32);

pub const threads_max = 256;
const spin_count_max = 20_000;

/// Calls `func(ctx, thread_index, begin, end)` over chunks of [0, n_items): multiples of
/// `grain` items, but the last.
pub const Job = struct {
    func: *const fn (ctx: *const anyopaque, thread_index: usize, begin: usize, end: usize) void,
    ctx: *const anyopaque,
    n_items: usize,
    grain: usize,
    /// How the items are handed out (see `Split`).
    split: Split = .guided,
};

pub const Split = enum {
    /// Every thread takes shrinking shares of what is left, from one shared cursor: threads
    /// end within a grain of each other, and each works on chunks spread over the range.
    guided,
    /// Thread i owns the i-th contiguous share of the range and walks it front to back; a
    /// thread out of work takes a grain at a time from the back of another's share. For
    /// a streamed read (a decode's weights): each thread reads one long run of memory,
    /// which the prefetchers keep up with better than chunks scattered over the matrix,
    /// and threads still end within a grain of each other.
    owned,
};

/// A thread's share in `.owned` mode: [front, back) packed into one word, the front in
/// the low half. The owner takes from the front, others from the back.
const Share = struct {
    bounds: std.atomic.Value(u64) align(std.atomic.cache_line) = std.atomic.Value(u64).init(0),

    fn pack(front: usize, back: usize) u64 {
        return @as(u64, @intCast(back)) << 32 | @as(u64, @intCast(front));
    }

    /// The next chunk from the front: half of what is left (whole grains, at least one), so
    /// that the owner reads its share in a few long runs while another thread can still
    /// take up to half of it when the owner falls behind (a thread descheduled for a
    /// moment: on a shared VM each compute thread is preempted ~50 times a second). Taking
    /// 7/8 at once left a late owner's work to itself: decode steps 1-5% slower (1B q4_0,
    /// 1B q4_k, 110m f16; two engines in one process, alternating steps, both orders).
    /// Quarters were as fast as halves.
    fn takeFront(share: *Share, grain: usize) ?[2]usize {
        var old = share.bounds.load(.monotonic);
        while (true) {
            const front: usize = @as(u32, @truncate(old));
            const back: usize = @intCast(old >> 32);
            if (front >= back) return null;
            const size = @max(grain, (back - front) / 2 / grain * grain);
            const end = @min(front + size, back);
            old = share.bounds.cmpxchgWeak(old, pack(end, back), .monotonic, .monotonic) orelse return .{ front, end };
        }
    }

    /// The last grain (a share's back may be the range's end, not a whole grain).
    fn takeBack(share: *Share, grain: usize) ?[2]usize {
        var old = share.bounds.load(.monotonic);
        while (true) {
            const front: usize = @as(u32, @truncate(old));
            const back: usize = @intCast(old >> 32);
            if (front >= back) return null;
            const begin = @max(front, (back - 1) / grain * grain);
            old = share.bounds.cmpxchgWeak(old, pack(front, begin), .monotonic, .monotonic) orelse return .{ begin, back };
        }
    }
};

pub const ThreadPool = struct {
    workers: []std.Thread,
    shares: []Share,
    generation: AtomicU32 = AtomicU32.init(0),
    workers_busy: AtomicU32 = AtomicU32.init(0),
    /// Workers asleep on `generation`, and whether the dispatcher sleeps on `workers_busy`.
    sleepers: AtomicU32 = AtomicU32.init(0),
    dispatcher_asleep: AtomicU32 = AtomicU32.init(0),
    next_item: std.atomic.Value(usize) = std.atomic.Value(usize).init(0),
    stop: std.atomic.Value(bool) = std.atomic.Value(bool).init(false),
    job: Job = undefined,

    /// Threads in all, the dispatcher included.
    pub fn numThreads(pool: *const ThreadPool) usize {
        return pool.workers.len + 1;
    }

    /// `pool` must not move after this: workers hold its address.
    pub fn init(pool: *ThreadPool, allocator: std.mem.Allocator, num_threads: usize) !void {
        assert(num_threads >= 1);
        assert(num_threads <= threads_max);
        const shares = try allocator.alloc(Share, num_threads);
        errdefer allocator.free(shares);
        for (shares) |*sh| sh.* = .{};
        pool.* = .{ .workers = try allocator.alloc(std.Thread, num_threads - 1), .shares = shares };
        var spawned: usize = 0;
        errdefer {
            pool.stopWorkers(spawned);
            allocator.free(pool.workers);
        }
        for (pool.workers, 1..) |*t, index| {
            t.* = try std.Thread.spawn(.{}, workerMain, .{ pool, index });
            spawned += 1;
        }
    }

    pub fn deinit(pool: *ThreadPool, allocator: std.mem.Allocator) void {
        pool.stopWorkers(pool.workers.len);
        allocator.free(pool.workers);
        allocator.free(pool.shares);
        pool.* = undefined;
    }

    fn stopWorkers(pool: *ThreadPool, count: usize) void {
        pool.stop.store(true, .release);
        _ = pool.generation.fetchAdd(1, .acq_rel);
        Futex.wake(&pool.generation, threads_max);
        for (pool.workers[0..count]) |t| t.join();
    }

    pub fn run(pool: *ThreadPool, job: Job) void {
        assert(job.grain > 0);
        if (job.n_items == 0) return;
        if (pool.workers.len == 0 or job.n_items <= job.grain) {
            job.func(job.ctx, 0, 0, job.n_items);
            return;
        }
        pool.job = job;
        pool.next_item.store(0, .monotonic);
        if (job.split == .owned) {
            assert(job.n_items < 1 << 32); // a share's bounds are two u32 in one word
            // Shares of whole grains; the last one ends at n_items.
            const grains = std.math.divCeil(usize, job.n_items, job.grain) catch unreachable;
            const n = pool.shares.len;
            for (pool.shares, 0..) |*sh, i| {
                const front = @min(job.n_items, grains * i / n * job.grain);
                const back = @min(job.n_items, grains * (i + 1) / n * job.grain);
                sh.bounds.store(Share.pack(front, back), .monotonic);
            }
        }
        pool.workers_busy.store(@intCast(pool.workers.len), .monotonic);
        // seq_cst on both sides (here and in workerMain): either the worker sees the new
        // generation before it sleeps, or this load sees it counted as a sleeper.
        _ = pool.generation.fetchAdd(1, .seq_cst);
        if (pool.sleepers.load(.seq_cst) > 0) Futex.wake(&pool.generation, threads_max);
        pool.work(0);
        var spins: u32 = 0;
        while (true) {
            const busy = pool.workers_busy.load(.acquire);
            if (busy == 0) break;
            if (spins < spin_count_max) {
                spins += 1;
                std.atomic.spinLoopHint();
            } else {
                pool.dispatcher_asleep.store(1, .seq_cst);
                Futex.wait(&pool.workers_busy, busy);
                pool.dispatcher_asleep.store(0, .seq_cst);
            }
        }
    }

    /// Guided chunks: a share of what is left (a multiple of the grain, at least one), so
    /// that threads start on large chunks and end within a grain of each other.
    fn work(pool: *ThreadPool, thread_index: usize) void {
        const job = pool.job;
        if (job.split == .owned) {
            const own = &pool.shares[thread_index];
            while (own.takeFront(job.grain)) |c| job.func(job.ctx, thread_index, c[0], c[1]);
            // Shares only shrink: one pass over the others' leaves nothing behind.
            for (1..pool.shares.len) |k| {
                const other = &pool.shares[(thread_index + k) % pool.shares.len];
                while (other.takeBack(job.grain)) |c| job.func(job.ctx, thread_index, c[0], c[1]);
            }
            return;
        }
        const share = 2 * pool.numThreads();
        var begin = pool.next_item.load(.monotonic);
        while (begin < job.n_items) {
            const size = @max(job.grain, (job.n_items - begin) / share / job.grain * job.grain);
            const end = @min(begin + size, job.n_items);
            if (pool.next_item.cmpxchgWeak(begin, end, .monotonic, .monotonic)) |seen| {
                begin = seen;
                continue;
            }
            job.func(job.ctx, thread_index, begin, end);
            begin = pool.next_item.load(.monotonic);
        }
    }

    fn workerMain(pool: *ThreadPool, thread_index: usize) void {
        var seen: u32 = 0;
        while (true) {
            var spins: u32 = 0;
            while (pool.generation.load(.acquire) == seen) {
                if (spins < spin_count_max) {
                    spins += 1;
                    std.atomic.spinLoopHint();
                } else {
                    _ = pool.sleepers.fetchAdd(1, .seq_cst);
                    // Futex.wait returns at once if the generation moved since `seen`.
                    if (pool.generation.load(.seq_cst) == seen) Futex.wait(&pool.generation, seen);
                    _ = pool.sleepers.fetchSub(1, .seq_cst);
                }
            }
            seen = pool.generation.load(.acquire);
            if (pool.stop.load(.acquire)) return;
            pool.work(thread_index);
            if (pool.workers_busy.fetchSub(1, .seq_cst) == 1 and pool.dispatcher_asleep.load(.seq_cst) != 0) Futex.wake(&pool.workers_busy, 1);
        }
    }
};

test "every item is visited exactly once, over many jobs" {
    var pool: ThreadPool = undefined;
    try pool.init(std.testing.allocator, 4);
    defer pool.deinit(std.testing.allocator);
    const Ctx = struct {
        hits: []std.atomic.Value(u32),
        fn visit(ctx_opaque: *const anyopaque, thread_index: usize, begin: usize, end: usize) void {
            const ctx: *const @This() = @ptrCast(@alignCast(ctx_opaque));
            assert(thread_index < 4);
            for (begin..end) |i| _ = ctx.hits[i].fetchAdd(1, .monotonic);
        }
    };
    var hits: [1000]std.atomic.Value(u32) = undefined;
    for (&hits) |*h| h.* = std.atomic.Value(u32).init(0);
    const ctx = Ctx{ .hits = &hits };
    for (0..200) |round| {
        pool.run(.{ .func = Ctx.visit, .ctx = &ctx, .n_items = 1000, .grain = 1 + round % 37 });
    }
    for (hits) |h| try std.testing.expectEqual(@as(u32, 200), h.load(.monotonic));
}

test "owned shares: every item exactly once, chunks on whole grains; the owner takes from the front, others from the back" {
    var pool: ThreadPool = undefined;
    try pool.init(std.testing.allocator, 3);
    defer pool.deinit(std.testing.allocator);
    const Ctx = struct {
        hits: []std.atomic.Value(u32),
        grain: usize,
        misaligned: *std.atomic.Value(u32),
        fn visit(ctx_opaque: *const anyopaque, thread_index: usize, begin: usize, end: usize) void {
            const ctx: *const @This() = @ptrCast(@alignCast(ctx_opaque));
            assert(thread_index < 3 and begin < end);
            if (begin % ctx.grain != 0 or (end % ctx.grain != 0 and end != ctx.hits.len)) _ = ctx.misaligned.fetchAdd(1, .monotonic);
            for (begin..end) |i| _ = ctx.hits[i].fetchAdd(1, .monotonic);
        }
    };
    var hits: [1000]std.atomic.Value(u32) = undefined;
    var misaligned = std.atomic.Value(u32).init(0);
    for (0..200) |round| {
        for (&hits) |*h| h.* = std.atomic.Value(u32).init(0);
        const n = 1 + round * 5; // 1..996 items, fewer than a grain per thread at first
        const grain = 1 + round % 37;
        const ctx = Ctx{ .hits = hits[0..n], .grain = grain, .misaligned = &misaligned };
        pool.run(.{ .func = Ctx.visit, .ctx = &ctx, .n_items = n, .grain = grain, .split = .owned });
        for (hits[0..n]) |h| try std.testing.expectEqual(@as(u32, 1), h.load(.monotonic));
    }
    try std.testing.expectEqual(@as(u32, 0), misaligned.load(.monotonic));

    // One thread alone (no workers) takes its share and then everyone else's from the back.
    var sh = [_]Share{ .{}, .{} };
    sh[0].bounds.store(Share.pack(0, 40), .monotonic);
    sh[1].bounds.store(Share.pack(40, 75), .monotonic);
    try std.testing.expectEqual([2]usize{ 0, 20 }, sh[0].takeFront(10).?);
    try std.testing.expectEqual([2]usize{ 20, 30 }, sh[0].takeFront(10).?);
    try std.testing.expectEqual([2]usize{ 30, 40 }, sh[0].takeFront(10).?);
    try std.testing.expectEqual(@as(?[2]usize, null), sh[0].takeFront(10));
    try std.testing.expectEqual([2]usize{ 70, 75 }, sh[1].takeBack(10).?);
    try std.testing.expectEqual([2]usize{ 60, 70 }, sh[1].takeBack(10).?);
    try std.testing.expectEqual([2]usize{ 40, 50 }, sh[1].takeFront(10).?);
    try std.testing.expectEqual([2]usize{ 50, 60 }, sh[1].takeBack(10).?);
    try std.testing.expectEqual(@as(?[2]usize, null), sh[1].takeBack(10));
    try std.testing.expectEqual(@as(?[2]usize, null), sh[1].takeFront(10));
}
