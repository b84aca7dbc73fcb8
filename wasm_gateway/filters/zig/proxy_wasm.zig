//! wasm-gateway's own Proxy-Wasm ABI 0.2.1 binding, shared by the bundled filters.
//!
//! A filter is a Zig file that declares its configuration handling and its per-request state, then calls
//! `register(@This())` from a `comptime` block:
//!
//!     pub fn configure(cfg: *proxy.Config, root: std.json.Value) proxy.ConfigError!void  // required
//!     pub const Http = struct { ... };            // per-request state, with default field values
//!     pub fn onRequestHeaders(h: *Http, headers: u32, end_of_stream: bool) proxy.Action
//!     pub fn onRequestBody(h: *Http, size: u32, end_of_stream: bool) proxy.Action
//!     pub fn onResponseHeaders(h: *Http, headers: u32, end_of_stream: bool) proxy.Action
//!     pub fn onResponseBody(h: *Http, size: u32, end_of_stream: bool) proxy.Action
//!     pub fn onHttpCallResponse(token: u32, headers: u32, body_size: u32, trailers: u32) void  // root
//!     pub fn onTick() void                                                                      // root
//!
//! `context_id` holds the id of the context the current callback runs for (the root context's in root
//! callbacks): a request paused for an `httpCall` is resumed from `onHttpCallResponse` with
//! `setEffectiveContext(id)` then `continueStream` or `sendLocalResponse`.
//!
//! Only the callbacks a filter declares are exported (each exported callback costs the host a call per
//! request). Per-request state is created on the first callback of a context and freed by
//! `proxy_on_delete`, so `proxy_on_context_create` is not exported at all.
//!
//! Memory: `scratch` is an arena reset when any callback starts. Everything the host hands over
//! (header maps, bodies, properties, shared data) lands there, so a filter never frees anything, and must
//! not keep scratch memory beyond the callback it was allocated in (copy what must outlive it into `Http`,
//! which is plain fixed-size data). `cfg.alloc` (in `configure`) owns the configuration: an arena freed
//! wholesale when a later configuration is accepted, or at once when `configure` fails. `persistent` is a general-purpose allocator for state
//! that outlives requests (caches).
const std = @import("std");
const Allocator = std.mem.Allocator;

// ------------------------------------------------------------------------------------------------ constants

pub const Status = enum(u32) {
    ok = 0,
    not_found = 1,
    bad_argument = 2,
    serialization_failure = 3,
    parse_failure = 4,
    invalid_memory_access = 6,
    empty = 7,
    cas_mismatch = 8,
    internal_failure = 10,
    unimplemented = 12,
    _,
};

pub const Action = enum(u32) { @"continue" = 0, pause = 1 };

pub const MapType = enum(u32) {
    request_headers = 0,
    request_trailers = 1,
    response_headers = 2,
    response_trailers = 3,
    http_call_response_headers = 6,
    http_call_response_trailers = 7,
};

pub const BufferType = enum(u32) {
    request_body = 0,
    response_body = 1,
    http_call_response_body = 4,
    vm_configuration = 6,
    plugin_configuration = 7,
};

pub const StreamType = enum(u32) { request = 0, response = 1 };

pub const LogLevel = enum(u32) { trace = 0, debug = 1, info = 2, warn = 3, err = 4, critical = 5 };

// ------------------------------------------------------------------------------------------------ host imports

const host = struct {
    extern "env" fn proxy_log(level: u32, ptr: [*]const u8, len: usize) u32;
    extern "env" fn proxy_get_log_level(level: *u32) u32;
    extern "env" fn proxy_get_current_time_nanoseconds(ns: *u64) u32;
    extern "env" fn proxy_get_buffer_bytes(t: u32, start: usize, max: usize, ptr: *?[*]u8, len: *usize) u32;
    extern "env" fn proxy_set_buffer_bytes(t: u32, start: usize, size: usize, ptr: [*]const u8, len: usize) u32;
    extern "env" fn proxy_get_buffer_status(t: u32, len: *usize, flags: *u32) u32;
    extern "env" fn proxy_get_header_map_pairs(t: u32, ptr: *?[*]u8, len: *usize) u32;
    extern "env" fn proxy_set_header_map_pairs(t: u32, ptr: [*]const u8, len: usize) u32;
    extern "env" fn proxy_get_header_map_value(t: u32, kp: [*]const u8, kl: usize, vp: *?[*]u8, vl: *usize) u32;
    extern "env" fn proxy_add_header_map_value(t: u32, kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize) u32;
    extern "env" fn proxy_replace_header_map_value(t: u32, kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize) u32;
    extern "env" fn proxy_remove_header_map_value(t: u32, kp: [*]const u8, kl: usize) u32;
    extern "env" fn proxy_get_property(pp: [*]const u8, pl: usize, vp: *?[*]u8, vl: *usize) u32;
    extern "env" fn proxy_set_property(pp: [*]const u8, pl: usize, vp: [*]const u8, vl: usize) u32;
    extern "env" fn proxy_send_local_response(
        status: u32,
        dp: [*]const u8,
        dl: usize,
        bp: [*]const u8,
        bl: usize,
        hp: [*]const u8,
        hl: usize,
        grpc_status: i32,
    ) u32;
    extern "env" fn proxy_continue_stream(t: u32) u32;
    extern "env" fn proxy_get_shared_data(kp: [*]const u8, kl: usize, vp: *?[*]u8, vl: *usize, cas: *u32) u32;
    extern "env" fn proxy_set_shared_data(kp: [*]const u8, kl: usize, vp: [*]const u8, vl: usize, cas: u32) u32;
    extern "env" fn proxy_http_call(
        up: [*]const u8,
        ul: usize,
        hp: [*]const u8,
        hl: usize,
        bp: [*]const u8,
        bl: usize,
        tp: [*]const u8,
        tl: usize,
        timeout_ms: u32,
        token: *u32,
    ) u32;
    extern "env" fn proxy_set_effective_context(ctx: u32) u32;
    extern "env" fn proxy_set_tick_period_milliseconds(ms: u32) u32;
    extern "env" fn proxy_call_foreign_function(np: [*]const u8, nl: usize, ap: [*]const u8, al: usize, rp: *?[*]u8, rl: *usize) u32;
};

/// A pointer the host accepts for a zero-length argument (an empty slice's pointer may be anywhere).
var empty_byte: u8 = 0;

fn ptrOf(s: []const u8) [*]const u8 {
    return if (s.len == 0) @ptrCast(&empty_byte) else s.ptr;
}

fn status(raw: u32) Status {
    return @enumFromInt(raw);
}

fn received(ptr: ?[*]u8, len: usize) []const u8 {
    if (len == 0) return "";
    return (ptr orelse return "")[0..len];
}

// ------------------------------------------------------------------------------------------------ memory

var scratch_arena = std.heap.ArenaAllocator.init(std.heap.wasm_allocator);
/// Callback-scoped memory (see the file comment).
pub const scratch: Allocator = scratch_arena.allocator();
/// General-purpose memory that lives until freed.
pub const persistent: Allocator = std.heap.wasm_allocator;

var config_arena: ?*std.heap.ArenaAllocator = null;

/// Starts a callback: frees the previous callback's scratch memory. The exports `register` makes call it;
/// a filter exporting an entry point of its own calls it first thing.
pub fn beginCallback() void {
    resetScratch();
}

fn resetScratch() void {
    // Keep a warm buffer so steady-state requests allocate nothing from the page allocator.
    _ = scratch_arena.reset(.{ .retain_with_limit = 256 * 1024 });
}

fn onMemoryAllocate(size: usize) callconv(.c) ?[*]u8 {
    const mem = scratch.alignedAlloc(u8, 8, @max(size, 1)) catch return null;
    return mem.ptr;
}

// ------------------------------------------------------------------------------------------------ logging

var log_level: u32 = @intFromEnum(LogLevel.info);

pub fn logEnabled(level: LogLevel) bool {
    return @intFromEnum(level) >= log_level;
}

pub fn logRaw(level: LogLevel, message: []const u8) void {
    _ = host.proxy_log(@intFromEnum(level), ptrOf(message), message.len);
}

/// Formats into scratch memory and logs (nothing is formatted below the host's log level).
pub fn log(level: LogLevel, comptime fmt: []const u8, args: anytype) void {
    if (!logEnabled(level)) return;
    logRaw(level, std.fmt.allocPrint(scratch, fmt, args) catch "(log message dropped: out of memory)");
}

pub fn panicHandler(msg: []const u8, first_trace_addr: ?usize) noreturn {
    _ = first_trace_addr;
    logRaw(.critical, msg);
    @trap();
}

// ------------------------------------------------------------------------------------------------ time

pub fn nowNanos() u64 {
    var ns: u64 = 0;
    _ = host.proxy_get_current_time_nanoseconds(&ns);
    return ns;
}

// ------------------------------------------------------------------------------------------------ buffers

pub const HostError = error{ HostCallFailed, OutOfMemory };

pub fn getBuffer(t: BufferType, start: usize, max: usize) HostError![]const u8 {
    var ptr: ?[*]u8 = null;
    var len: usize = 0;
    return switch (status(host.proxy_get_buffer_bytes(@intFromEnum(t), start, max, &ptr, &len))) {
        .ok => received(ptr, len),
        .not_found => "",
        else => error.HostCallFailed,
    };
}

/// Replaces the whole buffer (Envoy's rule: start 0 and size >= current length replaces).
pub fn replaceBuffer(t: BufferType, data: []const u8) HostError!void {
    const s = status(host.proxy_set_buffer_bytes(@intFromEnum(t), 0, std.math.maxInt(u32), ptrOf(data), data.len));
    if (s != .ok) return error.HostCallFailed;
}

// ------------------------------------------------------------------------------------------------ header maps

pub const Header = struct { name: []const u8, value: []const u8 };

/// Decodes the pairs wire format: u32 count, count x (u32 name_len, u32 value_len), then each name and
/// value followed by a NUL byte. Slices point into `data`.
pub fn decodePairs(alloc: Allocator, data: []const u8) HostError![]Header {
    if (data.len < 4) return &.{};
    const n = std.mem.readInt(u32, data[0..4], .little);
    if (n > (data.len - 4) / 8) return error.HostCallFailed;
    const out = try alloc.alloc(Header, n);
    var sizes: usize = 4;
    var pos: usize = 4 + @as(usize, n) * 8;
    for (out) |*h| {
        const kl = std.mem.readInt(u32, data[sizes..][0..4], .little);
        const vl = std.mem.readInt(u32, data[sizes + 4 ..][0..4], .little);
        sizes += 8;
        if (pos + kl + 1 + vl + 1 > data.len) return error.HostCallFailed;
        h.name = data[pos .. pos + kl];
        pos += kl + 1;
        h.value = data[pos .. pos + vl];
        pos += vl + 1;
    }
    return out;
}

pub fn encodePairs(alloc: Allocator, headers: []const Header) HostError![]u8 {
    var size: usize = 4 + headers.len * 8;
    for (headers) |h| size += h.name.len + h.value.len + 2;
    const out = try alloc.alloc(u8, size);
    std.mem.writeInt(u32, out[0..4], @intCast(headers.len), .little);
    var pos: usize = 4 + headers.len * 8;
    for (headers, 0..) |h, i| {
        std.mem.writeInt(u32, out[4 + i * 8 ..][0..4], @intCast(h.name.len), .little);
        std.mem.writeInt(u32, out[8 + i * 8 ..][0..4], @intCast(h.value.len), .little);
        @memcpy(out[pos .. pos + h.name.len], h.name);
        pos += h.name.len;
        out[pos] = 0;
        pos += 1;
        @memcpy(out[pos .. pos + h.value.len], h.value);
        pos += h.value.len;
        out[pos] = 0;
        pos += 1;
    }
    return out;
}

/// A header map edited locally and written back with one host call (cheaper than one call per edit).
/// Names are compared case-insensitively; the host lower-cases names it stores.
pub const HeaderList = struct {
    items: std.ArrayListUnmanaged(Header) = .{},
    changed: bool = false,

    pub fn fetch(map: MapType) HostError!HeaderList {
        var ptr: ?[*]u8 = null;
        var len: usize = 0;
        const s = status(host.proxy_get_header_map_pairs(@intFromEnum(map), &ptr, &len));
        if (s == .not_found) return .{};
        if (s != .ok) return error.HostCallFailed;
        const headers = try decodePairs(scratch, received(ptr, len));
        return .{ .items = .{ .items = headers, .capacity = headers.len } };
    }

    /// Writes the map back if it was changed.
    pub fn store(self: *HeaderList, map: MapType) HostError!void {
        if (!self.changed) return;
        const data = try encodePairs(scratch, self.items.items);
        if (status(host.proxy_set_header_map_pairs(@intFromEnum(map), ptrOf(data), data.len)) != .ok)
            return error.HostCallFailed;
        self.changed = false;
    }

    pub fn get(self: *const HeaderList, name: []const u8) ?[]const u8 {
        for (self.items.items) |h| {
            if (std.ascii.eqlIgnoreCase(h.name, name)) return h.value;
        }
        return null;
    }

    pub fn count(self: *const HeaderList, name: []const u8) usize {
        var n: usize = 0;
        for (self.items.items) |h| {
            if (std.ascii.eqlIgnoreCase(h.name, name)) n += 1;
        }
        return n;
    }

    pub fn add(self: *HeaderList, name: []const u8, value: []const u8) HostError!void {
        try self.items.append(scratch, .{ .name = name, .value = value });
        self.changed = true;
    }

    /// Removes every header called `name`; returns how many were removed.
    pub fn remove(self: *HeaderList, name: []const u8) usize {
        var kept: usize = 0;
        const all = self.items.items;
        for (all) |h| {
            if (!std.ascii.eqlIgnoreCase(h.name, name)) {
                all[kept] = h;
                kept += 1;
            }
        }
        const removed = all.len - kept;
        self.items.items.len = kept;
        if (removed > 0) self.changed = true;
        return removed;
    }

    /// Replaces the first `name` in place (dropping the others), or appends it.
    pub fn set(self: *HeaderList, name: []const u8, value: []const u8) HostError!void {
        for (self.items.items, 0..) |*h, i| {
            if (std.ascii.eqlIgnoreCase(h.name, name)) {
                h.value = value;
                self.changed = true;
                var kept: usize = i + 1;
                const all = self.items.items;
                for (all[i + 1 ..]) |other| {
                    if (!std.ascii.eqlIgnoreCase(other.name, name)) {
                        all[kept] = other;
                        kept += 1;
                    }
                }
                self.items.items.len = kept;
                return;
            }
        }
        try self.add(name, value);
    }

    /// Renames every `from` header to `to`, keeping values and positions. Returns how many were renamed.
    pub fn rename(self: *HeaderList, from: []const u8, to: []const u8) usize {
        var n: usize = 0;
        for (self.items.items) |*h| {
            if (std.ascii.eqlIgnoreCase(h.name, from)) {
                h.name = to;
                n += 1;
            }
        }
        if (n > 0) self.changed = true;
        return n;
    }
};

pub fn getHeader(map: MapType, name: []const u8) ?[]const u8 {
    var ptr: ?[*]u8 = null;
    var len: usize = 0;
    const s = status(host.proxy_get_header_map_value(@intFromEnum(map), ptrOf(name), name.len, &ptr, &len));
    return if (s == .ok) received(ptr, len) else null;
}

pub fn addHeader(map: MapType, name: []const u8, value: []const u8) void {
    _ = host.proxy_add_header_map_value(@intFromEnum(map), ptrOf(name), name.len, ptrOf(value), value.len);
}

pub fn replaceHeader(map: MapType, name: []const u8, value: []const u8) void {
    _ = host.proxy_replace_header_map_value(@intFromEnum(map), ptrOf(name), name.len, ptrOf(value), value.len);
}

pub fn removeHeader(map: MapType, name: []const u8) void {
    _ = host.proxy_remove_header_map_value(@intFromEnum(map), ptrOf(name), name.len);
}

// ------------------------------------------------------------------------------------------------ properties

/// `path` is the property's segments joined by NUL, e.g. "source\x00address". Null when unknown.
pub fn getProperty(path: []const u8) ?[]const u8 {
    var ptr: ?[*]u8 = null;
    var len: usize = 0;
    const s = status(host.proxy_get_property(ptrOf(path), path.len, &ptr, &len));
    return if (s == .ok) received(ptr, len) else null;
}

pub fn setProperty(path: []const u8, value: []const u8) Status {
    return status(host.proxy_set_property(ptrOf(path), path.len, ptrOf(value), value.len));
}

// ------------------------------------------------------------------------------------------------ stream

/// Answers the request locally; the host applies it when the current callback returns.
pub fn sendLocalResponse(code: u32, details: []const u8, body: []const u8, headers: []const Header) void {
    const pairs = encodePairs(scratch, headers) catch "";
    _ = host.proxy_send_local_response(
        code,
        ptrOf(details),
        details.len,
        ptrOf(body),
        body.len,
        ptrOf(pairs),
        pairs.len,
        -1,
    );
}

pub fn continueStream(t: StreamType) void {
    _ = host.proxy_continue_stream(@intFromEnum(t));
}

/// The id of the context the running callback belongs to (see the file comment).
pub var context_id: u32 = 0;

/// Makes host calls act on context `id` (a stream, from a root callback). False when it is gone.
pub fn setEffectiveContext(id: u32) bool {
    return host.proxy_set_effective_context(id) == 0;
}

pub fn setTickPeriod(ms: u32) void {
    _ = host.proxy_set_tick_period_milliseconds(ms);
}

// ------------------------------------------------------------------------------------------------ http calls

/// Sends a request to the configured upstream `upstream`; the answer comes to `onHttpCallResponse` with the
/// returned token. `headers` must include ":method", ":path" and ":authority".
pub fn httpCall(upstream: []const u8, headers: []const Header, body: []const u8, timeout_ms: u32) HostError!u32 {
    const pairs = try encodePairs(scratch, headers);
    const no_trailers = try encodePairs(scratch, &.{});
    var token: u32 = 0;
    const s = status(host.proxy_http_call(
        ptrOf(upstream),
        upstream.len,
        ptrOf(pairs),
        pairs.len,
        ptrOf(body),
        body.len,
        ptrOf(no_trailers),
        no_trailers.len,
        timeout_ms,
        &token,
    ));
    if (s != .ok) return error.HostCallFailed;
    return token;
}

// ------------------------------------------------------------------------------------------------ shared data

pub const SharedValue = struct { value: []const u8, cas: u32 };

pub const SharedGet = union(enum) {
    found: SharedValue,
    not_found,
    failed: Status,
};

pub fn getSharedData(key: []const u8) SharedGet {
    var ptr: ?[*]u8 = null;
    var len: usize = 0;
    var cas: u32 = 0;
    const s = status(host.proxy_get_shared_data(ptrOf(key), key.len, &ptr, &len, &cas));
    return switch (s) {
        .ok => .{ .found = .{ .value = received(ptr, len), .cas = cas } },
        .not_found => .not_found,
        else => .{ .failed = s },
    };
}

/// cas 0 writes unconditionally; otherwise the write happens only if the stored cas still equals `cas`
/// (`Status.cas_mismatch` when it does not).
pub fn setSharedData(key: []const u8, value: []const u8, cas: u32) Status {
    return status(host.proxy_set_shared_data(ptrOf(key), key.len, ptrOf(value), value.len, cas));
}

/// The cas used to create a key that was just seen absent. Hosts that follow Envoy create an absent key
/// for any cas and answer CAS_MISMATCH when the key exists with another cas, which makes creation atomic.
/// (Hosts never hand this value out for a stored entry in practice: cas counters start at 1.)
pub const create_cas: u32 = 0xFFFF_FFFF;

pub const CasOutcome = enum { written, retry, failed };

/// One step of a compare-and-swap loop: write `value` for an entry read as `seen` (null: absent).
/// Creation first tries the atomic `create_cas` form; a host that refuses it for absent keys (and still
/// has no entry) gets an unconditional write, which is exact as long as that host is process-local.
pub fn casWrite(key: []const u8, value: []const u8, seen_cas: ?u32) CasOutcome {
    if (seen_cas) |cas| {
        return switch (setSharedData(key, value, cas)) {
            .ok => .written,
            .cas_mismatch => .retry,
            else => .failed,
        };
    }
    switch (setSharedData(key, value, create_cas)) {
        .ok => return .written,
        .cas_mismatch => {},
        else => return .failed,
    }
    return switch (getSharedData(key)) {
        .found => .retry,
        .not_found => switch (setSharedData(key, value, 0)) {
            .ok => .written,
            else => .failed,
        },
        .failed => .failed,
    };
}

// ------------------------------------------------------------------------------------------------ configuration

pub const ConfigError = error{ InvalidConfig, OutOfMemory };
pub const Value = std.json.Value;
pub const ObjectMap = std.json.ObjectMap;

/// Reads and validates a JSON configuration, recording what is wrong and where for the error log.
pub const Config = struct {
    alloc: Allocator,
    message: []const u8 = "",

    pub fn fail(self: *Config, comptime fmt: []const u8, args: anytype) ConfigError {
        self.message = std.fmt.allocPrint(self.alloc, fmt, args) catch "invalid configuration";
        return error.InvalidConfig;
    }

    /// Parses JSON text; numbers stay as their source text (`.number_string`) so values pass through exactly.
    pub fn parseJson(self: *Config, text: []const u8) ConfigError!Value {
        var scanner = std.json.Scanner.initCompleteInput(self.alloc, text);
        var diag: std.json.Diagnostics = .{};
        scanner.enableDiagnostics(&diag);
        return std.json.parseFromTokenSourceLeaky(Value, self.alloc, &scanner, .{
            .parse_numbers = false,
            .allocate = .alloc_always,
        }) catch |e| switch (e) {
            error.OutOfMemory => error.OutOfMemory,
            else => self.fail("not valid JSON ({s}) at line {d}, column {d}", .{
                @errorName(e), diag.getLine(), diag.getColumn(),
            }),
        };
    }

    pub fn path(self: *Config, parent: []const u8, key: []const u8) []const u8 {
        if (parent.len == 0) return key;
        return std.fmt.allocPrint(self.alloc, "{s}.{s}", .{ parent, key }) catch key;
    }

    pub fn index(self: *Config, parent: []const u8, i: usize) []const u8 {
        return std.fmt.allocPrint(self.alloc, "{s}[{d}]", .{ parent, i }) catch parent;
    }

    pub fn object(self: *Config, v: Value, at: []const u8, allowed: []const []const u8) ConfigError!ObjectMap {
        const obj = switch (v) {
            .object => |o| o,
            else => return self.fail("{s}: expected an object, got {s}", .{ display(at), kind(v) }),
        };
        keys: for (obj.keys()) |k| {
            for (allowed) |a| {
                if (std.mem.eql(u8, a, k)) continue :keys;
            }
            var list: std.ArrayListUnmanaged(u8) = .{};
            for (allowed, 0..) |a, i| {
                if (i > 0) try list.appendSlice(self.alloc, ", ");
                try list.appendSlice(self.alloc, a);
            }
            return self.fail("{s}: unknown field \"{s}\" (expected one of: {s})", .{ display(at), k, list.items });
        }
        return obj;
    }

    pub fn array(self: *Config, v: Value, at: []const u8) ConfigError![]Value {
        return switch (v) {
            .array => |a| a.items,
            else => self.fail("{s}: expected an array, got {s}", .{ display(at), kind(v) }),
        };
    }

    pub fn string(self: *Config, v: Value, at: []const u8) ConfigError![]const u8 {
        return switch (v) {
            .string => |s| s,
            else => self.fail("{s}: expected a string, got {s}", .{ display(at), kind(v) }),
        };
    }

    pub fn boolean(self: *Config, v: Value, at: []const u8) ConfigError!bool {
        return switch (v) {
            .bool => |b| b,
            else => self.fail("{s}: expected true or false, got {s}", .{ display(at), kind(v) }),
        };
    }

    /// A non-negative integer within [min, max].
    pub fn integer(self: *Config, v: Value, at: []const u8, min: u64, max: u64) ConfigError!u64 {
        const text = switch (v) {
            .number_string => |s| s,
            .integer => |i| return self.inRange(if (i < 0) null else @intCast(i), at, min, max),
            else => return self.fail("{s}: expected an integer, got {s}", .{ display(at), kind(v) }),
        };
        const n = std.fmt.parseInt(u64, text, 10) catch
            return self.fail("{s}: expected an integer between {d} and {d}, got {s}", .{ display(at), min, max, text });
        return self.inRange(n, at, min, max);
    }

    fn inRange(self: *Config, n: ?u64, at: []const u8, min: u64, max: u64) ConfigError!u64 {
        if (n) |x| {
            if (x >= min and x <= max) return x;
        }
        return self.fail("{s}: expected an integer between {d} and {d}", .{ display(at), min, max });
    }

    /// One of `choices` (a string), returned as the matching enum value of `E`.
    pub fn choice(self: *Config, comptime E: type, v: Value, at: []const u8) ConfigError!E {
        const s = try self.string(v, at);
        inline for (@typeInfo(E).@"enum".fields) |f| {
            if (std.mem.eql(u8, f.name, s)) return @field(E, f.name);
        }
        const names = comptime blk: {
            var out: []const u8 = "";
            for (@typeInfo(E).@"enum".fields, 0..) |f, i| {
                out = out ++ (if (i > 0) ", " else "") ++ "\"" ++ f.name ++ "\"";
            }
            break :blk out;
        };
        return self.fail("{s}: expected one of {s}, got \"{s}\"", .{ display(at), names, s });
    }

    /// A copy of `s` in configuration memory, lower-cased (header names).
    pub fn lower(self: *Config, s: []const u8) ConfigError![]const u8 {
        return std.ascii.allocLowerString(self.alloc, s);
    }

    /// A valid HTTP header name (RFC 9110 token), returned lower-cased.
    pub fn headerName(self: *Config, v: Value, at: []const u8) ConfigError![]const u8 {
        const s = try self.string(v, at);
        if (!isToken(s)) return self.fail("{s}: \"{s}\" is not a valid header name", .{ display(at), s });
        return self.lower(s);
    }

    /// A header value without CR, LF or NUL.
    pub fn headerValue(self: *Config, v: Value, at: []const u8) ConfigError![]const u8 {
        const s = try self.string(v, at);
        for (s) |c| {
            if (c == '\r' or c == '\n' or c == 0)
                return self.fail("{s}: header values may not contain CR, LF or NUL", .{display(at)});
        }
        return s;
    }
};

fn display(at: []const u8) []const u8 {
    return if (at.len == 0) "configuration" else at;
}

pub fn kind(v: Value) []const u8 {
    return switch (v) {
        .null => "null",
        .bool => "a boolean",
        .integer, .float, .number_string => "a number",
        .string => "a string",
        .array => "an array",
        .object => "an object",
    };
}

pub fn isToken(s: []const u8) bool {
    if (s.len == 0) return false;
    for (s) |c| {
        const ok = std.ascii.isAlphanumeric(c) or std.mem.indexOfScalar(u8, "!#$%&'*+-.^_`|~", c) != null;
        if (!ok) return false;
    }
    return true;
}

// ------------------------------------------------------------------------------------------------ edge data

/// Calls a host foreign function; its result lands in scratch memory.
pub fn callForeignFunction(name: []const u8, args: []const u8) HostError![]const u8 {
    var ptr: ?[*]u8 = null;
    var len: usize = 0;
    const s = status(host.proxy_call_foreign_function(ptrOf(name), name.len, ptrOf(args), args.len, &ptr, &len));
    if (s != .ok) return error.HostCallFailed;
    return received(ptr, len);
}

/// Result codes of the edge-data functions (docs/edge-data.md, encoding version 1).
pub const EdgeCode = enum(u8) {
    ok = 0,
    not_found = 1,
    bad_request = 2,
    denied = 3,
    limit = 4,
    timeout = 5,
    unavailable = 6,
    conflict = 7,
    internal = 8,
    _,
};

/// An error result: the code and a reason for people (in scratch memory).
pub const EdgeError = struct { code: EdgeCode, reason: []const u8 };

/// What an edge-data call answers: the value, not_found (kv.get only), or an error with its reason.
pub fn EdgeResult(comptime T: type) type {
    return union(enum) { ok: T, not_found, err: EdgeError };
}

const edge_version: u8 = 1;

const EdgeWriter = struct {
    buf: std.ArrayListUnmanaged(u8) = .{},
    failed: bool = false,

    fn start() EdgeWriter {
        var w: EdgeWriter = .{};
        w.byte(edge_version);
        return w;
    }
    fn raw(w: *EdgeWriter, data: []const u8) void {
        w.buf.appendSlice(scratch, data) catch {
            w.failed = true;
        };
    }
    fn byte(w: *EdgeWriter, b: u8) void {
        w.raw(&.{b});
    }
    fn int(w: *EdgeWriter, comptime T: type, v: T) void {
        var tmp: [@sizeOf(T)]u8 = undefined;
        std.mem.writeInt(T, &tmp, v, .little);
        w.raw(&tmp);
    }
    fn bytes(w: *EdgeWriter, data: []const u8) void {
        w.int(u32, @intCast(data.len));
        w.raw(data);
    }
};

const EdgeReader = struct {
    data: []const u8,
    pos: usize = 2,

    fn take(r: *EdgeReader, n: usize) ?[]const u8 {
        if (r.data.len - r.pos < n) return null;
        const out = r.data[r.pos .. r.pos + n];
        r.pos += n;
        return out;
    }
    fn int(r: *EdgeReader, comptime T: type) ?T {
        const b = r.take(@sizeOf(T)) orelse return null;
        return std.mem.readInt(T, b[0..@sizeOf(T)], .little);
    }
    fn bytes(r: *EdgeReader) ?[]const u8 {
        const n = r.int(u32) orelse return null;
        return r.take(n);
    }
};

fn edgeFailure(comptime T: type, code: EdgeCode, reason: []const u8) EdgeResult(T) {
    return .{ .err = .{ .code = code, .reason = reason } };
}

/// Sends the arguments and checks the result's version and code; on .ok the reader is at the payload.
fn edgeCall(comptime T: type, name: []const u8, w: *EdgeWriter, reader: *EdgeReader) ?EdgeResult(T) {
    if (w.failed) return edgeFailure(T, .internal, "out of memory");
    const raw = callForeignFunction(name, w.buf.items) catch
        return edgeFailure(T, .internal, "the host has no edge-data functions (foreign function call failed)");
    if (raw.len < 2 or raw[0] != edge_version) return edgeFailure(T, .internal, "unexpected result encoding");
    reader.* = .{ .data = raw };
    const code: EdgeCode = @enumFromInt(raw[1]);
    switch (code) {
        .ok => return null,
        .not_found => return .not_found,
        else => return edgeFailure(T, code, reader.bytes() orelse ""),
    }
}

fn truncated(comptime T: type) EdgeResult(T) {
    return edgeFailure(T, .internal, "truncated result");
}

/// The KV namespaces granted to this filter (`kv = [...]` in its config). ttl_ms 0: the namespace's default.
pub const kv = struct {
    pub const KeyList = struct { keys: []const []const u8, truncated: bool };

    fn head(ns: []const u8, key: []const u8) EdgeWriter {
        var w = EdgeWriter.start();
        w.bytes(ns);
        w.bytes(key);
        return w;
    }

    pub fn get(ns: []const u8, key: []const u8) EdgeResult([]const u8) {
        var w = head(ns, key);
        var r: EdgeReader = undefined;
        if (edgeCall([]const u8, "kv.get", &w, &r)) |early| return early;
        return .{ .ok = r.bytes() orelse return truncated([]const u8) };
    }

    pub fn set(ns: []const u8, key: []const u8, value: []const u8, ttl_ms: u32) EdgeResult(void) {
        var w = head(ns, key);
        w.bytes(value);
        w.int(u32, ttl_ms);
        var r: EdgeReader = undefined;
        if (edgeCall(void, "kv.set", &w, &r)) |early| return early;
        return .{ .ok = {} };
    }

    /// .ok = whether a live entry was removed.
    pub fn delete(ns: []const u8, key: []const u8) EdgeResult(bool) {
        var w = head(ns, key);
        var r: EdgeReader = undefined;
        if (edgeCall(bool, "kv.delete", &w, &r)) |early| return early;
        const b = r.take(1) orelse return truncated(bool);
        return .{ .ok = b[0] != 0 };
    }

    /// Atomic add (an absent key counts as 0); ttl_ms applies when the key is created.
    pub fn incr(ns: []const u8, key: []const u8, delta: i64, ttl_ms: u32) EdgeResult(i64) {
        var w = head(ns, key);
        w.int(i64, delta);
        w.int(u32, ttl_ms);
        var r: EdgeReader = undefined;
        if (edgeCall(i64, "kv.incr", &w, &r)) |early| return early;
        return .{ .ok = r.int(i64) orelse return truncated(i64) };
    }

    /// Keys starting with `prefix`, in byte order, at most `limit` (0: the namespace's max_list).
    pub fn list(ns: []const u8, prefix: []const u8, limit: u32) EdgeResult(KeyList) {
        var w = head(ns, prefix);
        w.int(u32, limit);
        var r: EdgeReader = undefined;
        if (edgeCall(KeyList, "kv.list", &w, &r)) |early| return early;
        const n = r.int(u32) orelse return truncated(KeyList);
        const keys = scratch.alloc([]const u8, n) catch return edgeFailure(KeyList, .internal, "out of memory");
        for (keys) |*k| k.* = r.bytes() orelse return truncated(KeyList);
        const more = r.take(1) orelse return truncated(KeyList);
        return .{ .ok = .{ .keys = keys, .truncated = more[0] != 0 } };
    }
};

/// A SQL parameter or result value.
pub const SqlValue = union(enum) {
    null,
    integer: i64,
    real: f64,
    text: []const u8,
    blob: []const u8,
};

/// The read-only SQLite databases granted to this filter (`sql = [...]` in its config).
pub const sql = struct {
    pub const Rows = struct {
        columns: []const []const u8,
        /// Row-major: row i is values[i * columns.len ..][0..columns.len].
        values: []const SqlValue,
        count: usize,

        pub fn row(self: Rows, i: usize) []const SqlValue {
            return self.values[i * self.columns.len ..][0..self.columns.len];
        }
    };

    fn readValue(r: *EdgeReader) ?SqlValue {
        const t = r.take(1) orelse return null;
        return switch (t[0]) {
            0 => .null,
            1 => .{ .integer = r.int(i64) orelse return null },
            2 => .{ .real = @bitCast(r.int(u64) orelse return null) },
            3 => .{ .text = r.bytes() orelse return null },
            4 => .{ .blob = r.bytes() orelse return null },
            else => null,
        };
    }

    /// Runs one read-only statement with `?` parameters; all rows come back at once (bounded by the
    /// database's max_rows and max_bytes).
    pub fn query(db: []const u8, statement: []const u8, params: []const SqlValue) EdgeResult(Rows) {
        var w = EdgeWriter.start();
        w.bytes(db);
        w.bytes(statement);
        w.int(u32, @intCast(params.len));
        for (params) |p| switch (p) {
            .null => w.byte(0),
            .integer => |v| {
                w.byte(1);
                w.int(i64, v);
            },
            .real => |v| {
                w.byte(2);
                w.int(u64, @bitCast(v));
            },
            .text => |v| {
                w.byte(3);
                w.bytes(v);
            },
            .blob => |v| {
                w.byte(4);
                w.bytes(v);
            },
        };
        var r: EdgeReader = undefined;
        if (edgeCall(Rows, "sql.query", &w, &r)) |early| return early;
        const ncols = r.int(u32) orelse return truncated(Rows);
        const columns = scratch.alloc([]const u8, ncols) catch return edgeFailure(Rows, .internal, "out of memory");
        for (columns) |*c| c.* = r.bytes() orelse return truncated(Rows);
        const nrows = r.int(u32) orelse return truncated(Rows);
        const values = scratch.alloc(SqlValue, @as(usize, nrows) * ncols) catch
            return edgeFailure(Rows, .internal, "out of memory");
        for (values) |*v| v.* = readValue(&r) orelse return truncated(Rows);
        return .{ .ok = .{ .columns = columns, .values = values, .count = nrows } };
    }
};

// ------------------------------------------------------------------------------------------------ exports

/// Exports the Proxy-Wasm entry points `Filter` implements (see the file comment).
pub fn register(comptime Filter: type) void {
    const Http = Filter.Http;

    const Contexts = struct {
        var map: std.AutoHashMapUnmanaged(u32, Http) = .{};

        fn get(id: u32) ?*Http {
            resetScratch();
            context_id = id;
            const entry = map.getOrPut(persistent, id) catch return null;
            if (!entry.found_existing) entry.value_ptr.* = .{};
            return entry.value_ptr;
        }

        fn abiVersion() callconv(.c) void {}

        fn onConfigure(root_id: u32, size: u32) callconv(.c) u32 {
            resetScratch();
            context_id = root_id;
            var level: u32 = 0;
            if (host.proxy_get_log_level(&level) == 0) log_level = level;
            const name = getProperty("plugin_name") orelse "filter";
            const text = getBuffer(.plugin_configuration, 0, size) catch "";
            const arena = persistent.create(std.heap.ArenaAllocator) catch return 0;
            arena.* = std.heap.ArenaAllocator.init(persistent);
            var cfg: Config = .{ .alloc = arena.allocator() };
            const ok = blk: {
                const root = (if (std.mem.trim(u8, text, " \t\r\n").len == 0)
                    Value{ .object = ObjectMap.init(cfg.alloc) }
                else
                    cfg.parseJson(text)) catch break :blk false;
                Filter.configure(&cfg, root) catch |e| {
                    if (e == error.OutOfMemory) cfg.message = "out of memory";
                    break :blk false;
                };
                break :blk true;
            };
            if (!ok) {
                log(.err, "{s}: invalid configuration: {s}", .{ name, cfg.message });
                arena.deinit();
                persistent.destroy(arena);
                return 0;
            }
            if (config_arena) |old| {
                old.deinit();
                persistent.destroy(old);
            }
            config_arena = arena;
            return 1;
        }

        fn onRequestHeaders(id: u32, n: u32, eos: u32) callconv(.c) u32 {
            const h = get(id) orelse return 0;
            return @intFromEnum(Filter.onRequestHeaders(h, n, eos != 0));
        }

        fn onRequestBody(id: u32, size: u32, eos: u32) callconv(.c) u32 {
            const h = get(id) orelse return 0;
            return @intFromEnum(Filter.onRequestBody(h, size, eos != 0));
        }

        fn onResponseHeaders(id: u32, n: u32, eos: u32) callconv(.c) u32 {
            const h = get(id) orelse return 0;
            return @intFromEnum(Filter.onResponseHeaders(h, n, eos != 0));
        }

        fn onResponseBody(id: u32, size: u32, eos: u32) callconv(.c) u32 {
            const h = get(id) orelse return 0;
            return @intFromEnum(Filter.onResponseBody(h, size, eos != 0));
        }

        fn onHttpCallResponse(root_id: u32, token: u32, headers: u32, body_size: u32, trailers: u32) callconv(.c) void {
            resetScratch();
            context_id = root_id;
            Filter.onHttpCallResponse(token, headers, body_size, trailers);
        }

        fn onTick(root_id: u32) callconv(.c) void {
            resetScratch();
            context_id = root_id;
            Filter.onTick();
        }

        fn onDelete(id: u32) callconv(.c) void {
            _ = map.remove(id);
            resetScratch();
        }
    };

    @export(&Contexts.abiVersion, .{ .name = "proxy_abi_version_0_2_1" });
    @export(&onMemoryAllocate, .{ .name = "proxy_on_memory_allocate" });
    @export(&Contexts.onConfigure, .{ .name = "proxy_on_configure" });
    if (@hasDecl(Filter, "onRequestHeaders"))
        @export(&Contexts.onRequestHeaders, .{ .name = "proxy_on_request_headers" });
    if (@hasDecl(Filter, "onRequestBody"))
        @export(&Contexts.onRequestBody, .{ .name = "proxy_on_request_body" });
    if (@hasDecl(Filter, "onResponseHeaders"))
        @export(&Contexts.onResponseHeaders, .{ .name = "proxy_on_response_headers" });
    if (@hasDecl(Filter, "onResponseBody"))
        @export(&Contexts.onResponseBody, .{ .name = "proxy_on_response_body" });
    if (@hasDecl(Filter, "onHttpCallResponse"))
        @export(&Contexts.onHttpCallResponse, .{ .name = "proxy_on_http_call_response" });
    if (@hasDecl(Filter, "onTick"))
        @export(&Contexts.onTick, .{ .name = "proxy_on_tick" });
    @export(&Contexts.onDelete, .{ .name = "proxy_on_delete" });
}
