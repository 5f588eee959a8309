//! Failure detail for the C ABI: a status code says what kind of failure, and
//! this thread-local message says which tensor, which value, which file.

const std = @import("std");
const Status = @import("abi.zig").Status;

threadlocal var message_buf: [1024]u8 = undefined;
threadlocal var message_len: usize = 0;

pub fn set(comptime fmt: []const u8, args: anytype) void {
    const written = std.fmt.bufPrint(message_buf[0 .. message_buf.len - 1], fmt, args) catch message_buf[0 .. message_buf.len - 1];
    message_len = written.len;
    message_buf[message_len] = 0;
}

/// Sets the message and returns `status`, for `return errors.fail(.shape, "...", .{...})`.
pub fn fail(status: Status, comptime fmt: []const u8, args: anytype) Status {
    set(fmt, args);
    return status;
}

pub fn message() [:0]const u8 {
    if (message_len == 0) return "";
    return message_buf[0..message_len :0];
}

pub fn clear() void {
    message_len = 0;
}
