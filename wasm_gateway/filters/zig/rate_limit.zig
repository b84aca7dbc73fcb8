//! rate-limit: GCRA (generic cell rate algorithm) limits per key, kept in Proxy-Wasm shared data.
//!
//! Each rule has a key (client address, headers, route, or a combination) and one or more limits
//! ("10 per second and 1000 per hour"). A rule's limits live in one shared-data entry, updated with
//! compare-and-swap, so every instance and every process sharing the store counts the same requests:
//! the (n+1)th request within a window is refused, whichever instance serves it.
//! Configuration reference: docs/filters/rate-limit.md.
const std = @import("std");
const proxy = @import("proxy_wasm.zig");
const Value = proxy.Value;

pub const panic = std.debug.FullPanic(proxy.panicHandler);

comptime {
    proxy.register(@This());
}

/// At most this many limits over all rules (the per-request results are kept in fixed-size state).
const max_limits = 8;
const max_rules = 8;
const max_cas_attempts = 64;
const ns_per_s: u64 = std.time.ns_per_s;

// ------------------------------------------------------------------------------------------------ configuration

const KeyPart = union(enum) {
    client_ip,
    route,
    header: []const u8,
};

const Limit = struct {
    name: []const u8,
    requests: u64,
    window_s: u64,
    /// Emission interval: the time one request "costs".
    interval_ns: u64,
    /// Burst capacity in time units: requests * interval_ns (exactly `requests` at once).
    capacity_ns: u64,
};

const WhenMissing = enum { share, skip };

const Rule = struct {
    name: []const u8,
    key: []const KeyPart,
    limits: []const Limit,
    /// Index of this rule's first limit in the filter-wide list.
    first_limit: usize,
    when_missing: WhenMissing,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    /// Shared-data key prefix: "ratelimit:<scope>:<rule>:<limits signature>:".
    key_prefix: []const u8,
};

const HeaderStyle = enum { all, ietf, legacy, none };
const StoreErrorPolicy = enum { allow, deny };

const Settings = struct {
    rules: []const Rule = &.{},
    limits: []const Limit = &.{},
    headers: HeaderStyle = .all,
    on_store_error: StoreErrorPolicy = .allow,
    /// The `RateLimit-Policy` value (every limit): fixed for a configuration.
    policy_header: []const u8 = "",
};

var settings: Settings = .{};

pub fn configure(cfg: *proxy.Config, root: Value) proxy.ConfigError!void {
    const top = try cfg.object(root, "", &.{ "rules", "scope", "headers", "on_store_error" });
    var s: Settings = .{};
    const scope = if (top.get("scope")) |v| try cfg.string(v, "scope") else proxy.getProperty("plugin_name") orelse "";
    if (top.get("headers")) |v| s.headers = try cfg.choice(HeaderStyle, v, "headers");
    if (top.get("on_store_error")) |v| s.on_store_error = try cfg.choice(StoreErrorPolicy, v, "on_store_error");
    const rules_v = top.get("rules") orelse return cfg.fail("rules: missing (a list of rules, each with a key and limits)", .{});
    const items = try cfg.array(rules_v, "rules");
    if (items.len == 0) return cfg.fail("rules: at least one rule is needed", .{});
    if (items.len > max_rules) return cfg.fail("rules: at most {d} rules", .{max_rules});
    var rules = try cfg.alloc.alloc(Rule, items.len);
    var limits: std.ArrayListUnmanaged(Limit) = .{};
    for (items, 0..) |item, i| {
        rules[i] = try rule(cfg, item, cfg.index("rules", i), i, items.len, scope, &limits);
        for (rules[0..i]) |other| {
            if (std.mem.eql(u8, other.name, rules[i].name))
                return cfg.fail("{s}.name: \"{s}\" is used by another rule", .{ cfg.index("rules", i), other.name });
        }
    }
    for (limits.items, 0..) |l, i| {
        for (limits.items[0..i]) |other| {
            if (std.mem.eql(u8, l.name, other.name))
                return cfg.fail("rules: two limits are called \"{s}\" (give them distinct \"name\"s)", .{l.name});
        }
    }
    var policy: std.ArrayListUnmanaged(u8) = .{};
    for (limits.items, 0..) |l, i| {
        if (i > 0) try policy.appendSlice(cfg.alloc, ", ");
        try policy.writer(cfg.alloc).print("\"{s}\";q={d};w={d}", .{ l.name, l.requests, l.window_s });
    }
    s.rules = rules;
    s.limits = limits.items;
    s.policy_header = policy.items;
    settings = s;
}

fn rule(
    cfg: *proxy.Config,
    v: Value,
    at: []const u8,
    index: usize,
    count: usize,
    scope: []const u8,
    limits: *std.ArrayListUnmanaged(Limit),
) proxy.ConfigError!Rule {
    const obj = try cfg.object(v, at, &.{ "name", "key", "limits", "when_missing", "ipv4_prefix", "ipv6_prefix" });
    const name = if (obj.get("name")) |n|
        try policyName(cfg, n, cfg.path(at, "name"))
    else if (count == 1)
        "default"
    else
        try std.fmt.allocPrint(cfg.alloc, "rule{d}", .{index});

    const at_k = cfg.path(at, "key");
    const key_items = try cfg.array(obj.get("key") orelse return cfg.fail("{s}: missing (e.g. [\"client_ip\"])", .{at_k}), at_k);
    if (key_items.len == 0) return cfg.fail("{s}: at least one key part is needed", .{at_k});
    const key = try cfg.alloc.alloc(KeyPart, key_items.len);
    for (key_items, key, 0..) |item, *k, i| k.* = try keyPart(cfg, item, cfg.index(at_k, i));

    const at_l = cfg.path(at, "limits");
    const limit_items = try cfg.array(obj.get("limits") orelse return cfg.fail("{s}: missing (e.g. [{{\"requests\": 10, \"per\": \"1s\"}}])", .{at_l}), at_l);
    if (limit_items.len == 0) return cfg.fail("{s}: at least one limit is needed", .{at_l});
    const first = limits.items.len;
    if (first + limit_items.len > max_limits) return cfg.fail("{s}: at most {d} limits over all rules", .{ at_l, max_limits });
    var sig = std.hash.Wyhash.init(0);
    for (limit_items, 0..) |item, i| {
        const l = try limit(cfg, item, cfg.index(at_l, i), name, limit_items.len);
        sig.update(std.mem.asBytes(&l.requests));
        sig.update(std.mem.asBytes(&l.window_s));
        try limits.append(cfg.alloc, l);
    }

    var r: Rule = .{
        .name = name,
        .key = key,
        .limits = limits.items[first..],
        .first_limit = first,
        .when_missing = .share,
        .ipv4_prefix = 32,
        .ipv6_prefix = 64,
        .key_prefix = try std.fmt.allocPrint(cfg.alloc, "ratelimit:{s}:{s}:{x:0>16}:", .{ scope, name, sig.final() }),
    };
    if (obj.get("when_missing")) |w| r.when_missing = try cfg.choice(WhenMissing, w, cfg.path(at, "when_missing"));
    if (obj.get("ipv4_prefix")) |p| r.ipv4_prefix = @intCast(try cfg.integer(p, cfg.path(at, "ipv4_prefix"), 1, 32));
    if (obj.get("ipv6_prefix")) |p| r.ipv6_prefix = @intCast(try cfg.integer(p, cfg.path(at, "ipv6_prefix"), 1, 128));
    return r;
}

fn keyPart(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!KeyPart {
    switch (v) {
        .string => |s| {
            if (std.mem.eql(u8, s, "client_ip")) return .client_ip;
            if (std.mem.eql(u8, s, "route")) return .route;
            return cfg.fail("{s}: unknown key part \"{s}\" (expected \"client_ip\", \"route\" or {{\"header\": \"name\"}})", .{ at, s });
        },
        .object => {
            const obj = try cfg.object(v, at, &.{"header"});
            const h = obj.get("header") orelse return cfg.fail("{s}: expected {{\"header\": \"name\"}}", .{at});
            const name = try cfg.headerName(h, cfg.path(at, "header"));
            if (name[0] == ':') return cfg.fail("{s}: pseudo-headers cannot be keys", .{at});
            return .{ .header = name };
        },
        else => return cfg.fail("{s}: expected \"client_ip\", \"route\" or {{\"header\": \"name\"}}, got {s}", .{ at, proxy.kind(v) }),
    }
}

fn limit(cfg: *proxy.Config, v: Value, at: []const u8, rule_name: []const u8, count: usize) proxy.ConfigError!Limit {
    const obj = try cfg.object(v, at, &.{ "requests", "per", "name" });
    const requests = try cfg.integer(obj.get("requests") orelse return cfg.fail("{s}: missing \"requests\"", .{at}), cfg.path(at, "requests"), 1, 1_000_000_000);
    const per_v = obj.get("per") orelse return cfg.fail("{s}: missing \"per\" (e.g. \"1s\", \"1m\", \"1h\", \"1d\")", .{at});
    const window_s = try duration(cfg, per_v, cfg.path(at, "per"));
    const period_ns = window_s * ns_per_s;
    const interval = period_ns / requests;
    if (interval == 0) return cfg.fail("{s}: {d} requests per {d}s is more than one per nanosecond", .{ at, requests, window_s });
    const name = if (obj.get("name")) |n|
        try policyName(cfg, n, cfg.path(at, "name"))
    else if (count == 1)
        rule_name
    else
        try std.fmt.allocPrint(cfg.alloc, "{s}-{d}s", .{ rule_name, window_s });
    return .{
        .name = name,
        .requests = requests,
        .window_s = window_s,
        .interval_ns = interval,
        .capacity_ns = interval * requests,
    };
}

/// "30s", "5m", "1h", "1d" or a number of seconds; whole seconds, at most 366 days.
fn duration(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!u64 {
    const max_s: u64 = 366 * 24 * 3600;
    const s = switch (v) {
        .string => |s| s,
        else => return cfg.integer(v, at, 1, max_s),
    };
    const units = [_]struct { suffix: u8, seconds: u64 }{
        .{ .suffix = 's', .seconds = 1 },
        .{ .suffix = 'm', .seconds = 60 },
        .{ .suffix = 'h', .seconds = 3600 },
        .{ .suffix = 'd', .seconds = 86400 },
    };
    if (s.len >= 2) {
        for (units) |u| {
            if (s[s.len - 1] == u.suffix) {
                const n = std.fmt.parseInt(u64, s[0 .. s.len - 1], 10) catch break;
                const total = std.math.mul(u64, n, u.seconds) catch break;
                if (total >= 1 and total <= max_s) return total;
                break;
            }
        }
    }
    return cfg.fail("{s}: expected a duration like \"1s\", \"30s\", \"1m\", \"1h\" or \"1d\" (whole seconds, at most 366d), got \"{s}\"", .{ at, s });
}

/// A policy name as it appears in the RateLimit headers (a structured-field string: keep it plain).
fn policyName(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const u8 {
    const s = try cfg.string(v, at);
    const ok = s.len > 0 and s.len <= 64 and for (s) |c| {
        if (!std.ascii.isAlphanumeric(c) and c != '-' and c != '_' and c != '.') break false;
    } else true;
    if (!ok) return cfg.fail("{s}: \"{s}\" must be 1-64 letters, digits, '-', '_' or '.'", .{ at, s });
    return s;
}

// ------------------------------------------------------------------------------------------------ requests

const Result = struct { limit: u8 = 0, remaining: u64 = 0, reset_s: u64 = 0 };

pub const Http = struct {
    results: [max_limits]Result = [_]Result{.{}} ** max_limits,
    count: u8 = 0,
};

/// The limit that refused (the one with the longest wait) and the ns until a request would pass.
const Refusal = struct { limit: Limit, wait_ns: u64 };

/// One rule's outcome for this request.
const Outcome = union(enum) {
    skipped,
    allowed,
    rejected: Refusal,
    store_failed,
};

pub fn onRequestHeaders(h: *Http, _: u32, _: bool) proxy.Action {
    const s = settings;
    const now = proxy.nowNanos();
    var committed: [max_rules]?[]const u8 = [_]?[]const u8{null} ** max_rules;
    h.count = 0;
    for (s.rules, 0..) |r, i| {
        const key = ruleKey(r) catch {
            proxy.log(.err, "rate-limit: out of memory building the key of rule \"{s}\"", .{r.name});
            return .@"continue";
        } orelse continue;
        switch (take(h, r, key, now)) {
            .skipped => {},
            .allowed => committed[i] = key,
            .store_failed => {
                if (s.on_store_error == .deny) {
                    refund(s.rules[0..i], committed[0..i]);
                    return unavailable();
                }
            },
            .rejected => |refusal| {
                refund(s.rules[0..i], committed[0..i]);
                return tooManyRequests(refusal, key);
            },
        }
    }
    return .@"continue";
}

pub fn onResponseHeaders(h: *Http, _: u32, _: bool) proxy.Action {
    if (h.count == 0 or settings.headers == .none) return .@"continue";
    const s = settings;
    var buf: [512]u8 = undefined;
    if (s.headers == .all or s.headers == .ietf) {
        proxy.replaceHeader(.response_headers, "ratelimit-policy", s.policy_header);
        var fbs = std.io.fixedBufferStream(&buf);
        for (h.results[0..h.count], 0..) |res, i| {
            if (i > 0) fbs.writer().writeAll(", ") catch break;
            fbs.writer().print("\"{s}\";r={d};t={d}", .{ s.limits[res.limit].name, res.remaining, res.reset_s }) catch break;
        }
        proxy.replaceHeader(.response_headers, "ratelimit", fbs.getWritten());
    }
    if (s.headers == .all or s.headers == .legacy) {
        // The tightest limit: fewest requests left (the longest wait on a tie).
        var t = h.results[0];
        for (h.results[1..h.count]) |res| {
            if (res.remaining < t.remaining or (res.remaining == t.remaining and res.reset_s > t.reset_s)) t = res;
        }
        legacyHeaders(&buf, .response_headers, s.limits[t.limit].requests, t.remaining, t.reset_s);
    }
    return .@"continue";
}

fn legacyHeaders(buf: []u8, map: proxy.MapType, quota: u64, remaining: u64, reset_s: u64) void {
    proxy.replaceHeader(map, "x-ratelimit-limit", std.fmt.bufPrint(buf, "{d}", .{quota}) catch return);
    proxy.replaceHeader(map, "x-ratelimit-remaining", std.fmt.bufPrint(buf, "{d}", .{remaining}) catch return);
    proxy.replaceHeader(map, "x-ratelimit-reset", std.fmt.bufPrint(buf, "{d}", .{reset_s}) catch return);
}

fn ceilSeconds(ns: u64) u64 {
    return (ns + ns_per_s - 1) / ns_per_s;
}

/// Applies rule `r` to its entry `key`: a compare-and-swap loop over the stored theoretical arrival times.
fn take(h: *Http, r: Rule, key: []const u8, now: u64) Outcome {
    var attempt: usize = 0;
    var state: [max_limits]u64 = undefined;
    const n = r.limits.len;
    while (attempt < max_cas_attempts) : (attempt += 1) {
        var seen_cas: ?u32 = null;
        @memset(state[0..n], 0);
        switch (proxy.getSharedData(key)) {
            .found => |f| {
                seen_cas = f.cas;
                // A value of another shape (an older configuration) counts as empty.
                if (f.value.len == n * 8) {
                    for (state[0..n], 0..) |*tat, i| tat.* = std.mem.readInt(u64, f.value[i * 8 ..][0..8], .little);
                }
            },
            .not_found => {},
            .failed => |st| {
                proxy.log(.err, "rate-limit: reading shared data failed ({s})", .{@tagName(st)});
                return .store_failed;
            },
        }
        var refusal: ?Refusal = null;
        for (r.limits, state[0..n]) |l, *tat| {
            const new_tat = @max(tat.*, now) +| l.interval_ns;
            const used = new_tat - now;
            if (used > l.capacity_ns) {
                const wait = used - l.capacity_ns;
                if (refusal == null or wait > refusal.?.wait_ns) refusal = .{ .limit = l, .wait_ns = wait };
            } else tat.* = new_tat;
        }
        if (refusal) |x| return .{ .rejected = x };
        var value: [max_limits * 8]u8 = undefined;
        for (state[0..n], 0..) |tat, i| std.mem.writeInt(u64, value[i * 8 ..][0..8], tat, .little);
        switch (proxy.casWrite(key, value[0 .. n * 8], seen_cas)) {
            .written => {
                for (r.limits, state[0..n], 0..) |l, tat, i| {
                    const used = tat - now;
                    h.results[h.count] = .{
                        .limit = @intCast(r.first_limit + i),
                        .remaining = (l.capacity_ns - used) / l.interval_ns,
                        .reset_s = ceilSeconds(used),
                    };
                    h.count += 1;
                }
                return .allowed;
            },
            .retry => continue,
            .failed => {
                proxy.log(.err, "rate-limit: writing shared data failed", .{});
                return .store_failed;
            },
        }
    }
    proxy.log(.warn, "rate-limit: rule \"{s}\": gave up after {d} compare-and-swap conflicts; refusing the request", .{ r.name, max_cas_attempts });
    return .{ .rejected = .{ .limit = r.limits[0], .wait_ns = ns_per_s } };
}

/// Gives back the unit taken by rules that allowed a request a later rule refused.
fn refund(rules: []const Rule, keys: []const ?[]const u8) void {
    for (rules, keys) |r, maybe_key| {
        const key = maybe_key orelse continue;
        const n = r.limits.len;
        var attempt: usize = 0;
        while (attempt < max_cas_attempts) : (attempt += 1) {
            const f = switch (proxy.getSharedData(key)) {
                .found => |f| f,
                else => break,
            };
            if (f.value.len != n * 8) break;
            var value: [max_limits * 8]u8 = undefined;
            for (r.limits, 0..) |l, i| {
                const tat = std.mem.readInt(u64, f.value[i * 8 ..][0..8], .little);
                std.mem.writeInt(u64, value[i * 8 ..][0..8], tat -| l.interval_ns, .little);
            }
            if (proxy.casWrite(key, value[0 .. n * 8], f.cas) != .retry) break;
        }
    }
}

fn tooManyRequests(refusal: Refusal, key: []const u8) proxy.Action {
    const s = settings;
    const tight = refusal.limit;
    const retry_s = @max(ceilSeconds(refusal.wait_ns), 1);
    const a = proxy.scratch;
    var headers: std.ArrayListUnmanaged(proxy.Header) = .{};
    const retry_text = std.fmt.allocPrint(a, "{d}", .{retry_s}) catch "1";
    headers.append(a, .{ .name = "content-type", .value = "application/json" }) catch {};
    headers.append(a, .{ .name = "retry-after", .value = retry_text }) catch {};
    if (s.headers == .all or s.headers == .ietf) {
        headers.append(a, .{ .name = "ratelimit-policy", .value = s.policy_header }) catch {};
        const rl = std.fmt.allocPrint(a, "\"{s}\";r=0;t={d}", .{ tight.name, retry_s }) catch "";
        headers.append(a, .{ .name = "ratelimit", .value = rl }) catch {};
    }
    if (s.headers == .all or s.headers == .legacy) {
        headers.append(a, .{ .name = "x-ratelimit-limit", .value = std.fmt.allocPrint(a, "{d}", .{tight.requests}) catch "" }) catch {};
        headers.append(a, .{ .name = "x-ratelimit-remaining", .value = "0" }) catch {};
        headers.append(a, .{ .name = "x-ratelimit-reset", .value = retry_text }) catch {};
    }
    const body = std.fmt.allocPrint(
        a,
        "{{\"error\":\"rate_limited\",\"status\":429,\"policy\":\"{s}\",\"retry_after\":{d}}}",
        .{ tight.name, retry_s },
    ) catch "{\"error\":\"rate_limited\",\"status\":429}";
    if (proxy.logEnabled(.debug)) proxy.log(.debug, "rate-limit: {s} refused (retry in {d}s)", .{ key, retry_s });
    proxy.sendLocalResponse(429, "rate_limited", body, headers.items);
    return .pause;
}

fn unavailable() proxy.Action {
    proxy.sendLocalResponse(
        503,
        "rate_limit_store_unavailable",
        "{\"error\":\"rate_limit_unavailable\",\"status\":503}",
        &.{.{ .name = "content-type", .value = "application/json" }},
    );
    return .pause;
}

// ------------------------------------------------------------------------------------------------ keys

/// The shared-data key of rule `r` for this request; null when the rule does not apply (a key part is
/// missing and the rule says "skip").
fn ruleKey(r: Rule) error{OutOfMemory}!?[]const u8 {
    const a = proxy.scratch;
    var key: std.ArrayListUnmanaged(u8) = .{};
    try key.appendSlice(a, r.key_prefix);
    for (r.key, 0..) |part, i| {
        if (i > 0) try key.append(a, '|');
        const value: ?[]const u8 = switch (part) {
            .client_ip => if (proxy.getProperty("source\x00address")) |addr| try clientNetwork(a, addr, r) else null,
            .route => proxy.getProperty("route_name"),
            .header => |name| proxy.getHeader(.request_headers, name),
        };
        if (value) |v| {
            try key.append(a, '=');
            if (v.len > 128) {
                // Bounded keys; a hash keeps distinct values apart (not Wyhash: values are client-chosen).
                var digest: [32]u8 = undefined;
                std.crypto.hash.sha2.Sha256.hash(v, &digest, .{});
                try key.writer(a).print("#{s}", .{std.fmt.fmtSliceHexLower(digest[0..16])});
            } else {
                for (v) |c| switch (c) {
                    '%' => try key.appendSlice(a, "%25"),
                    '|' => try key.appendSlice(a, "%7C"),
                    else => try key.append(a, c),
                };
            }
        } else {
            if (r.when_missing == .skip) return null;
            try key.append(a, '-');
        }
    }
    return key.items;
}

/// "ip:port", "[v6]:port" or a bare address -> the client's network under the rule's prefixes
/// (IPv6 /64 by default, so one host cannot multiply its budget by rotating addresses in its subnet).
fn clientNetwork(a: std.mem.Allocator, address: []const u8, r: Rule) error{OutOfMemory}![]const u8 {
    var host = address;
    if (host.len > 0 and host[0] == '[') {
        const close = std.mem.indexOfScalar(u8, host, ']') orelse return address;
        host = host[1..close];
    } else if (std.mem.count(u8, host, ":") == 1) {
        host = host[0..std.mem.indexOfScalar(u8, host, ':').?];
    }
    if (std.mem.indexOfScalar(u8, host, '%')) |zone| host = host[0..zone];
    if (parseIp4(host)) |v4| return formatIp4(a, v4, r.ipv4_prefix);
    if (parseIp6(host)) |v6| {
        // IPv4-mapped (::ffff:a.b.c.d) is the IPv4 client.
        if (std.mem.allEqual(u8, v6[0..10], 0) and v6[10] == 0xff and v6[11] == 0xff)
            return formatIp4(a, v6[12..16].*, r.ipv4_prefix);
        var masked = v6;
        maskBits(&masked, r.ipv6_prefix);
        var out: std.ArrayListUnmanaged(u8) = .{};
        var i: usize = 0;
        while (i < 16) : (i += 2) {
            if (i > 0) try out.append(a, ':');
            try out.writer(a).print("{x}", .{@as(u16, masked[i]) << 8 | masked[i + 1]});
        }
        try out.writer(a).print("/{d}", .{r.ipv6_prefix});
        return out.items;
    }
    return address;
}

fn maskBits(bytes: []u8, prefix: u8) void {
    for (bytes, 0..) |*b, i| {
        const start: usize = i * 8;
        if (start >= prefix) {
            b.* = 0;
        } else if (start + 8 > prefix) {
            const keep: u3 = @intCast(prefix - start);
            b.* &= ~(@as(u8, 0xff) >> keep);
        }
    }
}

fn formatIp4(a: std.mem.Allocator, ip: [4]u8, prefix: u8) error{OutOfMemory}![]const u8 {
    var masked = ip;
    maskBits(&masked, prefix);
    if (prefix == 32) return std.fmt.allocPrint(a, "{d}.{d}.{d}.{d}", .{ masked[0], masked[1], masked[2], masked[3] });
    return std.fmt.allocPrint(a, "{d}.{d}.{d}.{d}/{d}", .{ masked[0], masked[1], masked[2], masked[3], prefix });
}

fn parseIp4(s: []const u8) ?[4]u8 {
    var out: [4]u8 = undefined;
    var it = std.mem.splitScalar(u8, s, '.');
    var i: usize = 0;
    while (it.next()) |part| : (i += 1) {
        if (i == 4 or part.len == 0 or part.len > 3) return null;
        out[i] = std.fmt.parseInt(u8, part, 10) catch return null;
    }
    return if (i == 4) out else null;
}

fn parseIp6(s: []const u8) ?[16]u8 {
    if (s.len < 2) return null;
    var groups: [8]u16 = undefined;
    var n: usize = 0;
    var gap: ?usize = null; // group index where "::" sits
    var rest = s;
    if (std.mem.startsWith(u8, rest, "::")) {
        gap = 0;
        rest = rest[2..];
    }
    while (rest.len > 0) {
        const end = std.mem.indexOfScalar(u8, rest, ':') orelse rest.len;
        const piece = rest[0..end];
        if (piece.len == 0) return null;
        if (end == rest.len and std.mem.indexOfScalar(u8, piece, '.') != null) {
            // Trailing dotted IPv4 takes two groups.
            const v4 = parseIp4(piece) orelse return null;
            if (n + 2 > 8) return null;
            groups[n] = @as(u16, v4[0]) << 8 | v4[1];
            groups[n + 1] = @as(u16, v4[2]) << 8 | v4[3];
            n += 2;
            break;
        }
        if (piece.len > 4 or n == 8) return null;
        groups[n] = std.fmt.parseInt(u16, piece, 16) catch return null;
        n += 1;
        if (end == rest.len) break;
        rest = rest[end + 1 ..];
        if (rest.len > 0 and rest[0] == ':') {
            if (gap != null) return null;
            gap = n;
            rest = rest[1..];
        } else if (rest.len == 0) return null;
    }
    var out: [16]u8 = [_]u8{0} ** 16;
    if (gap) |g| {
        if (n > 7) return null;
        const tail = n - g;
        for (0..g) |i| std.mem.writeInt(u16, out[i * 2 ..][0..2], groups[i], .big);
        for (0..tail) |i| std.mem.writeInt(u16, out[(8 - tail + i) * 2 ..][0..2], groups[g + i], .big);
    } else {
        if (n != 8) return null;
        for (0..8) |i| std.mem.writeInt(u16, out[i * 2 ..][0..2], groups[i], .big);
    }
    return out;
}
