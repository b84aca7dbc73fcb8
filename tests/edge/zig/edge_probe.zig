//! A test filter: runs one edge-data call described by request headers, answers its result locally.
//!
//!   x-op: get | set | delete | incr | list | sql | none     x-ns / x-db, x-key, x-value, x-ttl, x-delta,
//!   x-prefix, x-limit, x-sql, x-p1..x-p4 (parameters: "i:42", "f:1.5", "t:text", "b:bytes", "n")
//!
//! 200 with the value (get), "deleted"/"absent", the total (incr), keys one per line (x-truncated), or rows
//! as tab-separated lines after a header line of column names (sql); 404 when get finds nothing; 500 with
//! x-edge-code and the reason as the body for an error result. Without x-op the request goes on.
const std = @import("std");
const proxy = @import("proxy_wasm.zig");

pub const panic = std.debug.FullPanic(proxy.panicHandler);

comptime {
    proxy.register(@This());
}

pub const Http = struct {};

pub fn configure(cfg: *proxy.Config, root: std.json.Value) proxy.ConfigError!void {
    _ = cfg;
    _ = root;
}

fn header(name: []const u8) []const u8 {
    return proxy.getHeader(.request_headers, name) orelse "";
}

fn number(comptime T: type, name: []const u8) T {
    return std.fmt.parseInt(T, header(name), 10) catch 0;
}

fn answer(code: u32, body: []const u8, extra: []const proxy.Header) void {
    proxy.sendLocalResponse(code, "edge_probe", body, extra);
}

fn failed(e: proxy.EdgeError) proxy.Action {
    const code = std.fmt.allocPrint(proxy.scratch, "{d}", .{@intFromEnum(e.code)}) catch "?";
    answer(500, e.reason, &.{.{ .name = "x-edge-code", .value = code }});
    return .pause;
}

fn param(text: []const u8) proxy.SqlValue {
    if (text.len < 2) return .null;
    const rest = text[2..];
    return switch (text[0]) {
        'i' => .{ .integer = std.fmt.parseInt(i64, rest, 10) catch 0 },
        'f' => .{ .real = std.fmt.parseFloat(f64, rest) catch 0 },
        't' => .{ .text = rest },
        'b' => .{ .blob = rest },
        else => .null,
    };
}

fn writeValue(out: *std.ArrayListUnmanaged(u8), v: proxy.SqlValue) !void {
    const w = out.writer(proxy.scratch);
    switch (v) {
        .null => try w.writeAll("NULL"),
        .integer => |i| try w.print("{d}", .{i}),
        .real => |f| try w.print("{d}", .{f}),
        .text => |t| try w.writeAll(t),
        .blob => |b| try w.print("x'{s}'", .{std.fmt.fmtSliceHexLower(b)}),
    }
}

pub fn onRequestHeaders(h: *Http, headers: u32, end_of_stream: bool) proxy.Action {
    _ = h;
    _ = headers;
    _ = end_of_stream;
    const op = header("x-op");
    const ns = header("x-ns");
    const key = header("x-key");
    if (std.mem.eql(u8, op, "none")) {
        answer(200, "", &.{}); // the same local answer without an edge call: a benchmark's baseline
    } else if (std.mem.eql(u8, op, "get")) {
        switch (proxy.kv.get(ns, key)) {
            .ok => |v| answer(200, v, &.{}),
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else if (std.mem.eql(u8, op, "set")) {
        switch (proxy.kv.set(ns, key, header("x-value"), number(u32, "x-ttl"))) {
            .ok => answer(200, "stored", &.{}),
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else if (std.mem.eql(u8, op, "delete")) {
        switch (proxy.kv.delete(ns, key)) {
            .ok => |existed| answer(200, if (existed) "deleted" else "absent", &.{}),
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else if (std.mem.eql(u8, op, "incr")) {
        switch (proxy.kv.incr(ns, key, number(i64, "x-delta"), number(u32, "x-ttl"))) {
            .ok => |total| answer(200, std.fmt.allocPrint(proxy.scratch, "{d}", .{total}) catch "", &.{}),
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else if (std.mem.eql(u8, op, "list")) {
        switch (proxy.kv.list(ns, header("x-prefix"), number(u32, "x-limit"))) {
            .ok => |l| {
                const body = std.mem.join(proxy.scratch, "\n", l.keys) catch "";
                answer(200, body, &.{.{ .name = "x-truncated", .value = if (l.truncated) "1" else "0" }});
            },
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else if (std.mem.eql(u8, op, "sql")) {
        var params: [4]proxy.SqlValue = undefined;
        var n: usize = 0;
        for ([_][]const u8{ "x-p1", "x-p2", "x-p3", "x-p4" }) |name| {
            const text = proxy.getHeader(.request_headers, name) orelse break;
            params[n] = param(text);
            n += 1;
        }
        switch (proxy.sql.query(header("x-db"), header("x-sql"), params[0..n])) {
            .ok => |rows| {
                var out: std.ArrayListUnmanaged(u8) = .{};
                const body = blk: {
                    out.appendSlice(proxy.scratch, std.mem.join(proxy.scratch, "\t", rows.columns) catch "") catch break :blk "";
                    for (0..rows.count) |i| {
                        out.append(proxy.scratch, '\n') catch break :blk "";
                        for (rows.row(i), 0..) |v, j| {
                            if (j > 0) out.append(proxy.scratch, '\t') catch break :blk "";
                            writeValue(&out, v) catch break :blk "";
                        }
                    }
                    break :blk out.items;
                };
                answer(200, body, &.{});
            },
            .not_found => answer(404, "", &.{}),
            .err => |e| return failed(e),
        }
    } else {
        return .@"continue";
    }
    return .pause;
}
