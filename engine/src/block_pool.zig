//! The paged-KV block allocator: a fixed pool of blocks with reference counts.
//!
//! Free blocks sit in a doubly linked queue that allocation takes from the head, so
//! that a block can later be taken out of the middle when a prefix-cache lookup
//! revives it. A freed block that caches tokens goes to the tail (eviction is least
//! recently freed first); one that caches nothing goes to the head and is reused
//! first, before blocks never used: its pages are already in memory, while a
//! fresh block's first write faults its pages in (in a VM, milliseconds a MiB),
//! and the cached blocks behind it stay cached longer. Each block keeps the
//! chained hash of the tokens it holds (0 = none) for that lookup.
//! All memory is allocated in `init`; no verb allocates.

const std = @import("std");
const assert = std.debug.assert;

pub const BlockId = u32;
const none: u32 = std.math.maxInt(u32);

pub const Error = error{ PoolExhausted, InvalidBlock, DoubleFree };

pub const Block = struct {
    ref_count: u32 = 0,
    hash: u64 = 0,
    prev_free: u32 = none,
    next_free: u32 = none,
};

pub const BlockPool = struct {
    blocks: []Block,
    free_head: u32,
    free_tail: u32,
    num_free: u32,
    /// hash -> the block holding those tokens, for blocks in use and cached free ones.
    /// Sized for every block at init, so inserts never allocate.
    cached: std.AutoHashMapUnmanaged(u64, BlockId),

    pub fn init(allocator: std.mem.Allocator, num_blocks: u32) !BlockPool {
        assert(num_blocks > 0);
        assert(num_blocks < none);
        var cached: std.AutoHashMapUnmanaged(u64, BlockId) = .{};
        try cached.ensureTotalCapacity(allocator, num_blocks);
        errdefer cached.deinit(allocator);
        const blocks = try allocator.alloc(Block, num_blocks);
        for (blocks, 0..) |*block, i| {
            block.* = .{
                .prev_free = if (i == 0) none else @intCast(i - 1),
                .next_free = if (i + 1 == num_blocks) none else @intCast(i + 1),
            };
        }
        return .{ .blocks = blocks, .free_head = 0, .free_tail = num_blocks - 1, .num_free = num_blocks, .cached = cached };
    }

    pub fn deinit(pool: *BlockPool, allocator: std.mem.Allocator) void {
        pool.cached.deinit(allocator);
        allocator.free(pool.blocks);
        pool.* = undefined;
    }

    pub fn canAllocate(pool: *const BlockPool, n: u32) bool {
        return n <= pool.num_free;
    }

    /// Takes `out.len` blocks from the head of the free queue, each with ref count 1.
    pub fn allocate(pool: *BlockPool, out: []BlockId) Error!void {
        if (!pool.canAllocate(@intCast(out.len))) return error.PoolExhausted;
        for (out) |*id| {
            const block_id = pool.free_head;
            assert(block_id != none);
            pool.removeFree(block_id);
            const block = &pool.blocks[block_id];
            assert(block.ref_count == 0);
            // Reusing a cached block evicts its contents: the least recently freed goes first.
            if (block.hash != 0) {
                const entry = pool.cached.get(block.hash);
                if (entry != null and entry.? == block_id) assert(pool.cached.remove(block.hash));
            }
            block.ref_count = 1;
            block.hash = 0;
            id.* = block_id;
        }
    }

    /// Marks held, full blocks as holding the tokens that `hashes` stand for. A hash that
    /// another block already holds is left with that block (the same tokens twice).
    pub fn cacheInsert(pool: *BlockPool, ids: []const BlockId, hashes: []const u64) Error!void {
        assert(ids.len == hashes.len);
        for (ids, hashes) |id, hash| {
            if (id >= pool.blocks.len or pool.blocks[id].ref_count == 0 or hash == 0) return error.InvalidBlock;
        }
        for (ids, hashes) |id, hash| {
            const block = &pool.blocks[id];
            if (block.hash != 0) continue; // already cached, under its first hash
            const gop = pool.cached.getOrPutAssumeCapacity(hash);
            if (gop.found_existing) continue;
            gop.value_ptr.* = id;
            block.hash = hash;
        }
    }

    /// Takes a reference on the blocks that hold the leading `hashes`, stopping at the
    /// first miss; cached free blocks leave the free queue. Returns how many hit.
    pub fn cacheLookup(pool: *BlockPool, hashes: []const u64, out: []BlockId) usize {
        assert(out.len >= hashes.len);
        for (hashes, 0..) |hash, i| {
            const id = pool.cached.get(hash) orelse return i;
            const block = &pool.blocks[id];
            assert(block.hash == hash);
            if (block.ref_count == 0) pool.removeFree(id);
            block.ref_count += 1;
            out[i] = id;
        }
        return hashes.len;
    }

    pub fn numCached(pool: *const BlockPool) u32 {
        return pool.cached.count();
    }

    /// Adds a reference to blocks already held (a shared prefix, a forked sequence).
    pub fn ref(pool: *BlockPool, ids: []const BlockId) Error!void {
        for (ids) |id| {
            if (id >= pool.blocks.len) return error.InvalidBlock;
            if (pool.blocks[id].ref_count == 0) return error.InvalidBlock;
        }
        for (ids) |id| pool.blocks[id].ref_count += 1;
    }

    /// Drops one reference from each block; a block whose count reaches zero goes to the
    /// tail of the free queue if it caches tokens, else to the head. Validates every id
    /// first, so a bad call changes nothing.
    pub fn free(pool: *BlockPool, ids: []const BlockId) Error!void {
        for (ids, 0..) |id, i| {
            if (id >= pool.blocks.len) return error.InvalidBlock;
            // The same id twice in one call counts as two references.
            var times: u32 = 0;
            for (ids[0 .. i + 1]) |other| times += @intFromBool(other == id);
            if (pool.blocks[id].ref_count < times) return error.DoubleFree;
        }
        for (ids) |id| {
            const block = &pool.blocks[id];
            block.ref_count -= 1;
            if (block.ref_count == 0) {
                if (block.hash != 0) pool.pushFreeTail(id) else pool.pushFreeHead(id);
            }
        }
    }

    pub fn refCount(pool: *const BlockPool, id: BlockId) u32 {
        if (id >= pool.blocks.len) return 0;
        return pool.blocks[id].ref_count;
    }

    fn removeFree(pool: *BlockPool, id: BlockId) void {
        const block = &pool.blocks[id];
        if (block.prev_free == none) {
            assert(pool.free_head == id);
            pool.free_head = block.next_free;
        } else pool.blocks[block.prev_free].next_free = block.next_free;
        if (block.next_free == none) {
            assert(pool.free_tail == id);
            pool.free_tail = block.prev_free;
        } else pool.blocks[block.next_free].prev_free = block.prev_free;
        block.prev_free = none;
        block.next_free = none;
        pool.num_free -= 1;
    }

    fn pushFreeHead(pool: *BlockPool, id: BlockId) void {
        const block = &pool.blocks[id];
        assert(block.prev_free == none);
        assert(block.next_free == none);
        block.next_free = pool.free_head;
        if (pool.free_head == none) pool.free_tail = id else pool.blocks[pool.free_head].prev_free = id;
        pool.free_head = id;
        pool.num_free += 1;
    }

    fn pushFreeTail(pool: *BlockPool, id: BlockId) void {
        const block = &pool.blocks[id];
        assert(block.prev_free == none);
        assert(block.next_free == none);
        block.prev_free = pool.free_tail;
        if (pool.free_tail == none) pool.free_head = id else pool.blocks[pool.free_tail].next_free = id;
        pool.free_tail = id;
        pool.num_free += 1;
    }
};

const testing = std.testing;

test "allocate until exhausted, then all-or-nothing refusal" {
    var pool = try BlockPool.init(testing.allocator, 4);
    defer pool.deinit(testing.allocator);
    var ids: [3]BlockId = undefined;
    try pool.allocate(&ids);
    try testing.expectEqual(@as(u32, 1), pool.num_free);
    var two: [2]BlockId = undefined;
    try testing.expectError(error.PoolExhausted, pool.allocate(&two));
    try testing.expectEqual(@as(u32, 1), pool.num_free);
    var one: [1]BlockId = undefined;
    try pool.allocate(&one);
    try testing.expectEqual(@as(u32, 0), pool.num_free);
    // Every id handed out is distinct.
    const all = [_]BlockId{ ids[0], ids[1], ids[2], one[0] };
    for (all, 0..) |a, i| for (all[i + 1 ..]) |b| try testing.expect(a != b);
}

test "double free is refused and changes nothing" {
    var pool = try BlockPool.init(testing.allocator, 2);
    defer pool.deinit(testing.allocator);
    var ids: [1]BlockId = undefined;
    try pool.allocate(&ids);
    try pool.free(&ids);
    try testing.expectError(error.DoubleFree, pool.free(&ids));
    try testing.expectEqual(@as(u32, 2), pool.num_free);
    // The same block twice in one call with a single reference is a double free too.
    try pool.allocate(&ids);
    try testing.expectError(error.DoubleFree, pool.free(&[_]BlockId{ ids[0], ids[0] }));
    try testing.expectEqual(@as(u32, 1), pool.refCount(ids[0]));
    try testing.expectError(error.InvalidBlock, pool.free(&[_]BlockId{7}));
}

test "ref counts keep a shared block out of the free queue" {
    var pool = try BlockPool.init(testing.allocator, 3);
    defer pool.deinit(testing.allocator);
    var ids: [1]BlockId = undefined;
    try pool.allocate(&ids);
    try pool.ref(&ids);
    try testing.expectEqual(@as(u32, 2), pool.refCount(ids[0]));
    try pool.free(&ids);
    try testing.expectEqual(@as(u32, 2), pool.num_free);
    try pool.free(&ids);
    try testing.expectEqual(@as(u32, 3), pool.num_free);
    try testing.expectError(error.InvalidBlock, pool.ref(&ids));
}

test "freed blocks that cache nothing are reused first, most recently freed first, before fresh ones" {
    var pool = try BlockPool.init(testing.allocator, 4);
    defer pool.deinit(testing.allocator);
    var ids: [3]BlockId = undefined;
    try pool.allocate(&ids);
    try pool.free(&[_]BlockId{ids[2]});
    try pool.free(&[_]BlockId{ids[0]});
    var again: [3]BlockId = undefined;
    try pool.allocate(&again);
    try testing.expectEqual(ids[0], again[0]);
    try testing.expectEqual(ids[2], again[1]);
    // Then the block never used.
    for (ids) |id| try testing.expect(again[2] != id);
}

test "a block that caches tokens is evicted only after the free ones that cache nothing" {
    var pool = try BlockPool.init(testing.allocator, 3);
    defer pool.deinit(testing.allocator);
    var ids: [3]BlockId = undefined;
    try pool.allocate(&ids);
    try pool.cacheInsert(ids[0..1], &.{111});
    try pool.free(&ids); // ids[0] to the tail (cached), ids[1] and ids[2] to the head
    var two: [2]BlockId = undefined;
    try pool.allocate(&two);
    try testing.expectEqual(ids[2], two[0]);
    try testing.expectEqual(ids[1], two[1]);
    var hit: [1]BlockId = undefined;
    try testing.expectEqual(@as(usize, 1), pool.cacheLookup(&.{111}, &hit));
    try testing.expectEqual(ids[0], hit[0]);
}

test "a freed block stays cached until its slot is reused, least recently freed first" {
    var pool = try BlockPool.init(testing.allocator, 3);
    defer pool.deinit(testing.allocator);
    var ids: [2]BlockId = undefined;
    try pool.allocate(&ids);
    try pool.cacheInsert(&ids, &.{ 111, 222 });
    try pool.free(&ids);
    try testing.expectEqual(@as(u32, 3), pool.num_free);
    try testing.expectEqual(@as(u32, 2), pool.cached.count());

    // A hit revives the cached block: out of the free queue, one reference.
    var hit: [2]BlockId = undefined;
    try testing.expectEqual(@as(usize, 2), pool.cacheLookup(&.{ 111, 222 }, &hit));
    try testing.expectEqualSlices(BlockId, &ids, &hit);
    try testing.expectEqual(@as(u32, 1), pool.num_free);
    try testing.expectEqual(@as(u32, 1), pool.refCount(ids[0]));
    // A second holder of the same prefix shares it.
    var again: [1]BlockId = undefined;
    try testing.expectEqual(@as(usize, 1), pool.cacheLookup(&.{111}, &again));
    try testing.expectEqual(@as(u32, 2), pool.refCount(ids[0]));
    try pool.free(&.{ ids[0], ids[0], ids[1] });

    // The lookup stops at the first miss.
    try testing.expectEqual(@as(usize, 0), pool.cacheLookup(&.{ 999, 111 }, &hit));

    // Allocating all three reuses the never-cached block first, then evicts in LRU order.
    var all: [3]BlockId = undefined;
    try pool.allocate(&all);
    try testing.expectEqual(@as(u32, 0), pool.cached.count());
    try pool.free(&all);
    try testing.expectEqual(@as(usize, 0), pool.cacheLookup(&.{111}, &hit));
}

test "cacheInsert refuses free blocks and the zero hash" {
    var pool = try BlockPool.init(testing.allocator, 2);
    defer pool.deinit(testing.allocator);
    try testing.expectError(error.InvalidBlock, pool.cacheInsert(&.{0}, &.{5}));
    var ids: [1]BlockId = undefined;
    try pool.allocate(&ids);
    try testing.expectError(error.InvalidBlock, pool.cacheInsert(&ids, &.{0}));
}
