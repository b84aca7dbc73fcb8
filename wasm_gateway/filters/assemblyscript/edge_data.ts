// wasm-gateway edge data for @solo-io/proxy-runtime (AssemblyScript 0.14) filters: kv.* and sql.query.
//
// Copy this file next to your filter and import it:
//
//   import { kv, sql, SqlValue, EdgeCode } from "./edge_data";
//   const r = kv.get("flags", "beta");          // r.code: EdgeCode.OK, NOT_FOUND or an error (r.reason)
//   if (r.ok) log(LogLevelValues.info, r.text);  // r.value: ArrayBuffer, r.text: the value as UTF-8
//   kv.set("flags", "beta", String.UTF8.encode("on"), 60000);        // ttl in ms; 0: the namespace default
//   const hits = kv.incr("flags", "hits", 1, 0).total;
//   const keys = kv.list("flags", "user:", 10).keys;                  // Array<string>, and .truncated
//   const q = sql.query("catalogue", "SELECT name FROM products WHERE id = ?", [SqlValue.ofInteger(7)]);
//   if (q.ok) for (let i = 0; i < q.rows.length; i++) q.rows[i][0].text;
//
// The encoding is docs/edge-data.md, version 1. Namespaces and databases must be granted to the filter in the
// gateway configuration (kv = [...], sql = [...]). Nothing here throws: failures come back as a code and a
// reason. Results are copied out of the host's buffer, which is released before returning.
import { __release } from "rt/index-full";

// @ts-ignore: decorator
@external("env", "proxy_call_foreign_function")
declare function proxy_call_foreign_function(
  name: usize, name_size: usize, args: usize, args_size: usize, results: usize, results_size: usize,
): u32;

export namespace EdgeCode {
  export const OK: u8 = 0;
  export const NOT_FOUND: u8 = 1;
  export const BAD_REQUEST: u8 = 2;
  export const DENIED: u8 = 3;
  export const LIMIT: u8 = 4;
  export const TIMEOUT: u8 = 5;
  export const UNAVAILABLE: u8 = 6;
  export const CONFLICT: u8 = 7;
  export const INTERNAL: u8 = 8;
}

const VERSION: u8 = 1;

export class SqlValue {
  type: u8 = 0; // 0 null, 1 integer, 2 real, 3 text, 4 blob
  integer: i64 = 0;
  real: f64 = 0;
  text: string = "";
  blob: ArrayBuffer = new ArrayBuffer(0);

  static ofNull(): SqlValue { return new SqlValue(); }
  static ofInteger(v: i64): SqlValue { const s = new SqlValue(); s.type = 1; s.integer = v; return s; }
  static ofReal(v: f64): SqlValue { const s = new SqlValue(); s.type = 2; s.real = v; return s; }
  static ofText(v: string): SqlValue { const s = new SqlValue(); s.type = 3; s.text = v; return s; }
  static ofBlob(v: ArrayBuffer): SqlValue { const s = new SqlValue(); s.type = 4; s.blob = v; return s; }

  get isNull(): bool { return this.type == 0; }

  toString(): string {
    if (this.type == 1) return this.integer.toString();
    if (this.type == 2) return this.real.toString();
    if (this.type == 3) return this.text;
    if (this.type == 4) return "<" + this.blob.byteLength.toString() + " bytes>";
    return "NULL";
  }
}

export class EdgeResult {
  code: u8 = EdgeCode.INTERNAL;
  reason: string = "";
  value: ArrayBuffer = new ArrayBuffer(0); // kv.get
  existed: bool = false; // kv.delete
  total: i64 = 0; // kv.incr
  keys: Array<string> = []; // kv.list
  truncated: bool = false; // kv.list
  columns: Array<string> = []; // sql.query
  rows: Array<Array<SqlValue>> = []; // sql.query

  get ok(): bool { return this.code == EdgeCode.OK; }
  get text(): string { return String.UTF8.decode(this.value); }
}

class Writer {
  bytes: Array<u8> = [];

  constructor() { this.bytes.push(VERSION); }

  u8(v: u8): void { this.bytes.push(v); }
  u32(v: u32): void { for (let i = 0; i < 4; i++) this.bytes.push(<u8>((v >> (8 * i)) & 0xff)); }
  u64(v: u64): void { for (let i = 0; i < 8; i++) this.bytes.push(<u8>((v >> (8 * i)) & 0xff)); }
  buffer(b: ArrayBuffer): void {
    this.u32(<u32>b.byteLength);
    const p = changetype<usize>(b);
    for (let i = 0; i < b.byteLength; i++) this.bytes.push(load<u8>(p + i));
  }
  str(s: string): void { this.buffer(String.UTF8.encode(s)); }

  done(): ArrayBuffer {
    const out = new ArrayBuffer(this.bytes.length);
    const p = changetype<usize>(out);
    for (let i = 0; i < this.bytes.length; i++) store<u8>(p + i, this.bytes[i]);
    return out;
  }
}

class Reader {
  ptr: usize;
  len: usize;
  pos: usize = 2;
  bad: bool = false;

  constructor(ptr: usize, len: usize) { this.ptr = ptr; this.len = len; }

  has(n: usize): bool {
    if (this.bad || this.len - this.pos < n) { this.bad = true; return false; }
    return true;
  }
  u8(): u8 { if (!this.has(1)) return 0; const v = load<u8>(this.ptr + this.pos); this.pos += 1; return v; }
  u32(): u32 { if (!this.has(4)) return 0; const v = load<u32>(this.ptr + this.pos); this.pos += 4; return v; }
  u64(): u64 { if (!this.has(8)) return 0; const v = load<u64>(this.ptr + this.pos); this.pos += 8; return v; }
  buffer(): ArrayBuffer {
    const n = <usize>this.u32();
    if (!this.has(n)) return new ArrayBuffer(0);
    const out = new ArrayBuffer(<i32>n);
    memory.copy(changetype<usize>(out), this.ptr + this.pos, n);
    this.pos += n;
    return out;
  }
  str(): string { return String.UTF8.decode(this.buffer()); }
  value(): SqlValue {
    const t = this.u8();
    if (t == 1) return SqlValue.ofInteger(<i64>this.u64());
    if (t == 2) return SqlValue.ofReal(reinterpret<f64>(this.u64()));
    if (t == 3) return SqlValue.ofText(this.str());
    if (t == 4) return SqlValue.ofBlob(this.buffer());
    if (t != 0) this.bad = true;
    return SqlValue.ofNull();
  }
}

const out_params = new ArrayBuffer(8);

// Calls `name`; parses the version and code; on OK hands the payload to `parse`.
function call(name: string, args: ArrayBuffer, op: i32): EdgeResult {
  const result = new EdgeResult();
  const name_bytes = String.UTF8.encode(name);
  const out = changetype<usize>(out_params);
  store<u32>(out, 0, 0);
  store<u32>(out, 0, 4);
  const status = proxy_call_foreign_function(
    changetype<usize>(name_bytes), name_bytes.byteLength,
    changetype<usize>(args), args.byteLength, out, out + 4,
  );
  if (status != 0) {
    result.reason = "the host has no " + name + " (status " + status.toString() + ")";
    return result;
  }
  const ptr = <usize>load<u32>(out, 0);
  const len = <usize>load<u32>(out, 4);
  if (len < 2 || load<u8>(ptr) != VERSION) {
    result.reason = "unexpected result encoding";
  } else {
    const r = new Reader(ptr, len);
    result.code = load<u8>(ptr + 1);
    if (result.code == EdgeCode.OK) {
      parse(op, r, result);
    } else if (result.code != EdgeCode.NOT_FOUND) {
      result.reason = r.str();
    }
    if (r.bad) {
      result.code = EdgeCode.INTERNAL;
      result.reason = "truncated result";
    }
  }
  if (ptr != 0) __release(ptr); // the SDK's malloc gave the host this buffer
  return result;
}

const OP_GET = 0, OP_SET = 1, OP_DELETE = 2, OP_INCR = 3, OP_LIST = 4, OP_SQL = 5;

function parse(op: i32, r: Reader, result: EdgeResult): void {
  if (op == OP_GET) {
    result.value = r.buffer();
  } else if (op == OP_DELETE) {
    result.existed = r.u8() != 0;
  } else if (op == OP_INCR) {
    result.total = <i64>r.u64();
  } else if (op == OP_LIST) {
    const n = r.u32();
    for (let i: u32 = 0; i < n && !r.bad; i++) result.keys.push(r.str());
    result.truncated = r.u8() != 0;
  } else if (op == OP_SQL) {
    const ncols = r.u32();
    for (let i: u32 = 0; i < ncols && !r.bad; i++) result.columns.push(r.str());
    const nrows = r.u32();
    for (let i: u32 = 0; i < nrows && !r.bad; i++) {
      const row: Array<SqlValue> = [];
      for (let j: u32 = 0; j < ncols && !r.bad; j++) row.push(r.value());
      result.rows.push(row);
    }
  }
}

function head(ns: string, key: string): Writer {
  const w = new Writer();
  w.str(ns);
  w.str(key);
  return w;
}

export namespace kv {
  export function get(ns: string, key: string): EdgeResult {
    return call("kv.get", head(ns, key).done(), OP_GET);
  }

  export function set(ns: string, key: string, value: ArrayBuffer, ttl_ms: u32): EdgeResult {
    const w = head(ns, key);
    w.buffer(value);
    w.u32(ttl_ms);
    return call("kv.set", w.done(), OP_SET);
  }

  export function del(ns: string, key: string): EdgeResult {
    return call("kv.delete", head(ns, key).done(), OP_DELETE);
  }

  export function incr(ns: string, key: string, delta: i64, ttl_ms: u32): EdgeResult {
    const w = head(ns, key);
    w.u64(<u64>delta);
    w.u32(ttl_ms);
    return call("kv.incr", w.done(), OP_INCR);
  }

  export function list(ns: string, prefix: string, limit: u32): EdgeResult {
    const w = head(ns, prefix);
    w.u32(limit);
    return call("kv.list", w.done(), OP_LIST);
  }
}

export namespace sql {
  export function query(db: string, statement: string, params: Array<SqlValue>): EdgeResult {
    const w = new Writer();
    w.str(db);
    w.str(statement);
    w.u32(<u32>params.length);
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      w.u8(p.type);
      if (p.type == 1) w.u64(<u64>p.integer);
      else if (p.type == 2) w.u64(reinterpret<u64>(p.real));
      else if (p.type == 3) w.str(p.text);
      else if (p.type == 4) w.buffer(p.blob);
    }
    return call("sql.query", w.done(), OP_SQL);
  }
}
