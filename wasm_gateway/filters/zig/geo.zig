//! geo: acts on where the client is, as the gateway's geo database tells it through properties.
//!
//! The gateway looks the client address up (see wasm_gateway/geo.py) and offers the result as the
//! properties geo.country, geo.region, geo.region_name, geo.city, geo.asn, geo.as_org and geo.private,
//! and all of them as the map property "geo" (read with one host call when two or more are needed).
//! This filter, on request headers:
//!   1. refuses clients by country (allow or deny list; private and unknown addresses by policy): 403 JSON;
//!   2. answers a configured path itself with the client's geo JSON (an edge function);
//!   3. removes client-sent geo headers, then adds the configured ones for the upstream.
//! Configuration reference: docs/filters/geo.md.
const std = @import("std");
const proxy = @import("proxy_wasm.zig");
const Value = proxy.Value;

pub const panic = std.debug.FullPanic(proxy.panicHandler);

comptime {
    proxy.register(@This());
}

const max_headers = 16;
const max_strip = 16;
const max_countries = 512;
const max_path = 1024;

// ------------------------------------------------------------------------------------------------ configuration

/// A geo property, named as in the configuration and the answer JSON.
const Field = enum { country, region, region_name, city, asn, as_org, private };
const field_count = @typeInfo(Field).@"enum".fields.len;

/// Property paths as the host takes them (segments joined by NUL): "geo\x00country", ...
const property_paths = blk: {
    var paths: [field_count][]const u8 = undefined;
    for (@typeInfo(Field).@"enum".fields, 0..) |f, i| paths[i] = "geo\x00" ++ f.name;
    break :blk paths;
};

const GeoHeader = struct { name: []const u8, field: Field };

/// A header name, or a prefix (configured as "x-geo-*").
const Strip = struct { name: []const u8, prefix: bool };

const Policy = enum { allow, deny };

const Settings = struct {
    headers: []const GeoHeader = &.{},
    strip: []const Strip = &.{},
    /// Upper-case ISO 3166-1 alpha-2 codes; empty: no such list.
    allow: []const [2]u8 = &.{},
    deny: []const [2]u8 = &.{},
    unknown: Policy = .allow,
    private: Policy = .allow,
    answer_path: ?[]const u8 = null,
    /// Whether the access check can refuse anything (saves the property reads when it cannot).
    checks_access: bool = false,
    /// Whether `strip` has prefixes (the header names must be read to find them).
    strip_prefixes: bool = false,
    /// How many distinct fields a request that passes reads.
    fields_per_request: usize = 0,
};

var settings: Settings = .{};

/// Headers a geo value may not be written to: framing and routing are the gateway's business.
const managed_headers = [_][]const u8{ "content-length", "transfer-encoding", "connection", "upgrade", "host", "te", "trailer", "keep-alive" };

pub fn configure(cfg: *proxy.Config, root: Value) proxy.ConfigError!void {
    const top = try cfg.object(root, "", &.{ "headers", "strip", "allow_countries", "deny_countries", "unknown", "private", "answer_path" });
    var s: Settings = .{};
    if (top.get("headers")) |v| s.headers = try geoHeaders(cfg, v, "headers");
    if (top.get("strip")) |v| s.strip = try stripList(cfg, v, "strip");
    if (top.get("allow_countries")) |v| s.allow = try countries(cfg, v, "allow_countries");
    if (top.get("deny_countries")) |v| s.deny = try countries(cfg, v, "deny_countries");
    if (top.get("allow_countries") != null and top.get("deny_countries") != null)
        return cfg.fail("allow_countries, deny_countries: set one of them, not both", .{});
    // Only listed countries pass an allow list, so by default neither do clients of no known country.
    s.unknown = if (top.get("unknown")) |v| try cfg.choice(Policy, v, "unknown") else if (s.allow.len > 0) .deny else .allow;
    s.private = if (top.get("private")) |v| try cfg.choice(Policy, v, "private") else s.unknown;
    if (top.get("answer_path")) |v| s.answer_path = try answerPath(cfg, v, "answer_path");
    for (s.strip) |st| s.strip_prefixes = s.strip_prefixes or st.prefix;
    var fields = std.EnumSet(Field).initEmpty();
    for (s.headers) |h| fields.insert(h.field);
    s.checks_access = s.allow.len > 0 or s.deny.len > 0 or s.unknown == .deny or s.private == .deny;
    if (s.checks_access) fields.insert(.country);
    s.fields_per_request = fields.count();
    settings = s;
    missing_warned = false;
}

fn geoHeaders(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const GeoHeader {
    if (v != .object)
        return cfg.fail("{s}: expected an object of header names to geo fields (e.g. {{\"x-geo-country\": \"country\"}}), got {s}", .{ at, proxy.kind(v) });
    const m = v.object;
    if (m.count() > max_headers) return cfg.fail("{s}: at most {d} headers", .{ at, max_headers });
    const out = try cfg.alloc.alloc(GeoHeader, m.count());
    for (m.keys(), m.values(), 0..) |k, val, i| {
        const at_k = cfg.path(at, k);
        const name = try cfg.headerName(.{ .string = k }, at_k);
        for (managed_headers) |managed| {
            if (std.mem.eql(u8, managed, name))
                return cfg.fail("{s}: \"{s}\" is managed by the gateway and cannot carry a geo value", .{ at_k, name });
        }
        for (out[0..i]) |other| {
            if (std.mem.eql(u8, other.name, name))
                return cfg.fail("{s}: \"{s}\" is configured twice (header names are case-insensitive)", .{ at_k, name });
        }
        out[i] = .{ .name = name, .field = try cfg.choice(Field, val, at_k) };
    }
    return out;
}

fn stripList(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const Strip {
    const items = try cfg.array(v, at);
    if (items.len > max_strip) return cfg.fail("{s}: at most {d} entries", .{ at, max_strip });
    const out = try cfg.alloc.alloc(Strip, items.len);
    for (items, out, 0..) |item, *o, i| {
        const at_i = cfg.index(at, i);
        const s = try cfg.string(item, at_i);
        const prefix = s.len > 0 and s[s.len - 1] == '*';
        const name = if (prefix) s[0 .. s.len - 1] else s;
        if (prefix and name.len < 2)
            return cfg.fail("{s}: \"{s}\": a prefix needs at least two characters before the '*'", .{ at_i, s });
        if (!proxy.isToken(name))
            return cfg.fail("{s}: \"{s}\" is not a header name or a header-name prefix ending in '*'", .{ at_i, s });
        o.* = .{ .name = try cfg.lower(name), .prefix = prefix };
    }
    return out;
}

fn countries(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const [2]u8 {
    const items = try cfg.array(v, at);
    if (items.len == 0) return cfg.fail("{s}: at least one country code is needed (or leave it out)", .{at});
    if (items.len > max_countries) return cfg.fail("{s}: at most {d} country codes", .{ at, max_countries });
    const out = try cfg.alloc.alloc([2]u8, items.len);
    for (items, out, 0..) |item, *o, i| {
        const at_i = cfg.index(at, i);
        const s = try cfg.string(item, at_i);
        if (s.len != 2 or !std.ascii.isAlphabetic(s[0]) or !std.ascii.isAlphabetic(s[1]))
            return cfg.fail("{s}: \"{s}\" is not an ISO 3166-1 alpha-2 country code (two letters, e.g. \"DE\")", .{ at_i, s });
        o.* = .{ std.ascii.toUpper(s[0]), std.ascii.toUpper(s[1]) };
    }
    return out;
}

fn answerPath(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const u8 {
    const s = try cfg.string(v, at);
    if (s.len == 0 or s[0] != '/' or s.len > max_path)
        return cfg.fail("{s}: \"{s}\" must be a path starting with '/' (at most {d} bytes)", .{ at, s, max_path });
    for (s) |c| {
        if (c <= ' ' or c == 0x7f or c == '?' or c == '#')
            return cfg.fail("{s}: \"{s}\" may not contain '?', '#', spaces or control characters", .{ at, s });
    }
    return s;
}

// ------------------------------------------------------------------------------------------------ requests

pub const Http = struct {};

/// Set once the missing-properties warning was logged (per instance and configuration).
var missing_warned = false;

fn warnMissing() void {
    if (missing_warned) return;
    missing_warned = true;
    proxy.log(.warn, "geo: the gateway offers no geo properties (is a geo database configured?); every client counts as unknown", .{});
}

/// The geo properties of the current request, read from the host on first use: the whole record at once
/// from the map property "geo" when the host offers it (one host call), or one property per field.
const Props = struct {
    /// Read the "geo" map (worth it when two or more fields are needed; one small property is cheaper).
    use_map: bool,
    loaded: bool = false,
    /// Values came from the "geo" map: text ("15169", "true"), not Envoy's typed encodings.
    from_map: bool = false,
    values: [field_count]?[]const u8 = [_]?[]const u8{null} ** field_count,
    read: [field_count]bool = [_]bool{false} ** field_count,

    fn load(self: *Props) void {
        if (self.loaded or !self.use_map) return;
        self.loaded = true;
        const data = proxy.getProperty("geo") orelse return warnMissing();
        const pairs = proxy.decodePairs(proxy.scratch, data) catch return;
        self.from_map = true;
        self.read = [_]bool{true} ** field_count;
        self.values = [_]?[]const u8{null} ** field_count;
        for (pairs) |pair| {
            inline for (@typeInfo(Field).@"enum".fields, 0..) |f, i| {
                if (std.mem.eql(u8, pair.name, f.name)) self.values[i] = pair.value;
            }
        }
    }

    fn get(self: *Props, f: Field) ?[]const u8 {
        self.load();
        const i = @intFromEnum(f);
        if (!self.read[i]) {
            self.values[i] = proxy.getProperty(property_paths[i]);
            self.read[i] = true;
        }
        return self.values[i];
    }

    fn text(self: *Props, f: Field) ?[]const u8 {
        const v = self.get(f) orelse return null;
        return if (v.len == 0) null else v;
    }

    fn asn(self: *Props) ?u64 {
        const v = self.get(.asn) orelse return null;
        const n = if (self.from_map)
            std.fmt.parseInt(u64, v, 10) catch return null
        else if (v.len == 8)
            std.mem.readInt(u64, v[0..8], .little)
        else
            return null;
        return if (n == 0) null else n;
    }

    fn private(self: *Props) ?bool {
        const v = self.get(.private) orelse return null;
        if (self.from_map) return std.mem.eql(u8, v, "true");
        return if (v.len == 1) v[0] != 0 else null;
    }

    /// The client's country code, or null for a private or unknown address.
    fn country(self: *Props) ?[2]u8 {
        // The gateway always sets geo.country when it has a database ("" when the address is unknown).
        const v = self.get(.country) orelse {
            if (!self.from_map) warnMissing();
            return null;
        };
        if (v.len != 2 or !std.ascii.isAlphabetic(v[0]) or !std.ascii.isAlphabetic(v[1])) return null;
        return .{ std.ascii.toUpper(v[0]), std.ascii.toUpper(v[1]) };
    }
};

pub fn onRequestHeaders(_: *Http, _: u32, _: bool) proxy.Action {
    const s = settings;
    var props: Props = .{ .use_map = s.fields_per_request >= 2 };
    if (s.checks_access) {
        if (refusal(s, &props)) |country| return forbidden(country);
    }
    if (s.answer_path) |answer| {
        if (isAnswerPath(answer)) {
            props.use_map = true; // every field
            return answerGeo(&props);
        }
    }
    if (s.headers.len > 0 or s.strip.len > 0) {
        setHeaders(s, &props) catch proxy.log(.err, "geo: could not edit the request headers (host call failed)", .{});
    }
    return .@"continue";
}

/// Why the request is refused: the client's country ("" for private and unknown), or null to let it pass.
fn refusal(s: Settings, props: *Props) ?[]const u8 {
    const code = props.country() orelse {
        const policy = if (props.private() orelse false) s.private else s.unknown;
        return if (policy == .deny) "" else null;
    };
    if (s.allow.len > 0 and !listed(s.allow, code)) return proxy.scratch.dupe(u8, &code) catch "";
    if (listed(s.deny, code)) return proxy.scratch.dupe(u8, &code) catch "";
    return null;
}

fn listed(list: []const [2]u8, code: [2]u8) bool {
    for (list) |c| {
        if (c[0] == code[0] and c[1] == code[1]) return true;
    }
    return false;
}

fn forbidden(country: []const u8) proxy.Action {
    const body = if (country.len == 2)
        std.fmt.allocPrint(proxy.scratch, "{{\"error\":\"forbidden\",\"country\":\"{s}\"}}", .{country}) catch "{\"error\":\"forbidden\"}"
    else
        "{\"error\":\"forbidden\",\"country\":null}";
    if (proxy.logEnabled(.debug)) proxy.log(.debug, "geo: refused a client from \"{s}\"", .{country});
    proxy.sendLocalResponse(403, "geo_forbidden", body, &.{.{ .name = "content-type", .value = "application/json" }});
    return .pause;
}

fn isAnswerPath(answer: []const u8) bool {
    const target = proxy.getHeader(.request_headers, ":path") orelse return false;
    const path = target[0 .. std.mem.indexOfScalar(u8, target, '?') orelse target.len];
    return std.mem.eql(u8, path, answer);
}

/// Answers with the client's geo JSON: {"ip":..,"country":..,"region":..,"region_name":..,"city":..,
/// "asn":..,"as_org":..,"private":..}; absent values are null.
fn answerGeo(props: *Props) proxy.Action {
    const method = proxy.getHeader(.request_headers, ":method") orelse "GET";
    if (!std.mem.eql(u8, method, "GET") and !std.mem.eql(u8, method, "HEAD")) {
        proxy.sendLocalResponse(405, "geo_method_not_allowed", "{\"error\":\"method_not_allowed\"}", &.{
            .{ .name = "content-type", .value = "application/json" },
            .{ .name = "allow", .value = "GET, HEAD" },
        });
        return .pause;
    }
    const body = geoJson(props) catch {
        proxy.log(.err, "geo: out of memory building the answer", .{});
        return .@"continue";
    };
    proxy.sendLocalResponse(200, "geo_answer", body, &.{
        .{ .name = "content-type", .value = "application/json" },
        // The answer depends on who asks: no shared cache may keep it.
        .{ .name = "cache-control", .value = "no-store" },
    });
    return .pause;
}

fn geoJson(props: *Props) error{OutOfMemory}![]const u8 {
    var out: std.ArrayListUnmanaged(u8) = .{};
    const a = proxy.scratch;
    try out.appendSlice(a, "{\"ip\":");
    try jsonString(&out, if (proxy.getProperty("source\x00address")) |addr| hostOf(addr) else null);
    inline for (.{ Field.country, Field.region, Field.region_name, Field.city }) |f| {
        try out.appendSlice(a, ",\"" ++ @tagName(f) ++ "\":");
        try jsonString(&out, props.text(f));
    }
    try out.appendSlice(a, ",\"asn\":");
    if (props.asn()) |n| try out.writer(a).print("{d}", .{n}) else try out.appendSlice(a, "null");
    try out.appendSlice(a, ",\"as_org\":");
    try jsonString(&out, props.text(.as_org));
    try out.appendSlice(a, ",\"private\":");
    try out.appendSlice(a, if (props.private()) |p| (if (p) "true" else "false") else "null");
    try out.append(a, '}');
    return out.items;
}

fn jsonString(out: *std.ArrayListUnmanaged(u8), value: ?[]const u8) error{OutOfMemory}!void {
    const a = proxy.scratch;
    const v = value orelse return out.appendSlice(a, "null");
    try out.append(a, '"');
    for (v) |c| switch (c) {
        '"' => try out.appendSlice(a, "\\\""),
        '\\' => try out.appendSlice(a, "\\\\"),
        '\n' => try out.appendSlice(a, "\\n"),
        '\r' => try out.appendSlice(a, "\\r"),
        '\t' => try out.appendSlice(a, "\\t"),
        0...8, 11, 12, 14...0x1f, 0x7f => try out.writer(a).print("\\u{x:0>4}", .{c}),
        else => try out.append(a, c),
    };
    try out.append(a, '"');
}

/// "ip:port", "[v6]:port" or a bare address -> the address.
fn hostOf(address: []const u8) []const u8 {
    if (address.len > 0 and address[0] == '[') {
        const close = std.mem.indexOfScalar(u8, address, ']') orelse return address;
        return address[1..close];
    }
    if (std.mem.count(u8, address, ":") == 1) return address[0..std.mem.indexOfScalar(u8, address, ':').?];
    return address;
}

// ------------------------------------------------------------------------------------------------ headers

fn setHeaders(s: Settings, props: *Props) proxy.HostError!void {
    // Single host calls, no copy of the map written back: clients rarely send geo headers of their own,
    // so removals are rare; the configured headers are replaced (which drops every client copy) or removed.
    if (s.strip_prefixes) {
        const list = try proxy.HeaderList.fetch(.request_headers);
        for (list.items.items, 0..) |hd, i| {
            if (!stripped(s, hd.name)) continue;
            // Each name once (the host removes every value of a name).
            const seen = for (list.items.items[0..i]) |earlier| {
                if (std.ascii.eqlIgnoreCase(earlier.name, hd.name)) break true;
            } else false;
            if (!seen) proxy.removeHeader(.request_headers, hd.name);
        }
    } else {
        for (s.strip) |st| proxy.removeHeader(.request_headers, st.name);
    }
    for (s.headers) |h| {
        if (try headerValue(props, h.field)) |v| {
            proxy.replaceHeader(.request_headers, h.name, v);
        } else if (!s.strip_prefixes) {
            proxy.removeHeader(.request_headers, h.name);
        }
    }
}

fn stripped(s: Settings, name: []const u8) bool {
    for (s.strip) |st| {
        if (st.prefix) {
            if (name.len >= st.name.len and std.ascii.eqlIgnoreCase(name[0..st.name.len], st.name)) return true;
        } else if (std.ascii.eqlIgnoreCase(name, st.name)) return true;
    }
    for (s.headers) |h| {
        if (std.ascii.eqlIgnoreCase(name, h.name)) return true;
    }
    return false;
}

/// The header value of a field; null when the client's geo data has none.
fn headerValue(props: *Props, f: Field) proxy.HostError!?[]const u8 {
    return switch (f) {
        .asn => if (props.asn()) |n| try std.fmt.allocPrint(proxy.scratch, "{d}", .{n}) else null,
        .private => if (props.private()) |p| (if (p) "true" else "false") else null,
        else => if (props.text(f)) |v| try headerSafe(v) else null,
    };
}

/// Names may hold any UTF-8: bytes outside printable ASCII (and '%') are percent-encoded (RFC 3986),
/// so "Zürich" travels as "Z%C3%BCrich".
fn headerSafe(v: []const u8) proxy.HostError![]const u8 {
    var extra: usize = 0;
    for (v) |c| {
        if (needsEncoding(c)) extra += 2;
    }
    if (extra == 0) return v;
    const out = try proxy.scratch.alloc(u8, v.len + extra);
    var i: usize = 0;
    const hex = "0123456789ABCDEF";
    for (v) |c| {
        if (needsEncoding(c)) {
            out[i] = '%';
            out[i + 1] = hex[c >> 4];
            out[i + 2] = hex[c & 0xf];
            i += 3;
        } else {
            out[i] = c;
            i += 1;
        }
    }
    return out;
}

fn needsEncoding(c: u8) bool {
    return c < 0x20 or c >= 0x7f or c == '%';
}
