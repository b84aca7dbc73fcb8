/* Included before every QuickJS source when building for wasm32-wasi (build.py passes -include). */
#include <stddef.h>

/* QuickJS sizes its heap with malloc_usable_size() to decide when to collect cycles. With wasi-libc's the
 * count drifted until a collection ran on every allocation (a filter slowed from 30 us to 2 ms per request
 * after ~500 requests). Answering 0, as QuickJS's Emscripten build does, paces collections by allocation
 * count (8 bytes each) instead; memory stays bounded by the Wasm memory limit either way. */
static inline size_t malloc_usable_size(const void *p) {
  (void)p;
  return 0;
}

/* wasi-libc has no rounding-mode control and so no FE_UPWARD/FE_DOWNWARD; QuickJS passes them to
 * fesetround() while choosing between two candidate digit strings of an exact tie in toFixed/toPrecision.
 * There fesetround() fails and printf rounds to nearest-even, so such a tie may round down (rare). */
#ifndef FE_UPWARD
#define FE_UPWARD 0x800
#endif
#ifndef FE_DOWNWARD
#define FE_DOWNWARD 0x400
#endif
