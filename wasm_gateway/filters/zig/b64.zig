//! Base64 decoding for the auth filter: strict base64url for JWS segments, lenient forms for key material.
//!
//! Token segments must be canonical (RFC 7515: base64url, no padding, no whitespace, zero trailing bits), so
//! one token has exactly one spelling. Key material written by people (PEM bodies, JWK fields) is decoded
//! leniently: whitespace and trailing padding are skipped.
const std = @import("std");

pub const Error = error{ InvalidBase64, OutOfMemory };

const invalid: u8 = 0xff;

fn table(comptime alphabet: *const [64]u8) [256]u8 {
    var t = [_]u8{invalid} ** 256;
    for (alphabet, 0..) |c, i| t[c] = @intCast(i);
    return t;
}

const url_table = table("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_");
const std_table = table("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/");

/// Bytes decoded from `n` unpadded characters; null for a length no encoding produces (n % 4 == 1).
pub fn decodedLen(n: usize) ?usize {
    if (n % 4 == 1) return null;
    return n / 4 * 3 + (n % 4) * 3 / 4;
}

/// Decodes `chars` (already stripped of padding and whitespace) with `t` into `out`, which must be
/// `decodedLen(chars.len)` long. Rejects characters outside the alphabet and non-zero trailing bits.
fn decodeExact(t: *const [256]u8, out: []u8, chars: []const u8) error{InvalidBase64}!void {
    var acc: u32 = 0;
    var bits: u5 = 0;
    var o: usize = 0;
    for (chars) |c| {
        const v = t[c];
        if (v == invalid) return error.InvalidBase64;
        acc = (acc << 6) | v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o] = @truncate(acc >> bits);
            o += 1;
            acc &= (@as(u32, 1) << bits) - 1;
        }
    }
    // Leftover bits (2 or 4) must be zero: otherwise two spellings decode to the same bytes.
    if (acc != 0) return error.InvalidBase64;
    std.debug.assert(o == out.len);
}

/// Strict base64url without padding into `out` (a slice at least `decodedLen(s.len)` long).
pub fn decodeUrlInto(out: []u8, s: []const u8) error{InvalidBase64}![]u8 {
    const n = decodedLen(s.len) orelse return error.InvalidBase64;
    if (out.len < n) return error.InvalidBase64;
    try decodeExact(&url_table, out[0..n], s);
    return out[0..n];
}

/// Strict base64url without padding (JWS segments).
pub fn decodeUrl(alloc: std.mem.Allocator, s: []const u8) Error![]u8 {
    const n = decodedLen(s.len) orelse return error.InvalidBase64;
    const out = try alloc.alloc(u8, n);
    try decodeExact(&url_table, out, s);
    return out;
}

fn cleaned(alloc: std.mem.Allocator, s: []const u8) Error![]u8 {
    var out = try alloc.alloc(u8, s.len);
    var n: usize = 0;
    for (s) |c| {
        if (c == ' ' or c == '\t' or c == '\r' or c == '\n') continue;
        out[n] = c;
        n += 1;
    }
    var end = n;
    var pad: usize = 0;
    while (end > 0 and out[end - 1] == '=') : (pad += 1) end -= 1;
    if (pad > 2) return error.InvalidBase64;
    return out[0..end];
}

/// base64url for key material (JWK fields): tolerates whitespace and trailing '=' padding.
pub fn decodeUrlLenient(alloc: std.mem.Allocator, s: []const u8) Error![]u8 {
    const chars = try cleaned(alloc, s);
    const n = decodedLen(chars.len) orelse return error.InvalidBase64;
    const out = try alloc.alloc(u8, n);
    try decodeExact(&url_table, out, chars);
    return out;
}

/// Standard base64 (PEM bodies, "secret_base64"): tolerates whitespace and '=' padding.
pub fn decodeStd(alloc: std.mem.Allocator, s: []const u8) Error![]u8 {
    const chars = try cleaned(alloc, s);
    const n = decodedLen(chars.len) orelse return error.InvalidBase64;
    const out = try alloc.alloc(u8, n);
    try decodeExact(&std_table, out, chars);
    return out;
}

test "strict base64url" {
    var buf: [16]u8 = undefined;
    try std.testing.expectEqualStrings("hi", try decodeUrlInto(&buf, "aGk"));
    try std.testing.expectError(error.InvalidBase64, decodeUrlInto(&buf, "aGl")); // non-zero trailing bits
    try std.testing.expectError(error.InvalidBase64, decodeUrlInto(&buf, "aGk="));
    try std.testing.expectError(error.InvalidBase64, decodeUrlInto(&buf, "a"));
    try std.testing.expectError(error.InvalidBase64, decodeUrlInto(&buf, "a+/k"));
    try std.testing.expectEqualStrings("\xfb\xff", try decodeUrlInto(&buf, "-_8"));
}
