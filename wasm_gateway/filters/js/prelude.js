// The JS filter's Web/Workers API and request logic, evaluated once per instance at proxy_on_vm_start.
// glue.c calls this function with the host functions and keeps the object it returns; each Proxy-Wasm
// callback enters one of its methods, which answer CONTINUE 0, PAUSE 1, SETTLE 2 ("run the promise jobs, then
// call settle(id)") or FAIL -1 (the script failed and it was logged: the gateway applies the failure policy).
(function (host) {
  "use strict";

  const CONTINUE = 0, PAUSE = 1, SETTLE = 2, FAIL = -1;
  const REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2, HTTP_CALL_RESPONSE_HEADERS = 6;
  const REQUEST_BODY = 0, RESPONSE_BODY = 1, HTTP_CALL_RESPONSE_BODY = 4;
  const TRACE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4;
  const global = globalThis;
  const hidden = Symbol("internal");

  // ---------------------------------------------------------------------------------------------- helpers

  function define(name, value) {
    Object.defineProperty(global, name, { value, writable: true, configurable: true, enumerable: false });
  }

  function describe(value) {
    if (value === null) return "null";
    if (typeof value === "object" || typeof value === "function") {
      const ctor = value.constructor && value.constructor.name;
      return ctor ? `an object of type ${ctor}` : "an object";
    }
    return `${typeof value} ${String(value)}`;
  }

  function inspect(value, depth, seen) {
    if (typeof value === "string") return depth === 0 ? value : JSON.stringify(value);
    if (value instanceof Error) return value.stack ? `${value.name}: ${value.message}\n${value.stack}`.trimEnd() : String(value);
    if (typeof value !== "object" || value === null) {
      if (typeof value === "function") return `[Function ${value.name || "(anonymous)"}]`;
      if (typeof value === "symbol") return value.toString();
      return String(value);
    }
    if (seen.includes(value)) return "[Circular]";
    if (depth > 3) return Array.isArray(value) ? "[Array]" : "[Object]";
    seen = seen.concat([value]);
    if (value instanceof Headers) return `Headers ${inspect(Object.fromEntries(value), depth + 1, seen)}`;
    if (value instanceof URL || value instanceof URLSearchParams) return `${value.constructor.name} ${value}`;
    if (value instanceof Request) return `Request { ${value.method} ${value.url} }`;
    if (value instanceof Response) return `Response { ${value.status} }`;
    if (value instanceof Map) return `Map(${value.size}) {${[...value].map(([k, v]) => ` ${inspect(k, depth + 1, seen)} => ${inspect(v, depth + 1, seen)}`).join(",")} }`;
    if (value instanceof Set) return `Set(${value.size}) {${[...value].map((v) => " " + inspect(v, depth + 1, seen)).join(",")} }`;
    if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${value.length}) [${Array.prototype.slice.call(value, 0, 32).join(", ")}${value.length > 32 ? ", ..." : ""}]`;
    if (Array.isArray(value)) return `[${value.map((v) => inspect(v, depth + 1, seen)).join(", ")}]`;
    const keys = Object.keys(value);
    const body = keys.map((k) => `${/^[A-Za-z_$][\w$]*$/.test(k) ? k : JSON.stringify(k)}: ${inspect(value[k], depth + 1, seen)}`);
    return keys.length ? `{ ${body.join(", ")} }` : "{}";
  }

  function format(args) {
    let out = "";
    let i = 0;
    if (typeof args[0] === "string" && args.length > 1 && args[0].includes("%")) {
      i = 1;
      out = args[0].replace(/%[sdifoOj%]/g, (m) => {
        if (m === "%%") return "%";
        if (i >= args.length) return m;
        const a = args[i++];
        if (m === "%d" || m === "%i") return String(m === "%i" ? Math.trunc(Number(a)) : Number(a));
        if (m === "%f") return String(Number(a));
        if (m === "%s") return typeof a === "string" ? a : inspect(a, 1, []);
        return inspect(a, 1, []);
      });
    }
    for (; i < args.length; i++) out += (out.length ? " " : "") + inspect(args[i], 0, []);
    return out;
  }

  const counts = new Map();
  const console = {
    log: (...a) => host.log(INFO, format(a)),
    info: (...a) => host.log(INFO, format(a)),
    debug: (...a) => host.log(DEBUG, format(a)),
    trace: (...a) => host.log(TRACE, format(a)),
    warn: (...a) => host.log(WARN, format(a)),
    error: (...a) => host.log(ERROR, format(a)),
    assert: (cond, ...a) => { if (!cond) host.log(ERROR, "Assertion failed" + (a.length ? ": " + format(a) : "")); },
    count: (label = "default") => { const n = (counts.get(label) || 0) + 1; counts.set(label, n); host.log(INFO, `${label}: ${n}`); },
  };

  // ---------------------------------------------------------------------------------------------- encoding

  function toBytes(data) {
    if (data instanceof Uint8Array) return data;
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    throw new TypeError(`expected an ArrayBuffer or a typed array, got ${describe(data)}`);
  }

  class TextEncoder {
    get encoding() { return "utf-8"; }
    encode(input = "") { return new Uint8Array(host.utf8Encode(String(input))); }
    encodeInto(input, dest) {
      const bytes = this.encode(input);
      let n = Math.min(bytes.length, dest.length);
      while (n > 0 && n < bytes.length && (bytes[n] & 0xc0) === 0x80) n--; // whole characters only
      dest.set(bytes.subarray(0, n));
      return { read: host.utf8Decode(bytes.subarray(0, n), false).length, written: n };
    }
  }

  class TextDecoder {
    constructor(label = "utf-8", options = {}) {
      const l = String(label).trim().toLowerCase();
      if (l !== "utf-8" && l !== "utf8" && l !== "unicode-1-1-utf-8") throw new RangeError(`TextDecoder: unsupported encoding ${label} (only utf-8)`);
      this.fatal = !!options.fatal;
      this.ignoreBOM = !!options.ignoreBOM;
    }
    get encoding() { return "utf-8"; }
    decode(input) {
      if (input === undefined) return "";
      const s = host.utf8Decode(toBytes(input), this.fatal);
      return !this.ignoreBOM && s.charCodeAt(0) === 0xfeff ? s.slice(1) : s;
    }
  }

  const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  function btoa(input) {
    const s = String(input);
    let out = "";
    for (let i = 0; i < s.length; i += 3) {
      const a = s.charCodeAt(i), b = s.charCodeAt(i + 1), c = s.charCodeAt(i + 2);
      if (a > 255 || b > 255 || c > 255) throw new DOMException("btoa: the string contains characters outside of the Latin1 range", "InvalidCharacterError");
      const n = (a << 16) | ((b || 0) << 8) | (c || 0);
      out += B64[n >> 18] + B64[(n >> 12) & 63] + (i + 1 < s.length ? B64[(n >> 6) & 63] : "=") + (i + 2 < s.length ? B64[n & 63] : "=");
    }
    return out;
  }
  function atob(input) {
    let s = String(input).replace(/[\t\n\f\r ]/g, "");
    if (s.length % 4 === 0) s = s.replace(/==?$/, "");
    if (s.length % 4 === 1 || /[^A-Za-z0-9+/]/.test(s)) throw new DOMException("atob: the string is not correctly encoded", "InvalidCharacterError");
    let out = "", bits = 0, acc = 0;
    for (let i = 0; i < s.length; i++) {
      acc = (acc << 6) | B64.indexOf(s[i]);
      bits += 6;
      if (bits >= 8) { bits -= 8; out += String.fromCharCode((acc >> bits) & 255); }
    }
    return out;
  }

  class DOMException extends Error {
    constructor(message = "", name = "Error") { super(message); this.name = name; }
  }

  // ---------------------------------------------------------------------------------------------- crypto

  // crypto.subtle: SHA-1/SHA-256 digests and HMAC keys (sign, verify), computed in C.
  function hashName(alg) {
    const name = String(typeof alg === "object" && alg !== null ? alg.name : alg).toUpperCase();
    if (name === "SHA-256" || name === "SHA-1") return name;
    throw new DOMException(`crypto.subtle: unsupported hash ${JSON.stringify(String(name))} (SHA-1 and SHA-256 are)`, "NotSupportedError");
  }
  class CryptoKey {
    constructor(secret, hash, usages, extractable) {
      this[hidden] = secret;
      this.type = "secret";
      this.extractable = extractable;
      this.algorithm = { name: "HMAC", hash: { name: hash }, length: secret.byteLength * 8 };
      this.usages = usages;
    }
  }
  function hmacKey(key, usage) {
    if (!(key instanceof CryptoKey)) throw new TypeError("crypto.subtle: expected a CryptoKey from importKey");
    if (!key.usages.includes(usage)) throw new DOMException(`crypto.subtle: the key may not ${usage}`, "InvalidAccessError");
    return key;
  }
  const subtle = {
    async digest(algorithm, data) {
      return host.digest(hashName(algorithm) === "SHA-1", toBytes(data));
    },
    async importKey(format, keyData, algorithm, extractable, usages) {
      if (format !== "raw") throw new DOMException(`crypto.subtle.importKey: format ${JSON.stringify(String(format))} is not supported (raw is)`, "NotSupportedError");
      const name = String(typeof algorithm === "object" && algorithm !== null ? algorithm.name : algorithm).toUpperCase();
      if (name !== "HMAC") throw new DOMException(`crypto.subtle.importKey: algorithm ${JSON.stringify(name)} is not supported (HMAC is)`, "NotSupportedError");
      const usageList = Array.from(usages || []);
      if (usageList.some((u) => u !== "sign" && u !== "verify")) throw new SyntaxError("crypto.subtle.importKey: HMAC keys can only sign and verify");
      return new CryptoKey(toBytes(keyData).slice(), hashName(algorithm.hash), usageList, !!extractable);
    },
    async sign(algorithm, key, data) {
      const k = hmacKey(key, "sign");
      return host.hmac(k.algorithm.hash.name === "SHA-1", k[hidden], toBytes(data));
    },
    async verify(algorithm, key, signature, data) {
      const k = hmacKey(key, "verify");
      const mac = new Uint8Array(host.hmac(k.algorithm.hash.name === "SHA-1", k[hidden], toBytes(data)));
      const sig = toBytes(signature);
      let diff = mac.length ^ sig.length; // constant time in the signature's content
      for (let i = 0; i < mac.length; i++) diff |= mac[i] ^ (sig[i] | 0);
      return diff === 0;
    },
  };

  const crypto = {
    subtle,
    getRandomValues(array) {
      if (!(ArrayBuffer.isView(array)) || array instanceof Float32Array || array instanceof Float64Array || array instanceof DataView)
        throw new TypeError("crypto.getRandomValues: expected an integer typed array");
      if (array.byteLength > 65536) throw new DOMException(`crypto.getRandomValues: ${array.byteLength} bytes requested, at most 65536`, "QuotaExceededError");
      new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(new Uint8Array(host.randomBytes(array.byteLength)));
      return array;
    },
    randomUUID() {
      const b = new Uint8Array(host.randomBytes(16));
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    },
  };

  // ---------------------------------------------------------------------------------------------- timers

  // Zero-delay timers run after the promise jobs, before the gateway callback returns. A delay needs the
  // request to wait on the host clock, which the filter cannot do yet: refuse it instead of firing early.
  const timers = new Map();
  let nextTimer = 1;
  function setTimeout(fn, delay = 0, ...args) {
    if (typeof fn !== "function") throw new TypeError("setTimeout: the callback must be a function");
    if (Number(delay) > 0) throw new TypeError("setTimeout with a delay is not supported in gateway filters (zero-delay timers are)");
    const id = nextTimer++;
    timers.set(id, () => fn(...args));
    host.armTimers(true);
    return id;
  }
  function clearTimeout(id) { timers.delete(id); }
  function queueMicrotask(fn) { Promise.resolve().then(() => fn()); }
  function runTimers() {
    if (timers.size === 0) { host.armTimers(false); return false; }
    const [id, fn] = timers.entries().next().value;
    timers.delete(id);
    fn();
    return true;
  }

  // ---------------------------------------------------------------------------------------------- URLSearchParams

  const FORM_SAFE = /[A-Za-z0-9*\-._]/;
  function formEncode(s) {
    let out = "";
    for (const ch of String(s)) {
      if (ch === " ") out += "+";
      else if (FORM_SAFE.test(ch)) out += ch;
      else out += percentEncodeUtf8(ch);
    }
    return out;
  }
  function percentEncodeUtf8(ch) {
    let out = "";
    for (const byte of new Uint8Array(host.utf8Encode(ch))) out += "%" + (byte < 16 ? "0" : "") + byte.toString(16).toUpperCase();
    return out;
  }
  function percentDecode(s) {
    if (!s.includes("%")) return s;
    const bytes = [];
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c === 37 && /^[0-9A-Fa-f]{2}$/.test(s.slice(i + 1, i + 3))) { bytes.push(parseInt(s.slice(i + 1, i + 3), 16)); i += 2; }
      else if (c < 128) bytes.push(c);
      else for (const b of new Uint8Array(host.utf8Encode(s[i]))) bytes.push(b);
    }
    return host.utf8Decode(new Uint8Array(bytes), false);
  }
  function formDecode(s) { return percentDecode(s.replace(/\+/g, " ")); }

  class URLSearchParams {
    constructor(init = "") {
      this[hidden] = { list: [], url: null };
      const list = this[hidden].list;
      if (init instanceof URLSearchParams) list.push(...init[hidden].list.map(([k, v]) => [k, v]));
      else if (typeof init === "object" && init !== null && typeof init[Symbol.iterator] === "function") {
        for (const pair of init) {
          const p = Array.from(pair);
          if (p.length !== 2) throw new TypeError("URLSearchParams: each pair must have exactly two items");
          list.push([String(p[0]), String(p[1])]);
        }
      } else if (typeof init === "object" && init !== null) {
        for (const k of Object.keys(init)) list.push([k, String(init[k])]);
      } else this._parse(String(init));
    }
    _parse(s) {
      const list = this[hidden].list;
      list.length = 0;
      if (s.startsWith("?")) s = s.slice(1);
      for (const part of s.split("&")) {
        if (!part) continue;
        const eq = part.indexOf("=");
        list.push(eq < 0 ? [formDecode(part), ""] : [formDecode(part.slice(0, eq)), formDecode(part.slice(eq + 1))]);
      }
    }
    _update() {
      const url = this[hidden].url;
      if (url) { const s = this.toString(); url[hidden].query = s ? s : null; }
    }
    get size() { return this[hidden].list.length; }
    append(k, v) { this[hidden].list.push([String(k), String(v)]); this._update(); }
    delete(k, v) {
      k = String(k);
      const list = this[hidden].list;
      for (let i = list.length - 1; i >= 0; i--) if (list[i][0] === k && (v === undefined || list[i][1] === String(v))) list.splice(i, 1);
      this._update();
    }
    get(k) { const e = this[hidden].list.find(([n]) => n === String(k)); return e ? e[1] : null; }
    getAll(k) { return this[hidden].list.filter(([n]) => n === String(k)).map(([, v]) => v); }
    has(k, v) { return this[hidden].list.some(([n, x]) => n === String(k) && (v === undefined || x === String(v))); }
    set(k, v) {
      k = String(k);
      const list = this[hidden].list;
      const i = list.findIndex(([n]) => n === k);
      if (i < 0) list.push([k, String(v)]);
      else { list[i][1] = String(v); for (let j = list.length - 1; j > i; j--) if (list[j][0] === k) list.splice(j, 1); }
      this._update();
    }
    sort() { const l = this[hidden].list; const s = l.map((e, i) => [e, i]).sort((a, b) => (a[0][0] < b[0][0] ? -1 : a[0][0] > b[0][0] ? 1 : a[1] - b[1])); l.splice(0, l.length, ...s.map(([e]) => e)); this._update(); }
    forEach(fn, thisArg) { for (const [k, v] of this[hidden].list.slice()) fn.call(thisArg, v, k, this); }
    *entries() { for (const [k, v] of this[hidden].list.slice()) yield [k, v]; }
    *keys() { for (const [k] of this[hidden].list.slice()) yield k; }
    *values() { for (const [, v] of this[hidden].list.slice()) yield v; }
    [Symbol.iterator]() { return this.entries(); }
    toString() { return this[hidden].list.map(([k, v]) => formEncode(k) + "=" + formEncode(v)).join("&"); }
  }

  // ---------------------------------------------------------------------------------------------- URL

  const SPECIAL = { "http:": 80, "https:": 443, "ws:": 80, "wss:": 443, "ftp:": 21, "file:": null };
  // Percent-encode sets (WHATWG): what must be escaped in each component.
  const PATH_ESCAPE = /[\x00-\x20"#<>?`{}\x7f-\uffff]/g;
  const QUERY_ESCAPE = /[\x00-\x20"#<>\x7f-\uffff]/g;
  const SPECIAL_QUERY_ESCAPE = /[\x00-\x20"#<>'\x7f-\uffff]/g;
  const FRAGMENT_ESCAPE = /[\x00-\x20"<>`\x7f-\uffff]/g;
  const USERINFO_ESCAPE = /[\x00-\x20"#<>?`{}/:;=@[\\\]^|\x7f-\uffff]/g;
  function escapeWith(s, re) { return s.replace(re, (ch) => percentEncodeUtf8(ch)); }
  function escapeUnpaired(s, re) { return escapeWith(s.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "\ufffd"), re); }

  function parseHost(input, special) {
    if (input.startsWith("[")) {
      if (!input.endsWith("]") || !/^\[[0-9A-Fa-f:.]+\]$/.test(input)) throw new TypeError(`Invalid URL host: ${input}`);
      return input.toLowerCase();
    }
    if (!special) return escapeWith(input, /[\x00-\x20"#<>?`{}\x7f-\uffff]/g);
    const host = percentDecode(input).toLowerCase();
    if (host === "" || /[\x00-\x20#%/:<>?@[\\\]^|\x7f]/.test(host)) throw new TypeError(`Invalid URL host: ${input}`);
    if (/[^\x00-\x7f]/.test(host)) throw new TypeError(`Invalid URL host: ${input} (internationalised domain names are not supported; use punycode)`);
    if (/^[0-9.]+$/.test(host) || /^0x/i.test(host)) {
      const parts = host.replace(/\.$/, "").split(".");
      if (parts.length > 4 || parts.some((p) => p === "" || !/^(0x[0-9a-f]*|[0-9]+)$/i.test(p))) throw new TypeError(`Invalid URL host: ${input}`);
      const nums = parts.map((p) => (/^0x/i.test(p) ? parseInt(p.slice(2) || "0", 16) : /^0\d/.test(p) ? parseInt(p, 8) : parseInt(p, 10)));
      let n = 0;
      for (let i = 0; i < nums.length - 1; i++) { if (nums[i] > 255) throw new TypeError(`Invalid URL host: ${input}`); n = n * 256 + nums[i]; }
      const last = nums[nums.length - 1];
      if (last >= 256 ** (5 - nums.length)) throw new TypeError(`Invalid URL host: ${input}`);
      n = n * 256 ** (5 - nums.length) + last;
      return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".");
    }
    return host;
  }

  function normalizePath(segments, special) {
    const out = [];
    for (let i = 0; i < segments.length; i++) {
      const seg = segments[i];
      const lower = seg.toLowerCase();
      const last = i === segments.length - 1;
      if (lower === ".." || lower === ".%2e" || lower === "%2e." || lower === "%2e%2e") { out.pop(); if (last) out.push(""); }
      else if (lower === "." || lower === "%2e") { if (last) out.push(""); }
      else out.push(seg);
    }
    return out;
  }

  class URL {
    constructor(url, base) {
      const input = String(url).replace(/^[\x00-\x20]+|[\x00-\x20]+$/g, "").replace(/[\t\n\r]/g, "");
      const baseUrl = base === undefined ? null : base instanceof URL ? base : new URL(base);
      this[hidden] = URL._parse(input, baseUrl);
      this[hidden].params = null;
    }
    static canParse(url, base) { try { new URL(url, base); return true; } catch { return false; } }
    static parse(url, base) { try { return new URL(url, base); } catch { return null; } }

    static _parse(input, base) {
      const m = /^([A-Za-z][A-Za-z0-9+\-.]*):(.*)$/s.exec(input);
      let r;
      if (m) {
        const scheme = m[1].toLowerCase() + ":";
        let rest = m[2];
        const special = scheme in SPECIAL;
        if (special && base && base[hidden].scheme === scheme && !/^[/\\]/.test(rest)) return URL._relative(rest, base[hidden]);
        r = { scheme, username: "", password: "", host: null, port: null, path: [], opaque: null, query: null, fragment: null };
        if (special) rest = rest.replace(/\\/g, "/");
        const hashAt = rest.indexOf("#");
        if (hashAt >= 0) { r.fragment = escapeUnpaired(rest.slice(hashAt + 1), FRAGMENT_ESCAPE); rest = rest.slice(0, hashAt); }
        const qAt = rest.indexOf("?");
        if (qAt >= 0) { r.query = escapeUnpaired(rest.slice(qAt + 1), special ? SPECIAL_QUERY_ESCAPE : QUERY_ESCAPE); rest = rest.slice(0, qAt); }
        if (special || rest.startsWith("//")) {
          if (special) rest = rest.replace(/^\/*/, "//");
          if (rest.startsWith("//")) {
            rest = rest.slice(2);
            const slash = rest.indexOf("/");
            let authority = slash < 0 ? rest : rest.slice(0, slash);
            rest = slash < 0 ? "" : rest.slice(slash);
            const at = authority.lastIndexOf("@");
            if (at >= 0) {
              const cred = authority.slice(0, at);
              authority = authority.slice(at + 1);
              const colon = cred.indexOf(":");
              r.username = escapeUnpaired(colon < 0 ? cred : cred.slice(0, colon), USERINFO_ESCAPE);
              r.password = colon < 0 ? "" : escapeUnpaired(cred.slice(colon + 1), USERINFO_ESCAPE);
            }
            const pm = /^(.*?)(?::(\d*))?$/s.exec(authority);
            let hostPart = pm[1];
            let port = pm[2];
            if (hostPart.startsWith("[") && !hostPart.endsWith("]")) { hostPart = authority; port = undefined; }
            if (/:/.test(hostPart) && !hostPart.startsWith("[")) throw new TypeError(`Invalid URL: ${input}`);
            if (hostPart === "" && scheme !== "file:" && special) throw new TypeError(`Invalid URL: ${input}`);
            r.host = hostPart === "" ? "" : parseHost(hostPart, special);
            if (port !== undefined && port !== "") {
              const n = parseInt(port, 10);
              if (n > 65535) throw new TypeError(`Invalid URL: ${input}`);
              r.port = n === SPECIAL[scheme] ? null : n;
            }
          }
          r.path = normalizePath(rest.split("/").slice(1).map((s) => escapeUnpaired(s, PATH_ESCAPE)), special);
          if (special && r.path.length === 0) r.path = [""];
        } else if (rest.startsWith("/")) {
          r.path = normalizePath(rest.split("/").slice(1).map((s) => escapeUnpaired(s, PATH_ESCAPE)), false);
        } else {
          r.opaque = escapeUnpaired(rest, /[\x00-\x1f\x7f-\uffff]/g);
        }
        return r;
      }
      if (!base) throw new TypeError(`Invalid URL: ${input}`);
      return URL._relative(input, base[hidden]);
    }

    static _relative(input, b) {
      const special = b.scheme in SPECIAL;
      if (b.opaque !== null) {
        if (input.startsWith("#")) return { ...b, path: [], fragment: escapeUnpaired(input.slice(1), FRAGMENT_ESCAPE) };
        throw new TypeError(`Invalid URL: ${input}`);
      }
      if (special) input = input.replace(/\\/g, "/");
      if (input.startsWith("//")) return URL._parse(b.scheme + input, null);
      const r = { ...b, path: b.path.slice() };
      let rest = input;
      const hashAt = rest.indexOf("#");
      r.fragment = null;
      if (hashAt >= 0) { r.fragment = escapeUnpaired(rest.slice(hashAt + 1), FRAGMENT_ESCAPE); rest = rest.slice(0, hashAt); }
      const qAt = rest.indexOf("?");
      let query = null;
      if (qAt >= 0) { query = escapeUnpaired(rest.slice(qAt + 1), special ? SPECIAL_QUERY_ESCAPE : QUERY_ESCAPE); rest = rest.slice(0, qAt); }
      if (rest === "") { r.query = qAt >= 0 ? query : b.query; return r; }
      r.query = query;
      const segs = rest.split("/").map((s) => escapeUnpaired(s, PATH_ESCAPE));
      if (rest.startsWith("/")) r.path = normalizePath(segs.slice(1), special);
      else r.path = normalizePath(b.path.slice(0, -1).concat(segs), special);
      if (special && r.path.length === 0) r.path = [""];
      return r;
    }

    get protocol() { return this[hidden].scheme; }
    set protocol(v) {
      const s = String(v).replace(/:.*$/, "").toLowerCase() + ":";
      if (!/^[a-z][a-z0-9+\-.]*:$/.test(s) || (s in SPECIAL) !== (this[hidden].scheme in SPECIAL)) return;
      this[hidden].scheme = s;
      if (this[hidden].port === SPECIAL[s]) this[hidden].port = null;
    }
    get username() { return this[hidden].username; }
    set username(v) { if (this[hidden].host) this[hidden].username = escapeUnpaired(String(v), USERINFO_ESCAPE); }
    get password() { return this[hidden].password; }
    set password(v) { if (this[hidden].host) this[hidden].password = escapeUnpaired(String(v), USERINFO_ESCAPE); }
    get hostname() { return this[hidden].host ?? ""; }
    set hostname(v) { if (this[hidden].opaque === null) this[hidden].host = parseHost(String(v), this[hidden].scheme in SPECIAL); }
    get port() { return this[hidden].port === null ? "" : String(this[hidden].port); }
    set port(v) {
      const s = String(v);
      if (s === "") { this[hidden].port = null; return; }
      const m = /^\d+/.exec(s);
      if (!m || +m[0] > 65535) return;
      this[hidden].port = +m[0] === SPECIAL[this[hidden].scheme] ? null : +m[0];
    }
    get host() { const h = this[hidden]; return h.host === null ? "" : h.port === null ? h.host : `${h.host}:${h.port}`; }
    set host(v) {
      const m = /^(.*?)(?::(\d*))?$/s.exec(String(v));
      this.hostname = m[1];
      if (m[2]) this.port = m[2];
    }
    get origin() {
      const h = this[hidden];
      return h.scheme in SPECIAL && h.scheme !== "file:" ? `${h.scheme}//${this.host}` : "null";
    }
    get pathname() { const h = this[hidden]; return h.opaque !== null ? h.opaque : h.path.length || h.host !== null ? "/" + h.path.join("/") : ""; }
    set pathname(v) {
      const h = this[hidden];
      if (h.opaque !== null) return;
      let s = String(v);
      if (h.scheme in SPECIAL) s = s.replace(/\\/g, "/");
      if (!s.startsWith("/")) s = "/" + s;
      h.path = normalizePath(s.split("/").slice(1).map((x) => escapeUnpaired(x, PATH_ESCAPE)), h.scheme in SPECIAL);
    }
    get search() { const q = this[hidden].query; return q ? "?" + q : ""; }
    set search(v) {
      let s = String(v);
      if (s.startsWith("?")) s = s.slice(1);
      this[hidden].query = s === "" ? null : escapeUnpaired(s, this[hidden].scheme in SPECIAL ? SPECIAL_QUERY_ESCAPE : QUERY_ESCAPE);
      if (this[hidden].params) this[hidden].params._parse(s);
    }
    get searchParams() {
      let p = this[hidden].params;
      if (!p) {
        p = this[hidden].params = new URLSearchParams(this[hidden].query ?? "");
        p[hidden].url = this;
      }
      return p;
    }
    get hash() { const f = this[hidden].fragment; return f ? "#" + f : ""; }
    set hash(v) { let s = String(v); if (s.startsWith("#")) s = s.slice(1); this[hidden].fragment = s === "" ? null : escapeUnpaired(s, FRAGMENT_ESCAPE); }
    get href() {
      const h = this[hidden];
      let out = h.scheme;
      if (h.host !== null) {
        out += "//";
        if (h.username || h.password) out += h.username + (h.password ? ":" + h.password : "") + "@";
        out += this.host;
      } else if (h.opaque === null && h.path.length > 1 && h.path[0] === "") out += "/.";
      out += this.pathname;
      if (h.query !== null) out += "?" + h.query;
      if (h.fragment !== null) out += "#" + h.fragment;
      return out;
    }
    set href(v) { const r = URL._parse(String(v), null); r.params = null; this[hidden] = r; }
    toString() { return this.href; }
    toJSON() { return this.href; }
  }

  // ---------------------------------------------------------------------------------------------- Headers

  // Names and values are checked in C (host.headerName / host.headerValue): regular expressions cost more
  // than everything else a small script does per request. A header list is flat: [name0, value0, ...].
  const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
  const headerName = (name) => host.headerName(String(name));
  const headerValue = (value) => host.headerValue(String(value));

  class Headers {
    constructor(init) {
      this[hidden] = { list: [], dirty: false, guard: null };
      if (init === undefined || init === null) return;
      if (init instanceof Headers) this[hidden].list = init[hidden].list.slice();
      else if (typeof init[Symbol.iterator] === "function") {
        for (const pair of init) {
          const p = Array.from(pair);
          if (p.length !== 2) throw new TypeError("Headers: each pair must have exactly two items");
          this.append(p[0], p[1]);
        }
      } else if (typeof init === "object") for (const k of Object.keys(init)) this.append(k, init[k]);
      else throw new TypeError(`Headers: cannot build headers from ${describe(init)}`);
      this[hidden].dirty = false;
    }
    _edit() {
      const g = this[hidden].guard;
      if (g) throw new TypeError(g);
      this[hidden].dirty = true;
    }
    append(name, value) { const n = headerName(name); const v = headerValue(value); this._edit(); this[hidden].list.push(n, v); }
    set(name, value) {
      const n = headerName(name);
      const v = headerValue(value);
      this._edit();
      const list = this[hidden].list;
      let found = false;
      for (let i = 0; i < list.length; i += 2) {
        if (list[i] !== n) continue;
        if (!found) { list[i + 1] = v; found = true; }
        else { list.splice(i, 2); i -= 2; }
      }
      if (!found) list.push(n, v);
    }
    delete(name) {
      const n = headerName(name);
      const list = this[hidden].list;
      for (let i = list.length - 2; i >= 0; i -= 2) {
        if (list[i] !== n) continue;
        this._edit();
        list.splice(i, 2);
      }
    }
    get(name) {
      const n = headerName(name);
      const list = this[hidden].list;
      let out = null;
      for (let i = 0; i < list.length; i += 2) if (list[i] === n) out = out === null ? list[i + 1] : `${out}, ${list[i + 1]}`;
      return out;
    }
    getSetCookie() {
      const list = this[hidden].list;
      const out = [];
      for (let i = 0; i < list.length; i += 2) if (list[i] === "set-cookie") out.push(list[i + 1]);
      return out;
    }
    has(name) {
      const n = headerName(name);
      const list = this[hidden].list;
      for (let i = 0; i < list.length; i += 2) if (list[i] === n) return true;
      return false;
    }
    _sorted() {
      const list = this[hidden].list;
      const names = [];
      for (let i = 0; i < list.length; i += 2) if (!names.includes(list[i])) names.push(list[i]);
      names.sort();
      const out = [];
      for (const n of names) {
        if (n === "set-cookie") for (const v of this.getSetCookie()) out.push([n, v]);
        else out.push([n, this.get(n)]);
      }
      return out;
    }
    forEach(fn, thisArg) { for (const [k, v] of this._sorted()) fn.call(thisArg, v, k, this); }
    *entries() { yield* this._sorted(); }
    *keys() { for (const [k] of this._sorted()) yield k; }
    *values() { for (const [, v] of this._sorted()) yield v; }
    [Symbol.iterator]() { return this.entries(); }
  }

  function flatHeaders(headers, skip) {
    const list = headers[hidden].list;
    if (!skip) return list.slice();
    const out = [];
    for (let i = 0; i < list.length; i += 2) if (!skip.has(list[i])) out.push(list[i], list[i + 1]);
    return out;
  }
  function headersFromFlat(flat, pseudo) {
    const h = new Headers();
    const list = h[hidden].list;
    for (let i = 0; i + 1 < flat.length; i += 2) {
      const k = flat[i];
      if (k.charCodeAt(0) === 58 /* ':' */) { if (pseudo) pseudo[k] = flat[i + 1]; }
      else list.push(k, flat[i + 1]); // the gateway's header names are lower-case already
    }
    return h;
  }

  // ---------------------------------------------------------------------------------------------- Body, Request, Response

  const NOT_BUFFERED = Symbol("not buffered");

  // A body is kept as the script gave it (string, bytes, URLSearchParams) or as the bytes the gateway passed.
  function extractBody(body, headers) {
    if (body === undefined || body === null) return null;
    let type = null;
    let data;
    if (typeof body === "string") { data = body; type = "text/plain;charset=UTF-8"; }
    else if (body instanceof URLSearchParams) { data = body.toString(); type = "application/x-www-form-urlencoded;charset=UTF-8"; }
    else if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) data = toBytes(body).slice();
    else if (typeof body === "object" && typeof body.getReader === "function") throw new TypeError("streaming bodies (ReadableStream) are not supported in gateway filters; pass a string or bytes");
    else { data = String(body); type = "text/plain;charset=UTF-8"; }
    if (type && headers && !headers.has("content-type")) headers[hidden].list.push("content-type", type);
    return data;
  }

  class Body {
    get bodyUsed() { return this[hidden].used; }
    get body() {
      const b = this[hidden].body;
      if (b === null) return null;
      if (b === NOT_BUFFERED) throw new TypeError(this[hidden].unbuffered);
      return typeof b === "string" ? new Uint8Array(host.utf8Encode(b)) : b;
    }
    _take() {
      const h = this[hidden];
      if (h.body === NOT_BUFFERED) throw new TypeError(h.unbuffered);
      if (h.used) throw new TypeError("Body has already been used");
      h.used = true;
      return h.body;
    }
    async text() {
      const b = this._take();
      return b === null ? "" : typeof b === "string" ? b : host.utf8Decode(b, false);
    }
    async json() { return JSON.parse(await this.text()); }
    async arrayBuffer() {
      const b = this._take();
      if (b === null) return new ArrayBuffer(0);
      const bytes = typeof b === "string" ? new Uint8Array(host.utf8Encode(b)) : b;
      return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    }
    async bytes() { return new Uint8Array(await this.arrayBuffer()); }
    async formData() { throw new TypeError("formData() is not supported in gateway filters; parse text() with URLSearchParams"); }
    async blob() { throw new TypeError("Blob is not supported in gateway filters; use arrayBuffer()"); }
  }

  class Request extends Body {
    constructor(input, init = {}) {
      super();
      let url, method = "GET", headers, body = null, unbuffered = "";
      if (input instanceof Request) {
        url = input.url;
        method = input.method;
        headers = input.headers;
        if (init.body === undefined) { body = input[hidden].body; unbuffered = input[hidden].unbuffered; }
      } else url = new URL(String(input)).href;
      if (init.method !== undefined) {
        method = String(init.method);
        if (!TOKEN.test(method)) throw new TypeError(`Invalid method: ${method}`);
        const upper = method.toUpperCase();
        if (["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"].includes(upper)) method = upper;
      }
      const h = new Headers(init.headers !== undefined ? init.headers : headers);
      if (init.body !== undefined && init.body !== null) {
        if (method === "GET" || method === "HEAD") throw new TypeError("Request with GET/HEAD method cannot have body");
        body = extractBody(init.body, h);
      }
      this[hidden] = { url, method, headers: h, body, used: false, unbuffered, redirect: init.redirect ?? "follow" };
    }
    get url() { return this[hidden].url; }
    get method() { return this[hidden].method; }
    get headers() {
      const h = this[hidden];
      if (h.headers === null) h.headers = headersFromFlat(h.flat, null); // built on first use: many scripts never look
      return h.headers;
    }
    get redirect() { return this[hidden].redirect; }
    get signal() { return undefined; }
    clone() {
      if (this.bodyUsed) throw new TypeError("Request.clone: body has already been used");
      const r = new Request(this);
      return r;
    }
  }

  const STATUS_TEXT = { 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout" };

  class Response extends Body {
    constructor(body = null, init = {}) {
      super();
      const status = init.status === undefined ? 200 : Number(init.status);
      if (!Number.isInteger(status) || status < 200 || status > 599) throw new RangeError(`Response: status ${init.status} is outside 200-599`);
      const h = new Headers(init.headers);
      let data = null;
      if (body !== null && body !== undefined) {
        if (status === 204 || status === 205 || status === 304) throw new TypeError(`Response with status ${status} cannot have a body`);
        data = extractBody(body, h);
      }
      this[hidden] = { status, statusText: init.statusText !== undefined ? String(init.statusText) : "", headers: h, body: data, used: false, unbuffered: "", upstream: false };
    }
    static json(data, init = {}) {
      const text = JSON.stringify(data);
      if (text === undefined) throw new TypeError("Response.json: the value cannot be serialised as JSON");
      const h = new Headers(init.headers);
      if (!h.has("content-type")) h.set("content-type", "application/json");
      return new Response(text, { status: init.status, statusText: init.statusText, headers: h });
    }
    static redirect(url, status = 302) {
      if (![301, 302, 303, 307, 308].includes(status)) throw new RangeError(`Response.redirect: invalid status ${status}`);
      return new Response(null, { status, headers: { location: new URL(String(url)).href } });
    }
    static error() { throw new TypeError("Response.error() is not supported in gateway filters; throw instead"); }
    get status() { return this[hidden].status; }
    get statusText() { return this[hidden].statusText || STATUS_TEXT[this[hidden].status] || ""; }
    get ok() { return this[hidden].status >= 200 && this[hidden].status < 300; }
    get headers() { return this[hidden].headers; }
    get redirected() { return false; }
    get type() { return "default"; }
    get url() { return this[hidden].url || ""; }
    clone() {
      if (this.bodyUsed) throw new TypeError("Response.clone: body has already been used");
      const r = new Response(null, { status: this.status, statusText: this[hidden].statusText, headers: this.headers });
      Object.assign(r[hidden], { body: this[hidden].body, unbuffered: this[hidden].unbuffered, upstream: this[hidden].upstream });
      return r;
    }
  }

  // ---------------------------------------------------------------------------------------------- fetch

  let config = { fetch_timeout_ms: 5000 };
  const calls = new Map(); // http_call token -> { resolve, reject, url }

  async function fetch(input, init = undefined) {
    const req = input instanceof Request && init === undefined ? input : new Request(input, init || {});
    const u = new URL(req.url);
    if (u.protocol !== "http:" && u.protocol !== "https:") throw new TypeError(`fetch ${req.url}: only http: and https: URLs (host = an upstream name from the gateway configuration)`);
    const headers = [":method", req.method, ":path", u.pathname + u.search, ":authority", u.host, ":scheme", u.protocol.slice(0, -1)];
    const list = req.headers[hidden].list;
    for (let i = 0; i < list.length; i += 2) if (list[i] !== "host" && list[i] !== "content-length") headers.push(list[i], list[i + 1]);
    if (req[hidden].body === NOT_BUFFERED) throw new TypeError(`fetch ${req.url}: ${req[hidden].unbuffered}`);
    const body = req[hidden].body;
    if (body !== null && !req.headers.has("content-length")) headers.push("content-length", String(typeof body === "string" ? host.utf8Encode(body).byteLength : body.byteLength));
    const timeout = init && init.timeout !== undefined ? Number(init.timeout) : config.fetch_timeout_ms;
    const token = host.httpCall(u.hostname, headers, body, timeout);
    if (token < 0) {
      throw new TypeError(`fetch ${req.url}: refused by the gateway (proxy status ${-token}): the URL's host must name an upstream this filter may call`);
    }
    if (current) current.calls++;
    return new Promise((resolve, reject) => calls.set(token, { resolve, reject, url: req.url, stream: current }));
  }

  // ---------------------------------------------------------------------------------------------- the script

  const listeners = [];
  function addEventListener(type, listener) {
    if (type !== "fetch") throw new TypeError(`addEventListener: only "fetch" events happen in the gateway (got ${JSON.stringify(type)})`);
    if (configured) throw new TypeError("addEventListener must be called while the script loads");
    listeners.push(listener);
  }
  function removeEventListener(type, listener) {
    const i = listeners.indexOf(listener);
    if (i >= 0) listeners.splice(i, 1);
  }

  class FetchEvent {
    constructor(request, stream) { this.type = "fetch"; this.request = request; this[hidden] = { stream, response: undefined }; }
    respondWith(r) {
      if (this[hidden].response !== undefined) throw new DOMException("respondWith was already called", "InvalidStateError");
      this[hidden].response = Promise.resolve(r);
    }
    waitUntil(p) { this[hidden].stream.ctx.waitUntil(p); }
    passThroughOnException() { this[hidden].stream.passThrough = true; }
  }

  let onRequest = null, onResponse = null, configured = false;
  let env = Object.freeze({});

  function positionOf(e, filename) {
    if (e && e.lineNumber) return `${filename}:${e.lineNumber}:${e.columnNumber}: `;
    return "";
  }

  function configure(text) {
    let cfg;
    try {
      cfg = text.trim().startsWith("{") ? JSON.parse(text) : { script: text };
    } catch (e) {
      host.log(ERROR, `js: the configuration is not valid JSON: ${e.message}`);
      return false;
    }
    if (typeof cfg.script !== "string" || cfg.script.trim() === "") {
      host.log(ERROR, 'js: the configuration has no script (give "script": the JavaScript source, or in gateway.toml configuration.script = "file.js")');
      return false;
    }
    const filename = typeof cfg.filename === "string" && cfg.filename ? cfg.filename : "script.js";
    if (cfg.env !== undefined && (typeof cfg.env !== "object" || cfg.env === null || Array.isArray(cfg.env))) {
      host.log(ERROR, 'js: configuration "env" must be an object of names to values');
      return false;
    }
    if (cfg.fetch_timeout_ms !== undefined) {
      const t = Number(cfg.fetch_timeout_ms);
      if (!Number.isInteger(t) || t < 1 || t > 600000) { host.log(ERROR, 'js: configuration "fetch_timeout_ms" must be an integer from 1 to 600000'); return false; }
      config.fetch_timeout_ms = t;
    }
    config.buffer_request_body = !!cfg.buffer_request_body;
    config.buffer_response_body = !!cfg.buffer_response_body;
    env = Object.freeze(Object.assign(host.environ(), cfg.env || {}));
    try {
      host.compileModule(cfg.script, filename);
    } catch (e) {
      host.log(ERROR, `js: ${positionOf(e, filename)}${e && e.name ? e.name : "Error"}: ${e && e.message !== undefined ? e.message : e}`);
      return false;
    }
    try {
      host.evalModule(`import * as m from ${JSON.stringify(filename)}; globalThis.__gatewayScript = m;`);
    } catch (e) {
      host.log(ERROR, `js: ${filename}: the script failed while loading: ${inspect(e, 0, [])}`);
      return false;
    }
    const ns = global.__gatewayScript;
    delete global.__gatewayScript;
    const handlers = ns.default && typeof ns.default === "object" ? ns.default : {};
    onRequest = typeof ns.onRequest === "function" ? ns.onRequest : typeof handlers.onRequest === "function" ? handlers.onRequest.bind(handlers) : null;
    onResponse = typeof ns.onResponse === "function" ? ns.onResponse : typeof handlers.onResponse === "function" ? handlers.onResponse.bind(handlers) : null;
    if (!onRequest && typeof handlers.fetch === "function") {
      const f = handlers.fetch.bind(handlers); // Workers module syntax: export default { fetch(request, env, ctx) }
      onRequest = (request, ctx) => f(request, ctx.env, ctx);
    }
    if (!onRequest && listeners.length) onRequest = dispatchFetchEvent;
    host.setHooks((onRequest ? 1 : 0) | (onResponse ? 2 : 0) | (config.buffer_request_body ? 4 : 0) | (config.buffer_response_body ? 8 : 0));
    if (!onRequest && !onResponse) {
      host.log(ERROR, `js: ${filename} defines no handler: export onRequest(request, ctx) and/or onResponse(response, request, ctx), export default { fetch }, or addEventListener("fetch", ...)`);
      return false;
    }
    configured = true;
    return true;
  }

  function dispatchFetchEvent(request, ctx) {
    const event = new FetchEvent(request, ctx[hidden]);
    for (const l of listeners) {
      if (typeof l === "function") l(event);
      else if (l && typeof l.handleEvent === "function") l.handleEvent(event);
    }
    return event[hidden].response; // undefined: pass the request on to the upstream
  }

  // ---------------------------------------------------------------------------------------------- streams

  const streams = new Map(); // context id -> stream state
  let current = null; // the stream whose handler is running (fetch() counts its calls)

  class Context {
    constructor(stream) { this[hidden] = stream; }
    get env() { return env; }
    waitUntil(p) {
      Promise.resolve(p).catch((e) => host.log(ERROR, `js: a waitUntil promise failed: ${inspect(e, 0, [])}`));
    }
    passThroughOnException() { this[hidden].passThrough = true; }
    property(path) {
      const v = host.getProperty(String(path).split(".").join("\0"));
      return v === undefined ? undefined : host.utf8Decode(v, false);
    }
  }

  function newStream(id) {
    const st = { id, phase: "request", request: null, pseudo: null, ctx: null, outcome: undefined, waiting: false,
      calls: 0, passThrough: false, answered: false, bufferResponse: false, bufferRequest: false, bodySize: 0 };
    st.ctx = new Context(st);
    streams.set(id, st);
    return st;
  }

  function fail(st, e, where) {
    const detail = inspect(e, 0, []);
    if (st.passThrough) {
      host.log(WARN, `js: ${where} failed, passing the request through (passThroughOnException): ${detail}`);
      return CONTINUE;
    }
    host.log(ERROR, `js: ${where} failed: ${detail}`);
    return FAIL;
  }

  function requestHeaders(id, eos) {
    if (!onRequest && !onResponse) return CONTINUE;
    const st = newStream(id);
    if (!onRequest) { st.request = makeRequest(st, NOT_BUFFERED); return CONTINUE; } // for onResponse(response, request)
    if (!eos && config.buffer_request_body) { st.bufferRequest = true; return PAUSE; }
    return startRequest(st, eos ? null : NOT_BUFFERED);
  }

  function requestBody(id, size, eos) {
    const st = streams.get(id);
    if (!st || !st.bufferRequest) return CONTINUE;
    if (!eos) return PAUSE;
    st.bufferRequest = false;
    st.bodySize = size;
    return startRequest(st, size ? new Uint8Array(host.getBody(REQUEST_BODY, 0, size)) : null);
  }

  function makeRequest(st, body) {
    // One host call for the whole map (cheaper than four lookups of the pseudo-headers alone).
    const pseudo = {};
    const flat = host.getHeaders(REQUEST_HEADERS);
    let hostHeader = "localhost";
    for (let i = 0; i + 1 < flat.length; i += 2) {
      const k = flat[i];
      if (k.charCodeAt(0) === 58 /* ':' */) pseudo[k] = flat[i + 1];
      else if (k === "host") hostHeader = flat[i + 1];
    }
    st.pseudo = pseudo;
    const scheme = pseudo[":scheme"] || "http";
    const authority = pseudo[":authority"] || hostHeader;
    // Not parsed here (most scripts never look, and parsing costs): the gateway validated path and authority.
    const url = `${scheme}://${authority}${pseudo[":path"] || "/"}`;
    const req = Object.create(Request.prototype);
    req[hidden] = { url, method: pseudo[":method"] || "GET", headers: null, flat, body, used: false, redirect: "follow",
      unbuffered: "the request body is not buffered: set buffer_request_body = true in the filter configuration" };
    return req;
  }

  function startRequest(st, body) {
    st.request = makeRequest(st, body);
    return run(st, "onRequest", () => onRequest(st.request, st.ctx));
  }

  function run(st, where, call) {
    st.outcome = undefined;
    st.where = where;
    current = st;
    let result;
    try {
      result = call();
    } catch (e) {
      st.outcome = { ok: false, error: e };
      return finish(st);
    } finally {
      current = null;
    }
    if (result === null || typeof result !== "object" || typeof result.then !== "function") {
      st.outcome = { ok: true, value: result }; // a plain (non-async) handler: no promise round trip
      return finish(st);
    }
    Promise.resolve(result).then((value) => { st.outcome = { ok: true, value }; }, (error) => { st.outcome = { ok: false, error }; });
    return SETTLE;
  }

  // After the jobs ran: apply the handler's answer, or wait for its fetch() calls (PAUSE).
  function settle(id) {
    if (id === 0) { // after an http_call answer: move on every stream that settled
      for (const st of streams.values()) {
        if (!st.waiting || st.outcome === undefined) continue;
        st.waiting = false;
        host.setEffectiveContext(st.id);
        const action = finish(st);
        if (action === FAIL) return FAIL;
        if (action === CONTINUE) host.continueStream(st.phase === "request" ? 0 : 1);
      }
      return CONTINUE;
    }
    const st = streams.get(id);
    if (!st) return CONTINUE;
    if (st.outcome === undefined) {
      if (st.calls === 0 && ![...calls.values()].some((c) => c.stream === st))
        return fail(st, new Error(`${st.where}'s promise never settled (it awaits something that cannot happen in the gateway)`), st.where);
      st.waiting = true;
      return PAUSE;
    }
    return finish(st);
  }

  const LOCAL_SKIP = new Set(["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"]);

  function answer(st, response) {
    const b = response[hidden].body;
    if (b === NOT_BUFFERED) throw new TypeError("cannot answer with an unbuffered upstream response body (set buffer_response_body = true)");
    st.answered = true;
    host.sendLocalResponse(response.status, "js_filter", b, flatHeaders(response.headers, LOCAL_SKIP));
    return PAUSE;
  }

  function finish(st) {
    const out = st.outcome;
    st.outcome = undefined;
    if (!out.ok) return fail(st, out.error, st.where);
    try {
      return st.phase === "request" ? applyRequest(st, out.value) : applyResponse(st, out.value);
    } catch (e) {
      return fail(st, e, st.where);
    }
  }

  function setBody(bufferType, headerType, flat, st, data) {
    const bytes = typeof data === "string" ? new Uint8Array(host.utf8Encode(data)) : data || new Uint8Array(0);
    host.setBody(bufferType, st.bodySize, bytes);
    const out = [];
    for (let i = 0; i < flat.length; i += 2) if (flat[i] !== "content-length" && flat[i] !== "transfer-encoding") out.push(flat[i], flat[i + 1]);
    out.push("content-length", String(bytes.byteLength));
    return out;
  }

  function applyRequest(st, value) {
    if (value instanceof Response) return answer(st, value);
    const req = st.request;
    if (value === undefined || value === null) {
      const edited = req[hidden].headers; // null: the script never looked at them
      if (edited !== null && edited[hidden].dirty) host.setHeaders(REQUEST_HEADERS, pseudoFlat(st.pseudo).concat(flatHeaders(edited)));
      return CONTINUE;
    }
    if (!(value instanceof Request)) throw new TypeError(`${st.where} must return undefined, a Response (answer) or a Request (forward it), got ${describe(value)}`);
    const u = new URL(value.url);
    const pseudo = Object.assign({}, st.pseudo, { ":method": value.method, ":path": u.pathname + u.search });
    if (u.host !== new URL(req.url).host) pseudo[":authority"] = u.host;
    let flat = flatHeaders(value.headers);
    const body = value[hidden].body;
    if (body !== req[hidden].body && body !== NOT_BUFFERED) {
      if (req[hidden].body === NOT_BUFFERED) throw new TypeError("cannot replace an unbuffered request body (set buffer_request_body = true)");
      flat = setBody(REQUEST_BODY, REQUEST_HEADERS, flat, st, body);
    }
    host.setHeaders(REQUEST_HEADERS, pseudoFlat(pseudo).concat(flat));
    return CONTINUE;
  }

  function pseudoFlat(p) {
    const out = [];
    for (const k of Object.keys(p)) out.push(k, p[k]);
    return out;
  }

  function responseHeaders(id, eos) {
    const st = streams.get(id);
    if (!onResponse || !st || st.answered) return CONTINUE;
    if (!eos && config.buffer_response_body) { st.bufferResponse = true; return PAUSE; }
    return startResponse(st, eos ? null : NOT_BUFFERED);
  }

  function responseBody(id, size, eos) {
    const st = streams.get(id);
    if (!st || !st.bufferResponse) return CONTINUE;
    if (!eos) return PAUSE;
    st.bufferResponse = false;
    st.bodySize = size;
    return startResponse(st, size ? new Uint8Array(host.getBody(RESPONSE_BODY, 0, size)) : null);
  }

  function startResponse(st, body) {
    st.phase = "response";
    const pseudo = {};
    const headers = headersFromFlat(host.getHeaders(RESPONSE_HEADERS), pseudo);
    st.responsePseudo = pseudo;
    const res = Object.create(Response.prototype);
    res[hidden] = { status: parseInt(pseudo[":status"] || "200", 10), statusText: "", headers, body, used: false, upstream: true,
      unbuffered: "the response body is not buffered: set buffer_response_body = true in the filter configuration" };
    st.response = res;
    return run(st, "onResponse", () => onResponse(res, st.request, st.ctx));
  }

  function applyResponse(st, value) {
    const res = st.response;
    if (value === undefined || value === null || value === res) {
      if (res.headers[hidden].dirty) host.setHeaders(RESPONSE_HEADERS, pseudoFlat(st.responsePseudo).concat(flatHeaders(res.headers)));
      return CONTINUE;
    }
    if (!(value instanceof Response)) throw new TypeError(`onResponse must return undefined or a Response, got ${describe(value)}`);
    if (value[hidden].body === NOT_BUFFERED || (value[hidden].body === res[hidden].body && res[hidden].body !== null && value[hidden].upstream)) {
      // Same body (e.g. new Response(response.body...) is not possible unbuffered): edit status and headers in place.
      host.setHeaders(RESPONSE_HEADERS, [":status", String(value.status)].concat(flatHeaders(value.headers)));
      return CONTINUE;
    }
    if (res[hidden].body !== NOT_BUFFERED) {
      const flat = setBody(RESPONSE_BODY, RESPONSE_HEADERS, flatHeaders(value.headers), st, value[hidden].body);
      host.setHeaders(RESPONSE_HEADERS, [":status", String(value.status)].concat(flat));
      return CONTINUE;
    }
    return answer(st, value); // a new body for an unbuffered response: answer instead
  }

  function httpCallResponse(token, nHeaders, bodySize) {
    const call = calls.get(token);
    if (!call) return CONTINUE;
    calls.delete(token);
    if (call.stream) {
      call.stream.calls--;
      // The answer arrives on the root context: what the script does next (read request headers, ...) is
      // about its stream.
      if (streams.has(call.stream.id)) host.setEffectiveContext(call.stream.id);
    }
    if (nHeaders === 0) {
      call.reject(new TypeError(`fetch ${call.url}: the upstream did not answer (connection failed or timed out)`));
      return SETTLE;
    }
    const pseudo = {};
    const headers = headersFromFlat(host.getHeaders(HTTP_CALL_RESPONSE_HEADERS), pseudo);
    const body = bodySize ? new Uint8Array(host.getBody(HTTP_CALL_RESPONSE_BODY, 0, bodySize)) : null;
    const res = Object.create(Response.prototype);
    res[hidden] = { status: parseInt(pseudo[":status"] || "502", 10), statusText: "", headers, body, used: false, upstream: false, unbuffered: "", url: call.url };
    call.resolve(res);
    return SETTLE;
  }

  function deleteContext(id) {
    const st = streams.get(id);
    if (st === undefined) return;
    // Break the stream <-> ctx cycle: reference counting then frees the request's objects at once, and the
    // (stop-the-world) cycle collector only runs when a script itself leaves cycles behind.
    st.ctx[hidden] = null;
    st.ctx = null;
    streams.delete(id);
    for (const [token, call] of calls) if (call.stream && call.stream.id === id) calls.delete(token);
  }

  // Hostile JSON (a client's body) must end in a SyntaxError the script can catch, not in a trap: see glue.c.
  const MAX_JSON_DEPTH = 1000;
  const nativeParse = JSON.parse;
  Object.defineProperty(JSON, "parse", {
    value: function parse(text, reviver) {
      const s = String(text);
      if (host.jsonTooDeep(s, MAX_JSON_DEPTH)) throw new SyntaxError(`JSON.parse: nested deeper than ${MAX_JSON_DEPTH} levels`);
      return reviver === undefined ? nativeParse(s) : nativeParse(s, reviver);
    },
    writable: true,
    configurable: true,
  });

  // ---------------------------------------------------------------------------------------------- globals

  define("console", console);
  define("TextEncoder", TextEncoder);
  define("TextDecoder", TextDecoder);
  define("URL", URL);
  define("URLSearchParams", URLSearchParams);
  define("Headers", Headers);
  define("Request", Request);
  define("Response", Response);
  define("FetchEvent", FetchEvent);
  define("DOMException", DOMException);
  define("fetch", fetch);
  define("crypto", crypto);
  define("CryptoKey", CryptoKey);
  define("atob", atob);
  define("btoa", btoa);
  define("setTimeout", setTimeout);
  define("clearTimeout", clearTimeout);
  define("queueMicrotask", queueMicrotask);
  define("addEventListener", addEventListener);
  define("removeEventListener", removeEventListener);
  define("self", global);

  return { configure, requestHeaders, requestBody, responseHeaders, responseBody, httpCallResponse, settle, deleteContext, runTimers };
})
