//! auth: API keys and JWT bearer tokens, checked before the request reaches the upstream.
//!
//! API keys come from a header or query parameter; the configuration holds only their SHA-256 hashes, and
//! the presented key's hash is compared with every configured hash in constant time. JWTs (JWS compact
//! form) are verified with inline keys (PEM, JWK, shared secrets) or a JWKS fetched with `proxy_http_call`
//! and kept in shared data, so every instance and worker uses one copy. Each key pins one algorithm; the
//! token's `alg` must match it (no `none`, no HS/RS confusion) and `jku`/`x5u`/`jwk` headers are ignored.
//! Verified tokens are cached per instance under the SHA-256 of the whole token, until they expire.
//! Headers this filter sets upstream are removed from the client's request first, so they cannot be forged.
//! Configuration reference: docs/filters/auth.md.
const std = @import("std");
const proxy = @import("proxy_wasm.zig");
const keys = @import("keys.zig");
const b64 = @import("b64.zig");

const Value = proxy.Value;
const Header = proxy.Header;
const Sha256 = std.crypto.hash.sha2.Sha256;
const Allocator = std.mem.Allocator;

pub const panic = std.debug.FullPanic(proxy.panicHandler);

comptime {
    proxy.register(@This());
    // Our own entry points: the binding's request callback does not pass the context id, which a request
    // paused for a JWKS fetch needs to be resumed (proxy_set_effective_context).
    @export(&onRequestHeaders, .{ .name = "proxy_on_request_headers" });
    @export(&onHttpCallResponse, .{ .name = "proxy_on_http_call_response" });
    @export(&onTick, .{ .name = "proxy_on_tick" });
}

/// Per-request state kept by the binding: none (everything is decided in the request-headers callback).
pub const Http = struct {};

const host = struct {
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
};

const ns_per_s: u64 = std.time.ns_per_s;
/// Keys tried for a token without `kid` (each try is a full signature check).
const max_candidates = 4;
const max_jwks_keys = 64;
const tick_ms: u32 = 1000;

/// The binding resets its scratch arena only in its own callbacks; ours (request headers, http_call
/// responses, ticks) reset it the same way so a long-idle instance does not accumulate tick allocations.
fn resetScratch() void {
    const arena: *std.heap.ArenaAllocator = @ptrCast(@alignCast(proxy.scratch.ptr));
    _ = arena.reset(.{ .retain_with_limit = 256 * 1024 });
}

// ------------------------------------------------------------------------------------------------ configuration

const ClaimPath = []const []const u8;

const ApiKey = struct { name: []const u8, digest: [32]u8 };

const ApiKeys = struct {
    header: ?[]const u8,
    query: ?[]const u8,
    keys: []const ApiKey,
    forward_header: ?[]const u8,
    max_len: usize,
};

const Forward = struct { claim: ClaimPath, header: []const u8 };
const ClaimValues = struct { claim: ClaimPath, values: []const []const u8 };

const Jwks = struct {
    upstream: []const u8,
    path: []const u8,
    authority: []const u8,
    refresh_ns: u64,
    min_refetch_ns: u64,
    timeout_ms: u32,
    max_bytes: usize,
    /// Shared-data entries: the document ("<fetched_at u64><json>") and the fetch state
    /// ("<last attempt u64><last success u64>"), named after the source so identical sources share them.
    doc_key: []const u8,
    state_key: []const u8,
};

const Jwt = struct {
    header: ?[]const u8,
    query: ?[]const u8,
    keys: []const keys.Key,
    jwks: ?Jwks,
    issuers: []const []const u8,
    audiences: []const []const u8,
    leeway_s: u64,
    require_exp: bool,
    max_age_s: ?u64,
    required_claims: []const ClaimPath,
    required_scopes: []const []const u8,
    claim_values: []const ClaimValues,
    forward: []const Forward,
    max_token_bytes: usize,
    cache_entries: usize,
    cache_max_ttl_ns: u64,
};

const Settings = struct {
    realm: []const u8 = "api",
    strip: bool = false,
    api: ?ApiKeys = null,
    jwt: ?Jwt = null,
    /// Every header this filter sets upstream; client-sent copies are removed from every request.
    owned_headers: []const []const u8 = &.{},
    /// Challenges sent with a 401 for missing credentials (one WWW-Authenticate header each).
    bearer_challenge: []const u8 = "",
    api_key_challenge: []const u8 = "",
    /// `scope="..."` parameter for insufficient_scope challenges ("" without required scopes).
    scope_param: []const u8 = "",
};

var settings: Settings = .{};

/// Header names the filter refuses to write (they would break framing or routing).
const reserved_headers = [_][]const u8{
    "host",       "content-length",   "transfer-encoding", "connection",    "upgrade", "te", "trailer",
    "keep-alive", "proxy-connection", "cookie",            "authorization",
};

pub fn configure(cfg: *proxy.Config, root: Value) proxy.ConfigError!void {
    const top = try cfg.object(root, "", &.{ "realm", "strip_credential", "api_keys", "jwt" });
    var s: Settings = .{};
    if (top.get("realm")) |v| {
        s.realm = try cfg.string(v, "realm");
        if (s.realm.len == 0 or s.realm.len > 128) return cfg.fail("realm: expected 1 to 128 characters", .{});
        for (s.realm) |c| {
            if (c < 0x20 or c >= 0x7f or c == '"' or c == '\\')
                return cfg.fail("realm: only printable ASCII without '\"' and '\\' is allowed", .{});
        }
    }
    if (top.get("strip_credential")) |v| s.strip = try cfg.boolean(v, "strip_credential");
    if (top.get("api_keys")) |v| s.api = try apiKeys(cfg, v);
    if (top.get("jwt")) |v| s.jwt = try jwtSettings(cfg, v);
    if (s.api == null and s.jwt == null)
        return cfg.fail("configuration: nothing to check (configure \"api_keys\", \"jwt\" or both)", .{});

    // Headers we set: each once, none reserved, none a credential source.
    var owned: std.ArrayListUnmanaged([]const u8) = .{};
    if (s.api) |api| if (api.forward_header) |h| try owned.append(cfg.alloc, h);
    if (s.jwt) |jwt| for (jwt.forward) |f| try owned.append(cfg.alloc, f.header);
    for (owned.items, 0..) |h, i| {
        for (reserved_headers) |r| {
            if (std.mem.eql(u8, h, r)) return cfg.fail("forwarded header \"{s}\" is reserved and cannot be set by auth", .{h});
        }
        for (owned.items[0..i]) |other| {
            if (std.mem.eql(u8, h, other)) return cfg.fail("forwarded header \"{s}\" is configured twice", .{h});
        }
        const sources = [_]?[]const u8{
            if (s.api) |a| a.header else null,
            if (s.jwt) |j| j.header else null,
        };
        for (sources) |src| {
            if (src != null and std.mem.eql(u8, src.?, h))
                return cfg.fail("forwarded header \"{s}\" is also a credential header", .{h});
        }
    }
    s.owned_headers = owned.items;
    s.bearer_challenge = try std.fmt.allocPrint(cfg.alloc, "Bearer realm=\"{s}\"", .{s.realm});
    s.api_key_challenge = try std.fmt.allocPrint(cfg.alloc, "ApiKey realm=\"{s}\"", .{s.realm});
    if (s.jwt != null and s.jwt.?.required_scopes.len > 0) {
        const jwt = s.jwt.?;
        var list: std.ArrayListUnmanaged(u8) = .{};
        try list.appendSlice(cfg.alloc, ", scope=\"");
        for (jwt.required_scopes, 0..) |sc, i| {
            if (i > 0) try list.append(cfg.alloc, ' ');
            try list.appendSlice(cfg.alloc, sc);
        }
        try list.append(cfg.alloc, '"');
        s.scope_param = list.items;
    }

    // Configuration accepted: everything derived from the old one goes.
    settings = s;
    tokenCacheReset(if (s.jwt) |j| j.cache_entries else 0);
    jwksForget();
    const wants_ticks = s.jwt != null and s.jwt.?.jwks != null;
    _ = host.proxy_set_tick_period_milliseconds(if (wants_ticks) tick_ms else 0);
}

fn apiKeys(cfg: *proxy.Config, v: Value) proxy.ConfigError!ApiKeys {
    const obj = try cfg.object(v, "api_keys", &.{ "header", "query_param", "keys", "forward_header", "max_length" });
    var out: ApiKeys = .{ .header = null, .query = null, .keys = &.{}, .forward_header = "x-consumer", .max_len = 256 };
    if (obj.get("header")) |h| out.header = try cfg.headerName(h, "api_keys.header");
    if (obj.get("query_param")) |q| out.query = try queryName(cfg, q, "api_keys.query_param");
    if (out.header == null and out.query == null) out.header = "x-api-key";
    if (obj.get("forward_header")) |h| out.forward_header = switch (h) {
        .null => null,
        else => try cfg.headerName(h, "api_keys.forward_header"),
    };
    if (obj.get("max_length")) |m| out.max_len = @intCast(try cfg.integer(m, "api_keys.max_length", 16, 4096));
    const items = try cfg.array(obj.get("keys") orelse
        return cfg.fail("api_keys.keys: missing (a list of {{\"name\": ..., \"sha256\": \"<64 hex digits>\"}})", .{}), "api_keys.keys");
    if (items.len == 0) return cfg.fail("api_keys.keys: at least one key is needed", .{});
    const list = try cfg.alloc.alloc(ApiKey, items.len);
    for (items, list, 0..) |item, *k, i| {
        const at = cfg.index("api_keys.keys", i);
        const ko = try cfg.object(item, at, &.{ "name", "sha256" });
        const name_at = cfg.path(at, "name");
        k.name = try cfg.headerValue(ko.get("name") orelse return cfg.fail("{s}: missing", .{name_at}), name_at);
        if (k.name.len == 0) return cfg.fail("{s}: must not be empty", .{name_at});
        const hash_at = cfg.path(at, "sha256");
        const hex = try cfg.string(ko.get("sha256") orelse
            return cfg.fail("{s}: missing (the SHA-256 of the key, hex: `printf %s KEY | sha256sum`)", .{hash_at}), hash_at);
        if (hex.len != 64) return cfg.fail("{s}: expected 64 hex digits, got {d} characters", .{ hash_at, hex.len });
        _ = std.fmt.hexToBytes(&k.digest, hex) catch return cfg.fail("{s}: not a hex string", .{hash_at});
        for (list[0..i], 0..) |other, j| {
            if (std.mem.eql(u8, &other.digest, &k.digest))
                return cfg.fail("{s}: same hash as api_keys.keys[{d}]", .{ hash_at, j });
        }
    }
    out.keys = list;
    return out;
}

fn queryName(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const u8 {
    const s = try cfg.string(v, at);
    if (s.len == 0 or s.len > 128) return cfg.fail("{s}: expected 1 to 128 characters", .{at});
    for (s) |c| {
        if (c <= 0x20 or c >= 0x7f or c == '&' or c == '=' or c == '#' or c == '?' or c == '%')
            return cfg.fail("{s}: \"{s}\" is not a plain query parameter name", .{ at, s });
    }
    return s;
}

fn jwtSettings(cfg: *proxy.Config, v: Value) proxy.ConfigError!Jwt {
    const obj = try cfg.object(v, "jwt", &.{
        "header",         "query_param",     "keys",            "jwks",
        "issuers",        "audiences",       "leeway",          "require_exp",
        "max_age",        "required_claims", "required_scopes", "required_claim_values",
        "forward_claims", "max_token_bytes", "cache",
    });
    var j: Jwt = .{
        .header = "authorization",
        .query = null,
        .keys = &.{},
        .jwks = null,
        .issuers = &.{},
        .audiences = &.{},
        .leeway_s = 30,
        .require_exp = true,
        .max_age_s = null,
        .required_claims = &.{},
        .required_scopes = &.{},
        .claim_values = &.{},
        .forward = &.{},
        .max_token_bytes = 8192,
        .cache_entries = 1024,
        .cache_max_ttl_ns = 300 * ns_per_s,
    };
    if (obj.get("header")) |h| j.header = switch (h) {
        .null => null,
        else => try cfg.headerName(h, "jwt.header"),
    };
    if (obj.get("query_param")) |q| j.query = try queryName(cfg, q, "jwt.query_param");
    if (j.header == null and j.query == null) return cfg.fail("jwt: no credential source (set \"header\" or \"query_param\")", .{});
    if (obj.get("keys")) |kv| j.keys = try inlineKeys(cfg, kv);
    if (obj.get("jwks")) |jv| j.jwks = try jwksSettings(cfg, jv);
    if (j.keys.len == 0 and j.jwks == null) return cfg.fail("jwt: no verification keys (set \"keys\", \"jwks\" or both)", .{});
    if (obj.get("issuers")) |x| j.issuers = try stringList(cfg, x, "jwt.issuers");
    if (obj.get("audiences")) |x| j.audiences = try stringList(cfg, x, "jwt.audiences");
    if (obj.get("leeway")) |x| j.leeway_s = try durationNs(cfg, x, "jwt.leeway", 0, 3600 * ns_per_s) / ns_per_s;
    if (obj.get("require_exp")) |x| j.require_exp = try cfg.boolean(x, "jwt.require_exp");
    if (obj.get("max_age")) |x| j.max_age_s = try durationNs(cfg, x, "jwt.max_age", ns_per_s, 366 * 86400 * ns_per_s) / ns_per_s;
    if (obj.get("required_claims")) |x| {
        const items = try cfg.array(x, "jwt.required_claims");
        const out = try cfg.alloc.alloc(ClaimPath, items.len);
        for (items, out, 0..) |item, *p, i| p.* = try claimPath(cfg, item, cfg.index("jwt.required_claims", i));
        j.required_claims = out;
    }
    if (obj.get("required_scopes")) |x| {
        j.required_scopes = try stringList(cfg, x, "jwt.required_scopes");
        for (j.required_scopes, 0..) |sc, i| {
            for (sc) |c| {
                // RFC 6749 scope-token: %x21 / %x23-5B / %x5D-7E
                if (c <= 0x20 or c == '"' or c == '\\' or c >= 0x7f)
                    return cfg.fail("{s}: \"{s}\" is not a valid scope token", .{ cfg.index("jwt.required_scopes", i), sc });
            }
        }
    }
    if (obj.get("required_claim_values")) |x| {
        const items = try cfg.array(x, "jwt.required_claim_values");
        const out = try cfg.alloc.alloc(ClaimValues, items.len);
        for (items, out, 0..) |item, *cv, i| {
            const at = cfg.index("jwt.required_claim_values", i);
            const o = try cfg.object(item, at, &.{ "claim", "values" });
            cv.claim = try claimPath(cfg, o.get("claim") orelse return cfg.fail("{s}.claim: missing", .{at}), cfg.path(at, "claim"));
            cv.values = try stringList(cfg, o.get("values") orelse return cfg.fail("{s}.values: missing", .{at}), cfg.path(at, "values"));
            if (cv.values.len == 0) return cfg.fail("{s}.values: at least one value is needed", .{at});
        }
        j.claim_values = out;
    }
    if (obj.get("forward_claims")) |x| {
        const items = try cfg.array(x, "jwt.forward_claims");
        const out = try cfg.alloc.alloc(Forward, items.len);
        for (items, out, 0..) |item, *f, i| {
            const at = cfg.index("jwt.forward_claims", i);
            const o = try cfg.object(item, at, &.{ "claim", "header" });
            f.claim = try claimPath(cfg, o.get("claim") orelse return cfg.fail("{s}.claim: missing", .{at}), cfg.path(at, "claim"));
            f.header = try cfg.headerName(o.get("header") orelse return cfg.fail("{s}.header: missing", .{at}), cfg.path(at, "header"));
        }
        j.forward = out;
    }
    if (obj.get("max_token_bytes")) |x| j.max_token_bytes = @intCast(try cfg.integer(x, "jwt.max_token_bytes", 256, 65536));
    if (obj.get("cache")) |x| {
        const o = try cfg.object(x, "jwt.cache", &.{ "max_entries", "max_ttl" });
        if (o.get("max_entries")) |m| j.cache_entries = @intCast(try cfg.integer(m, "jwt.cache.max_entries", 0, 65536));
        if (o.get("max_ttl")) |m| j.cache_max_ttl_ns = try durationNs(cfg, m, "jwt.cache.max_ttl", ns_per_s, 86400 * ns_per_s);
    }
    return j;
}

fn inlineKeys(cfg: *proxy.Config, v: Value) proxy.ConfigError![]const keys.Key {
    const items = try cfg.array(v, "jwt.keys");
    const out = try cfg.alloc.alloc(keys.Key, items.len);
    for (items, out, 0..) |item, *k, i| {
        const at = cfg.index("jwt.keys", i);
        const o = try cfg.object(item, at, &.{ "kid", "alg", "pem", "jwk", "secret", "secret_base64" });
        var alg: ?keys.Alg = null;
        if (o.get("alg")) |a| {
            const name = try cfg.string(a, cfg.path(at, "alg"));
            alg = keys.parseAlg(name) orelse
                return cfg.fail("{s}.alg: \"{s}\" is not supported (HS256, HS384, HS512, RS256, ES256, EdDSA)", .{ at, name });
        }
        var sources: usize = 0;
        for ([_][]const u8{ "pem", "jwk", "secret", "secret_base64" }) |f| sources += @intFromBool(o.get(f) != null);
        if (sources != 1) return cfg.fail("{s}: give exactly one of \"pem\", \"jwk\", \"secret\", \"secret_base64\"", .{at});
        var problem: keys.Problem = .{};
        const loaded: keys.Error!keys.Key = blk: {
            if (o.get("pem")) |p| break :blk keys.fromPem(cfg.alloc, proxy.scratch, try cfg.string(p, cfg.path(at, "pem")), alg, &problem);
            if (o.get("jwk")) |p| {
                const jo = try cfg.object(p, cfg.path(at, "jwk"), &.{ "kty", "use", "alg", "kid", "n", "e", "crv", "x", "y", "k", "key_ops", "x5c", "x5t", "x5t#S256" });
                break :blk keys.fromJwk(cfg.alloc, proxy.scratch, jo, alg, true, &problem);
            }
            const a = alg orelse return cfg.fail("{s}.alg: required with a shared secret (HS256, HS384 or HS512)", .{at});
            if (o.get("secret")) |p| {
                const sec = try cfg.string(p, cfg.path(at, "secret"));
                break :blk keys.Key{ .alg = a, .material = try secretOrFail(cfg, keys.hmacKey(cfg.alloc, a, sec, &problem), &problem, at) };
            }
            const text = try cfg.string(o.get("secret_base64").?, cfg.path(at, "secret_base64"));
            const raw = b64.decodeStd(cfg.alloc, text) catch
                b64.decodeUrlLenient(cfg.alloc, text) catch
                return cfg.fail("{s}.secret_base64: not valid base64", .{at});
            break :blk keys.Key{ .alg = a, .material = try secretOrFail(cfg, keys.hmacKey(cfg.alloc, a, raw, &problem), &problem, at) };
        };
        k.* = loaded catch |e| switch (e) {
            error.OutOfMemory => return error.OutOfMemory,
            error.InvalidKey => return cfg.fail("{s}: {s}", .{ at, problem.text }),
        };
        if (o.get("kid")) |kid| k.kid = try cfg.string(kid, cfg.path(at, "kid"));
        for (out[0..i], 0..) |other, j| {
            if (k.kid != null and other.kid != null and std.mem.eql(u8, k.kid.?, other.kid.?))
                return cfg.fail("{s}.kid: \"{s}\" is also the kid of jwt.keys[{d}]", .{ at, k.kid.?, j });
        }
    }
    return out;
}

fn secretOrFail(cfg: *proxy.Config, m: keys.Error!keys.Material, problem: *keys.Problem, at: []const u8) proxy.ConfigError!keys.Material {
    return m catch |e| switch (e) {
        error.OutOfMemory => error.OutOfMemory,
        error.InvalidKey => cfg.fail("{s}: {s}", .{ at, problem.text }),
    };
}

fn jwksSettings(cfg: *proxy.Config, v: Value) proxy.ConfigError!Jwks {
    const o = try cfg.object(v, "jwt.jwks", &.{ "upstream", "path", "authority", "refresh_interval", "min_refetch_interval", "timeout", "max_bytes" });
    var j: Jwks = .{
        .upstream = try cfg.string(o.get("upstream") orelse return cfg.fail("jwt.jwks.upstream: missing (the name of a configured upstream)", .{}), "jwt.jwks.upstream"),
        .path = "/.well-known/jwks.json",
        .authority = "",
        .refresh_ns = 600 * ns_per_s,
        .min_refetch_ns = 30 * ns_per_s,
        .timeout_ms = 2000,
        .max_bytes = 64 * 1024,
        .doc_key = "",
        .state_key = "",
    };
    if (j.upstream.len == 0) return cfg.fail("jwt.jwks.upstream: must not be empty", .{});
    j.authority = j.upstream;
    if (o.get("path")) |p| {
        j.path = try cfg.headerValue(p, "jwt.jwks.path");
        if (j.path.len == 0 or j.path[0] != '/') return cfg.fail("jwt.jwks.path: must start with '/'", .{});
    }
    if (o.get("authority")) |a| {
        j.authority = try cfg.headerValue(a, "jwt.jwks.authority");
        if (j.authority.len == 0) return cfg.fail("jwt.jwks.authority: must not be empty", .{});
    }
    if (o.get("refresh_interval")) |x| j.refresh_ns = try durationNs(cfg, x, "jwt.jwks.refresh_interval", ns_per_s, 7 * 86400 * ns_per_s);
    if (o.get("min_refetch_interval")) |x| j.min_refetch_ns = try durationNs(cfg, x, "jwt.jwks.min_refetch_interval", ns_per_s, 86400 * ns_per_s);
    if (o.get("timeout")) |x| j.timeout_ms = @intCast(try durationNs(cfg, x, "jwt.jwks.timeout", std.time.ns_per_ms, 60 * ns_per_s) / std.time.ns_per_ms);
    if (o.get("max_bytes")) |x| j.max_bytes = @intCast(try cfg.integer(x, "jwt.jwks.max_bytes", 1024, 1024 * 1024));
    var h = std.hash.Wyhash.init(0);
    for ([_][]const u8{ j.upstream, j.authority, j.path }) |part| {
        h.update(part);
        h.update("\x00");
    }
    const id = h.final();
    j.doc_key = try std.fmt.allocPrint(cfg.alloc, "auth:jwks:{x:0>16}", .{id});
    j.state_key = try std.fmt.allocPrint(cfg.alloc, "auth:jwks-state:{x:0>16}", .{id});
    return j;
}

/// A string or a list of non-empty strings.
fn stringList(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError![]const []const u8 {
    if (v == .string) {
        if (v.string.len == 0) return cfg.fail("{s}: must not be empty", .{at});
        const one = try cfg.alloc.alloc([]const u8, 1);
        one[0] = v.string;
        return one;
    }
    const items = try cfg.array(v, at);
    const out = try cfg.alloc.alloc([]const u8, items.len);
    for (items, out, 0..) |item, *s, i| {
        s.* = try cfg.string(item, cfg.index(at, i));
        if (s.len == 0) return cfg.fail("{s}: must not be empty", .{cfg.index(at, i)});
    }
    return out;
}

/// "sub" (a top-level claim, whatever characters its name has) or ["realm_access", "roles"] (nested).
fn claimPath(cfg: *proxy.Config, v: Value, at: []const u8) proxy.ConfigError!ClaimPath {
    const path = try stringList(cfg, v, at);
    if (path.len == 0 or path.len > 8) return cfg.fail("{s}: expected a claim name or a list of 1 to 8 names", .{at});
    return path;
}

/// Integer seconds, or a string: "500ms", "30s", "5m", "1h", "1d". Returns nanoseconds within [min, max].
fn durationNs(cfg: *proxy.Config, v: Value, at: []const u8, min: u64, max: u64) proxy.ConfigError!u64 {
    const ns: ?u64 = switch (v) {
        .string => |s| parseDuration(s),
        .number_string, .integer => blk: {
            const secs = cfg.integer(v, at, 0, 366 * 86400) catch break :blk null;
            break :blk secs * ns_per_s;
        },
        else => null,
    };
    if (ns) |n| {
        if (n >= min and n <= max) return n;
        return cfg.fail("{s}: must be between {d}ms and {d}s", .{ at, min / std.time.ns_per_ms, max / ns_per_s });
    }
    return cfg.fail("{s}: expected seconds or a duration like \"500ms\", \"30s\", \"5m\", \"1h\"", .{at});
}

fn parseDuration(s: []const u8) ?u64 {
    const units = [_]struct { suffix: []const u8, ns: u64 }{
        .{ .suffix = "ms", .ns = std.time.ns_per_ms },
        .{ .suffix = "s", .ns = ns_per_s },
        .{ .suffix = "m", .ns = 60 * ns_per_s },
        .{ .suffix = "h", .ns = 3600 * ns_per_s },
        .{ .suffix = "d", .ns = 86400 * ns_per_s },
    };
    for (units) |u| {
        if (s.len > u.suffix.len and std.mem.endsWith(u8, s, u.suffix)) {
            const n = std.fmt.parseInt(u64, s[0 .. s.len - u.suffix.len], 10) catch return null;
            return std.math.mul(u64, n, u.ns) catch null;
        }
    }
    return null;
}

// ------------------------------------------------------------------------------------------------ requests

const Verdict = enum { allow, deny, wait };

fn onRequestHeaders(ctx: u32, _: u32, _: u32) callconv(.c) u32 {
    resetScratch();
    return switch (authenticate(ctx, false)) {
        .allow => @intFromEnum(proxy.Action.@"continue"),
        .deny, .wait => @intFromEnum(proxy.Action.pause),
    };
}

const Source = union(enum) { header: []const u8, query: []const u8 };

const Credential = union(enum) {
    none,
    /// Sent more than once (two headers, or a repeated query parameter): ambiguous, refused.
    repeated,
    present: struct { value: []const u8, from: Source },
};

/// Runs the checks for the current request: `.allow` after editing its headers, `.deny` after sending a
/// local response, `.wait` with a JWKS fetch in flight (`resumed` requests never start another).
///
/// Headers are read and edited one by one (a few host calls) rather than as a whole map: that is the
/// cheaper path when only the credential is read and a handful of headers are written.
fn authenticate(ctx: u32, resumed: bool) Verdict {
    const s = &settings;
    if (s.api) |api| {
        switch (findCredential(api.header, api.query, false)) {
            .none => {},
            .repeated => return unauthorized(.api_key, "invalid_request", "the API key was sent more than once"),
            .present => |c| {
                const name = matchApiKey(api, c.value) orelse
                    return unauthorized(.api_key, "invalid_api_key", "the API key is not valid");
                const forwarded = [_]Header{.{ .name = api.forward_header orelse "", .value = name }};
                return admit(if (api.forward_header != null) &forwarded else &.{}, c.from);
            },
        }
    }
    if (s.jwt) |*jwt| {
        switch (findCredential(jwt.header, jwt.query, true)) {
            .none => {},
            .repeated => return unauthorized(.bearer, "invalid_request", "the token was sent more than once"),
            .present => |c| {
                const now = proxy.nowNanos();
                var digest: [32]u8 = undefined;
                Sha256.hash(c.value, &digest, .{});
                if (tokenCacheGet(&digest, now)) |blob| {
                    if (proxy.logEnabled(.trace)) proxy.logRaw(.trace, "auth: token cache hit");
                    const cached = proxy.decodePairs(proxy.scratch, blob) catch return internalError();
                    return admit(cached, c.from);
                }
                switch (verifyToken(ctx, jwt, c.value, now, resumed)) {
                    .ok => |v| {
                        tokenCachePut(&digest, v.deadline_ns, v.headers);
                        return admit(v.headers, c.from);
                    },
                    .invalid => |why| return unauthorized(.bearer, "invalid_token", why),
                    .forbidden => |why| return forbidden(why),
                    .wait => return .wait,
                    .unavailable => |retry_s| return unavailable(retry_s),
                }
            },
        }
    }
    return unauthorized(.none, "", "");
}

/// Lets the request through: every header this filter owns is set to its forwarded value or removed
/// (so client-sent copies never reach the upstream), and the credential is stripped if configured.
fn admit(forwarded: []const Header, from: Source) Verdict {
    owned: for (settings.owned_headers) |name| {
        for (forwarded) |h| {
            if (std.mem.eql(u8, h.name, name)) {
                proxy.replaceHeader(.request_headers, name, h.value);
                continue :owned;
            }
        }
        proxy.removeHeader(.request_headers, name);
    }
    if (settings.strip) switch (from) {
        .header => |name| proxy.removeHeader(.request_headers, name),
        .query => |name| {
            const path = proxy.getHeader(.request_headers, ":path") orelse "";
            const stripped = withoutQueryParam(proxy.scratch, path, name) catch return internalError();
            proxy.replaceHeader(.request_headers, ":path", stripped);
        },
    };
    return .allow;
}

fn findCredential(header: ?[]const u8, query: ?[]const u8, bearer: bool) Credential {
    if (header) |name| {
        if (proxy.getHeader(.request_headers, name)) |raw| {
            // The host joins repeated headers with ','; neither tokens nor supported API keys contain one.
            if (std.mem.indexOfScalar(u8, raw, ',') != null) return .repeated;
            var value = std.mem.trim(u8, raw, " \t");
            if (bearer) {
                // "Bearer <token>" (scheme case-insensitive). Other schemes in Authorization are not ours;
                // a custom header may carry the bare token.
                const scheme = "bearer";
                const has_scheme = value.len > scheme.len and std.ascii.eqlIgnoreCase(value[0..scheme.len], scheme) and
                    (value[scheme.len] == ' ' or value[scheme.len] == '\t');
                if (has_scheme) {
                    value = std.mem.trimLeft(u8, value[scheme.len..], " \t");
                } else if (std.mem.eql(u8, name, "authorization")) {
                    value = "";
                }
            }
            if (value.len > 0) return .{ .present = .{ .value = value, .from = .{ .header = name } } };
        }
    }
    if (query) |param| {
        const path = proxy.getHeader(.request_headers, ":path") orelse return .none;
        const q = std.mem.indexOfScalar(u8, path, '?') orelse return .none;
        var found: ?[]const u8 = null;
        var it = std.mem.splitScalar(u8, path[q + 1 ..], '&');
        while (it.next()) |pair| {
            const eq = std.mem.indexOfScalar(u8, pair, '=') orelse pair.len;
            if (!std.mem.eql(u8, pair[0..eq], param)) continue;
            if (found != null) return .repeated;
            found = if (eq < pair.len) pair[eq + 1 ..] else "";
        }
        if (found) |raw| {
            // Undecodable: kept as sent, so it matches nothing and is refused as invalid.
            const value = percentDecode(proxy.scratch, raw) catch raw;
            return .{ .present = .{ .value = value, .from = .{ .query = param } } };
        }
    }
    return .none;
}

fn percentDecode(a: Allocator, s: []const u8) error{ Invalid, OutOfMemory }![]const u8 {
    if (std.mem.indexOfScalar(u8, s, '%') == null) return s;
    var out = try a.alloc(u8, s.len);
    var i: usize = 0;
    var n: usize = 0;
    while (i < s.len) : (n += 1) {
        if (s[i] == '%') {
            if (i + 2 >= s.len) return error.Invalid;
            const hi = std.fmt.charToDigit(s[i + 1], 16) catch return error.Invalid;
            const lo = std.fmt.charToDigit(s[i + 2], 16) catch return error.Invalid;
            out[n] = hi << 4 | lo;
            i += 3;
        } else {
            out[n] = s[i];
            i += 1;
        }
    }
    return out[0..n];
}

/// `path` without any `param=...` pair in its query (and without the '?' when nothing is left).
fn withoutQueryParam(a: Allocator, path: []const u8, param: []const u8) error{OutOfMemory}![]const u8 {
    const q = std.mem.indexOfScalar(u8, path, '?') orelse return path;
    var out: std.ArrayListUnmanaged(u8) = .{};
    try out.appendSlice(a, path[0..q]);
    var first = true;
    var it = std.mem.splitScalar(u8, path[q + 1 ..], '&');
    while (it.next()) |pair| {
        const eq = std.mem.indexOfScalar(u8, pair, '=') orelse pair.len;
        if (std.mem.eql(u8, pair[0..eq], param)) continue;
        try out.append(a, if (first) '?' else '&');
        try out.appendSlice(a, pair);
        first = false;
    }
    return out.items;
}

/// The name of the configured key whose hash equals the presented key's hash. Every configured hash is
/// compared, each in constant time, so the time taken says nothing about which (or whether one) matched.
fn matchApiKey(api: ApiKeys, presented: []const u8) ?[]const u8 {
    if (presented.len > api.max_len) return null;
    var digest: [32]u8 = undefined;
    Sha256.hash(presented, &digest, .{});
    var found: usize = 0; // index + 1 of the match; digests are unique (checked at configuration)
    for (api.keys, 1..) |k, i| {
        const eq: usize = @intFromBool(std.crypto.timing_safe.eql([32]u8, k.digest, digest));
        found |= i * eq;
    }
    return if (found == 0) null else api.keys[found - 1].name;
}

// ------------------------------------------------------------------------------------------------ responses

const Challenge = enum { none, bearer, api_key };

fn unauthorized(which: Challenge, code: []const u8, description: []const u8) Verdict {
    const s = &settings;
    const a = proxy.scratch;
    var hs: std.ArrayListUnmanaged(Header) = .{};
    hs.appendSlice(a, &.{
        .{ .name = "content-type", .value = "application/json" },
        .{ .name = "cache-control", .value = "no-store" },
    }) catch {};
    if (s.jwt != null) {
        const value = if (which == .bearer)
            std.fmt.allocPrint(a, "{s}, error=\"{s}\", error_description=\"{s}\"", .{ s.bearer_challenge, code, description }) catch s.bearer_challenge
        else
            s.bearer_challenge;
        hs.append(a, .{ .name = "www-authenticate", .value = value }) catch {};
    }
    if (s.api != null) {
        const value = if (which == .api_key)
            std.fmt.allocPrint(a, "{s}, error=\"{s}\"", .{ s.api_key_challenge, code }) catch s.api_key_challenge
        else
            s.api_key_challenge;
        hs.append(a, .{ .name = "www-authenticate", .value = value }) catch {};
    }
    const body = if (which == .none)
        "{\"error\":\"unauthorized\",\"error_description\":\"credentials are missing\",\"status\":401}"
    else
        std.fmt.allocPrint(a, "{{\"error\":\"{s}\",\"error_description\":\"{s}\",\"status\":401}}", .{ code, description }) catch
            "{\"error\":\"unauthorized\",\"status\":401}";
    if (proxy.logEnabled(.debug)) proxy.log(.debug, "auth: 401 {s}: {s}", .{ if (which == .none) "missing" else code, description });
    proxy.sendLocalResponse(401, "auth_unauthorized", body, hs.items);
    return .deny;
}

fn forbidden(description: []const u8) Verdict {
    const s = &settings;
    const a = proxy.scratch;
    const challenge = std.fmt.allocPrint(a, "{s}, error=\"insufficient_scope\", error_description=\"{s}\"{s}", .{
        s.bearer_challenge, description, s.scope_param,
    }) catch s.bearer_challenge;
    const body = std.fmt.allocPrint(a, "{{\"error\":\"insufficient_scope\",\"error_description\":\"{s}\",\"status\":403}}", .{description}) catch
        "{\"error\":\"insufficient_scope\",\"status\":403}";
    if (proxy.logEnabled(.debug)) proxy.log(.debug, "auth: 403 {s}", .{description});
    proxy.sendLocalResponse(403, "auth_forbidden", body, &.{
        .{ .name = "content-type", .value = "application/json" },
        .{ .name = "cache-control", .value = "no-store" },
        .{ .name = "www-authenticate", .value = challenge },
    });
    return .deny;
}

fn unavailable(retry_s: u64) Verdict {
    const a = proxy.scratch;
    const retry = std.fmt.allocPrint(a, "{d}", .{retry_s}) catch "1";
    proxy.sendLocalResponse(503, "auth_keys_unavailable", "{\"error\":\"jwks_unavailable\",\"error_description\":\"token signing keys are not available yet\",\"status\":503}", &.{
        .{ .name = "content-type", .value = "application/json" },
        .{ .name = "cache-control", .value = "no-store" },
        .{ .name = "retry-after", .value = retry },
    });
    return .deny;
}

fn internalError() Verdict {
    proxy.log(.err, "auth: internal error (out of memory or a failed host call); refusing the request", .{});
    proxy.sendLocalResponse(500, "auth_internal_error", "{\"error\":\"internal_error\",\"status\":500}", &.{
        .{ .name = "content-type", .value = "application/json" },
    });
    return .deny;
}

// ------------------------------------------------------------------------------------------------ JWT

const Verified = struct { headers: []const Header, deadline_ns: u64 };

const Check = union(enum) {
    ok: Verified,
    /// 401 invalid_token, with a fixed description (never token content).
    invalid: []const u8,
    /// 403 insufficient_scope.
    forbidden: []const u8,
    /// A JWKS fetch is in flight; the request resumes when it answers.
    wait,
    /// No keys yet and no fetch allowed now: 503, retry after this many seconds.
    unavailable: u64,
};

fn verifyToken(ctx: u32, jwt: *const Jwt, token: []const u8, now: u64, resumed: bool) Check {
    const a = proxy.scratch;
    if (token.len > jwt.max_token_bytes) return .{ .invalid = "the token is too large" };
    for (token) |c| {
        if (!(std.ascii.isAlphanumeric(c) or c == '-' or c == '_' or c == '.')) return .{ .invalid = "the token is malformed" };
    }
    const dot1 = std.mem.indexOfScalar(u8, token, '.') orelse return .{ .invalid = "the token is malformed" };
    const dot2 = std.mem.indexOfScalarPos(u8, token, dot1 + 1, '.') orelse return .{ .invalid = "the token is malformed" };
    if (std.mem.indexOfScalarPos(u8, token, dot2 + 1, '.') != null) return .{ .invalid = "the token is malformed (JWE is not supported)" };
    const header_b64 = token[0..dot1];
    const payload_b64 = token[dot1 + 1 .. dot2];
    const sig_b64 = token[dot2 + 1 ..];
    if (header_b64.len == 0 or payload_b64.len == 0 or sig_b64.len == 0) return .{ .invalid = "the token is malformed" };

    const header_json = b64.decodeUrl(a, header_b64) catch return .{ .invalid = "the token header is not base64url" };
    const header = parseObject(a, header_json) orelse return .{ .invalid = "the token header is not a JSON object" };
    const alg_name = switch (header.get("alg") orelse return .{ .invalid = "the token has no alg" }) {
        .string => |s| s,
        else => return .{ .invalid = "the token alg is not a string" },
    };
    if (std.ascii.eqlIgnoreCase(alg_name, "none")) return .{ .invalid = "unsigned tokens are not accepted" };
    const alg = keys.parseAlg(alg_name) orelse return .{ .invalid = "the token alg is not supported" };
    // RFC 7515 4.1.11: extensions we do not understand must not be ignored.
    if (header.get("crit") != null) return .{ .invalid = "the token has critical header extensions" };
    const kid: ?[]const u8 = if (header.get("kid")) |k| switch (k) {
        .string => |s| s,
        else => return .{ .invalid = "the token kid is not a string" },
    } else null;

    // Candidate keys: by kid when the token names one, else every key of the token's algorithm.
    var candidates: [max_candidates]*const keys.Key = undefined;
    var n: usize = 0;
    var alg_mismatch = false;
    selectKeys(jwt.keys, kid, alg, &candidates, &n, &alg_mismatch);
    if (jwt.jwks) |*src| {
        if (n == 0) {
            switch (jwksKeys(ctx, src, now, resumed, false)) {
                .keys => |set| selectKeys(set, kid, alg, &candidates, &n, &alg_mismatch),
                .wait => return .wait,
                .unavailable => |r| return .{ .unavailable = r },
            }
            if (n == 0 and !alg_mismatch and kid != null) {
                // An unknown kid may be a freshly rotated key: refetch, at most once per min_refetch_interval.
                switch (jwksKeys(ctx, src, now, resumed, true)) {
                    .wait => return .wait,
                    else => {},
                }
            }
        }
    }
    if (n == 0) {
        if (alg_mismatch) return .{ .invalid = "the token alg does not match its key" };
        return .{ .invalid = if (kid != null) "the token key id is unknown" else "no key for the token alg" };
    }

    var sig_buf: [1024]u8 = undefined;
    const sig = b64.decodeUrlInto(&sig_buf, sig_b64) catch return .{ .invalid = "the token signature is not base64url" };
    const signing_input = token[0..dot2];
    const valid = for (candidates[0..n]) |k| {
        if (keys.verify(k, signing_input, sig)) break true;
    } else false;
    if (!valid) return .{ .invalid = "the token signature is invalid" };

    const payload_json = b64.decodeUrl(a, payload_b64) catch return .{ .invalid = "the token payload is not base64url" };
    const claims = parseObject(a, payload_json) orelse return .{ .invalid = "the token payload is not a JSON object" };
    return checkClaims(jwt, claims, now);
}

fn selectKeys(
    set: []const keys.Key,
    kid: ?[]const u8,
    alg: keys.Alg,
    out: *[max_candidates]*const keys.Key,
    n: *usize,
    alg_mismatch: *bool,
) void {
    if (kid) |want| {
        // A key with this kid is the one; keys without a kid stand in only when no key has it.
        var named = false;
        for (set) |*k| {
            if (k.kid != null and std.mem.eql(u8, k.kid.?, want)) {
                named = true;
                if (k.alg == alg) add(out, n, k) else alg_mismatch.* = true;
            }
        }
        if (named) return;
        for (set) |*k| {
            if (k.kid != null) continue;
            if (k.alg == alg) add(out, n, k) else alg_mismatch.* = true;
        }
        return;
    }
    for (set) |*k| {
        if (k.alg == alg) add(out, n, k) else if (k.kid == null) alg_mismatch.* = true;
    }
}

fn add(out: *[max_candidates]*const keys.Key, n: *usize, k: *const keys.Key) void {
    if (n.* < max_candidates) {
        out[n.*] = k;
        n.* += 1;
    }
}

fn parseObject(a: Allocator, text: []const u8) ?proxy.ObjectMap {
    // Duplicate member names are an error (the default): no "which alg counts" ambiguity.
    const v = std.json.parseFromSliceLeaky(Value, a, text, .{}) catch return null;
    return switch (v) {
        .object => |o| o,
        else => null,
    };
}

fn numeric(v: Value) ?f64 {
    return switch (v) {
        .integer => |i| @floatFromInt(i),
        .float => |f| if (std.math.isFinite(f)) f else null,
        .number_string => |s| std.fmt.parseFloat(f64, s) catch null,
        else => null,
    };
}

fn claimAt(claims: proxy.ObjectMap, path: ClaimPath) ?Value {
    var cur: Value = .{ .object = claims };
    for (path) |name| {
        cur = switch (cur) {
            .object => |o| o.get(name) orelse return null,
            else => return null,
        };
    }
    return cur;
}

fn checkClaims(jwt: *const Jwt, claims: proxy.ObjectMap, now: u64) Check {
    const now_s = @as(f64, @floatFromInt(now)) / 1e9;
    const leeway: f64 = @floatFromInt(jwt.leeway_s);
    var deadline_s: f64 = now_s + @as(f64, @floatFromInt(jwt.cache_max_ttl_ns / ns_per_s));

    if (claims.get("exp")) |v| {
        const exp = numeric(v) orelse return .{ .invalid = "the token exp is not a number" };
        if (now_s >= exp + leeway) return .{ .invalid = "the token has expired" };
        deadline_s = @min(deadline_s, exp + leeway);
    } else if (jwt.require_exp) return .{ .invalid = "the token has no exp" };
    if (claims.get("nbf")) |v| {
        const nbf = numeric(v) orelse return .{ .invalid = "the token nbf is not a number" };
        if (now_s + leeway < nbf) return .{ .invalid = "the token is not valid yet" };
    }
    if (claims.get("iat")) |v| {
        const iat = numeric(v) orelse return .{ .invalid = "the token iat is not a number" };
        if (iat > now_s + leeway) return .{ .invalid = "the token was issued in the future" };
        if (jwt.max_age_s) |max_age| {
            const limit = iat + @as(f64, @floatFromInt(max_age)) + leeway;
            if (now_s >= limit) return .{ .invalid = "the token is too old" };
            deadline_s = @min(deadline_s, limit);
        }
    } else if (jwt.max_age_s != null) return .{ .invalid = "the token has no iat" };

    if (jwt.issuers.len > 0) {
        const iss = switch (claims.get("iss") orelse return .{ .invalid = "the token has no iss" }) {
            .string => |s| s,
            else => return .{ .invalid = "the token iss is not a string" },
        };
        if (!contains(jwt.issuers, iss)) return .{ .invalid = "the token issuer is not accepted" };
    }
    if (jwt.audiences.len > 0) {
        const ok = switch (claims.get("aud") orelse return .{ .invalid = "the token has no aud" }) {
            .string => |s| contains(jwt.audiences, s),
            .array => |arr| for (arr.items) |item| {
                if (item == .string and contains(jwt.audiences, item.string)) break true;
            } else false,
            else => false,
        };
        if (!ok) return .{ .invalid = "the token audience is not accepted" };
    }
    for (jwt.required_claims) |path| {
        const v = claimAt(claims, path) orelse return .{ .invalid = "the token lacks a required claim" };
        if (v == .null) return .{ .invalid = "the token lacks a required claim" };
    }

    for (jwt.required_scopes) |want| {
        if (!hasScope(claims, want)) return .{ .forbidden = "the token lacks a required scope" };
    }
    for (jwt.claim_values) |cv| {
        const v = claimAt(claims, cv.claim) orelse return .{ .forbidden = "the token lacks a required claim value" };
        const ok = switch (v) {
            .string => |s| contains(cv.values, s),
            .array => |arr| for (arr.items) |item| {
                if (item == .string and contains(cv.values, item.string)) break true;
            } else false,
            else => false,
        };
        if (!ok) return .{ .forbidden = "the token lacks a required claim value" };
    }

    const a = proxy.scratch;
    var out: std.ArrayListUnmanaged(Header) = .{};
    for (jwt.forward) |f| {
        const v = claimAt(claims, f.claim) orelse continue;
        const text = claimText(a, v) catch return .{ .invalid = "the token could not be processed" };
        if (text.len == 0 or text.len > 4096 or !headerSafe(text)) {
            proxy.log(.warn, "auth: claim for header \"{s}\" is empty, too long or has control characters; not forwarded", .{f.header});
            continue;
        }
        out.append(a, .{ .name = f.header, .value = text }) catch return .{ .invalid = "the token could not be processed" };
    }
    const deadline_ns: u64 = if (deadline_s <= now_s) now else @intFromFloat(@min(deadline_s * 1e9, 1.8e19));
    return .{ .ok = .{ .headers = out.items, .deadline_ns = deadline_ns } };
}

fn contains(list: []const []const u8, s: []const u8) bool {
    for (list) |x| {
        if (std.mem.eql(u8, x, s)) return true;
    }
    return false;
}

/// `scope` (space-separated, RFC 8693) or `scp` (a list or a string, as some issuers send it).
fn hasScope(claims: proxy.ObjectMap, want: []const u8) bool {
    for ([_][]const u8{ "scope", "scp" }) |name| {
        switch (claims.get(name) orelse continue) {
            .string => |s| {
                var it = std.mem.tokenizeScalar(u8, s, ' ');
                while (it.next()) |sc| {
                    if (std.mem.eql(u8, sc, want)) return true;
                }
            },
            .array => |arr| for (arr.items) |item| {
                if (item == .string and std.mem.eql(u8, item.string, want)) return true;
            },
            else => {},
        }
    }
    return false;
}

/// A claim as a header value: strings as they are, lists joined with ",", anything else as compact JSON.
fn claimText(a: Allocator, v: Value) error{OutOfMemory}![]const u8 {
    switch (v) {
        .string => |s| return s,
        .array => |arr| {
            var out: std.ArrayListUnmanaged(u8) = .{};
            for (arr.items, 0..) |item, i| {
                if (i > 0) try out.append(a, ',');
                switch (item) {
                    .string => |s| try out.appendSlice(a, s),
                    else => try std.json.stringify(item, .{}, out.writer(a)),
                }
            }
            return out.items;
        },
        else => return std.json.stringifyAlloc(a, v, .{}),
    }
}

fn headerSafe(s: []const u8) bool {
    for (s) |c| {
        if ((c < 0x20 and c != '\t') or c == 0x7f) return false;
    }
    return true;
}

// ------------------------------------------------------------------------------------------------ token cache

/// Verified tokens, under the SHA-256 of the whole token: a different token (forged or not) is a
/// different key, so nothing but the exact verified string ever hits. Two-way set-associative, fixed size.
const CacheEntry = struct {
    digest: [32]u8 = undefined,
    deadline_ns: u64 = 0, // 0: empty
    headers: []u8 = &.{}, // the forwarded headers, encoded as header pairs (persistent memory)
};

var token_cache: []CacheEntry = &.{};

fn tokenCacheReset(entries: usize) void {
    for (token_cache) |e| if (e.headers.len > 0) proxy.persistent.free(e.headers);
    if (token_cache.len > 0) proxy.persistent.free(token_cache);
    token_cache = &.{};
    if (entries == 0) return;
    const size = std.math.ceilPowerOfTwo(usize, @max(entries, 2)) catch 65536;
    token_cache = proxy.persistent.alloc(CacheEntry, size) catch return;
    for (token_cache) |*e| e.* = .{};
}

fn cacheSet(digest: *const [32]u8) usize {
    return (std.mem.readInt(u32, digest[0..4], .little) & @as(u32, @intCast(token_cache.len / 2 - 1))) * 2;
}

fn tokenCacheGet(digest: *const [32]u8, now: u64) ?[]const u8 {
    if (token_cache.len == 0) return null;
    const base = cacheSet(digest);
    for (token_cache[base .. base + 2]) |*e| {
        if (e.deadline_ns > now and std.crypto.timing_safe.eql([32]u8, e.digest, digest.*)) return e.headers;
    }
    return null;
}

fn tokenCachePut(digest: *const [32]u8, deadline_ns: u64, headers: []const Header) void {
    if (token_cache.len == 0) return;
    const blob = proxy.encodePairs(proxy.persistent, headers) catch return;
    const base = cacheSet(digest);
    const pair = token_cache[base .. base + 2];
    // An empty or expired slot, else the one expiring first.
    const victim = if (pair[0].deadline_ns <= pair[1].deadline_ns) &pair[0] else &pair[1];
    if (victim.headers.len > 0) proxy.persistent.free(victim.headers);
    victim.* = .{ .digest = digest.*, .deadline_ns = deadline_ns, .headers = blob };
}

// ------------------------------------------------------------------------------------------------ JWKS

/// This instance's parsed copy of the shared JWKS document.
const LocalKeySet = struct {
    arena: ?*std.heap.ArenaAllocator = null,
    keys: []const keys.Key = &.{},
    /// The shared-data cas of the document it was parsed from (0: not from shared data).
    cas: u32 = 0,
    fetched_at_ns: u64 = 0,
};

var key_set: LocalKeySet = .{};
/// The http_call token of this instance's JWKS fetch in flight, and when it started.
var fetch_token: ?u32 = null;
var fetch_started_ns: u64 = 0;
var last_attempt_ns: u64 = 0;
/// The latest fetch attempt by any instance, as last read from the shared fetch state.
var seen_attempt_ns: u64 = 0;

/// Requests waiting for a fetch (context id -> call token). Bounded: an instance serves one stream at
/// a time, and entries of streams that went away are overwritten.
const Waiter = struct { ctx: u32 = 0, call: u32 = 0, used: bool = false };
var waiters: [16]Waiter = [_]Waiter{.{}} ** 16;

fn jwksForget() void {
    if (key_set.arena) |arena| {
        arena.deinit();
        proxy.persistent.destroy(arena);
    }
    key_set = .{};
    fetch_token = null;
    last_attempt_ns = 0;
    seen_attempt_ns = 0;
    for (&waiters) |*w| w.* = .{};
}

const KeySetResult = union(enum) { keys: []const keys.Key, wait, unavailable: u64 };

/// The key set to verify with. Picks up a newer shared copy; starts a fetch when there is none yet,
/// when it is older than refresh_interval, or (`unknown_kid`) when a token names a key it lacks -- every
/// fetch at most once per min_refetch_interval across all instances sharing the store.
fn jwksKeys(ctx: u32, src: *const Jwks, now: u64, resumed: bool, unknown_kid: bool) KeySetResult {
    syncFromShared(src);
    const have = key_set.keys.len > 0;
    const stale = have and now -| key_set.fetched_at_ns >= src.refresh_ns;
    if (!resumed and (!have or stale or unknown_kid)) {
        if (fetch_token != null and now -| fetch_started_ns > @as(u64, src.timeout_ms) * 2 * std.time.ns_per_ms) fetch_token = null;
        if (fetch_token == null and claimFetch(src, now)) {
            if (startFetch(src, now)) {
                addWaiter(ctx, fetch_token.?);
                return .wait;
            }
        }
    }
    if (have) return .{ .keys = key_set.keys };
    // A fetch started by another instance is probably still in flight: come back soon. Otherwise the
    // last one failed: no new attempt before min_refetch_interval.
    const since = now -| seen_attempt_ns;
    const in_flight = seen_attempt_ns > last_attempt_ns and since <= @as(u64, src.timeout_ms) * std.time.ns_per_ms;
    const retry = if (in_flight) 1 else @max((src.min_refetch_ns -| since) / ns_per_s, 1);
    return .{ .unavailable = retry };
}

fn addWaiter(ctx: u32, call: u32) void {
    for (&waiters) |*w| {
        if (!w.used or w.call != call) {
            w.* = .{ .ctx = ctx, .call = call, .used = true };
            return;
        }
    }
    waiters[0] = .{ .ctx = ctx, .call = call, .used = true };
}

/// Loads the shared document if it is newer than ours.
fn syncFromShared(src: *const Jwks) void {
    switch (proxy.getSharedData(src.doc_key)) {
        .found => |f| {
            if (f.cas == key_set.cas and key_set.keys.len > 0) return;
            if (f.value.len < 8) return;
            const fetched_at = std.mem.readInt(u64, f.value[0..8], .little);
            installKeySet(f.value[8..], fetched_at, f.cas) catch |e| {
                proxy.log(.warn, "auth: the shared JWKS document is unusable ({s}); keeping the current keys", .{@errorName(e)});
            };
        },
        .not_found => {},
        .failed => |st| proxy.log(.err, "auth: reading the JWKS from shared data failed ({s})", .{@tagName(st)}),
    }
}

fn installKeySet(doc: []const u8, fetched_at: u64, cas: u32) error{ InvalidJwks, OutOfMemory }!void {
    const arena = try proxy.persistent.create(std.heap.ArenaAllocator);
    arena.* = std.heap.ArenaAllocator.init(proxy.persistent);
    errdefer {
        arena.deinit();
        proxy.persistent.destroy(arena);
    }
    const parsed = try parseJwks(arena.allocator(), doc);
    if (key_set.arena) |old| {
        old.deinit();
        proxy.persistent.destroy(old);
    }
    key_set = .{ .arena = arena, .keys = parsed, .cas = cas, .fetched_at_ns = fetched_at };
    // Keys may have been revoked: tokens verified with the old set are checked again.
    tokenCacheReset(if (settings.jwt) |j| j.cache_entries else 0);
}

/// {"keys": [...]}: the usable signature keys (others -- encryption keys, unsupported types, symmetric
/// keys -- are skipped). InvalidJwks when none is usable.
fn parseJwks(alloc: Allocator, doc: []const u8) error{ InvalidJwks, OutOfMemory }![]const keys.Key {
    const a = proxy.scratch;
    const root = parseObject(a, doc) orelse return error.InvalidJwks;
    const list = switch (root.get("keys") orelse return error.InvalidJwks) {
        .array => |arr| arr.items,
        else => return error.InvalidJwks,
    };
    var out: std.ArrayListUnmanaged(keys.Key) = .{};
    for (list) |item| {
        if (out.items.len == max_jwks_keys) break;
        const obj = switch (item) {
            .object => |o| o,
            else => continue,
        };
        var problem: keys.Problem = .{};
        const k = keys.fromJwk(alloc, a, obj, null, false, &problem) catch |e| switch (e) {
            error.OutOfMemory => return error.OutOfMemory,
            error.InvalidKey => {
                if (proxy.logEnabled(.debug)) proxy.log(.debug, "auth: JWKS key skipped: {s}", .{problem.text});
                continue;
            },
        };
        try out.append(alloc, k);
    }
    if (out.items.len == 0) return error.InvalidJwks;
    return out.items;
}

const FetchState = struct { attempt_ns: u64 = 0, success_ns: u64 = 0 };

fn decodeState(v: []const u8) FetchState {
    if (v.len != 16) return .{};
    return .{ .attempt_ns = std.mem.readInt(u64, v[0..8], .little), .success_ns = std.mem.readInt(u64, v[8..16], .little) };
}

fn writeState(src: *const Jwks, st: FetchState, seen_cas: ?u32) proxy.CasOutcome {
    var buf: [16]u8 = undefined;
    std.mem.writeInt(u64, buf[0..8], st.attempt_ns, .little);
    std.mem.writeInt(u64, buf[8..16], st.success_ns, .little);
    return proxy.casWrite(src.state_key, &buf, seen_cas);
}

/// Takes the right to fetch now (compare-and-swap on the shared fetch state), unless a fetch was
/// attempted less than min_refetch_interval ago by any instance sharing the store.
fn claimFetch(src: *const Jwks, now: u64) bool {
    if (last_attempt_ns != 0 and now -| last_attempt_ns < src.min_refetch_ns) {
        seen_attempt_ns = @max(seen_attempt_ns, last_attempt_ns);
        return false;
    }
    var attempt: usize = 0;
    while (attempt < 16) : (attempt += 1) {
        var st: FetchState = .{};
        var seen: ?u32 = null;
        switch (proxy.getSharedData(src.state_key)) {
            .found => |f| {
                st = decodeState(f.value);
                seen = f.cas;
            },
            .not_found => {},
            .failed => {
                // No shared store: this instance's own limit still holds.
                last_attempt_ns = now;
                seen_attempt_ns = now;
                return true;
            },
        }
        seen_attempt_ns = @max(st.attempt_ns, last_attempt_ns);
        if (st.attempt_ns != 0 and now -| st.attempt_ns < src.min_refetch_ns) return false;
        st.attempt_ns = now;
        switch (writeState(src, st, seen)) {
            .written => {
                last_attempt_ns = now;
                seen_attempt_ns = now;
                return true;
            },
            .retry => continue,
            .failed => {
                last_attempt_ns = now;
                seen_attempt_ns = now;
                return true;
            },
        }
    }
    return false;
}

fn startFetch(src: *const Jwks, now: u64) bool {
    const pairs = proxy.encodePairs(proxy.scratch, &.{
        .{ .name = ":method", .value = "GET" },
        .{ .name = ":path", .value = src.path },
        .{ .name = ":authority", .value = src.authority },
        .{ .name = "accept", .value = "application/json" },
    }) catch return false;
    var token: u32 = 0;
    const empty = "";
    const st = host.proxy_http_call(
        src.upstream.ptr,
        src.upstream.len,
        pairs.ptr,
        pairs.len,
        empty.ptr,
        0,
        empty.ptr,
        0,
        src.timeout_ms,
        &token,
    );
    if (st != 0) {
        proxy.log(.err, "auth: cannot fetch the JWKS from upstream \"{s}\" (proxy_http_call status {d})", .{ src.upstream, st });
        return false;
    }
    fetch_token = token;
    fetch_started_ns = now;
    return true;
}

fn onHttpCallResponse(_: u32, token: u32, n_headers: u32, body_len: u32, _: u32) callconv(.c) void {
    resetScratch();
    if (fetch_token == null or fetch_token.? != token) return;
    fetch_token = null;
    if (settings.jwt) |*jwt| if (jwt.jwks) |*src| storeFetched(src, n_headers, body_len);
    // Resume the requests that waited for this fetch.
    for (&waiters) |*w| {
        if (!w.used or w.call != token) continue;
        w.used = false;
        if (host.proxy_set_effective_context(w.ctx) != 0) continue; // the request went away
        switch (authenticate(w.ctx, true)) {
            .allow => proxy.continueStream(.request),
            .deny, .wait => {},
        }
    }
}

fn storeFetched(src: *const Jwks, n_headers: u32, body_len: u32) void {
    if (n_headers == 0) {
        proxy.log(.warn, "auth: fetching the JWKS from upstream \"{s}\" failed", .{src.upstream});
        return;
    }
    const status = proxy.getHeader(.http_call_response_headers, ":status") orelse "";
    if (!std.mem.eql(u8, status, "200")) {
        proxy.log(.warn, "auth: the JWKS upstream \"{s}\" answered {s}", .{ src.upstream, status });
        return;
    }
    if (body_len > src.max_bytes) {
        proxy.log(.warn, "auth: the JWKS from \"{s}\" is {d} bytes (max_bytes is {d})", .{ src.upstream, body_len, src.max_bytes });
        return;
    }
    const body = proxy.getBuffer(.http_call_response_body, 0, body_len) catch "";
    const now = proxy.nowNanos();
    // Validate before sharing: a broken document must not replace a working one anywhere.
    installKeySet(body, now, 0) catch |e| {
        proxy.log(.warn, "auth: the JWKS from \"{s}\" is unusable ({s}); keeping the current keys", .{ src.upstream, @errorName(e) });
        return;
    };
    const doc = proxy.scratch.alloc(u8, 8 + body.len) catch return;
    std.mem.writeInt(u64, doc[0..8], now, .little);
    @memcpy(doc[8..], body);
    if (proxy.setSharedData(src.doc_key, doc, 0) == .ok) {
        switch (proxy.getSharedData(src.doc_key)) {
            .found => |f| key_set.cas = f.cas,
            else => {},
        }
    } else proxy.log(.err, "auth: storing the JWKS in shared data failed; only this instance has it", .{});
    var attempt: usize = 0;
    while (attempt < 16) : (attempt += 1) {
        var st: FetchState = .{ .attempt_ns = now };
        var seen: ?u32 = null;
        switch (proxy.getSharedData(src.state_key)) {
            .found => |f| {
                st = decodeState(f.value);
                seen = f.cas;
            },
            .not_found => {},
            .failed => break,
        }
        st.success_ns = now;
        if (writeState(src, st, seen) != .retry) break;
    }
    proxy.log(.info, "auth: loaded {d} key(s) from the JWKS of upstream \"{s}\"", .{ key_set.keys.len, src.upstream });
}

/// Background refresh (the gateway ticks idle instances): fetch before the keys go stale, so requests
/// rarely wait for a fetch. One instance fetches; the others pick the result up from shared data.
fn onTick(_: u32) callconv(.c) void {
    resetScratch();
    const jwt = if (settings.jwt) |*j| j else return;
    const src = if (jwt.jwks) |*j| j else return;
    const now = proxy.nowNanos();
    if (fetch_token != null) {
        if (now -| fetch_started_ns <= @as(u64, src.timeout_ms) * 2 * std.time.ns_per_ms) return;
        fetch_token = null;
    }
    const st: FetchState = switch (proxy.getSharedData(src.state_key)) {
        .found => |f| decodeState(f.value),
        .not_found => .{},
        .failed => return,
    };
    if (st.success_ns != 0 and now -| st.success_ns < src.refresh_ns) return;
    if (claimFetch(src, now)) _ = startFetch(src, now);
}
