//! Per-sequence sampling state across steps, in max_num_seqs slots: the tokens so far (the
//! first prompt_len the prompt), which the penalties count. The caller opens a slot with
//! them; every step that samples a row naming the slot appends the token it drew. A slot
//! named by a step that is queued or running (`users`) can be neither opened nor closed.

const std = @import("std");
const assert = std.debug.assert;

pub const SeqState = struct {
    tokens: []i32, // (slots, capacity)
    len: []u32, // (slots); 0 and closed, or open
    prompt_len: []u32, // (slots)
    open: []bool, // (slots)
    users: []u8, // (slots) steps queued or running whose rows name the slot
    capacity: usize, // tokens a slot holds: a whole sequence

    pub fn init(allocator: std.mem.Allocator, slots: usize, capacity: usize) !SeqState {
        const tokens = try allocator.alloc(i32, slots * capacity);
        errdefer allocator.free(tokens);
        const counts = try allocator.alloc(u32, 2 * slots);
        errdefer allocator.free(counts);
        @memset(counts, 0);
        const open = try allocator.alloc(bool, slots);
        errdefer allocator.free(open);
        @memset(open, false);
        const users = try allocator.alloc(u8, slots);
        @memset(users, 0);
        return .{ .tokens = tokens, .len = counts[0..slots], .prompt_len = counts[slots..], .open = open, .users = users, .capacity = capacity };
    }

    pub fn deinit(s: *SeqState, allocator: std.mem.Allocator) void {
        allocator.free(s.tokens);
        allocator.free(s.len.ptr[0 .. 2 * s.len.len]);
        allocator.free(s.open);
        allocator.free(s.users);
        s.* = undefined;
    }

    pub fn numSlots(s: SeqState) usize {
        return s.open.len;
    }

    pub fn history(s: SeqState, slot: usize) []const i32 {
        return s.tokens[slot * s.capacity ..][0..s.len[slot]];
    }

    pub fn append(s: SeqState, slot: usize, token: i32) void {
        assert(s.open[slot]);
        if (s.len[slot] < s.capacity) {
            s.tokens[slot * s.capacity + s.len[slot]] = token;
            s.len[slot] += 1;
        }
    }

    pub fn set(s: SeqState, slot: usize, tokens: []const i32, prompt_len: u32) void {
        assert(tokens.len <= s.capacity);
        assert(prompt_len <= tokens.len);
        @memcpy(s.tokens[slot * s.capacity ..][0..tokens.len], tokens);
        s.len[slot] = @intCast(tokens.len);
        s.prompt_len[slot] = prompt_len;
        s.open[slot] = true;
    }

    pub fn close(s: SeqState, slot: usize) void {
        s.open[slot] = false;
        s.len[slot] = 0;
    }
};

test "a slot holds its history and appends draws up to its capacity" {
    var s = try SeqState.init(std.testing.allocator, 2, 4);
    defer s.deinit(std.testing.allocator);
    s.set(1, &.{ 5, 6 }, 1);
    s.append(1, 7);
    s.append(1, 8);
    s.append(1, 9); // over capacity: dropped
    try std.testing.expectEqualSlices(i32, &.{ 5, 6, 7, 8 }, s.history(1));
    try std.testing.expectEqual(@as(u32, 1), s.prompt_len[1]);
    s.close(1);
    try std.testing.expect(!s.open[1]);
    try std.testing.expectEqual(@as(usize, 0), s.history(1).len);
}
