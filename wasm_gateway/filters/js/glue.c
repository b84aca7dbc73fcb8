/* The JS filter's Proxy-Wasm side: QuickJS plus the host calls the prelude (prelude.js) needs.
 *
 * The prelude holds every Web API and all request logic; this file only
 *   - starts QuickJS and evaluates the prelude (proxy_on_vm_start),
 *   - forwards each Proxy-Wasm callback to the prelude's matching function and runs the promise job queue,
 *   - exposes the Proxy-Wasm host functions (and UTF-8, randomness, module compilation) to the prelude.
 * A prelude entry answers an action (CONTINUE 0, PAUSE 1), SETTLE 2 ("run the jobs, then ask settle()"),
 * or FAIL -1: the script failed, it was logged, and we trap so the gateway applies the failure policy. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quickjs.h"

/* build.py builds twice: first with the prelude's source (prelude.h) and an export that compiles it to
 * QuickJS bytecode, then with that bytecode (prelude_bc.h), so an instance starts without parsing ~40 KB of JS
 * (7 ms -> 0.3 ms). */
#ifdef GW_PRELUDE_BYTECODE
#include "prelude_bc.h" /* prelude_bc[], prelude_bc_len */
#else
#include "prelude.h" /* prelude_js[], prelude_js_len */
#endif

#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
IMPORT(proxy_get_header_map_pairs) int32_t proxy_get_header_map_pairs(int32_t type, char **ptr, size_t *len);
IMPORT(proxy_set_header_map_pairs) int32_t proxy_set_header_map_pairs(int32_t type, const char *ptr, size_t len);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, uint32_t start, uint32_t max, char **ptr, size_t *len);
IMPORT(proxy_set_buffer_bytes)
int32_t proxy_set_buffer_bytes(int32_t type, uint32_t start, uint32_t size, const char *ptr, size_t len);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(uint32_t status, const char *details, size_t dlen, const char *body, size_t blen,
                                  const char *pairs, size_t plen, int32_t grpc_status);
IMPORT(proxy_http_call)
int32_t proxy_http_call(const char *upstream, size_t ulen, const char *headers, size_t hlen, const char *body,
                        size_t blen, const char *trailers, size_t tlen, uint32_t timeout_ms, uint32_t *token);
IMPORT(proxy_continue_stream) int32_t proxy_continue_stream(int32_t type);
IMPORT(proxy_set_effective_context) int32_t proxy_set_effective_context(uint32_t ctx);
IMPORT(proxy_get_property) int32_t proxy_get_property(const char *path, size_t plen, char **ptr, size_t *len);

/* Set by our one-line patch of js_parse_error(): where the offending token starts (for line and column). */
extern const uint8_t *js_parse_error_ptr;

enum { ACT_CONTINUE = 0, ACT_PAUSE = 1, ACT_SETTLE = 2, ACT_FAIL = -1 };
enum { LOG_ERROR = 4, LOG_CRITICAL = 5 };

static JSRuntime *rt;
static JSContext *jc;
static JSValue api = JS_UNDEFINED; /* the object the prelude returns */
static JSValue fn_configure, fn_request_headers, fn_request_body, fn_response_headers, fn_response_body,
    fn_http_call_response, fn_settle, fn_delete, fn_run_timers;

/* What the script defines (set by the prelude at configure): callbacks it cannot care about return at once. */
enum { HOOK_REQUEST = 1, HOOK_RESPONSE = 2, HOOK_BUFFER_REQUEST = 4, HOOK_BUFFER_RESPONSE = 8 };
static int hooks = HOOK_REQUEST | HOOK_RESPONSE | HOOK_BUFFER_REQUEST | HOOK_BUFFER_RESPONSE;
static int timers_armed; /* the prelude has zero-delay timers queued */

static void log_str(int level, const char *msg) { proxy_log(level, msg, strlen(msg)); }

/* Log the pending exception with its stack (the last resort: the prelude logs script errors itself). */
static void log_exception(const char *where) {
  JSValue exc = JS_GetException(jc);
  const char *msg = JS_ToCString(jc, exc);
  const char *stack = NULL;
  JSValue st = JS_UNDEFINED;
  if (JS_IsObject(exc)) {
    st = JS_GetPropertyStr(jc, exc, "stack");
    if (JS_IsString(st)) stack = JS_ToCString(jc, st);
  }
  size_t n = strlen(where) + (msg ? strlen(msg) : 7) + (stack ? strlen(stack) : 0) + 8;
  char *line = malloc(n);
  if (line) {
    strcpy(line, where);
    strcat(line, ": ");
    strcat(line, msg ? msg : "(error)");
    if (stack) {
      strcat(line, "\n");
      strcat(line, stack);
    }
    log_str(LOG_ERROR, line);
    free(line);
  } else {
    log_str(LOG_ERROR, where);
  }
  if (stack) JS_FreeCString(jc, stack);
  if (msg) JS_FreeCString(jc, msg);
  JS_FreeValue(jc, st);
  JS_FreeValue(jc, exc);
}

/* Run queued promise jobs and due zero-delay timers until nothing is left. */
static int run_jobs(void) {
  for (;;) {
    JSContext *c;
    int r;
    while ((r = JS_ExecutePendingJob(rt, &c)) > 0) {
    }
    if (r < 0) {
      log_exception("js: promise job failed");
      return -1;
    }
    if (!timers_armed) return 0;
    JSValue more = JS_Call(jc, fn_run_timers, api, 0, NULL);
    if (JS_IsException(more)) {
      log_exception("js: timer failed");
      return -1;
    }
    int again = JS_ToBool(jc, more);
    JS_FreeValue(jc, more);
    if (!again) return 0;
  }
}

/* Call a prelude entry with integer arguments; the action it answers (FAIL traps after logging). */
static int32_t enter(JSValue fn, int argc, const uint32_t *args, uint32_t settle_id) {
  JSValue argv[4];
  for (int i = 0; i < argc; i++) argv[i] = JS_NewInt64(jc, (int64_t)args[i]);
  JSValue r = JS_Call(jc, fn, api, argc, argv);
  int32_t action;
  if (JS_IsException(r)) {
    log_exception("js: filter error");
    abort();
  }
  if (JS_ToInt32(jc, &action, r)) action = ACT_FAIL;
  JS_FreeValue(jc, r);
  if (run_jobs() < 0) abort(); /* also after a synchronous answer: jobs it queued run now, not later */
  if (action == ACT_SETTLE) {
    JSValue id = JS_NewInt64(jc, (int64_t)settle_id);
    r = JS_Call(jc, fn_settle, api, 1, &id);
    if (JS_IsException(r)) {
      log_exception("js: filter error");
      abort();
    }
    if (JS_ToInt32(jc, &action, r)) action = ACT_FAIL;
    JS_FreeValue(jc, r);
  }
  if (action == ACT_FAIL) abort(); /* logged by the prelude; the gateway applies the failure policy */
  return action;
}

/* ------------------------------------------------------------------------------------ wire formats */

static uint32_t rd32(const char *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* Header names and values are byte strings: each byte is one character U+0000..U+00FF (Latin-1), as in the
 * Fetch standard, so any bytes a client sent come back out unchanged when a script edits other headers. */
static JSValue latin1_string(const char *s, size_t len) {
  size_t high = 0;
  for (size_t i = 0; i < len; i++) high += (uint8_t)s[i] >> 7;
  if (!high) return JS_NewStringLen(jc, s, len);
  char *utf8 = malloc(len + high);
  if (!utf8) return JS_ThrowOutOfMemory(jc);
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    uint8_t c = (uint8_t)s[i];
    if (c < 0x80) utf8[o++] = (char)c;
    else utf8[o++] = (char)(0xC0 | (c >> 6)), utf8[o++] = (char)(0x80 | (c & 0x3F));
  }
  JSValue v = JS_NewStringLen(jc, utf8, o);
  free(utf8);
  return v;
}

/* The inverse: a JS string as bytes (malloc'd); NULL with a TypeError pending for a character above U+00FF. */
static char *latin1_bytes(JSValueConst v, size_t *out_len) {
  size_t len;
  const char *s = JS_ToCStringLen(jc, &len, v);
  if (!s) return NULL;
  char *out = malloc(len + 1);
  size_t o = 0;
  if (!out) {
    JS_FreeCString(jc, s);
    JS_ThrowOutOfMemory(jc);
    return NULL;
  }
  for (size_t i = 0; i < len; i++) {
    uint8_t c = (uint8_t)s[i];
    if (c < 0x80) {
      out[o++] = (char)c;
    } else if ((c == 0xC2 || c == 0xC3) && i + 1 < len && ((uint8_t)s[i + 1] & 0xC0) == 0x80) {
      out[o++] = (char)(((c & 0x1F) << 6) | ((uint8_t)s[i + 1] & 0x3F));
      i++;
    } else {
      free(out);
      JS_FreeCString(jc, s);
      JS_ThrowTypeError(jc, "header names and values must be byte strings (characters up to U+00FF)");
      return NULL;
    }
  }
  JS_FreeCString(jc, s);
  *out_len = o;
  return out;
}

/* Proxy-Wasm pairs -> flat JS array [k0, v0, k1, v1, ...]. */
static JSValue pairs_to_array(const char *buf, size_t len) {
  JSValue arr = JS_NewArray(jc);
  if (!buf || len < 4) return arr;
  uint32_t n = rd32(buf);
  if ((uint64_t)n * 8 + 4 > len) return arr;
  const char *sizes = buf + 4, *data = buf + 4 + (size_t)n * 8, *end = buf + len;
  uint32_t idx = 0;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t kl = rd32(sizes + i * 8), vl = rd32(sizes + i * 8 + 4);
    if ((size_t)(end - data) < (size_t)kl + vl + 2) break;
    JS_SetPropertyUint32(jc, arr, idx++, latin1_string(data, kl));
    data += kl + 1;
    JS_SetPropertyUint32(jc, arr, idx++, latin1_string(data, vl));
    data += vl + 1;
  }
  return arr;
}

/* Flat JS array -> Proxy-Wasm pairs (malloc'd; NULL with an exception pending on failure). */
static char *array_to_pairs(JSValueConst arr, size_t *out_len) {
  uint32_t count = 0;
  JSValue lenv = JS_GetPropertyStr(jc, arr, "length");
  if (JS_ToUint32(jc, &count, lenv)) {
    JS_FreeValue(jc, lenv);
    return NULL;
  }
  JS_FreeValue(jc, lenv);
  uint32_t n = count / 2;
  char **strs = calloc(count ? count : 1, sizeof(char *));
  size_t *lens = calloc(count ? count : 1, sizeof(size_t));
  char *out = NULL;
  if (!strs || !lens) {
    JS_ThrowOutOfMemory(jc);
    goto done;
  }
  size_t total = 4 + (size_t)n * 8;
  for (uint32_t i = 0; i < n * 2; i++) {
    JSValue v = JS_GetPropertyUint32(jc, arr, i);
    strs[i] = latin1_bytes(v, &lens[i]);
    JS_FreeValue(jc, v);
    if (!strs[i]) goto done;
    total += lens[i] + 1;
  }
  out = malloc(total);
  if (!out) {
    JS_ThrowOutOfMemory(jc);
    goto done;
  }
  memcpy(out, &n, 4);
  char *p = out + 4 + (size_t)n * 8;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t kl = (uint32_t)lens[2 * i], vl = (uint32_t)lens[2 * i + 1];
    memcpy(out + 4 + i * 8, &kl, 4);
    memcpy(out + 8 + i * 8, &vl, 4);
    memcpy(p, strs[2 * i], kl);
    p[kl] = 0;
    p += kl + 1;
    memcpy(p, strs[2 * i + 1], vl);
    p[vl] = 0;
    p += vl + 1;
  }
  *out_len = total;
done:
  if (strs)
    for (uint32_t i = 0; i < n * 2; i++) free(strs[i]);
  free(strs);
  free(lens);
  return out;
}

/* Bytes of a string (UTF-8), ArrayBuffer or typed array; *owned tells which free to use. */
typedef struct {
  const char *ptr;
  size_t len;
  int is_cstring;
} Bytes;

static int get_bytes(JSValueConst v, Bytes *b) {
  b->ptr = NULL;
  b->len = 0;
  b->is_cstring = 0;
  if (JS_IsUndefined(v) || JS_IsNull(v)) return 0;
  if (JS_IsString(v)) {
    b->ptr = JS_ToCStringLen(jc, &b->len, v);
    b->is_cstring = 1;
    return b->ptr ? 0 : -1;
  }
  size_t size;
  uint8_t *buf = JS_GetArrayBuffer(jc, &size, v);
  if (buf) {
    b->ptr = (const char *)buf;
    b->len = size;
    return 0;
  }
  JS_FreeValue(jc, JS_GetException(jc));
  size_t off, blen, bpe;
  JSValue ab = JS_GetTypedArrayBuffer(jc, v, &off, &blen, &bpe);
  if (JS_IsException(ab)) return -1;
  buf = JS_GetArrayBuffer(jc, &size, ab);
  JS_FreeValue(jc, ab); /* the view keeps the buffer alive */
  if (!buf || off + blen > size) {
    JS_ThrowTypeError(jc, "detached buffer");
    return -1;
  }
  b->ptr = (const char *)buf + off;
  b->len = blen;
  return 0;
}

static void free_bytes(Bytes *b) {
  if (b->is_cstring && b->ptr) JS_FreeCString(jc, b->ptr);
  b->ptr = NULL;
}

static JSValue status_error(const char *what, int32_t status) {
  return JS_ThrowInternalError(jc, "%s failed (proxy status %d)", what, (int)status);
}

/* ------------------------------------------------------------------------------------ host functions */

static JSValue h_log(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t level;
  size_t len;
  if (JS_ToInt32(c, &level, argv[0])) return JS_EXCEPTION;
  const char *s = JS_ToCStringLen(c, &len, argv[1]);
  if (!s) return JS_EXCEPTION;
  proxy_log(level, s, len);
  JS_FreeCString(c, s);
  return JS_UNDEFINED;
}

static JSValue h_get_headers(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t type;
  char *ptr = NULL;
  size_t len = 0;
  if (JS_ToInt32(c, &type, argv[0])) return JS_EXCEPTION;
  int32_t st = proxy_get_header_map_pairs(type, &ptr, &len);
  if (st != 0) return status_error("proxy_get_header_map_pairs", st);
  JSValue arr = pairs_to_array(ptr, len);
  free(ptr);
  return arr;
}

static JSValue h_set_headers(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t type;
  size_t len = 0;
  if (JS_ToInt32(c, &type, argv[0])) return JS_EXCEPTION;
  char *pairs = array_to_pairs(argv[1], &len);
  if (!pairs) return JS_EXCEPTION;
  int32_t st = proxy_set_header_map_pairs(type, pairs, len);
  free(pairs);
  if (st != 0) return status_error("proxy_set_header_map_pairs", st);
  return JS_UNDEFINED;
}

static JSValue h_get_body(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t type;
  uint32_t start, max;
  char *ptr = NULL;
  size_t len = 0;
  if (JS_ToInt32(c, &type, argv[0]) || JS_ToUint32(c, &start, argv[1]) || JS_ToUint32(c, &max, argv[2]))
    return JS_EXCEPTION;
  int32_t st = proxy_get_buffer_bytes(type, start, max, &ptr, &len);
  if (st == 1 /* NOT_FOUND */) return JS_NewArrayBufferCopy(c, NULL, 0);
  if (st != 0) return status_error("proxy_get_buffer_bytes", st);
  JSValue ab = JS_NewArrayBufferCopy(c, (const uint8_t *)ptr, len);
  free(ptr);
  return ab;
}

static JSValue h_set_body(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t type;
  uint32_t old_size;
  Bytes b;
  if (JS_ToInt32(c, &type, argv[0]) || JS_ToUint32(c, &old_size, argv[1])) return JS_EXCEPTION;
  if (get_bytes(argv[2], &b)) return JS_EXCEPTION;
  int32_t st = proxy_set_buffer_bytes(type, 0, old_size, b.ptr ? b.ptr : "", b.len);
  free_bytes(&b);
  if (st != 0) return status_error("proxy_set_buffer_bytes", st);
  return JS_UNDEFINED;
}

/* sendLocalResponse(status, details, body, flatHeaders) */
static JSValue h_send_local_response(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  uint32_t status;
  size_t dlen = 0, plen = 0;
  Bytes body;
  if (JS_ToUint32(c, &status, argv[0])) return JS_EXCEPTION;
  const char *details = JS_ToCStringLen(c, &dlen, argv[1]);
  if (!details) return JS_EXCEPTION;
  if (get_bytes(argv[2], &body)) {
    JS_FreeCString(c, details);
    return JS_EXCEPTION;
  }
  char *pairs = array_to_pairs(argv[3], &plen);
  int32_t st = -1;
  if (pairs) st = proxy_send_local_response(status, details, dlen, body.ptr ? body.ptr : "", body.len, pairs, plen, -1);
  free(pairs);
  free_bytes(&body);
  JS_FreeCString(c, details);
  if (st == -1) return JS_EXCEPTION;
  if (st != 0) return status_error("proxy_send_local_response", st);
  return JS_UNDEFINED;
}

/* httpCall(upstream, flatHeaders, body, timeoutMs) -> token */
static JSValue h_http_call(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t ulen = 0, hlen = 0;
  uint32_t timeout, token = 0;
  Bytes body;
  if (JS_ToUint32(c, &timeout, argv[3])) return JS_EXCEPTION;
  const char *upstream = JS_ToCStringLen(c, &ulen, argv[0]);
  if (!upstream) return JS_EXCEPTION;
  char *pairs = array_to_pairs(argv[1], &hlen);
  if (!pairs) {
    JS_FreeCString(c, upstream);
    return JS_EXCEPTION;
  }
  if (get_bytes(argv[2], &body)) {
    free(pairs);
    JS_FreeCString(c, upstream);
    return JS_EXCEPTION;
  }
  static const char no_trailers[4] = {0, 0, 0, 0};
  int32_t st = proxy_http_call(upstream, ulen, pairs, hlen, body.ptr ? body.ptr : "", body.len, no_trailers, 4,
                               timeout, &token);
  free_bytes(&body);
  free(pairs);
  JS_FreeCString(c, upstream);
  if (st != 0) return JS_NewInt32(c, -st); /* the prelude turns a negative answer into a TypeError */
  return JS_NewUint32(c, token);
}

static JSValue h_continue_stream(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int32_t type;
  if (JS_ToInt32(c, &type, argv[0])) return JS_EXCEPTION;
  int32_t st = proxy_continue_stream(type);
  if (st != 0) return status_error("proxy_continue_stream", st);
  return JS_UNDEFINED;
}

static JSValue h_set_effective_context(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  uint32_t id;
  if (JS_ToUint32(c, &id, argv[0])) return JS_EXCEPTION;
  int32_t st = proxy_set_effective_context(id);
  if (st != 0) return status_error("proxy_set_effective_context", st);
  return JS_UNDEFINED;
}

static JSValue h_get_property(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t plen = 0, len = 0;
  char *ptr = NULL;
  const char *path = JS_ToCStringLen(c, &plen, argv[0]);
  if (!path) return JS_EXCEPTION;
  int32_t st = proxy_get_property(path, plen, &ptr, &len);
  JS_FreeCString(c, path);
  if (st != 0) return JS_UNDEFINED;
  JSValue ab = JS_NewArrayBufferCopy(c, (const uint8_t *)ptr, len);
  free(ptr);
  return ab;
}

/* UTF-8 with every invalid sequence replaced by U+FFFD (WHATWG decode); writes at most 3*len bytes. */
static size_t utf8_sanitize(const uint8_t *s, size_t len, uint8_t *out, int *bad) {
  size_t i = 0, o = 0;
  *bad = 0;
  while (i < len) {
    uint8_t c0 = s[i];
    size_t need = 0;
    uint32_t lo = 0x80, hi = 0xBF;
    if (c0 < 0x80) {
      out[o++] = c0;
      i++;
      continue;
    } else if (c0 >= 0xC2 && c0 <= 0xDF) need = 1;
    else if (c0 >= 0xE0 && c0 <= 0xEF) {
      need = 2;
      if (c0 == 0xE0) lo = 0xA0;
      if (c0 == 0xED) hi = 0x9F;
    } else if (c0 >= 0xF0 && c0 <= 0xF4) {
      need = 3;
      if (c0 == 0xF0) lo = 0x90;
      if (c0 == 0xF4) hi = 0x8F;
    } else {
      goto invalid;
    }
    size_t k = 1;
    for (; k <= need; k++) {
      if (i + k >= len) break;
      uint8_t ck = s[i + k];
      if (ck < (k == 1 ? lo : 0x80) || ck > (k == 1 ? hi : 0xBF)) break;
    }
    if (k == need + 1) {
      memcpy(out + o, s + i, need + 1);
      o += need + 1;
      i += need + 1;
      continue;
    }
    /* maximal subpart: skip the lead and the valid continuation bytes seen */
    i += k;
    out[o++] = 0xEF, out[o++] = 0xBF, out[o++] = 0xBD;
    *bad = 1;
    continue;
  invalid:
    i++;
    out[o++] = 0xEF, out[o++] = 0xBF, out[o++] = 0xBD;
    *bad = 1;
  }
  return o;
}

/* utf8Decode(bufferSource, fatal) -> string */
static JSValue h_utf8_decode(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  Bytes b;
  if (get_bytes(argv[0], &b)) return JS_EXCEPTION;
  int fatal = JS_ToBool(c, argv[1]);
  const uint8_t *s = (const uint8_t *)b.ptr;
  size_t len = b.len;
  uint8_t *tmp = malloc(len * 3 + 1);
  if (!tmp) {
    free_bytes(&b);
    return JS_ThrowOutOfMemory(c);
  }
  int bad;
  size_t n = utf8_sanitize(s, len, tmp, &bad);
  free_bytes(&b);
  if (bad && fatal) {
    free(tmp);
    return JS_ThrowTypeError(c, "The encoded data was not valid utf-8");
  }
  JSValue r = JS_NewStringLen(c, (const char *)tmp, n);
  free(tmp);
  return r;
}

/* utf8Encode(string) -> ArrayBuffer; lone surrogates become U+FFFD like TextEncoder. */
static JSValue h_utf8_encode(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t len;
  const char *s = JS_ToCStringLen(c, &len, argv[0]);
  if (!s) return JS_EXCEPTION;
  JSValue ab = JS_NewArrayBufferCopy(c, (const uint8_t *)s, len);
  JS_FreeCString(c, s);
  if (JS_IsException(ab)) return ab;
  size_t size;
  uint8_t *p = JS_GetArrayBuffer(c, &size, ab);
  for (size_t i = 0; p && i + 2 < size; i++)
    if (p[i] == 0xED && p[i + 1] >= 0xA0 && p[i + 1] <= 0xBF) p[i] = 0xEF, p[i + 1] = 0xBF, p[i + 2] = 0xBD;
  return ab;
}

static JSValue h_random_bytes(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  uint32_t n;
  if (JS_ToUint32(c, &n, argv[0])) return JS_EXCEPTION;
  if (n > 65536) return JS_ThrowRangeError(c, "at most 65536 random bytes at a time");
  uint8_t *buf = malloc(n ? n : 1);
  if (!buf) return JS_ThrowOutOfMemory(c);
  for (uint32_t off = 0; off < n; off += 256)
    if (getentropy(buf + off, n - off < 256 ? n - off : 256) != 0) {
      free(buf);
      return JS_ThrowInternalError(c, "no randomness available");
    }
  JSValue ab = JS_NewArrayBufferCopy(c, buf, n);
  free(buf);
  return ab;
}

static JSValue h_environ(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  extern char **environ;
  JSValue obj = JS_NewObject(c);
  for (char **e = environ; e && *e; e++) {
    const char *eq = strchr(*e, '=');
    if (!eq) continue;
    JSValue key = JS_NewStringLen(c, *e, (size_t)(eq - *e));
    JSAtom atom = JS_ValueToAtom(c, key);
    JS_FreeValue(c, key);
    JS_SetProperty(c, obj, atom, JS_NewString(c, eq + 1));
    JS_FreeAtom(c, atom);
  }
  return obj;
}

/* compileModule(source, filename): compile (not run) the user's module; a SyntaxError carries
 * lineNumber and columnNumber (1-based) computed from where the parser stopped. */
static JSValue h_compile_module(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t len;
  const char *src = JS_ToCStringLen(c, &len, argv[0]);
  if (!src) return JS_EXCEPTION;
  const char *name = JS_ToCString(c, argv[1]);
  if (!name) {
    JS_FreeCString(c, src);
    return JS_EXCEPTION;
  }
  js_parse_error_ptr = NULL;
  JSValue fn = JS_Eval(c, src, len, name, JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
  if (JS_IsException(fn)) {
    JSValue exc = JS_GetException(c);
    const uint8_t *at = js_parse_error_ptr;
    if (JS_IsObject(exc) && at && at >= (const uint8_t *)src && at <= (const uint8_t *)src + len) {
      int line = 1, col = 1; /* column in UTF-16 units, like browsers report it */
      for (const uint8_t *p = (const uint8_t *)src; p < at; p++) {
        if (*p == '\n') line++, col = 1;
        else if ((*p & 0xC0) != 0x80) col += (*p >= 0xF0) ? 2 : 1;
      }
      JS_SetPropertyStr(c, exc, "lineNumber", JS_NewInt32(c, line));
      JS_SetPropertyStr(c, exc, "columnNumber", JS_NewInt32(c, col));
    }
    JS_FreeCString(c, name);
    JS_FreeCString(c, src);
    return JS_Throw(c, exc);
  }
  JS_FreeValue(c, fn); /* the module stays registered under its name; evalModule imports it */
  JS_FreeCString(c, name);
  JS_FreeCString(c, src);
  return JS_UNDEFINED;
}

static JSValue h_eval_module(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t len;
  const char *src = JS_ToCStringLen(c, &len, argv[0]);
  if (!src) return JS_EXCEPTION;
  JSValue r = JS_Eval(c, src, len, "<gateway>", JS_EVAL_TYPE_MODULE);
  JS_FreeCString(c, src);
  return r;
}

/* ------------------------------------------------------------------------------------ SHA-1, SHA-256, HMAC
 * For crypto.subtle.digest / sign / verify (HMAC). Straight from FIPS 180-4 and RFC 2104. */

typedef struct {
  uint32_t h[8];
  uint64_t len;
  uint8_t buf[64];
  size_t fill;
  int sha1;
} Sha;

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }
static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static void sha_block(Sha *c, const uint8_t *p) {
  uint32_t w[80];
  for (int i = 0; i < 16; i++) w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  if (c->sha1) {
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3], e = c->h[4];
    for (int i = 0; i < 80; i++) {
      uint32_t f, k;
      if (i < 20) f = (b & cc) | (~b & d), k = 0x5a827999;
      else if (i < 40) f = b ^ cc ^ d, k = 0x6ed9eba1;
      else if (i < 60) f = (b & cc) | (b & d) | (cc & d), k = 0x8f1bbcdc;
      else f = b ^ cc ^ d, k = 0xca62c1d6;
      uint32_t t = rol(a, 5) + f + e + k + w[i];
      e = d, d = cc, cc = rol(b, 30), b = a, a = t;
    }
    c->h[0] += a, c->h[1] += b, c->h[2] += cc, c->h[3] += d, c->h[4] += e;
    return;
  }
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t v[8];
  memcpy(v, c->h, sizeof v);
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = v[7] + (ror(v[4], 6) ^ ror(v[4], 11) ^ ror(v[4], 25)) + ((v[4] & v[5]) ^ (~v[4] & v[6])) + K256[i] + w[i];
    uint32_t t2 = (ror(v[0], 2) ^ ror(v[0], 13) ^ ror(v[0], 22)) + ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]));
    memmove(v + 1, v, 7 * sizeof(uint32_t));
    v[4] += t1;
    v[0] = t1 + t2;
  }
  for (int i = 0; i < 8; i++) c->h[i] += v[i];
}

static void sha_init(Sha *c, int sha1) {
  static const uint32_t h1[5] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0};
  static const uint32_t h256[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memset(c, 0, sizeof *c);
  c->sha1 = sha1;
  memcpy(c->h, sha1 ? h1 : h256, sha1 ? sizeof h1 : sizeof h256);
}

static void sha_update(Sha *c, const uint8_t *p, size_t n) {
  c->len += n;
  while (n) {
    size_t take = 64 - c->fill < n ? 64 - c->fill : n;
    memcpy(c->buf + c->fill, p, take);
    c->fill += take, p += take, n -= take;
    if (c->fill == 64) sha_block(c, c->buf), c->fill = 0;
  }
}

/* Writes 20 (SHA-1) or 32 bytes; returns the length. */
static size_t sha_final(Sha *c, uint8_t *out) {
  uint64_t bits = c->len * 8;
  uint8_t pad = 0x80, zero = 0, lenbuf[8];
  sha_update(c, &pad, 1);
  while (c->fill != 56) sha_update(c, &zero, 1);
  for (int i = 0; i < 8; i++) lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
  sha_update(c, lenbuf, 8);
  size_t words = c->sha1 ? 5 : 8;
  for (size_t i = 0; i < words; i++)
    for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(c->h[i] >> (24 - 8 * j));
  return words * 4;
}

/* digest(sha1: bool, data) -> ArrayBuffer */
static JSValue h_digest(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  Bytes data;
  if (get_bytes(argv[1], &data)) return JS_EXCEPTION;
  Sha ctx;
  uint8_t out[32];
  sha_init(&ctx, JS_ToBool(c, argv[0]));
  sha_update(&ctx, (const uint8_t *)(data.ptr ? data.ptr : ""), data.len);
  free_bytes(&data);
  size_t n = sha_final(&ctx, out);
  return JS_NewArrayBufferCopy(c, out, n);
}

/* hmac(sha1: bool, key, data) -> ArrayBuffer */
static JSValue h_hmac(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  int sha1 = JS_ToBool(c, argv[0]);
  Bytes key, data;
  if (get_bytes(argv[1], &key)) return JS_EXCEPTION;
  if (get_bytes(argv[2], &data)) {
    free_bytes(&key);
    return JS_EXCEPTION;
  }
  uint8_t k[64] = {0}, pad[64], inner[32], out[32];
  Sha ctx;
  if (key.len > 64) {
    sha_init(&ctx, sha1);
    sha_update(&ctx, (const uint8_t *)key.ptr, key.len);
    sha_final(&ctx, k);
  } else if (key.len) {
    memcpy(k, key.ptr, key.len);
  }
  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
  sha_init(&ctx, sha1);
  sha_update(&ctx, pad, 64);
  sha_update(&ctx, (const uint8_t *)(data.ptr ? data.ptr : ""), data.len);
  size_t n = sha_final(&ctx, inner);
  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
  sha_init(&ctx, sha1);
  sha_update(&ctx, pad, 64);
  sha_update(&ctx, inner, n);
  n = sha_final(&ctx, out);
  free_bytes(&key);
  free_bytes(&data);
  return JS_NewArrayBufferCopy(c, out, n);
}

/* jsonTooDeep(text, limit): whether brackets outside strings nest deeper than limit. QuickJS's JSON parser
 * recurses on wasmtime's native stack faster than its stack check notices (a trap at ~5,000 levels), so the
 * prelude refuses such input up front with a SyntaxError a script can catch. */
static JSValue h_json_too_deep(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t len;
  int32_t limit;
  if (JS_ToInt32(c, &limit, argv[1])) return JS_EXCEPTION;
  const char *s = JS_ToCStringLen(c, &len, argv[0]);
  if (!s) return JS_EXCEPTION;
  int32_t depth = 0;
  int in_string = 0, too_deep = 0;
  for (size_t i = 0; i < len && !too_deep; i++) {
    char ch = s[i];
    if (in_string) {
      if (ch == '\\') i++;
      else if (ch == '"') in_string = 0;
    } else if (ch == '"') {
      in_string = 1;
    } else if (ch == '[' || ch == '{') {
      too_deep = ++depth > limit;
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      depth--;
    }
  }
  JS_FreeCString(c, s);
  return JS_NewBool(c, too_deep);
}

/* headerName(string) -> the name lower-cased; TypeError unless it is an HTTP token. */
static JSValue h_header_name(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  /* RFC 9110 tchar: ! # $ % & ' * + - . ^ _ ` | ~ DIGIT ALPHA */
  static const char *tchars = "!#$%&'*+-.^_`|~";
  size_t len;
  const char *s = JS_ToCStringLen(c, &len, argv[0]);
  if (!s) return JS_EXCEPTION;
  int upper = 0, ok = len > 0;
  for (size_t i = 0; i < len && ok; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch >= 'A' && ch <= 'Z') upper = 1;
    else if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || (ch && strchr(tchars, ch)))) ok = 0;
  }
  JSValue r;
  if (!ok) {
    r = JS_ThrowTypeError(c, "Invalid header name: \"%.100s\"", s);
  } else if (!upper) {
    r = JS_DupValue(c, argv[0]);
  } else {
    char *low = malloc(len + 1);
    if (!low) {
      JS_FreeCString(c, s);
      return JS_ThrowOutOfMemory(c);
    }
    for (size_t i = 0; i < len; i++) low[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] + 32) : s[i];
    r = JS_NewStringLen(c, low, len);
    free(low);
  }
  JS_FreeCString(c, s);
  return r;
}

/* headerValue(string) -> without leading/trailing HTTP whitespace; TypeError for NUL, CR, LF or a character
 * above U+00FF (header values are byte strings). */
static JSValue h_header_value(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  size_t len;
  const char *s = JS_ToCStringLen(c, &len, argv[0]);
  if (!s) return JS_EXCEPTION;
  size_t start = 0, end = len;
  while (start < end && (s[start] == ' ' || s[start] == '\t' || s[start] == '\r' || s[start] == '\n')) start++;
  while (end > start && (s[end - 1] == ' ' || s[end - 1] == '\t' || s[end - 1] == '\r' || s[end - 1] == '\n')) end--;
  for (size_t i = start; i < end; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == 0 || ch == '\r' || ch == '\n' || ch >= 0xC4) { /* UTF-8 leads from 0xC4 encode U+0100 and up */
      JS_FreeCString(c, s);
      return JS_ThrowTypeError(c, "Invalid header value (no CR, LF, NUL; characters up to U+00FF only)");
    }
  }
  JSValue r = (start == 0 && end == len) ? JS_DupValue(c, argv[0]) : JS_NewStringLen(c, s + start, end - start);
  JS_FreeCString(c, s);
  return r;
}

static JSValue h_set_hooks(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  return JS_ToInt32(c, &hooks, argv[0]) ? JS_EXCEPTION : JS_UNDEFINED;
}

static JSValue h_arm_timers(JSContext *c, JSValueConst this, int argc, JSValueConst *argv) {
  timers_armed = JS_ToBool(c, argv[0]);
  return JS_UNDEFINED;
}

static const JSCFunctionListEntry host_functions[] = {
    JS_CFUNC_DEF("setHooks", 1, h_set_hooks),
    JS_CFUNC_DEF("digest", 2, h_digest),
    JS_CFUNC_DEF("hmac", 3, h_hmac),
    JS_CFUNC_DEF("headerName", 1, h_header_name),
    JS_CFUNC_DEF("headerValue", 1, h_header_value),
    JS_CFUNC_DEF("jsonTooDeep", 2, h_json_too_deep),
    JS_CFUNC_DEF("armTimers", 1, h_arm_timers),
    JS_CFUNC_DEF("log", 2, h_log),
    JS_CFUNC_DEF("getHeaders", 1, h_get_headers),
    JS_CFUNC_DEF("setHeaders", 2, h_set_headers),
    JS_CFUNC_DEF("getBody", 3, h_get_body),
    JS_CFUNC_DEF("setBody", 3, h_set_body),
    JS_CFUNC_DEF("sendLocalResponse", 4, h_send_local_response),
    JS_CFUNC_DEF("httpCall", 4, h_http_call),
    JS_CFUNC_DEF("continueStream", 1, h_continue_stream),
    JS_CFUNC_DEF("setEffectiveContext", 1, h_set_effective_context),
    JS_CFUNC_DEF("getProperty", 1, h_get_property),
    JS_CFUNC_DEF("utf8Decode", 2, h_utf8_decode),
    JS_CFUNC_DEF("utf8Encode", 1, h_utf8_encode),
    JS_CFUNC_DEF("randomBytes", 1, h_random_bytes),
    JS_CFUNC_DEF("environ", 0, h_environ),
    JS_CFUNC_DEF("compileModule", 2, h_compile_module),
    JS_CFUNC_DEF("evalModule", 1, h_eval_module),
};

/* ------------------------------------------------------------------------------------ Proxy-Wasm exports */

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size ? size : 1); }

static JSValue api_fn(const char *name) { return JS_GetPropertyStr(jc, api, name); }

EXPORT(proxy_on_vm_start) int32_t proxy_on_vm_start(uint32_t root, uint32_t len) {
  rt = JS_NewRuntime();
  if (!rt) return 0;
  /* Deep recursion must end in a catchable InternalError ("stack overflow"), not a trap. Each JS call level
   * takes ~256 bytes of this (linear-memory) stack but ~700 bytes of wasmtime's native stack, which the
   * runtime caps at 512 KiB: 144 KiB stops plain recursion at ~560 levels, before the native stack runs out.
   * (Recursion through native builtins uses more native stack per level and may still trap: the failure
   * policy applies then.) */
  JS_SetMaxStackSize(rt, 144 * 1024);
  jc = JS_NewContext(rt);
  if (!jc) return 0;
#ifdef GW_PRELUDE_BYTECODE
  JSValue factory = JS_ReadObject(jc, prelude_bc, prelude_bc_len, JS_READ_OBJ_BYTECODE);
  if (!JS_IsException(factory)) factory = JS_EvalFunction(jc, factory); /* frees the function */
#else
  JSValue factory = JS_Eval(jc, (const char *)prelude_js, prelude_js_len, "<prelude>", JS_EVAL_TYPE_GLOBAL);
#endif
  if (JS_IsException(factory)) {
    log_exception("js: prelude failed to load");
    return 0;
  }
  JSValue host = JS_NewObject(jc);
  JS_SetPropertyFunctionList(jc, host, host_functions, sizeof(host_functions) / sizeof(host_functions[0]));
  api = JS_Call(jc, factory, JS_UNDEFINED, 1, &host);
  JS_FreeValue(jc, host);
  JS_FreeValue(jc, factory);
  if (JS_IsException(api)) {
    log_exception("js: prelude failed to start");
    return 0;
  }
  fn_configure = api_fn("configure");
  fn_request_headers = api_fn("requestHeaders");
  fn_request_body = api_fn("requestBody");
  fn_response_headers = api_fn("responseHeaders");
  fn_response_body = api_fn("responseBody");
  fn_http_call_response = api_fn("httpCallResponse");
  fn_settle = api_fn("settle");
  fn_delete = api_fn("deleteContext");
  fn_run_timers = api_fn("runTimers");
  return 1;
}

EXPORT(proxy_on_configure) int32_t proxy_on_configure(uint32_t root, uint32_t len) {
  char *ptr = NULL;
  size_t n = 0;
  int32_t st = proxy_get_buffer_bytes(7 /* PLUGIN_CONFIGURATION */, 0, len, &ptr, &n);
  JSValue text = JS_NewStringLen(jc, st == 0 && ptr ? ptr : "", st == 0 ? n : 0);
  free(ptr);
  JSValue r = JS_Call(jc, fn_configure, api, 1, &text);
  JS_FreeValue(jc, text);
  if (JS_IsException(r)) {
    log_exception("js: configuration failed");
    return 0;
  }
  int ok = JS_ToBool(jc, r);
  JS_FreeValue(jc, r);
  if (ok && run_jobs() < 0) return 0;
  return ok;
}

EXPORT(proxy_on_request_headers) int32_t proxy_on_request_headers(uint32_t ctx, uint32_t n, uint32_t eos) {
  if (!(hooks & (HOOK_REQUEST | HOOK_RESPONSE))) return ACT_CONTINUE;
  uint32_t args[2] = {ctx, eos};
  return enter(fn_request_headers, 2, args, ctx);
}

EXPORT(proxy_on_request_body) int32_t proxy_on_request_body(uint32_t ctx, uint32_t size, uint32_t eos) {
  if (!(hooks & HOOK_BUFFER_REQUEST)) return ACT_CONTINUE;
  uint32_t args[3] = {ctx, size, eos};
  return enter(fn_request_body, 3, args, ctx);
}

EXPORT(proxy_on_response_headers) int32_t proxy_on_response_headers(uint32_t ctx, uint32_t n, uint32_t eos) {
  if (!(hooks & HOOK_RESPONSE)) return ACT_CONTINUE;
  uint32_t args[2] = {ctx, eos};
  return enter(fn_response_headers, 2, args, ctx);
}

EXPORT(proxy_on_response_body) int32_t proxy_on_response_body(uint32_t ctx, uint32_t size, uint32_t eos) {
  if (!(hooks & HOOK_BUFFER_RESPONSE)) return ACT_CONTINUE;
  uint32_t args[3] = {ctx, size, eos};
  return enter(fn_response_body, 3, args, ctx);
}

/* A fetch() answer: resolve its promise, run the jobs, and let every stream that settled move on. */
EXPORT(proxy_on_http_call_response)
void proxy_on_http_call_response(uint32_t root, uint32_t token, uint32_t nh, uint32_t body, uint32_t nt) {
  uint32_t args[3] = {token, nh, body};
  enter(fn_http_call_response, 3, args, 0);
}

EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t ctx) {
  if (!(hooks & (HOOK_REQUEST | HOOK_RESPONSE))) return;
  JSValue id = JS_NewInt64(jc, ctx);
  JSValue r = JS_Call(jc, fn_delete, api, 1, &id);
  if (JS_IsException(r)) log_exception("js: cleanup failed");
  JS_FreeValue(jc, r);
}

#ifndef GW_PRELUDE_BYTECODE
/* Build step only: the prelude compiled to bytecode, as [u32 length][bytes] (0 on failure). */
EXPORT(gw_compile_prelude) uint8_t *gw_compile_prelude(void) {
  JSRuntime *r = JS_NewRuntime();
  JSContext *c = JS_NewContext(r);
  JSValue fn = JS_Eval(c, (const char *)prelude_js, prelude_js_len, "<prelude>",
                       JS_EVAL_TYPE_GLOBAL | JS_EVAL_FLAG_COMPILE_ONLY);
  if (JS_IsException(fn)) return 0;
  size_t len = 0;
  uint8_t *bc = JS_WriteObject(c, &len, fn, JS_WRITE_OBJ_BYTECODE);
  if (!bc) return 0;
  uint8_t *out = malloc(len + 4);
  uint32_t n = (uint32_t)len;
  memcpy(out, &n, 4);
  memcpy(out + 4, bc, len);
  return out;
}
#endif
