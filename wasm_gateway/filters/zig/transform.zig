//! transform: edits requests and responses on their way through the gateway.
//!
//! Request: headers (remove, rename, set, add, in that order), path rules (strip/replace/add a prefix,
//! templates with captured segments, applied in order), query parameters (remove, set, add), JSON body
//! edits. Response: headers and JSON body edits. Configuration reference: docs/filters/transform.md.
const std = @import("std");
const proxy = @import("proxy_wasm.zig");
const Value = proxy.Value;
const Header = proxy.Header;

pub const panic = std.debug.FullPanic(proxy.panicHandler);

comptime {
    proxy.register(@This());
}

// ------------------------------------------------------------------------------------------------ configuration

const Rename = struct { from: []const u8, to: []const u8 };

const HeaderOps = struct {
    remove: []const []const u8 = &.{},
    rename: []const Rename = &.{},
    set: []const Header = &.{},
    add: []const Header = &.{},

    fn empty(self: HeaderOps) bool {
        return self.remove.len + self.rename.len + self.set.len + self.add.len == 0;
    }
};

const Segment = union(enum) { literal: []const u8, capture: usize, rest: usize };
const Part = union(enum) { literal: []const u8, capture: usize };

const Template = struct {
    segments: []const Segment,
    to: []const Part,
};

const PathRule = union(enum) {
    strip_prefix: []const u8,
    replace_prefix: Rename,
    add_prefix: []const u8,
    template: Template,
};

const Param = struct { name: []const u8, encoded: []const u8 };

const QueryOps = struct {
    remove: []const []const u8 = &.{},
    set: []const Param = &.{},
    add: []const Param = &.{},

    fn empty(self: QueryOps) bool {
        return self.remove.len + self.set.len + self.add.len == 0;
    }
};

const Policy = enum { pass, reject };

const Edit = union(enum) {
    set: struct { pointer: []const []const u8, value: Value },
    remove: []const []const u8,
    rename: struct { pointer: []const []const u8, to: []const u8 },
    uppercase: []const []const u8,
    lowercase: []const []const u8,
};

const BodyOps = struct {
    edits: []const Edit,
    max_bytes: usize = 64 * 1024,
    max_depth: usize = 64,
    on_invalid: Policy = .pass,
    on_oversized: Policy = .pass,
};

const Direction = struct {
    headers: HeaderOps = .{},
    path: []const PathRule = &.{},
    query: QueryOps = .{},
    body: ?BodyOps = null,

    fn empty(self: Direction) bool {
        return self.headers.empty() and self.path.len == 0 and self.query.empty() and self.body == null;
    }
};

var request_ops: Direction = .{};
var response_ops: Direction = .{};

pub fn configure(cfg: *proxy.Config, root: Value) proxy.ConfigError!void {
    const top = try cfg.object(root, "", &.{ "request", "response" });
    var request: Direction = .{};
    var response: Direction = .{};
    if (top.get("request")) |v| request = try direction(cfg, v, "request", true);
    if (top.get("response")) |v| response = try direction(cfg, v, "response", false);
    request_ops = request;
    response_ops = response;
}

fn direction(cfg: *proxy.Config, v: Value, at: []const u8, is_request: bool) proxy.ConfigError!Direction {
    const keys: []const []const u8 = if (is_request) &.{ "headers", "path", "query", "body" } else &.{ "headers", "body" };
    const obj = try cfg.object(v, at, keys);
    var d: Direction = .{};
    if (obj.get("headers")) |h| d.headers = try headerOps(cfg, h, cfg.path(at, "headers"));
    if (obj.get("path")) |p| d.path = try pathRules(cfg, p, cfg.path(at, "path"));
    if (obj.get("query")) |q| d.query = try queryOps(cfg, q, cfg.path(at, "query"));
    if (obj.get("body")) |b| d.body = try bodyOps(cfg, b, cfg.path(at, "body"));
    return d;
}

/// Header names a transform may not touch: framing is the gateway's business.
const managed_headers = [_][]const u8{ "content-length", "transfer-encoding", "connection", "upgrade" };

fn editableName(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const u8 {
    if (v == .string and v.string.len > 0 and v.string[0] == ':')
        return cfg.fail("{s}: pseudo-header \"{s}\" cannot be edited here (use request.path for the path)", .{ at, v.string });
    const name = try cfg.headerName(v, at);
    for (managed_headers) |m| {
        if (std.mem.eql(u8, m, name))
            return cfg.fail("{s}: \"{s}\" is managed by the gateway and cannot be edited", .{ at, name });
    }
    return name;
}

fn headerOps(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!HeaderOps {
    const obj = try cfg.object(v, at, &.{ "remove", "rename", "set", "add" });
    var ops: HeaderOps = .{};
    if (obj.get("remove")) |r| {
        const at_r = cfg.path(at, "remove");
        const items = try cfg.array(r, at_r);
        const out = try cfg.alloc.alloc([]const u8, items.len);
        for (items, out, 0..) |item, *o, i| o.* = try editableName(cfg, item, cfg.index(at_r, i));
        ops.remove = out;
    }
    if (obj.get("rename")) |r| {
        const at_r = cfg.path(at, "rename");
        if (r != .object) return cfg.fail("{s}: expected an object of old names to new names, got {s}", .{ at_r, proxy.kind(r) });
        const m = r.object;
        const out = try cfg.alloc.alloc(Rename, m.count());
        for (m.keys(), m.values(), out) |k, val, *o| {
            const at_k = cfg.path(at_r, k);
            o.* = .{ .from = try editableName(cfg, .{ .string = k }, at_k), .to = try editableName(cfg, val, at_k) };
        }
        ops.rename = out;
    }
    if (obj.get("set")) |s| ops.set = try headerValues(cfg, s, cfg.path(at, "set"), false);
    if (obj.get("add")) |a| ops.add = try headerValues(cfg, a, cfg.path(at, "add"), true);
    return ops;
}

/// {"name": "value"} (and, for add, {"name": ["v1", "v2"]}).
fn headerValues(cfg: *proxy.Config, v: Value, at: []const u8, many: bool) proxy.ConfigError![]const Header {
    if (v != .object) return cfg.fail("{s}: expected an object of header names to values, got {s}", .{ at, proxy.kind(v) });
    var out: std.ArrayListUnmanaged(Header) = .{};
    var it = v.object.iterator();
    while (it.next()) |e| {
        const at_k = cfg.path(at, e.key_ptr.*);
        const name = try editableName(cfg, .{ .string = e.key_ptr.* }, at_k);
        if (many and e.value_ptr.* == .array) {
            for (e.value_ptr.array.items, 0..) |item, i|
                try out.append(cfg.alloc, .{ .name = name, .value = try cfg.headerValue(item, cfg.index(at_k, i)) });
        } else {
            try out.append(cfg.alloc, .{ .name = name, .value = try cfg.headerValue(e.value_ptr.*, at_k) });
        }
    }
    return out.items;
}

fn pathRules(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const PathRule {
    const items = try cfg.array(v, at);
    const out = try cfg.alloc.alloc(PathRule, items.len);
    for (items, out, 0..) |item, *o, i| {
        const at_i = cfg.index(at, i);
        const obj = try cfg.object(item, at_i, &.{ "strip_prefix", "replace_prefix", "with", "add_prefix", "template", "to" });
        const has = [_]bool{ obj.contains("strip_prefix"), obj.contains("replace_prefix"), obj.contains("add_prefix"), obj.contains("template") };
        var n: usize = 0;
        for (has) |b| n += @intFromBool(b);
        if (n != 1) return cfg.fail("{s}: a path rule has exactly one of strip_prefix, replace_prefix, add_prefix, template", .{at_i});
        if (obj.get("strip_prefix")) |p| {
            try noExtra(cfg, obj, at_i, &.{ "with", "to" });
            o.* = .{ .strip_prefix = try pathPrefix(cfg, p, cfg.path(at_i, "strip_prefix")) };
        } else if (obj.get("replace_prefix")) |p| {
            try noExtra(cfg, obj, at_i, &.{"to"});
            const with = obj.get("with") orelse return cfg.fail("{s}: replace_prefix needs \"with\"", .{at_i});
            o.* = .{ .replace_prefix = .{
                .from = try pathPrefix(cfg, p, cfg.path(at_i, "replace_prefix")),
                .to = try pathPrefix(cfg, with, cfg.path(at_i, "with")),
            } };
        } else if (obj.get("add_prefix")) |p| {
            try noExtra(cfg, obj, at_i, &.{ "with", "to" });
            o.* = .{ .add_prefix = try pathPrefix(cfg, p, cfg.path(at_i, "add_prefix")) };
        } else {
            try noExtra(cfg, obj, at_i, &.{"with"});
            const to = obj.get("to") orelse return cfg.fail("{s}: template needs \"to\"", .{at_i});
            o.* = .{ .template = try template(cfg, obj.get("template").?, to, at_i) };
        }
    }
    return out;
}

fn noExtra(cfg: *proxy.Config, obj: proxy.ObjectMap, at: []const u8, forbidden: []const []const u8) proxy.ConfigError!void {
    for (forbidden) |f| {
        if (obj.contains(f)) return cfg.fail("{s}: \"{s}\" does not belong to this kind of path rule", .{ at, f });
    }
}

fn pathPrefix(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const u8 {
    const s = try cfg.string(v, at);
    if (s.len == 0 or s[0] != '/') return cfg.fail("{s}: must start with \"/\"", .{at});
    if (!validPathChars(s)) return cfg.fail("{s}: \"{s}\" contains characters not allowed in a path", .{ at, s });
    return s;
}

fn validPathChars(s: []const u8) bool {
    for (s) |c| {
        if (c <= ' ' or c >= 0x7f or c == '?' or c == '#') return false;
    }
    return true;
}

fn template(cfg: *proxy.Config, pattern_v: Value, to_v: Value, at: []const u8) proxy.ConfigError!Template {
    const at_p = cfg.path(at, "template");
    const pattern = try cfg.string(pattern_v, at_p);
    if (pattern.len == 0 or pattern[0] != '/') return cfg.fail("{s}: must start with \"/\"", .{at_p});
    var names: std.ArrayListUnmanaged([]const u8) = .{};
    var segments: std.ArrayListUnmanaged(Segment) = .{};
    var it = std.mem.splitScalar(u8, pattern[1..], '/');
    while (it.next()) |seg| {
        if (seg.len >= 2 and seg[0] == '{' and seg[seg.len - 1] == '}') {
            var name = seg[1 .. seg.len - 1];
            const rest = name.len > 0 and name[name.len - 1] == '*';
            if (rest) name = name[0 .. name.len - 1];
            if (!validName(name)) return cfg.fail("{s}: \"{s}\" is not a valid capture (use {{name}} or {{name*}})", .{ at_p, seg });
            for (names.items) |n| {
                if (std.mem.eql(u8, n, name)) return cfg.fail("{s}: capture \"{s}\" appears twice", .{ at_p, name });
            }
            if (rest and it.index != null)
                return cfg.fail("{s}: {{{s}*}} must be the last segment", .{ at_p, name });
            try segments.append(cfg.alloc, if (rest) .{ .rest = names.items.len } else .{ .capture = names.items.len });
            try names.append(cfg.alloc, name);
        } else {
            if (std.mem.indexOfAny(u8, seg, "{}") != null)
                return cfg.fail("{s}: a capture must be a whole segment, like /{{id}}/ (got \"{s}\")", .{ at_p, seg });
            if (!validPathChars(seg)) return cfg.fail("{s}: \"{s}\" contains characters not allowed in a path", .{ at_p, seg });
            try segments.append(cfg.alloc, .{ .literal = seg });
        }
    }
    const at_t = cfg.path(at, "to");
    const to = try cfg.string(to_v, at_t);
    if (to.len == 0 or to[0] != '/') return cfg.fail("{s}: must start with \"/\"", .{at_t});
    var parts: std.ArrayListUnmanaged(Part) = .{};
    var i: usize = 0;
    while (i < to.len) {
        const open = std.mem.indexOfScalarPos(u8, to, i, '{') orelse to.len;
        if (std.mem.indexOfScalar(u8, to[i..open], '}') != null) return cfg.fail("{s}: unmatched \"}}\"", .{at_t});
        if (open > i) try parts.append(cfg.alloc, .{ .literal = to[i..open] });
        if (open == to.len) break;
        const close = std.mem.indexOfScalarPos(u8, to, open, '}') orelse return cfg.fail("{s}: unmatched \"{{\"", .{at_t});
        const name = to[open + 1 .. close];
        const idx = for (names.items, 0..) |n, k| {
            if (std.mem.eql(u8, n, name)) break k;
        } else return cfg.fail("{s}: {{{s}}} is not captured by the template", .{ at_t, name });
        try parts.append(cfg.alloc, .{ .capture = idx });
        i = close + 1;
    }
    if (!validPathChars(std.mem.sliceTo(to, '?')))
        return cfg.fail("{s}: contains characters not allowed in a path", .{at_t});
    return .{ .segments = segments.items, .to = parts.items };
}

fn validName(name: []const u8) bool {
    if (name.len == 0) return false;
    for (name) |c| {
        if (!std.ascii.isAlphanumeric(c) and c != '_') return false;
    }
    return true;
}

fn queryOps(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!QueryOps {
    const obj = try cfg.object(v, at, &.{ "remove", "set", "add" });
    var ops: QueryOps = .{};
    if (obj.get("remove")) |r| {
        const at_r = cfg.path(at, "remove");
        const items = try cfg.array(r, at_r);
        const out = try cfg.alloc.alloc([]const u8, items.len);
        for (items, out, 0..) |item, *o, i| {
            o.* = try cfg.string(item, cfg.index(at_r, i));
            if (o.len == 0) return cfg.fail("{s}: empty parameter name", .{cfg.index(at_r, i)});
        }
        ops.remove = out;
    }
    if (obj.get("set")) |s| ops.set = try params(cfg, s, cfg.path(at, "set"));
    if (obj.get("add")) |a| ops.add = try params(cfg, a, cfg.path(at, "add"));
    return ops;
}

fn params(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const Param {
    if (v != .object) return cfg.fail("{s}: expected an object of parameter names to values, got {s}", .{ at, proxy.kind(v) });
    var out: std.ArrayListUnmanaged(Param) = .{};
    var it = v.object.iterator();
    while (it.next()) |e| {
        const name = e.key_ptr.*;
        if (name.len == 0) return cfg.fail("{s}: empty parameter name", .{at});
        const value = try cfg.string(e.value_ptr.*, cfg.path(at, name));
        var enc: std.ArrayListUnmanaged(u8) = .{};
        try percentEncode(&enc, cfg.alloc, name);
        try enc.append(cfg.alloc, '=');
        try percentEncode(&enc, cfg.alloc, value);
        try out.append(cfg.alloc, .{ .name = name, .encoded = enc.items });
    }
    return out.items;
}

fn bodyOps(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!BodyOps {
    const obj = try cfg.object(v, at, &.{ "edits", "max_bytes", "max_depth", "on_invalid", "on_oversized" });
    const at_e = cfg.path(at, "edits");
    const items = try cfg.array(obj.get("edits") orelse return cfg.fail("{s}: missing", .{at_e}), at_e);
    const edits = try cfg.alloc.alloc(Edit, items.len);
    for (items, edits, 0..) |item, *e, i| e.* = try edit(cfg, item, cfg.index(at_e, i));
    var ops: BodyOps = .{ .edits = edits };
    if (obj.get("max_bytes")) |m| ops.max_bytes = @intCast(try cfg.integer(m, cfg.path(at, "max_bytes"), 1, 16 * 1024 * 1024));
    if (obj.get("max_depth")) |m| ops.max_depth = @intCast(try cfg.integer(m, cfg.path(at, "max_depth"), 1, 256));
    if (obj.get("on_invalid")) |p| ops.on_invalid = try cfg.choice(Policy, p, cfg.path(at, "on_invalid"));
    if (obj.get("on_oversized")) |p| ops.on_oversized = try cfg.choice(Policy, p, cfg.path(at, "on_oversized"));
    return ops;
}

const EditOp = enum { set, remove, rename, uppercase, lowercase };

fn edit(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!Edit {
    const obj = try cfg.object(v, at, &.{ "op", "pointer", "value", "to" });
    const op = try cfg.choice(EditOp, obj.get("op") orelse return cfg.fail("{s}: missing \"op\"", .{at}), cfg.path(at, "op"));
    const at_p = cfg.path(at, "pointer");
    const pointer = try jsonPointer(cfg, obj.get("pointer") orelse return cfg.fail("{s}: missing \"pointer\"", .{at}), at_p);
    if (op != .set and obj.contains("value")) return cfg.fail("{s}: \"value\" only belongs to op \"set\"", .{at});
    if (op != .rename and obj.contains("to")) return cfg.fail("{s}: \"to\" only belongs to op \"rename\"", .{at});
    return switch (op) {
        .set => .{ .set = .{
            .pointer = pointer,
            .value = obj.get("value") orelse return cfg.fail("{s}: op \"set\" needs \"value\"", .{at}),
        } },
        .remove => .{ .remove = pointer },
        .rename => blk: {
            const at_t = cfg.path(at, "to");
            const to = try cfg.string(obj.get("to") orelse return cfg.fail("{s}: op \"rename\" needs \"to\" (the new member name)", .{at}), at_t);
            if (to.len == 0) return cfg.fail("{s}: the new member name is empty", .{at_t});
            break :blk .{ .rename = .{ .pointer = pointer, .to = to } };
        },
        .uppercase => .{ .uppercase = pointer },
        .lowercase => .{ .lowercase = pointer },
    };
}

/// RFC 6901: "/a/b~1c/0" -> ["a", "b/c", "0"]. The whole document ("") cannot be edited.
fn jsonPointer(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const []const u8 {
    const s = try cfg.string(v, at);
    if (s.len == 0 or s[0] != '/') return cfg.fail("{s}: a JSON pointer starts with \"/\" (got \"{s}\")", .{ at, s });
    var tokens: std.ArrayListUnmanaged([]const u8) = .{};
    var it = std.mem.splitScalar(u8, s[1..], '/');
    while (it.next()) |raw| {
        var tok: std.ArrayListUnmanaged(u8) = .{};
        var i: usize = 0;
        while (i < raw.len) : (i += 1) {
            if (raw[i] == '~') {
                if (i + 1 >= raw.len or (raw[i + 1] != '0' and raw[i + 1] != '1'))
                    return cfg.fail("{s}: \"~\" must be followed by 0 or 1 in \"{s}\"", .{ at, s });
                try tok.append(cfg.alloc, if (raw[i + 1] == '0') '~' else '/');
                i += 1;
            } else try tok.append(cfg.alloc, raw[i]);
        }
        try tokens.append(cfg.alloc, tok.items);
    }
    return tokens.items;
}

// ------------------------------------------------------------------------------------------------ requests

const BodyMode = enum(u8) { none, buffer, passthrough };

pub const Http = struct {
    request_body: BodyMode = .none,
    response_body: BodyMode = .none,
};

pub fn onRequestHeaders(h: *Http, _: u32, eos: bool) proxy.Action {
    const d = request_ops;
    // Response body edits need an uncompressed upstream answer: the request must not offer compression.
    const edits_response_body = response_ops.body != null;
    if (d.empty() and !edits_response_body) return .@"continue";
    var list: proxy.HeaderList = .{};
    const hs = Headers.open(.request_headers, &list, d.headers.rename.len > 0) catch return hostFailure("request headers");
    applyHeaderOps(hs, d.headers) catch return hostFailure("request headers");
    if (d.path.len > 0 or !d.query.empty()) rewritePath(hs, d) catch return hostFailure("request path");
    if (edits_response_body) hs.remove("accept-encoding");
    var action: proxy.Action = .@"continue";
    if (d.body) |b| {
        if (!eos) action = startBody(&h.request_body, hs, b, false);
    }
    hs.close() catch return hostFailure("request headers");
    return action;
}

pub fn onRequestBody(h: *Http, size: u32, eos: bool) proxy.Action {
    return bodyChunk(&h.request_body, request_ops.body orelse return .@"continue", size, eos, false);
}

pub fn onResponseHeaders(h: *Http, _: u32, eos: bool) proxy.Action {
    const d = response_ops;
    if (d.empty()) return .@"continue";
    var list: proxy.HeaderList = .{};
    const hs = Headers.open(.response_headers, &list, d.headers.rename.len > 0) catch return hostFailure("response headers");
    applyHeaderOps(hs, d.headers) catch return hostFailure("response headers");
    var action: proxy.Action = .@"continue";
    if (d.body) |b| {
        if (!eos) action = startBody(&h.response_body, hs, b, true);
    }
    hs.close() catch return hostFailure("response headers");
    return action;
}

pub fn onResponseBody(h: *Http, size: u32, eos: bool) proxy.Action {
    return bodyChunk(&h.response_body, response_ops.body orelse return .@"continue", size, eos, true);
}

fn hostFailure(what: []const u8) proxy.Action {
    proxy.log(.err, "transform: could not edit the {s} (host call failed)", .{what});
    return .@"continue";
}

/// A header map edited through single host calls, or, when a rename needs every value of a header
/// (Set-Cookie must not be comma-joined), through a local copy written back with one call.
const Headers = struct {
    map: proxy.MapType,
    list: ?*proxy.HeaderList,

    fn open(map: proxy.MapType, list: *proxy.HeaderList, copy: bool) proxy.HostError!Headers {
        if (!copy) return .{ .map = map, .list = null };
        list.* = try proxy.HeaderList.fetch(map);
        return .{ .map = map, .list = list };
    }

    fn close(self: Headers) proxy.HostError!void {
        if (self.list) |l| try l.store(self.map);
    }

    fn get(self: Headers, name: []const u8) ?[]const u8 {
        if (self.list) |l| return l.get(name);
        return proxy.getHeader(self.map, name);
    }

    fn remove(self: Headers, name: []const u8) void {
        if (self.list) |l| _ = l.remove(name) else proxy.removeHeader(self.map, name);
    }

    fn set(self: Headers, name: []const u8, value: []const u8) proxy.HostError!void {
        if (self.list) |l| try l.set(name, value) else proxy.replaceHeader(self.map, name, value);
    }

    fn add(self: Headers, name: []const u8, value: []const u8) proxy.HostError!void {
        if (self.list) |l| try l.add(name, value) else proxy.addHeader(self.map, name, value);
    }
};

fn applyHeaderOps(hs: Headers, ops: HeaderOps) proxy.HostError!void {
    for (ops.remove) |name| hs.remove(name);
    if (hs.list) |list| {
        for (ops.rename) |r| {
            // A rename replaces whatever the target held before.
            if (list.count(r.from) > 0) {
                _ = list.remove(r.to);
                _ = list.rename(r.from, r.to);
            }
        }
    }
    for (ops.set) |hd| try hs.set(hd.name, hd.value);
    for (ops.add) |hd| try hs.add(hd.name, hd.value);
}

// ------------------------------------------------------------------------------------------------ path and query

fn rewritePath(hs: Headers, d: Direction) proxy.HostError!void {
    const original = hs.get(":path") orelse return;
    const q = std.mem.indexOfScalar(u8, original, '?');
    var path: []const u8 = if (q) |i| original[0..i] else original;
    var query: []const u8 = if (q) |i| original[i + 1 ..] else "";
    const a = proxy.scratch;
    for (d.path) |rule| {
        switch (rule) {
            .strip_prefix => |p| if (prefixRest(path, p)) |rest| {
                path = if (rest.len == 0) "/" else if (rest[0] != '/') try std.mem.concat(a, u8, &.{ "/", rest }) else rest;
            },
            .replace_prefix => |r| if (prefixRest(path, r.from)) |rest| {
                path = try joinPath(a, r.to, rest);
            },
            .add_prefix => |p| path = try joinPath(a, p, path),
            .template => |t| if (try matchTemplate(a, t, path)) |target| {
                if (std.mem.indexOfScalar(u8, target, '?')) |i| {
                    query = if (query.len == 0) target[i + 1 ..] else try std.mem.concat(a, u8, &.{ target[i + 1 ..], "&", query });
                    path = target[0..i];
                } else path = target;
            },
        }
    }
    if (!d.query.empty()) query = try editQuery(a, query, d.query);
    const new = if (query.len == 0) path else try std.mem.concat(a, u8, &.{ path, "?", query });
    if (!std.mem.eql(u8, new, original)) try hs.set(":path", new);
}

/// What follows `prefix` when `path` starts with it at a segment boundary ("/api" matches "/api" and
/// "/api/x", not "/apix").
fn prefixRest(path: []const u8, prefix: []const u8) ?[]const u8 {
    if (!std.mem.startsWith(u8, path, prefix)) return null;
    const rest = path[prefix.len..];
    if (rest.len == 0 or rest[0] == '/' or prefix[prefix.len - 1] == '/') return rest;
    return null;
}

fn joinPath(a: std.mem.Allocator, prefix: []const u8, rest: []const u8) ![]const u8 {
    if (rest.len == 0) return prefix;
    if (prefix[prefix.len - 1] == '/' and rest[0] == '/') return std.mem.concat(a, u8, &.{ prefix, rest[1..] });
    if (prefix[prefix.len - 1] != '/' and rest[0] != '/') return std.mem.concat(a, u8, &.{ prefix, "/", rest });
    return std.mem.concat(a, u8, &.{ prefix, rest });
}

fn matchTemplate(a: std.mem.Allocator, t: Template, path: []const u8) !?[]const u8 {
    var captures: [32][]const u8 = undefined;
    if (t.segments.len > captures.len) return null;
    var pos: usize = 1; // after the leading "/"
    var at_end = false;
    for (t.segments) |seg| {
        if (seg == .rest) {
            captures[seg.rest] = if (at_end) "" else path[pos..];
            at_end = true;
            pos = path.len;
            break;
        }
        if (at_end) return null;
        const end = std.mem.indexOfScalarPos(u8, path, pos, '/') orelse path.len;
        const piece = path[pos..end];
        switch (seg) {
            .literal => |l| if (!std.mem.eql(u8, l, piece)) return null,
            .capture => |i| {
                if (piece.len == 0) return null;
                captures[i] = piece;
            },
            .rest => unreachable,
        }
        if (end == path.len) at_end = true else pos = end + 1;
    }
    if (!at_end) return null;
    var out: std.ArrayListUnmanaged(u8) = .{};
    for (t.to) |part| switch (part) {
        .literal => |l| try out.appendSlice(a, l),
        .capture => |i| try out.appendSlice(a, captures[i]),
    };
    return out.items;
}

fn editQuery(a: std.mem.Allocator, query: []const u8, ops: QueryOps) ![]const u8 {
    var out: std.ArrayListUnmanaged(u8) = .{};
    var it = std.mem.splitScalar(u8, query, '&');
    while (it.next()) |param| {
        if (param.len == 0) continue;
        const raw_name = param[0 .. std.mem.indexOfScalar(u8, param, '=') orelse param.len];
        const name = try percentDecode(a, raw_name);
        if (inList(name, ops.remove) or inParams(name, ops.set)) continue;
        if (out.items.len > 0) try out.append(a, '&');
        try out.appendSlice(a, param);
    }
    for (ops.set) |p| {
        if (out.items.len > 0) try out.append(a, '&');
        try out.appendSlice(a, p.encoded);
    }
    for (ops.add) |p| {
        if (out.items.len > 0) try out.append(a, '&');
        try out.appendSlice(a, p.encoded);
    }
    return out.items;
}

fn inList(name: []const u8, names: []const []const u8) bool {
    for (names) |n| {
        if (std.mem.eql(u8, n, name)) return true;
    }
    return false;
}

fn inParams(name: []const u8, ps: []const Param) bool {
    for (ps) |p| {
        if (std.mem.eql(u8, p.name, name)) return true;
    }
    return false;
}

/// Query-component decoding: %XX and "+" as space (so "debu%67" cannot dodge a removal of "debug").
fn percentDecode(a: std.mem.Allocator, s: []const u8) ![]const u8 {
    if (std.mem.indexOfAny(u8, s, "%+") == null) return s;
    const out = try a.alloc(u8, s.len);
    var n: usize = 0;
    var i: usize = 0;
    while (i < s.len) : (i += 1) {
        if (s[i] == '+') {
            out[n] = ' ';
        } else if (s[i] == '%' and i + 2 < s.len) {
            const hi = std.fmt.charToDigit(s[i + 1], 16) catch 255;
            const lo = std.fmt.charToDigit(s[i + 2], 16) catch 255;
            if (hi < 16 and lo < 16) {
                out[n] = hi * 16 + lo;
                i += 2;
            } else out[n] = '%';
        } else out[n] = s[i];
        n += 1;
    }
    return out[0..n];
}

fn percentEncode(out: *std.ArrayListUnmanaged(u8), a: std.mem.Allocator, s: []const u8) !void {
    for (s) |c| {
        if (std.ascii.isAlphanumeric(c) or c == '-' or c == '.' or c == '_' or c == '~') {
            try out.append(a, c);
        } else {
            try out.writer(a).print("%{X:0>2}", .{c});
        }
    }
}

// ------------------------------------------------------------------------------------------------ bodies

fn isJson(content_type: []const u8) bool {
    const media = std.mem.trim(u8, std.mem.sliceTo(content_type, ';'), " \t");
    if (std.ascii.eqlIgnoreCase(media, "application/json")) return true;
    return std.ascii.endsWithIgnoreCase(media, "+json") and std.mem.indexOfScalar(u8, media, '/') != null;
}

/// Headers of a message with a body: decide whether to buffer it for editing.
fn startBody(mode: *BodyMode, hs: Headers, ops: BodyOps, is_response: bool) proxy.Action {
    const json = if (hs.get("content-type")) |ct| isJson(ct) else false;
    const encoded = if (hs.get("content-encoding")) |ce| !std.ascii.eqlIgnoreCase(ce, "identity") else false;
    if (!json or encoded) {
        if (ops.on_invalid == .reject) {
            reject(is_response, if (is_response) 502 else 415, if (is_response) "upstream_body_not_json" else "unsupported_media_type");
            return .pause;
        }
        mode.* = .passthrough;
        return .@"continue";
    }
    if (hs.get("content-length")) |cl| {
        const n = std.fmt.parseInt(u64, std.mem.trim(u8, cl, " \t"), 10) catch 0;
        if (n > ops.max_bytes) {
            if (ops.on_oversized == .reject) {
                reject(is_response, if (is_response) 502 else 413, "body_too_large");
                return .pause;
            }
            mode.* = .passthrough;
            return .@"continue";
        }
    }
    mode.* = .buffer;
    return .pause;
}

fn bodyChunk(mode: *BodyMode, ops: BodyOps, size: u32, eos: bool, is_response: bool) proxy.Action {
    if (mode.* != .buffer) return .@"continue";
    if (size > ops.max_bytes) {
        if (ops.on_oversized == .reject) {
            reject(is_response, if (is_response) 502 else 413, "body_too_large");
            return .pause;
        }
        mode.* = .passthrough;
        return .@"continue";
    }
    if (!eos) return .pause;
    mode.* = .none;
    const buffer: proxy.BufferType = if (is_response) .response_body else .request_body;
    const map: proxy.MapType = if (is_response) .response_headers else .request_headers;
    const body = proxy.getBuffer(buffer, 0, size) catch return hostFailure("body");
    const edited = editJson(body, ops) catch |e| {
        if (e == error.OutOfMemory) return hostFailure("body (out of memory)");
        proxy.log(.debug, "transform: body left as is: {s}", .{@errorName(e)});
        if (ops.on_invalid == .reject) {
            reject(is_response, if (is_response) 502 else 400, if (is_response) "upstream_body_not_json" else "invalid_json_body");
            return .pause;
        }
        return .@"continue";
    };
    proxy.replaceBuffer(buffer, edited) catch return hostFailure("body");
    var num: [20]u8 = undefined;
    const len_text = std.fmt.bufPrint(&num, "{d}", .{edited.len}) catch unreachable;
    proxy.replaceHeader(map, "content-length", len_text);
    proxy.removeHeader(map, "transfer-encoding");
    return .@"continue";
}

fn reject(is_response: bool, code: u32, reason: []const u8) void {
    _ = is_response;
    const body = std.fmt.allocPrint(proxy.scratch, "{{\"error\":\"{s}\",\"status\":{d}}}", .{ reason, code }) catch "{}";
    proxy.sendLocalResponse(code, reason, body, &.{.{ .name = "content-type", .value = "application/json" }});
}

const EditError = error{ OutOfMemory, TooDeep, NotJson };

fn editJson(body: []const u8, ops: BodyOps) EditError![]const u8 {
    if (!depthWithin(body, ops.max_depth)) return error.TooDeep;
    const a = proxy.scratch;
    var doc = std.json.parseFromSliceLeaky(Value, a, body, .{ .parse_numbers = false }) catch |e| switch (e) {
        error.OutOfMemory => return error.OutOfMemory,
        else => return error.NotJson,
    };
    for (ops.edits) |e| try apply(a, &doc, e);
    return std.json.stringifyAlloc(a, doc, .{}) catch error.OutOfMemory;
}

/// Nesting depth check before parsing: stringify recurses, and the Wasm stack is small.
fn depthWithin(text: []const u8, max: usize) bool {
    var depth: usize = 0;
    var in_string = false;
    var escaped = false;
    for (text) |c| {
        if (in_string) {
            if (escaped) {
                escaped = false;
            } else if (c == '\\') {
                escaped = true;
            } else if (c == '"') in_string = false;
            continue;
        }
        switch (c) {
            '"' => in_string = true,
            '{', '[' => {
                depth += 1;
                if (depth > max) return false;
            },
            '}', ']' => depth -|= 1,
            else => {},
        }
    }
    return true;
}

fn apply(a: std.mem.Allocator, doc: *Value, e: Edit) EditError!void {
    switch (e) {
        .set => |s| {
            const parent = try walk(a, doc, s.pointer[0 .. s.pointer.len - 1], true) orelse return;
            const key = s.pointer[s.pointer.len - 1];
            const value = try clone(a, s.value);
            switch (parent.*) {
                .object => |*o| try o.put(key, value),
                .array => |*arr| {
                    if (std.mem.eql(u8, key, "-")) return arr.append(value);
                    const i = arrayIndex(key) orelse return;
                    if (i < arr.items.len) {
                        arr.items[i] = value;
                    } else if (i == arr.items.len) try arr.append(value);
                },
                else => {},
            }
        },
        .remove => |p| {
            const parent = try walk(a, doc, p[0 .. p.len - 1], false) orelse return;
            const key = p[p.len - 1];
            switch (parent.*) {
                .object => |*o| _ = o.orderedRemove(key),
                .array => |*arr| {
                    const i = arrayIndex(key) orelse return;
                    if (i < arr.items.len) _ = arr.orderedRemove(i);
                },
                else => {},
            }
        },
        .rename => |r| {
            const parent = try walk(a, doc, r.pointer[0 .. r.pointer.len - 1], false) orelse return;
            if (parent.* != .object) return;
            const old = &parent.object;
            const key = r.pointer[r.pointer.len - 1];
            if (!old.contains(key) or std.mem.eql(u8, key, r.to)) return;
            // Rebuild to keep the member where it was.
            var renamed = proxy.ObjectMap.init(a);
            try renamed.ensureTotalCapacity(old.count());
            var it = old.iterator();
            while (it.next()) |entry| {
                const k = entry.key_ptr.*;
                if (std.mem.eql(u8, k, r.to)) continue;
                renamed.putAssumeCapacity(if (std.mem.eql(u8, k, key)) r.to else k, entry.value_ptr.*);
            }
            old.* = renamed;
        },
        .uppercase, .lowercase => |p| {
            const target = try walk(a, doc, p, false) orelse return;
            if (target.* != .string) return;
            target.* = .{ .string = if (e == .uppercase)
                try std.ascii.allocUpperString(a, target.string)
            else
                try std.ascii.allocLowerString(a, target.string) };
        },
    }
}

fn arrayIndex(token: []const u8) ?usize {
    if (token.len == 0 or (token.len > 1 and token[0] == '0')) return null;
    return std.fmt.parseInt(usize, token, 10) catch null;
}

/// The value at `tokens` (null when absent). With `create`, missing object members become objects.
fn walk(a: std.mem.Allocator, doc: *Value, tokens: []const []const u8, create: bool) EditError!?*Value {
    var cur = doc;
    for (tokens) |t| {
        switch (cur.*) {
            .object => |*o| {
                if (o.getPtr(t)) |next| {
                    cur = next;
                } else if (create) {
                    try o.put(t, .{ .object = proxy.ObjectMap.init(a) });
                    cur = o.getPtr(t).?;
                } else return null;
            },
            .array => |*arr| {
                const i = arrayIndex(t) orelse return null;
                if (i >= arr.items.len) return null;
                cur = &arr.items[i];
            },
            else => return null,
        }
    }
    return cur;
}

/// A deep copy, so edits of the document never touch the configuration's values.
fn clone(a: std.mem.Allocator, v: Value) EditError!Value {
    return switch (v) {
        .array => |arr| blk: {
            var out = std.json.Array.init(a);
            try out.ensureTotalCapacity(arr.items.len);
            for (arr.items) |item| out.appendAssumeCapacity(try clone(a, item));
            break :blk .{ .array = out };
        },
        .object => |o| blk: {
            var out = proxy.ObjectMap.init(a);
            try out.ensureTotalCapacity(o.count());
            var it = o.iterator();
            while (it.next()) |entry| out.putAssumeCapacity(entry.key_ptr.*, try clone(a, entry.value_ptr.*));
            break :blk .{ .object = out };
        },
        else => v,
    };
}
