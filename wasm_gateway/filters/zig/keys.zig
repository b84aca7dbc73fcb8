//! JWS verification keys for the auth filter: parsing (PEM, JWK) and signature checks.
//!
//! A key carries exactly one algorithm, fixed when the key is loaded (from the key type, or from its
//! configured/JWK "alg"); a token's `alg` header only has to agree with it. That is what rules out
//! `alg: none` and HS/RS confusion: an RSA key never verifies an HMAC.
const std = @import("std");
const b64 = @import("b64.zig");

const rsa = std.crypto.Certificate.rsa;
const P256 = std.crypto.sign.ecdsa.EcdsaP256Sha256;
const Ed25519 = std.crypto.sign.Ed25519;
const hmac = std.crypto.auth.hmac.sha2;
const Sha256 = std.crypto.hash.sha2.Sha256;
const Allocator = std.mem.Allocator;

pub const Alg = enum { HS256, HS384, HS512, RS256, ES256, EdDSA };

/// The JWS name, compared exactly (JWS algorithm names are case-sensitive).
pub fn parseAlg(name: []const u8) ?Alg {
    inline for (@typeInfo(Alg).@"enum".fields) |f| {
        if (std.mem.eql(u8, f.name, name)) return @field(Alg, f.name);
    }
    return null;
}

pub fn isHmac(a: Alg) bool {
    return a == .HS256 or a == .HS384 or a == .HS512;
}

/// RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
pub fn minSecretLen(a: Alg) usize {
    return switch (a) {
        .HS256 => 32,
        .HS384 => 48,
        .HS512 => 64,
        else => 0,
    };
}

pub const RsaKey = struct {
    key: rsa.PublicKey,
    /// Modulus size in bytes: 256, 384 or 512 (RSA-2048, -3072, -4096).
    modulus_len: usize,
};

pub const Material = union(enum) {
    hmac: []const u8,
    rsa: *const RsaKey,
    p256: P256.PublicKey,
    ed25519: Ed25519.PublicKey,
};

pub const Key = struct {
    kid: ?[]const u8 = null,
    alg: Alg,
    material: Material,
};

/// What went wrong when a key could not be loaded (a fixed text, for error messages).
pub const Problem = struct { text: []const u8 = "" };
pub const Error = error{ InvalidKey, OutOfMemory };

fn fail(problem: *Problem, text: []const u8) Error {
    problem.text = text;
    return error.InvalidKey;
}

// ------------------------------------------------------------------------------------------------ verification

/// Whether `sig` is a valid signature of `signing_input` by `key` under the key's algorithm.
pub fn verify(key: *const Key, signing_input: []const u8, sig: []const u8) bool {
    switch (key.material) {
        .hmac => |secret| return switch (key.alg) {
            .HS256 => macEql(hmac.HmacSha256, secret, signing_input, sig),
            .HS384 => macEql(hmac.HmacSha384, secret, signing_input, sig),
            .HS512 => macEql(hmac.HmacSha512, secret, signing_input, sig),
            else => false,
        },
        .rsa => |k| {
            if (key.alg != .RS256 or sig.len != k.modulus_len) return false;
            inline for (.{ 256, 384, 512 }) |n| {
                if (n == k.modulus_len) {
                    rsa.PKCS1v1_5Signature.verify(n, sig[0..n].*, signing_input, k.key, Sha256) catch return false;
                    return true;
                }
            }
            return false;
        },
        .p256 => |pk| {
            if (key.alg != .ES256 or sig.len != P256.Signature.encoded_length) return false;
            const s = P256.Signature.fromBytes(sig[0..P256.Signature.encoded_length].*);
            s.verify(signing_input, pk) catch return false;
            return true;
        },
        .ed25519 => |pk| {
            if (key.alg != .EdDSA or sig.len != Ed25519.Signature.encoded_length) return false;
            const s = Ed25519.Signature.fromBytes(sig[0..Ed25519.Signature.encoded_length].*);
            s.verify(signing_input, pk) catch return false;
            return true;
        },
    }
}

fn macEql(comptime Mac: type, secret: []const u8, msg: []const u8, sig: []const u8) bool {
    if (sig.len != Mac.mac_length) return false;
    var expected: [Mac.mac_length]u8 = undefined;
    Mac.create(&expected, msg, secret);
    return std.crypto.timing_safe.eql([Mac.mac_length]u8, expected, sig[0..Mac.mac_length].*);
}

// ------------------------------------------------------------------------------------------------ construction

/// Checks that `configured` (if any) agrees with the algorithm the key type implies.
fn pinned(natural: Alg, configured: ?Alg, problem: *Problem) Error!Alg {
    if (configured) |a| {
        if (a != natural) return fail(problem, switch (natural) {
            .RS256 => "an RSA key can only be used with alg RS256",
            .ES256 => "a P-256 key can only be used with alg ES256",
            .EdDSA => "an Ed25519 key can only be used with alg EdDSA",
            else => "the key type does not match alg",
        });
    }
    return natural;
}

fn stripZeros(bytes: []const u8) []const u8 {
    var i: usize = 0;
    while (i < bytes.len and bytes[i] == 0) i += 1;
    return bytes[i..];
}

pub fn rsaKey(alloc: Allocator, modulus_raw: []const u8, exponent_raw: []const u8, problem: *Problem) Error!Material {
    const n = stripZeros(modulus_raw);
    const e = stripZeros(exponent_raw);
    if (n.len != 256 and n.len != 384 and n.len != 512)
        return fail(problem, "RSA modulus must be 2048, 3072 or 4096 bits");
    if (e.len == 0 or e.len > 4) return fail(problem, "RSA exponent is invalid");
    const k = try alloc.create(RsaKey);
    k.* = .{
        .key = rsa.PublicKey.fromBytes(e, n) catch return fail(problem, "RSA public key is invalid"),
        .modulus_len = n.len,
    };
    return .{ .rsa = k };
}

pub fn p256Key(sec1: []const u8, problem: *Problem) Error!Material {
    const pk = P256.PublicKey.fromSec1(sec1) catch return fail(problem, "P-256 public key is not a point on the curve");
    return .{ .p256 = pk };
}

pub fn ed25519Key(raw: []const u8, problem: *Problem) Error!Material {
    if (raw.len != 32) return fail(problem, "Ed25519 public key must be 32 bytes");
    const pk = Ed25519.PublicKey.fromBytes(raw[0..32].*) catch return fail(problem, "Ed25519 public key is not canonical");
    return .{ .ed25519 = pk };
}

/// An HMAC key for `a` from secret bytes (copied into `alloc`).
pub fn hmacKey(alloc: Allocator, a: Alg, secret: []const u8, problem: *Problem) Error!Material {
    if (!isHmac(a)) return fail(problem, "a shared secret needs alg HS256, HS384 or HS512");
    if (secret.len < minSecretLen(a)) return fail(problem, switch (a) {
        .HS256 => "an HS256 secret must be at least 32 bytes",
        .HS384 => "an HS384 secret must be at least 48 bytes",
        else => "an HS512 secret must be at least 64 bytes",
    });
    return .{ .hmac = try alloc.dupe(u8, secret) };
}

// ------------------------------------------------------------------------------------------------ DER / PEM

const Tlv = struct { tag: u8, body: []const u8, rest: []const u8 };

fn readTlv(data: []const u8) error{Malformed}!Tlv {
    if (data.len < 2) return error.Malformed;
    const tag = data[0];
    var len: usize = data[1];
    var pos: usize = 2;
    if (len >= 0x80) {
        const n = len & 0x7f;
        if (n == 0 or n > 3 or data.len < 2 + n) return error.Malformed;
        len = 0;
        for (data[2 .. 2 + n]) |b| len = (len << 8) | b;
        pos += n;
    }
    if (data.len - pos < len) return error.Malformed;
    return .{ .tag = tag, .body = data[pos .. pos + len], .rest = data[pos + len ..] };
}

const oid_rsa = [_]u8{ 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01 };
const oid_ec = [_]u8{ 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01 };
const oid_p256 = [_]u8{ 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
const oid_ed25519 = [_]u8{ 0x2b, 0x65, 0x70 };

const Parsed = struct { alg: Alg, material: Material };

/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (PKCS#1).
fn pkcs1(alloc: Allocator, der: []const u8, problem: *Problem) Error!Parsed {
    const seq = readTlv(der) catch return fail(problem, "RSA public key: malformed DER");
    if (seq.tag != 0x30) return fail(problem, "RSA public key: malformed DER");
    const n = readTlv(seq.body) catch return fail(problem, "RSA public key: malformed DER");
    const e = readTlv(n.rest) catch return fail(problem, "RSA public key: malformed DER");
    if (n.tag != 0x02 or e.tag != 0x02) return fail(problem, "RSA public key: malformed DER");
    return .{ .alg = .RS256, .material = try rsaKey(alloc, n.body, e.body, problem) };
}

/// SubjectPublicKeyInfo (the "PUBLIC KEY" PEM): RSA, EC P-256 or Ed25519.
fn spki(alloc: Allocator, der: []const u8, problem: *Problem) Error!Parsed {
    const bad = "PUBLIC KEY: malformed DER";
    const seq = readTlv(der) catch return fail(problem, bad);
    if (seq.tag != 0x30) return fail(problem, bad);
    const alg_id = readTlv(seq.body) catch return fail(problem, bad);
    if (alg_id.tag != 0x30) return fail(problem, bad);
    const bits = readTlv(alg_id.rest) catch return fail(problem, bad);
    if (bits.tag != 0x03 or bits.body.len < 2 or bits.body[0] != 0) return fail(problem, bad);
    const key = bits.body[1..];
    const oid = readTlv(alg_id.body) catch return fail(problem, bad);
    if (oid.tag != 0x06) return fail(problem, bad);
    if (std.mem.eql(u8, oid.body, &oid_rsa)) return pkcs1(alloc, key, problem);
    if (std.mem.eql(u8, oid.body, &oid_ed25519)) return .{ .alg = .EdDSA, .material = try ed25519Key(key, problem) };
    if (std.mem.eql(u8, oid.body, &oid_ec)) {
        const curve = readTlv(oid.rest) catch return fail(problem, bad);
        if (curve.tag != 0x06 or !std.mem.eql(u8, curve.body, &oid_p256))
            return fail(problem, "EC public key: only the P-256 curve is supported");
        return .{ .alg = .ES256, .material = try p256Key(key, problem) };
    }
    return fail(problem, "PUBLIC KEY: unsupported key type (RSA, EC P-256 and Ed25519 are supported)");
}

/// A PEM public key ("PUBLIC KEY" or "RSA PUBLIC KEY"); the algorithm follows from the key type.
pub fn fromPem(alloc: Allocator, scratch: Allocator, pem: []const u8, configured: ?Alg, problem: *Problem) Error!Key {
    const begin = "-----BEGIN ";
    const start = std.mem.indexOf(u8, pem, begin) orelse return fail(problem, "no \"-----BEGIN ...-----\" line");
    const label_start = start + begin.len;
    const label_end = std.mem.indexOfPos(u8, pem, label_start, "-----") orelse return fail(problem, "malformed BEGIN line");
    const label = pem[label_start..label_end];
    if (std.mem.indexOf(u8, label, "PRIVATE") != null)
        return fail(problem, "this is a private key: configure the public key");
    const end_line = try std.fmt.allocPrint(scratch, "-----END {s}-----", .{label});
    const body_end = std.mem.indexOfPos(u8, pem, label_end + 5, end_line) orelse return fail(problem, "no matching END line");
    const der = b64.decodeStd(scratch, pem[label_end + 5 .. body_end]) catch |e| switch (e) {
        error.OutOfMemory => return error.OutOfMemory,
        else => return fail(problem, "the PEM body is not valid base64"),
    };
    const parsed = if (std.mem.eql(u8, label, "PUBLIC KEY"))
        try spki(alloc, der, problem)
    else if (std.mem.eql(u8, label, "RSA PUBLIC KEY"))
        try pkcs1(alloc, der, problem)
    else
        return fail(problem, "unsupported PEM type (expected PUBLIC KEY or RSA PUBLIC KEY)");
    return .{ .alg = try pinned(parsed.alg, configured, problem), .material = parsed.material };
}

// ------------------------------------------------------------------------------------------------ JWK

fn jwkBytes(scratch: Allocator, obj: std.json.ObjectMap, field: []const u8, problem: *Problem, missing: []const u8) Error![]const u8 {
    const v = obj.get(field) orelse return fail(problem, missing);
    const s = switch (v) {
        .string => |s| s,
        else => return fail(problem, missing),
    };
    return b64.decodeUrlLenient(scratch, s) catch |e| switch (e) {
        error.OutOfMemory => error.OutOfMemory,
        else => fail(problem, "a JWK field is not valid base64url"),
    };
}

fn jwkString(obj: std.json.ObjectMap, field: []const u8) ?[]const u8 {
    return switch (obj.get(field) orelse return null) {
        .string => |s| s,
        else => null,
    };
}

/// A JWK (RFC 7517) public key, or an "oct" secret when `allow_secret` (inline configuration only: a
/// fetched key set never supplies HMAC secrets). `configured` overrides a missing JWK "alg".
pub fn fromJwk(
    alloc: Allocator,
    scratch: Allocator,
    obj: std.json.ObjectMap,
    configured: ?Alg,
    allow_secret: bool,
    problem: *Problem,
) Error!Key {
    const kty = jwkString(obj, "kty") orelse return fail(problem, "JWK without \"kty\"");
    if (jwkString(obj, "use")) |use| {
        if (!std.mem.eql(u8, use, "sig")) return fail(problem, "JWK \"use\" is not \"sig\"");
    } else if (obj.get("use") != null) return fail(problem, "JWK \"use\" must be a string");
    var alg = configured;
    if (obj.get("alg")) |v| {
        const name = switch (v) {
            .string => |s| s,
            else => return fail(problem, "JWK \"alg\" must be a string"),
        };
        const a = parseAlg(name) orelse return fail(problem, "JWK \"alg\" is not supported (HS256/384/512, RS256, ES256, EdDSA)");
        if (alg != null and alg.? != a) return fail(problem, "JWK \"alg\" differs from the configured alg");
        alg = a;
    }
    var kid: ?[]const u8 = null;
    if (obj.get("kid")) |v| switch (v) {
        .string => |s| kid = try alloc.dupe(u8, s),
        else => return fail(problem, "JWK \"kid\" must be a string"),
    };
    if (std.mem.eql(u8, kty, "RSA")) {
        const n = try jwkBytes(scratch, obj, "n", problem, "RSA JWK needs \"n\"");
        const e = try jwkBytes(scratch, obj, "e", problem, "RSA JWK needs \"e\"");
        return .{ .kid = kid, .alg = try pinned(.RS256, alg, problem), .material = try rsaKey(alloc, n, e, problem) };
    }
    if (std.mem.eql(u8, kty, "EC")) {
        const crv = jwkString(obj, "crv") orelse return fail(problem, "EC JWK needs \"crv\"");
        if (!std.mem.eql(u8, crv, "P-256")) return fail(problem, "EC JWK: only crv P-256 is supported");
        const x = try jwkBytes(scratch, obj, "x", problem, "EC JWK needs \"x\"");
        const y = try jwkBytes(scratch, obj, "y", problem, "EC JWK needs \"y\"");
        if (x.len != 32 or y.len != 32) return fail(problem, "EC JWK: x and y must be 32 bytes");
        var sec1: [65]u8 = undefined;
        sec1[0] = 0x04;
        @memcpy(sec1[1..33], x);
        @memcpy(sec1[33..65], y);
        return .{ .kid = kid, .alg = try pinned(.ES256, alg, problem), .material = try p256Key(&sec1, problem) };
    }
    if (std.mem.eql(u8, kty, "OKP")) {
        const crv = jwkString(obj, "crv") orelse return fail(problem, "OKP JWK needs \"crv\"");
        if (!std.mem.eql(u8, crv, "Ed25519")) return fail(problem, "OKP JWK: only crv Ed25519 is supported");
        const x = try jwkBytes(scratch, obj, "x", problem, "OKP JWK needs \"x\"");
        return .{ .kid = kid, .alg = try pinned(.EdDSA, alg, problem), .material = try ed25519Key(x, problem) };
    }
    if (std.mem.eql(u8, kty, "oct")) {
        if (!allow_secret) return fail(problem, "symmetric (oct) keys are not accepted from a key set");
        const a = alg orelse return fail(problem, "an oct JWK needs \"alg\" (HS256, HS384 or HS512)");
        const k = try jwkBytes(scratch, obj, "k", problem, "oct JWK needs \"k\"");
        return .{ .kid = kid, .alg = a, .material = try hmacKey(alloc, a, k, problem) };
    }
    return fail(problem, "JWK \"kty\" is not supported (RSA, EC, OKP, oct)");
}
